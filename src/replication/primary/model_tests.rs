//! Model-based tests of the primary mirror: the join of a guest write's local and remote
//! halves ([`MirrorDevice`]'s queue), and the resync's ordering rule (resync.rs).
//!
//! The local half is an in-memory queue the test completes by hand, in any order and with
//! any result; the remote half is a [`Link`] whose requests the test receives from the
//! link's channel and answers through [`Mirror::on_reply`] (or cuts with
//! [`Mirror::fail_link`]), also in any order. Everything runs on the test thread except the
//! resync copy, which blocks on its replies in a thread of its own while the test decides
//! when the secondary applies and answers them.
use super::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Condvar, atomic::AtomicBool};

use super::link::Link;
use super::resync::RESYNC_DEPTH;
use crate::block::{
    BlockDevice, BlockError, BlockQueue, Buffers, Completion, IoEngineError, IoRequest, Rejected, WorkerCompletions,
};
use crate::nbd::client::Reply;
use crate::nbd::transport::Stream;
use crate::nbd::wire::Request;

const DEADLINE: Duration = Duration::from_secs(30);

use crate::test_rng::Rng;

// ---- the local half: an in-memory queue completed by the test -------------------------------

/// A request the local queue holds until the test completes it.
struct LocalReq {
    /// The request the mirror queue pushed (its token is the queue's own for a joined request).
    request: IoRequest,
    /// The guest token it belongs to (set by the test right after the push).
    guest: u64,
    offset: u64,
    /// A write's bytes, copied from the iovecs at push time.
    data: Option<Vec<u8>>,
}

#[derive(Default)]
struct Local {
    pending: Vec<LocalReq>,
    done: Vec<Completion>,
}

struct FakeQueue(Arc<Mutex<Local>>);

impl BlockQueue for FakeQueue {
    fn push(&mut self, request: IoRequest) -> Result<(), Box<Rejected>> {
        let offset = match request.kind {
            OpKind::Write { offset, .. } | OpKind::Read { offset } => offset,
            OpKind::Discard { offset, .. } | OpKind::WriteZeroes { offset, .. } => offset,
            OpKind::Flush => 0,
        };
        let data = matches!(request.kind, OpKind::Write { .. }).then(|| {
            let mut d = vec![0u8; request.bufs.len() as usize];
            request.bufs.copy_to(&mut d);
            d
        });
        lock(&self.0).pending.push(LocalReq { request, guest: u64::MAX, offset, data });
        Ok(())
    }
    fn submit(&mut self) -> Result<(), IoEngineError> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut lock(&self.0).done);
    }
}

struct FakeDevice {
    size: u64,
    local: Arc<Mutex<Local>>,
}

impl BlockDevice for FakeDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn open_queue(
        &self,
        _depth: u32,
        _completions: &Arc<WorkerCompletions>,
    ) -> Result<Box<dyn BlockQueue>, BlockError> {
        Ok(Box::new(FakeQueue(self.local.clone())))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "in-memory test queue".into()
    }
}

// ---- the remote half: a link whose requests the test answers --------------------------------

struct TestLink {
    link: Arc<Link>,
    rx: mpsc::Receiver<(Request, Payload)>,
    _peer: UnixStream,
}

/// Installs a fresh link on `m` (a reconnect); its requests arrive on the returned receiver.
fn connect(m: &Mirror) -> TestLink {
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    let link = Arc::new(Link {
        tx,
        ctl: Stream::Unix(a),
        pending: Mutex::new(HashMap::new()),
        drained: Condvar::new(),
        broken: AtomicBool::new(false),
        why: Default::default(),
        colo: false,
        write_zeroes: false,
        checksum_max: 0,
    });
    *lock(&m.link.current) = Some(link.clone());
    TestLink { link, rx, _peer: b }
}

