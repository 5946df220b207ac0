//! A table of values indexed by small integers that reuses freed slots: the in-flight tables
//! of the engines and the stack's layers (no allocation per request once warm, and an index
//! fits in a request's token).

/// See the module documentation.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slab<T> {
    /// An empty table with room for `n` values before it grows.
    pub fn with_capacity(n: usize) -> Self {
        Slab { slots: Vec::with_capacity(n), free: Vec::new() }
    }

    /// Stores `value`; returns its index.
    pub fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(value);
                i
            }
            None => {
                self.slots.push(Some(value));
                self.slots.len() - 1
            }
        }
    }

    /// Takes the value at `index` out (None if there is none).
    pub fn remove(&mut self, index: usize) -> Option<T> {
        let v = self.slots.get_mut(index)?.take();
        if v.is_some() {
            self.free.push(index);
        }
        v
    }

    /// The value at `index`.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.slots.get(index)?.as_ref()
    }

    /// The value at `index`, mutably.
    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.slots.get_mut(index)?.as_mut()
    }

    /// How many values are stored.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// True when no value is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every stored value, mutably.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().flatten()
    }

    /// Every stored value.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().flatten()
    }

    /// Empties the table without running anything on the values (they are leaked): for a
    /// table whose values the kernel may still use.
    pub fn leak(&mut self) {
        std::mem::forget(std::mem::take(&mut self.slots));
        self.free.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_indexes_are_reused_and_double_removal_is_harmless() {
        let mut s = Slab::default();
        let (a, b) = (s.insert('a'), s.insert('b'));
        assert_eq!(s.remove(a), Some('a'));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.len(), 1);
        let c = s.insert('c');
        assert_eq!(c, a, "a freed index is reused");
        assert_eq!(s.get(b), Some(&'b'));
        assert_eq!(s.values().count(), 2);
        assert_eq!(s.remove(99), None);
    }
}
