//! A minimal virtio-blk driver + vhost-user frontend built on the `vhost` crate's frontend
//! side, for replaying exactly the message sequences QEMU sends (COLO checkpoints restart
//! the device with dirty logging) and for checking the dirty log the backend writes.
//!
//! Guest memory is a memfd shared with the backend (guest physical address 0 = offset 0); the
//! test writes descriptors and rings into it by hand, so every byte the backend reads or
//! writes can be inspected.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM size.
pub const MEM: u64 = 4 << 20;
/// Virtqueue size.
pub const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Request slots: header at +0, data at +0x1000 (up to 56 KiB), status at +0xF000.
const SLOT_BASE: u64 = 0x10000;
const SLOT_SIZE: u64 = 0x10000;
const SLOTS: u16 = 5;
/// Dirty log granularity (vhost-user: one bit per 4 KiB page).
pub const PAGE: u64 = 4096;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL.
pub const LOG_ALL: u64 = 1 << 26;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = 1 << 29;
/// Guest physical address of the avail ring (queue 0).
pub const AVAIL_GPA: u64 = AVAIL;
/// Guest physical address of the descriptor table (queue 0).
pub const DESC_GPA: u64 = DESC;

/// virtio-blk request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;

/// A shared memory file mapped into the test.
pub struct SharedMem {
    pub file: File,
    ptr: *mut u8,
    size: u64,
}

impl SharedMem {
    pub fn new(size: u64) -> SharedMem {
        // SAFETY: plain syscalls with valid arguments; the fd is owned by `file`.
        unsafe {
            let fd = libc::memfd_create(c"colo-blk-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create");
            let file = File::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd, size as i64), 0);
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            SharedMem { file, ptr: ptr as *mut u8, size }
        }
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn write(&self, off: u64, data: &[u8]) {
        assert!(off + data.len() as u64 <= self.size);
        // SAFETY: in bounds of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off as usize), data.len()) }
    }

    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        assert!(off + len as u64 <= self.size);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off as usize), v.as_mut_ptr(), len) }
        v
    }

    /// Volatile 16-bit read (ring indexes the backend updates).
    pub fn read_u16(&self, off: u64) -> u16 {
        // SAFETY: in bounds, 2-aligned.
        unsafe { std::ptr::read_volatile(self.ptr.add(off as usize) as *const u16) }
    }

    pub fn write_u16(&self, off: u64, v: u16) {
        // SAFETY: in bounds, 2-aligned.
        unsafe { std::ptr::write_volatile(self.ptr.add(off as usize) as *mut u16, v) }
    }

    /// Copies all of `other` (what a checkpoint does to the secondary's RAM).
    pub fn copy_from(&self, other: &SharedMem) {
        assert_eq!(self.size, other.size);
        self.write(0, &other.read(0, other.size as usize));
    }

    /// Clears every byte.
    pub fn clear(&self) {
        self.write(0, &vec![0u8; self.size as usize]);
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.size as usize) };
    }
}

/// One virtio-blk device driven through vhost-user, queue 0 only.
pub struct BlkFrontend {
    pub fe: Frontend,
    pub mem: SharedMem,
    pub log: SharedMem,
    kick: EventFd,
    call: EventFd,
    features: u64,
    next_avail: u16,
    used_seen: u16,
    seq: u64,
    /// The inflight-tracking region the backend gave us (kept across its restarts).
    inflight: Option<(VhostUserInflight, File)>,
}

/// A completed request: its status byte and (for reads) the data.
#[derive(Debug)]
pub struct Done {
    pub status: u8,
    pub data: Vec<u8>,
}

impl BlkFrontend {
    /// Consumes any kick the backend has not read yet (as if the backend that died had
    /// read it): a restarted backend must then find the ring's work without one.
    pub fn clear_kick(&self) {
        let _ = self.kick.read();
    }