/// A running mirror of a `size`-byte temporary file and one guest queue on the fake local
/// device.
fn mirror(size: u64, file: std::fs::File) -> (Arc<Mirror>, Box<dyn BlockQueue>, Arc<Mutex<Local>>) {
    let cfg = MirrorConfig { secondary: None, timeout: DEADLINE, tls: None };
    let m = Mirror::new(Arc::new(file), size, cfg);
    m.set_stage(Stage::Running);
    let local = Arc::new(Mutex::new(Local::default()));
    let dev = MirrorDevice { inner: Arc::new(FakeDevice { size, local: local.clone() }), mirror: m.clone() };
    let q = dev.open_queue(64, &WorkerCompletions::new().unwrap()).unwrap();
    (m, q, local)
}

/// A guest buffer holding `data` (owned, so the request may outlive the test's step).
fn guest_buffers(data: &[u8]) -> Buffers {
    let mut b = crate::io::aligned::AlignedBuf::zeroed(data.len());
    b.copy_from_slice(data);
    Buffers::from_aligned(b)
}

fn dirty_bits(m: &Mirror) -> Vec<bool> {
    (0..m.size / SECTOR).map(|s| m.dirty.count(s, s + 1) == 1).collect()
}

// ---- 1. the join of the local and remote halves ---------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zeroes,
    Discard,
    Flush,
}

/// A guest request in the model.
struct Guest {
    kind: Kind,
    sectors: (u64, u64),
    data: Option<Vec<u8>>,
    /// The local half's result, once completed.
    local: Option<i32>,
    /// The remote half completed (successfully or not).
    remote_done: bool,
    reported: bool,
}

