//! Structured replies and block status on the server side (NBD spec, "Structured replies"
//! and "Metadata querying"): the `OPT_LIST/SET_META_CONTEXT` answers for the one context
//! colo-blk offers, `base:allocation`, and the reply chunks of the transmission phase.
//!
//! Once a client negotiated structured replies, reads are answered with one
//! `NBD_REPLY_TYPE_OFFSET_DATA` chunk (never fragmented, so `NBD_CMD_FLAG_DF` always holds)
//! and read or block-status errors with `NBD_REPLY_TYPE_ERROR`; every other command keeps
//! simple replies, which the spec allows. A block-status answer holds at most
//! [`MAX_EXTENTS`] extents (the client asks again from where it ends), so a request of any
//! length costs the server a bounded amount of memory and extent queries.

use super::wire::*;

/// What a connection negotiated about replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplyMode {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected (`NBD_CMD_BLOCK_STATUS` is answered).
    pub allocation: bool,
    /// The colo-blk checksum extension was acknowledged (`CMD_COLO_CHECKSUM` is answered,
    /// with a simple reply; see [`super::checksum`]).
    pub checksums: bool,
}

/// The id `base:allocation` gets in `SET_META_CONTEXT` answers and block-status chunks.
pub const ALLOCATION_ID: u32 = 1;
/// Most extents in one block-status answer.
pub const MAX_EXTENTS: usize = 1024;

/// A LIST/SET_META_CONTEXT payload: u32 name length, export name, u32 query count, then each
/// query as u32 length and string. `None` when it is malformed (lengths that do not add up
/// to the payload exactly).
pub fn parse_meta_request(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let take_u32 = |d: &[u8], at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(d.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let n = take_u32(d, 0)?;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let mut at = 4 + n;
    let count = take_u32(d, at)?;
    at += 4;
    // Each query takes at least 4 bytes: a count larger than that cannot be honest, and the
    // vector below stays within the payload's size (at most MAX_OPTION).
    if count > (d.len() - at) / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = take_u32(d, at)?;
        at += 4;
        queries.push(d.get(at..at.checked_add(len)?)?);
        at += len;
    }
    (at == d.len()).then_some((name, queries))
}

/// Whether `queries` select `base:allocation`. For a LIST, no query at all or the bare
/// namespace `base:` select it too.
pub fn selects_allocation(queries: &[&[u8]], list: bool) -> bool {
    if list && queries.is_empty() {
        return true;
    }
    queries.iter().any(|q| *q == META_BASE_ALLOCATION.as_bytes() || (list && *q == b"base:"))
}

/// The payload of a `REP_META_CONTEXT` answer naming `base:allocation` with `id`.
pub fn meta_context_reply(id: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    b
}

/// A complete `NBD_REPLY_TYPE_ERROR` reply (the last chunk) with no message.
pub fn error_chunk(handle: u64, code: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + 6);
    b.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6));
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// The header (and offset) of a read's one `OFFSET_DATA` chunk carrying `len` bytes read at
/// `offset`; the data follows it. A zero-length read gets a `NONE` chunk instead (a data
/// chunk must carry data).
pub fn read_chunk_header(handle: u64, offset: u64, len: u32) -> Vec<u8> {
    if len == 0 {
        return chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0).to_vec();
    }
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + 8);
    // `len` is at most MAX_PAYLOAD (32 MiB), so adding 8 cannot overflow.
    b.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, len + 8));
    b.extend_from_slice(&offset.to_be_bytes());
    b
}

/// A complete block-status reply for `base:allocation`: `extents` are `(length, hole)` with
/// lengths that fit 32 bits (they lie within one request's length); holes read as zeroes.
pub fn block_status_chunk(handle: u64, extents: &[(u64, bool)]) -> Vec<u8> {
    let payload = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + payload);
    // At most MAX_EXTENTS extents: the payload length fits 32 bits.
    b.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, payload as u32));
    b.extend_from_slice(&ALLOCATION_ID.to_be_bytes());
    for &(len, hole) in extents {
        b.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        b.extend_from_slice(&(if hole { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn meta_requests_parse_and_select() {
        let d = meta(b"exp", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let (name, q) = parse_meta_request(&d).unwrap();
        assert_eq!(name, b"exp");
        assert!(selects_allocation(&q, false));
        let d = meta(b"", &[]);
        let (_, q) = parse_meta_request(&d).unwrap();
        assert!(selects_allocation(&q, true) && !selects_allocation(&q, false));
        assert!(selects_allocation(&[b"base:"], true) && !selects_allocation(&[b"base:"], false));
        assert!(!selects_allocation(&[b"qemu:allocation-depth"], true));
        // Malformed: trailing bytes, truncated query, a count far beyond the payload.
        let mut bad = meta(b"exp", &[b"base:allocation"]);
        bad.push(0);
        assert!(parse_meta_request(&bad).is_none());
        let bad = meta(b"exp", &[b"base:allocation"]);
        assert!(parse_meta_request(&bad[..bad.len() - 1]).is_none());
        let mut bad = meta(b"exp", &[]);
        let at = bad.len() - 4;
        bad[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&bad).is_none());
        assert!(parse_meta_request(&[0, 0, 0, 9, 1]).is_none());
        assert!(parse_meta_request(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }

    #[test]
    fn chunk_layouts() {
        let e = error_chunk(7, EINVAL);
        assert_eq!(e.len(), 26);
        assert_eq!(u32::from_be_bytes(e[20..24].try_into().unwrap()), EINVAL);
        let r = read_chunk_header(7, 4096, 512);
        assert_eq!(u32::from_be_bytes(r[16..20].try_into().unwrap()), 520);
        assert_eq!(u64::from_be_bytes(r[20..28].try_into().unwrap()), 4096);
        assert_eq!(read_chunk_header(7, 0, 0).len(), 20);
        let b = block_status_chunk(7, &[(4096, true), (512, false)]);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(u32::from_be_bytes(b[28..32].try_into().unwrap()), STATE_HOLE | STATE_ZERO);
        assert_eq!(u32::from_be_bytes(b[36..40].try_into().unwrap()), 0);
    }
}