    /// Connects and initialises the device the way QEMU does for a fresh VM.
    pub fn connect(socket: &Path) -> BlkFrontend {
        Self::connect_with(socket, false)
    }

    /// Like [`connect`], also setting up inflight tracking as QEMU's vhost-user-blk does
    /// (GET_INFLIGHT_FD, then SET_INFLIGHT_FD, before the rings start).
    pub fn connect_inflight(socket: &Path) -> BlkFrontend {
        Self::connect_with(socket, true)
    }

    fn handshake(socket: &Path, inflight: bool) -> (Frontend, u64) {
        Self::handshake_features(socket, inflight, 0)
    }

    fn handshake_features(socket: &Path, inflight: bool, extra: u64) -> (Frontend, u64) {
        Self::handshake_protocol(socket, inflight, extra, VhostUserProtocolFeatures::empty())
    }

    fn handshake_protocol(
        socket: &Path,
        inflight: bool,
        extra: u64,
        extra_protocol: VhostUserProtocolFeatures,
    ) -> (Frontend, u64) {
        let mut fe = Frontend::connect(socket, 16).expect("vhost-user connect");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert!(offered & LOG_ALL != 0, "backend does not offer VHOST_F_LOG_ALL");
        let features = offered & (VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | extra);
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::LOG_SHMFD), "backend lacks LOG_SHMFD");
        let mut want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD;
        if inflight {
            assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD), "backend lacks INFLIGHT_SHMFD");
            want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        assert!(pf.contains(extra_protocol), "backend lacks {:?}", extra_protocol - pf);
        want |= extra_protocol;
        fe.set_protocol_features(pf & want).unwrap();
        // Every later message waits for the backend's answer, as QEMU's do while logging.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        (fe, features)
    }

    fn set_mem(&mut self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: self.mem.addr(),
            mmap_offset: 0,
            mmap_handle: self.mem.file.as_raw_fd(),
        };
        self.fe.set_mem_table(&[region]).unwrap();
    }

    /// The backend died and was restarted: reconnect the way QEMU does with
    /// `reconnect-ms`: same guest memory, the saved inflight region handed back, and each
    /// queue restarted at the used index (the backend resubmits what it had in flight).
    pub fn reconnect(self, socket: &Path) -> BlkFrontend {
        let BlkFrontend { mem, log, kick, call, features: _, next_avail, used_seen: _, seq, inflight, fe: old } = self;
        drop(old);
        let (fe, features) = Self::handshake(socket, inflight.is_some());
        let mut f = BlkFrontend { fe, mem, log, kick, call, features, next_avail, used_seen: 0, seq, inflight };
        f.set_mem();
        if let Some((info, file)) = &f.inflight {
            f.fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        }
        let used = f.mem.read_u16(USED + 2);
        f.used_seen = used;
        f.start_queue(used, false);
        f
    }

    fn connect_with(socket: &Path, inflight: bool) -> BlkFrontend {
        Self::connect_full(socket, inflight, 0)
    }

    /// Like [`connect`], also negotiating the virtio feature bits `extra` (those the backend
    /// offers), e.g. [`EVENT_IDX`].
    pub fn connect_features(socket: &Path, extra: u64) -> BlkFrontend {
        Self::connect_full(socket, false, extra)
    }

    /// Like [`connect`], also negotiating VHOST_USER_PROTOCOL_F_BACKEND_REQ and handing the
    /// backend its request channel (SET_BACKEND_REQ_FD), as QEMU does; the frontend's end
    /// of the channel is returned.
    pub fn connect_backend_req(socket: &Path) -> (BlkFrontend, BackendReqEnd) {
        Self::connect_backend_req_with(socket, None)
    }

    /// [`connect_backend_req`], first giving the backend's end of the channel a send buffer
    /// of `sndbuf` bytes (a small one fills after a few unread messages).
    pub fn connect_backend_req_with(socket: &Path, sndbuf: Option<libc::c_int>) -> (BlkFrontend, BackendReqEnd) {
        let (mut fe, features) = Self::handshake_protocol(socket, false, 0, VhostUserProtocolFeatures::BACKEND_REQ);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        if let Some(size) = sndbuf {
            // SAFETY: a valid socket and an int-sized option value.
            let r = unsafe {
                libc::setsockopt(
                    theirs.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_SNDBUF");
        }
        fe.set_backend_request_fd(&theirs).expect("SET_BACKEND_REQ_FD");
        drop(theirs);
        (Self::finish_connect(fe, features, None), BackendReqEnd { sock: ours })
    }

    /// The capacity in 512-byte sectors the backend's configuration space shows now
    /// (GET_CONFIG, what QEMU reads after a config-change notification).
    pub fn config_capacity(&mut self) -> u64 {
        let flags = vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE;
        let (_, payload) = self.fe.get_config(0, 8, flags, &[0u8; 8]).expect("GET_CONFIG");
        u64::from_le_bytes(payload[..8].try_into().unwrap())
    }

    fn connect_full(socket: &Path, inflight: bool, extra: u64) -> BlkFrontend {
        let (mut fe, features) = Self::handshake_features(socket, inflight, extra);
        let inflight = inflight.then(|| {
            let (info, file) = fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)).expect("GET_INFLIGHT_FD");
            assert!(info.mmap_size > 0, "no inflight region");
            fe.set_inflight_fd(&info, file.as_raw_fd()).expect("SET_INFLIGHT_FD");
            (info, file)
        });
        Self::finish_connect(fe, features, inflight)
    }

    fn finish_connect(fe: Frontend, features: u64, inflight: Option<(VhostUserInflight, File)>) -> BlkFrontend {
        let mut f = BlkFrontend {
            fe,
            mem: SharedMem::new(MEM),
            log: SharedMem::new(PAGE),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            features,
            next_avail: 0,
            used_seen: 0,
            seq: 0,
            inflight,
        };
        f.set_mem();
        f.start_queue(0, false);
        f
    }

    /// Queue 0's ring addresses (frontend virtual addresses), with the log flag if logging.
    fn ring_config(&self, logging: bool) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: u32::from(logging),
            desc_table_addr: self.mem.addr() + DESC,
            used_ring_addr: self.mem.addr() + USED,
            avail_ring_addr: self.mem.addr() + AVAIL,
            log_addr: logging.then_some(USED),
        }
    }

    /// `SET_VRING_NUM .. SET_VRING_ENABLE 1` for queue 0 starting at `base`.
    fn start_queue(&mut self, base: u16, logging: bool) {
        let cfg = self.ring_config(logging);
        let fe = &mut self.fe;
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_base(0, base).unwrap();
        fe.set_vring_addr(0, &cfg).unwrap();
        fe.set_vring_kick(0, &self.kick).unwrap();
        fe.set_vring_call(0, &self.call).unwrap();
        fe.set_vring_enable(0, true).unwrap();
    }

    /// What QEMU sends when it stops the VM: returns the backend's next avail index.
    pub fn stop(&mut self) -> u16 {
        self.fe.set_vring_enable(0, false).unwrap();
        let base = self.fe.get_vring_base(0).unwrap();
        u16::try_from(base).expect("vring base fits u16")
    }

    /// QEMU's restart after a COLO checkpoint load (migration/colo.c, 7.2 and 10.0 traces):
    /// SET_FEATURES (with LOG_ALL when logging), SET_VRING_CALL, SET_FEATURES, SET_VRING_NUM,
    /// SET_VRING_BASE with `base` (the primary's index), SET_VRING_ADDR (log flag),
    /// SET_VRING_KICK, SET_LOG_BASE, SET_VRING_ENABLE 1.
    pub fn restart(&mut self, base: u16, logging: bool) {
        let features = if logging { self.features | LOG_ALL } else { self.features };
        self.fe.set_features(features).unwrap();
        self.fe.set_vring_call(0, &self.call).unwrap();
        self.fe.set_features(features).unwrap();
        self.fe.set_vring_num(0, QSIZE).unwrap();
        self.fe.set_vring_base(0, base).unwrap();
        let cfg = self.ring_config(logging);
        self.fe.set_vring_addr(0, &cfg).unwrap();
        self.fe.set_vring_kick(0, &self.kick).unwrap();
        if logging {
            let region =
                VhostUserDirtyLogRegion { mmap_size: PAGE, mmap_offset: 0, mmap_handle: self.log.file.as_raw_fd() };
            self.fe.set_log_base(0, Some(region)).unwrap();
        }
        self.fe.set_vring_enable(0, true).unwrap();
        // The driver goes on from what it published in its RAM, not from `base`: requests
        // the device had not popped before the stop (`base` short of the avail index) are
        // still in the ring and the device runs them after the restart. Restarting the
        // driver's count at `base` would overwrite those ring slots and move the avail
        // index backwards (which the device rightly treats as a broken ring).
        self.next_avail = self.mem.read_u16(AVAIL + 2);
        self.used_seen = self.mem.read_u16(USED + 2);
    }

    /// Takes over the ring state of `other` (the driver's view lives in guest RAM, which a
    /// checkpoint copies): the indexes this driver tracks follow.
    pub fn adopt_ring_state(&mut self, other: &BlkFrontend) {
        self.next_avail = other.next_avail;
        self.used_seen = other.used_seen;
        self.seq = other.seq;
    }

    /// Places one request in the avail ring (not kicked). `data`: write payload, or the read
    /// length as zeroes. Returns the slot.
    pub fn queue(&mut self, rtype: u32, sector: u64, data: &[u8]) -> u64 {
        let slot = self.seq % u64::from(SLOTS);
        self.seq += 1;
        let base = SLOT_BASE + slot * SLOT_SIZE;
        let (hdr, buf, status) = (base, base + 0x1000, base + 0xF000);
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&rtype.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.mem.write(hdr, &h);
        assert!(data.len() <= 0xE000);
        self.mem.write(buf, data);
        self.mem.write(status, &[0xFF]);
        let d0 = (slot * 3) as u16;
        let data_flags = if rtype == T_IN { DESC_WRITE } else { 0 };
        let descs = [
            (hdr, 16u32, DESC_NEXT, d0 + 1),
            (buf, data.len() as u32, DESC_NEXT | data_flags, d0 + 2),
            (status, 1u32, DESC_WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            self.mem.write(DESC + (u64::from(d0) + i as u64) * 16, &d);
        }
        self.mem.write_u16(AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE), d0);
        fence(Ordering::Release);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem.write_u16(AVAIL + 2, self.next_avail);
        slot
    }

    /// Kicks the queue.
    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Waits until the used index reaches the avail index; returns the completions in order.
    pub fn wait_all(&mut self, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while self.used_seen != self.next_avail {
            let used = self.mem.read_u16(USED + 2);
            fence(Ordering::Acquire);
            while self.used_seen != used {
                let e = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
                let id = u32::from_le_bytes(self.mem.read(e, 4).try_into().unwrap());
                let len = u32::from_le_bytes(self.mem.read(e + 4, 4).try_into().unwrap());
                out.push((id as u16, len));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            if self.used_seen == self.next_avail {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "requests not completed in {timeout:?}");
            let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = self.call.read();
        }
        out
    }

    /// Status byte and data of slot `slot` after completion.
    pub fn result(&self, slot: u64, len: usize) -> Done {
        let base = SLOT_BASE + slot * SLOT_SIZE;
        Done { status: self.mem.read(base + 0xF000, 1)[0], data: self.mem.read(base + 0x1000, len) }
    }

    /// One synchronous request.
    pub fn io(&mut self, rtype: u32, sector: u64, data: &[u8]) -> Done {
        let slot = self.queue(rtype, sector, data);
        self.kick();
        self.wait_all(Duration::from_secs(30));
        self.result(slot, data.len())
    }

    /// Guest physical address of a slot's data buffer.
    pub fn data_gpa(slot: u64) -> u64 {
        SLOT_BASE + slot * SLOT_SIZE + 0x1000
    }

    /// The used ring's guest physical address.
    pub fn used_gpa() -> u64 {
        USED
    }

    /// Whether the dirty log marks the page holding `gpa`.
    pub fn logged(&self, gpa: u64) -> bool {
        let page = gpa / PAGE;
        self.log.read(page / 8, 1)[0] & (1 << (page % 8)) != 0
    }
}