/// Random guest requests, local completions (some failing), secondary answers (some errors),
/// link cuts and reconnects in a random order. After every step:
/// - a guest request has completed (been reaped) exactly when both its halves did, once;
/// - its result is the local half's result, whatever the remote half did (a read, which is
///   not mirrored, completes with its local half);
/// - the dirty bitmap holds exactly the ranges whose remote half failed (an error answer,
///   pending when the link was cut, or no link when forwarded) or whose *local* half failed
///   (the secondary may have taken bytes the local disk lacks: a resync must copy the
///   range); flushes dirty nothing.
/// - a forwarded write carries the bytes the local half was written with, which are the
///   guest's.
fn join_seed(seed: u64) {
    const SECTORS: u64 = 256;
    let size = SECTORS * SECTOR;
    let f = tempfile::tempfile().unwrap();
    f.set_len(size).unwrap();
    let (m, mut q, local) = mirror(size, f);
    let mut rng = Rng(seed);
    let mut link = Some(connect(&m));
    let mut guests: BTreeMap<u64, Guest> = BTreeMap::new();
    // Remote requests pending: handle -> guest token.
    let mut remote: BTreeMap<u64, u64> = BTreeMap::new();
    let mut must_dirty = vec![false; SECTORS as usize];
    let mut next_token = 1u64;
    let mut out = Vec::new();
    for step in 0..400 {
        let ctx = format!("seed {seed} step {step}");
        let remote_failed = |g: &Guest, must: &mut Vec<bool>| {
            if g.kind != Kind::Flush {
                must[g.sectors.0 as usize..g.sectors.1 as usize].fill(true);
            }
        };
        match rng.below(100) {
            0..=34 => {
                // A new guest request.
                let kind =
                    [Kind::Write, Kind::Write, Kind::Write, Kind::Zeroes, Kind::Discard, Kind::Flush, Kind::Read]
                        [rng.below(7) as usize];
                let s0 = rng.below(SECTORS);
                let n = 1 + rng.below(16).min(SECTORS - s0 - 1);
                let (offset, len) = (s0 * SECTOR, n * SECTOR);
                let data = rng.bytes(len as usize);
                let (op, bufs) = match kind {
                    Kind::Read => (OpKind::Read { offset }, guest_buffers(&data)),
                    Kind::Write => (OpKind::Write { offset, dsync: rng.below(2) == 0 }, guest_buffers(&data)),
                    Kind::Zeroes => (OpKind::WriteZeroes { offset, len, unmap: rng.below(2) == 0 }, Buffers::none()),
                    Kind::Discard => (OpKind::Discard { offset, len }, Buffers::none()),
                    Kind::Flush => (OpKind::Flush, Buffers::none()),
                };
                let token = next_token;
                next_token += 1;
                q.push(IoRequest::new(token, op, bufs)).unwrap();
                let guest_data = (kind == Kind::Write).then(|| data.clone());
                {
                    let mut l = lock(&local);
                    let r = l.pending.last_mut().expect("the local half was submitted");
                    r.guest = token;
                    if kind == Kind::Write {
                        assert_eq!(r.data, guest_data, "{ctx}: the local write's bytes are not the guest's");
                    }
                }
                let sectors = if kind == Kind::Flush { (0, 0) } else { (s0, s0 + n) };
                let mut g = Guest { kind, sectors, data: guest_data, local: None, remote_done: false, reported: false };
                if kind == Kind::Read {
                    // Not mirrored: nothing to wait for on the secondary.
                    g.remote_done = true;
                } else {
                    match link.as_ref().map(|l| l.rx.try_recv()) {
                        Some(Ok((req, payload))) => {
                            let (cmd, plen) = match kind {
                                Kind::Write => (CMD_WRITE, len as usize),
                                Kind::Zeroes => (CMD_WRITE_ZEROES, 0),
                                Kind::Discard => (CMD_TRIM, 0),
                                _ => (CMD_FLUSH, 0),
                            };
                            assert_eq!(req.cmd, cmd, "{ctx}");
                            if kind != Kind::Flush {
                                assert_eq!((req.offset, u64::from(req.length)), (offset, len), "{ctx}");
                            }
                            assert_eq!(payload.len(), plen, "{ctx}");
                            if let Some(d) = &g.data {
                                assert!(payload[..] == d[..], "{ctx}: the forwarded bytes are not the guest's");
                            }
                            remote.insert(req.handle, token);
                        }
                        // No usable link: the remote half completed at once, as a failure.
                        _ => {
                            assert!(link.as_ref().is_none_or(|l| l.link.broken.load(Ordering::Acquire)), "{ctx}");
                            g.remote_done = true;
                            remote_failed(&g, &mut must_dirty);
                        }
                    }
                }
                guests.insert(token, g);
            }
            35..=59 => {
                // The local half of a pending request completes (one in ten fails).
                let mut l = lock(&local);
                if l.pending.is_empty() {
                    continue;
                }
                let i = rng.pick(&l.pending);
                let r = l.pending.remove(i);
                let g = guests.get_mut(&r.guest).unwrap();
                let result = if rng.below(10) == 0 {
                    -libc::EIO
                } else {
                    match g.kind {
                        Kind::Read | Kind::Write => ((g.sectors.1 - g.sectors.0) * SECTOR) as i32,
                        _ => 0,
                    }
                };
                if result < 0 && matches!(g.kind, Kind::Write | Kind::Zeroes | Kind::Discard) {
                    must_dirty[g.sectors.0 as usize..g.sectors.1 as usize].fill(true);
                }
                g.local = Some(result);
                l.done.push(Completion { request: r.request, result });
            }
            60..=89 => {
                // The secondary answers a pending request (one in five with EIO).
                let (Some(l), false) = (&link, remote.is_empty()) else { continue };
                let keys: Vec<u64> = remote.keys().copied().collect();
                let handle = keys[rng.pick(&keys)];
                let token = remote.remove(&handle).unwrap();
                let error = if rng.below(5) == 0 { crate::nbd::wire::EIO } else { 0 };
                m.on_reply(&l.link, Reply { error, handle }, None);
                let g = guests.get_mut(&token).unwrap();
                g.remote_done = true;
                if error != 0 {
                    remote_failed(g, &mut must_dirty);
                }
            }
            90..=94 => {
                // The link is cut: every pending request fails over to the dirty bitmap.
                if let Some(l) = &link {
                    m.fail_link(&l.link, "cut by the test");
                    for (_, token) in std::mem::take(&mut remote) {
                        let g = guests.get_mut(&token).unwrap();
                        g.remote_done = true;
                        remote_failed(g, &mut must_dirty);
                    }
                }
            }
            _ => {
                // Reconnect (or, with a link up, drop it the way `disconnect` does).
                if link.as_ref().is_some_and(|l| !l.link.broken.load(Ordering::Acquire)) {
                    m.disconnect();
                    link = None;
                    for (_, token) in std::mem::take(&mut remote) {
                        let g = guests.get_mut(&token).unwrap();
                        g.remote_done = true;
                        remote_failed(g, &mut must_dirty);
                    }
                } else {
                    link = Some(connect(&m));
                }
            }
        }
        // Reap and compare with the model.
        out.clear();
        q.reap(&mut out);
        let mut seen = HashSet::new();
        for c in &out {
            let g = guests
                .get_mut(&c.token())
                .unwrap_or_else(|| panic!("{ctx}: completion for unknown token {}", c.token()));
            assert!(seen.insert(c.token()) && !g.reported, "{ctx}: token {} completed twice", c.token());
            assert!(
                g.local.is_some() && g.remote_done,
                "{ctx}: {:?} token {} completed with local {:?}, remote done {}",
                g.kind,
                c.token(),
                g.local,
                g.remote_done
            );
            assert_eq!(
                Some(c.result),
                g.local,
                "{ctx}: {:?} token {}: the guest's result is not the local one",
                g.kind,
                c.token()
            );
            g.reported = true;
        }
        for (token, g) in &guests {
            assert!(
                g.reported || g.local.is_none() || !g.remote_done,
                "{ctx}: {:?} token {token} has both halves done but was not completed",
                g.kind
            );
        }
        guests.retain(|_, g| !g.reported);
        let dirty = dirty_bits(&m);
        for s in 0..SECTORS as usize {
            assert!(!must_dirty[s] || dirty[s], "{ctx}: sector {s}: the secondary missed a write but it is not dirty");
            assert!(
                must_dirty[s] || !dirty[s],
                "{ctx}: sector {s} is dirty but every write to it reached the secondary"
            );
        }
    }
}

#[test]
fn mirrored_write_completes_when_both_halves_did_with_the_local_result() {
    for seed in 0..40 {
        join_seed(seed);
    }
}

// ---- 2. the resync ordering rule ------------------------------------------------------------

/// The dirty bitmap's runs.
fn runs(m: &Mirror) -> usize {
    let (mut runs, mut s) = (0, 0);
    while let Some((_, b)) = m.dirty.next_set_run(s, m.size / SECTOR) {
        runs += 1;
        s = b;
    }
    runs
}

/// How many chunks `copy_chunks` sends for the bitmap as it is, when nothing changes it
/// meanwhile (on a disk smaller than a chunk, without WRITE_ZEROES: one request per dirty
/// run, at most [`RESYNC_DEPTH`]).
fn expected_chunks(m: &Mirror) -> usize {
    runs(m).min(RESYNC_DEPTH)
}

/// A request on its way to the secondary: applied (or not yet), answered (or not yet).
struct Remote {
    req: Request,
    payload: Payload,
    /// The guest token, or `None` for a resync chunk.
    guest: Option<u64>,
    applied: bool,
}

/// Resync rounds racing guest writes. Each round seeds a few dirty ranges (the secondary's
/// copy of them is garbage, as after missed writes), starts a resync copy of them (the real
/// `copy_chunks`, which clears the bits and reads the local disk before it sends), and then
/// interleaves at random: new guest writes (never overlapping one still in flight, as a guest
/// orders its own writes), local completions (the local disk changes then), and the secondary
/// applying any request — guest write or resync chunk — in any order. Chunk answers come
/// last, then the copy returns; the writes still in flight then finish. At that point, for
/// every sector, the secondary holds the local disk's bytes or the sector is dirty (the next
/// resync copies it): an older resync copy is never the last word. A final resync makes the
/// two disks equal.
fn resync_seed(seed: u64) {
    const SECTORS: u64 = 256;
    let size = SECTORS * SECTOR;
    let mut rng = Rng(seed);
    let f = tempfile::tempfile().unwrap();
    let initial = rng.bytes(size as usize);
    FileExt::write_all_at(&f, &initial, 0).unwrap();
    let disk = f.try_clone().unwrap();
    let (m, mut q, local) = mirror(size, f);
    let tl = connect(&m);
    let mut secondary = initial;
    let mut next_token = 1u64;
    // Guest writes in flight: token -> sectors.
    let mut inflight: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut remotes: BTreeMap<u64, Remote> = BTreeMap::new();
    let mut out = Vec::new();

    let apply = |secondary: &mut Vec<u8>, r: &mut Remote| {
        if !r.applied {
            assert_eq!(r.req.cmd, CMD_WRITE);
            secondary[r.req.offset as usize..][..r.payload.len()].copy_from_slice(&r.payload);
            r.applied = true;
        }
    };
    for round in 0..30 {
        let ctx = format!("seed {seed} round {round}");
        // Missed writes: the secondary has garbage where the bitmap is dirty.
        for _ in 0..1 + rng.below(3) {
            let s0 = rng.below(SECTORS);
            let n = 1 + rng.below(12).min(SECTORS - s0 - 1);
            m.dirty.set(s0, s0 + n);
            let junk = rng.bytes((n * SECTOR) as usize);
            secondary[(s0 * SECTOR) as usize..][..junk.len()].copy_from_slice(&junk);
        }
        // At least RESYNC_DEPTH separate runs: the copy then sends exactly that many chunks
        // and stops, whatever the race below dirties meanwhile (with fewer, whether it picks
        // up a run dirtied after its last send would be a matter of timing).
        while runs(&m) < RESYNC_DEPTH {
            let s = 1 + rng.below(SECTORS - 2);
            if m.dirty.count(s - 1, s + 2) == 0 {
                m.dirty.set(s, s + 1);
                let junk = rng.bytes(SECTOR as usize);
                secondary[(s * SECTOR) as usize..][..junk.len()].copy_from_slice(&junk);
            }
        }
        let chunks = RESYNC_DEPTH;
        let first = m.dirty.next_set_run(0, SECTORS).unwrap();
        let copier = {
            let m = m.clone();
            std::thread::spawn(move || m.copy_chunks(first))
        };
        // The copy's requests: once they are all here, it has cleared the bits and read the
        // local disk for each chunk.
        let mut chunk_handles = Vec::new();
        for _ in 0..chunks {
            let (req, payload) =
                tl.rx.recv_timeout(DEADLINE).unwrap_or_else(|e| panic!("{ctx}: resync chunk not sent: {e}"));
            chunk_handles.push(req.handle);
            remotes.insert(req.handle, Remote { req, payload, guest: None, applied: false });
        }
        // The race, in a random order. Chunk answers are held back until the end.
        for step in 0..20 + rng.below(20) {
            let ctx = format!("{ctx} step {step}");
            match rng.below(3) {
                0 => {
                    let s0 = rng.below(SECTORS);
                    let n = 1 + rng.below(12).min(SECTORS - s0 - 1);
                    if inflight.values().any(|&(a, b)| a < s0 + n && s0 < b) {
                        continue;
                    }
                    let data = rng.bytes((n * SECTOR) as usize);
                    let token = next_token;
                    next_token += 1;
                    let write = OpKind::Write { offset: s0 * SECTOR, dsync: false };
                    q.push(IoRequest::new(token, write, guest_buffers(&data))).unwrap();
                    lock(&local).pending.last_mut().unwrap().guest = token;
                    let (req, payload) = tl.rx.try_recv().unwrap_or_else(|e| panic!("{ctx}: write not forwarded: {e}"));
                    remotes.insert(req.handle, Remote { req, payload, guest: Some(token), applied: false });
                    inflight.insert(token, (s0, s0 + n));
                }
                1 => {
                    // A local half completes: the local disk changes now.
                    let mut l = lock(&local);
                    if l.pending.is_empty() {
                        continue;
                    }
                    let i = rng.pick(&l.pending);
                    let r = l.pending.remove(i);
                    let data = r.data.as_ref().unwrap();
                    FileExt::write_all_at(&disk, data, r.offset).unwrap();
                    l.done.push(Completion { result: data.len() as i32, request: r.request });
                }
                _ => {
                    // The secondary applies a request; a guest write's answer may follow.
                    let pending: Vec<u64> = remotes.iter().filter(|(_, r)| !r.applied).map(|(&h, _)| h).collect();
                    if pending.is_empty() {
                        continue;
                    }
                    let h = pending[rng.pick(&pending)];
                    apply(&mut secondary, remotes.get_mut(&h).unwrap());
                    if remotes[&h].guest.is_some() && rng.below(2) == 0 {
                        remotes.remove(&h);
                        m.on_reply(&tl.link, Reply { error: 0, handle: h }, None);
                    }
                }
            }
            out.clear();
            q.reap(&mut out);
            for c in &out {
                assert!(c.result >= 0, "{ctx}");
                inflight.remove(&c.token());
            }
        }
        // The secondary applies and answers the chunks; the copy finishes.
        for h in chunk_handles {
            let mut r = remotes.remove(&h).unwrap();
            apply(&mut secondary, &mut r);
            m.on_reply(&tl.link, Reply { error: 0, handle: h }, None);
        }
        assert!(copier.join().unwrap(), "{ctx}: the resync copy failed");
        // The writes still in flight finish, their halves in a random order.
        loop {
            let (pending_local, pending_remote) = (lock(&local).pending.len(), remotes.len());
            if pending_local + pending_remote == 0 {
                break;
            }
            if pending_remote == 0 || (pending_local > 0 && rng.below(2) == 0) {
                let mut l = lock(&local);
                let r = l.pending.remove(0);
                let data = r.data.as_ref().unwrap();
                FileExt::write_all_at(&disk, data, r.offset).unwrap();
                l.done.push(Completion { result: data.len() as i32, request: r.request });
            } else {
                let h = *remotes.keys().nth(rng.below(pending_remote as u64) as usize).unwrap();
                let mut r = remotes.remove(&h).unwrap();
                apply(&mut secondary, &mut r);
                m.on_reply(&tl.link, Reply { error: 0, handle: h }, None);
            }
        }
        out.clear();
        q.reap(&mut out);
        for c in &out {
            inflight.remove(&c.token());
        }
        assert!(inflight.is_empty(), "{ctx}: writes never completed: {inflight:?}");
        // The rule: where the secondary differs from the local disk, the sector is dirty.
        let mut local_now = vec![0u8; size as usize];
        FileExt::read_exact_at(&disk, &mut local_now, 0).unwrap();
        for (s, dirty) in dirty_bits(&m).into_iter().enumerate() {
            let sector = s * SECTOR as usize..(s + 1) * SECTOR as usize;
            assert!(
                dirty || secondary[sector.clone()] == local_now[sector],
                "{ctx}: sector {s} differs on the secondary (an older copy landed last) and is not dirty"
            );
        }
    }
    // A final resync, answered in order, leaves nothing behind.
    while let Some(first) = m.dirty.next_set_run(0, SECTORS) {
        let chunks = expected_chunks(&m);
        let copier = {
            let m = m.clone();
            std::thread::spawn(move || m.copy_chunks(first))
        };
        for _ in 0..chunks {
            let (req, payload) = tl.rx.recv_timeout(DEADLINE).expect("resync chunk not sent");
            let mut r = Remote { req, payload, guest: None, applied: false };
            apply(&mut secondary, &mut r);
            m.on_reply(&tl.link, Reply { error: 0, handle: r.req.handle }, None);
        }
        assert!(copier.join().unwrap());
    }
    let mut local_now = vec![0u8; size as usize];
    FileExt::read_exact_at(&disk, &mut local_now, 0).unwrap();
    assert!(secondary == local_now, "seed {seed}: the disks differ after the final resync");
}

#[test]
fn resync_copy_never_overwrites_a_newer_guest_write_for_good() {
    for seed in 0..60 {
        resync_seed(seed);
    }
}