/// Raw ring access for hostile-guest tests.
impl BlkFrontend {
    /// The driver's next avail index (what it published last).
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// Publishes `idx` as the avail index without adding entries (a buggy or hostile guest).
    pub fn publish_avail_idx(&self, idx: u16) {
        fence(Ordering::Release);
        self.mem.write_u16(AVAIL + 2, idx);
    }

    /// Writes descriptor `i` of the table.
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.mem.write(DESC + u64::from(i) * 16, &d);
    }

    /// Places head `head` in the avail ring and publishes it (not kicked).
    pub fn push_head(&mut self, head: u16) {
        self.mem.write_u16(AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE), head);
        fence(Ordering::Release);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem.write_u16(AVAIL + 2, self.next_avail);
    }

    /// The inflight region's descriptor the backend handed over (GET_INFLIGHT_FD).
    pub fn inflight_file(&self) -> Option<&File> {
        self.inflight.as_ref().map(|(_, f)| f)
    }

    /// Writes raw bytes into guest memory at `gpa`.
    pub fn poke(&self, gpa: u64, data: &[u8]) {
        self.mem.write(gpa, data);
    }

    /// Waits up to `timeout` for the used index to reach `idx`; returns whether it did.
    pub fn wait_used(&self, idx: u16, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.mem.read_u16(USED + 2) != idx {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = self.call.read();
        }
        true
    }

    /// The used ring entry at position `pos` (id, len).
    pub fn used_entry(&self, pos: u16) -> (u32, u32) {
        let e = USED + 4 + 8 * u64::from(pos % QSIZE);
        let id = u32::from_le_bytes(self.mem.read(e, 4).try_into().unwrap());
        let len = u32::from_le_bytes(self.mem.read(e + 4, 4).try_into().unwrap());
        (id, len)
    }

    /// The used index the backend published.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_u16(USED + 2)
    }

    /// Restarts queue 0 at `base` with consistent indexes (what a frontend's device reset
    /// does after [`BlkFrontend::stop`]): the avail index is put back, then the start
    /// sequence is sent again.
    pub fn restart_at(&mut self, base: u16) {
        self.mem.write_u16(AVAIL + 2, base);
        self.next_avail = base;
        self.used_seen = self.mem.read_u16(USED + 2);
        self.start_queue(base, false);
    }
}

/// The frontend's end of the backend request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ).
pub struct BackendReqEnd {
    pub sock: std::os::unix::net::UnixStream,
}

/// A message the backend sent on its request channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMsg {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
}

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

impl BackendReqEnd {
    /// The next message, or None when none arrives within `timeout` (or the channel closed).
    pub fn next(&mut self, timeout: Duration) -> Option<BackendMsg> {
        use std::io::Read;
        let mut pfd = libc::pollfd { fd: self.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if r <= 0 {
            return None;
        }
        self.sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).unwrap();
        let mut hdr = [0u8; 12];
        self.sock.read_exact(&mut hdr).ok()?;
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(8).min(4096) as usize];
        self.sock.read_exact(&mut payload).ok()?;
        Some(BackendMsg { request: word(0), flags: word(4), payload })
    }
}
