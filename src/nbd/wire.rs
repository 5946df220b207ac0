//! NBD wire format (fixed newstyle negotiation, simple and structured replies), big-endian
//! throughout.
//! Reference: the NBD protocol document (github.com/NetworkBlockDevice/nbd, doc/proto.md).

/// "NBDMAGIC".
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Export info without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Export info and enter transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies for the transmission phase (NBD spec, "Structured replies").
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for NBD_CMD_BLOCK_STATUS.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// colo-blk extension ("COLO"): the client asks whether the server understands
/// [`CMD_COLO_BARRIER`]. Only a colo-blk secondary acknowledges it; every other server answers
/// `REP_ERR_UNSUP` and the link stays plain NBD. Sent only between colo-blk instances.
pub const OPT_COLO: u32 = 0x434f_4c4f;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// One export in a LIST answer.
pub const REP_SERVER: u32 = 2;
/// INFO / GO details.
pub const REP_INFO: u32 = 3;
/// One metadata context (u32 id, name) in a LIST/SET_META_CONTEXT answer.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
pub const REP_ERR_UNSUP: u32 = 1 | 1 << 31;
/// Policy refused the option.
pub const REP_ERR_POLICY: u32 = 2 | 1 << 31;
/// The option was malformed.
pub const REP_ERR_INVALID: u32 = 3 | 1 << 31;
/// The export is unknown.
pub const REP_ERR_UNKNOWN: u32 = 6 | 1 << 31;
/// TLS is required before this option.
pub const REP_ERR_TLS_REQD: u32 = 5 | 1 << 31;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = 7 | 1 << 31;

/// INFO types.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
/// Export is read-only.
pub const TF_READ_ONLY: u16 = 2;
/// FLUSH supported.
pub const TF_SEND_FLUSH: u16 = 4;
/// FUA supported.
pub const TF_SEND_FUA: u16 = 8;
/// TRIM supported.
pub const TF_SEND_TRIM: u16 = 32;
/// WRITE_ZEROES supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 64;
/// Several connections see the same data (flush on one covers writes of all).
pub const TF_CAN_MULTI_CONN: u16 = 256;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status of the selected metadata contexts (answered with structured replies).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// colo-blk extension, only after [`OPT_COLO`] was acknowledged: a checkpoint barrier. Every
/// write sent before it was answered; `offset` carries the barrier's sequence number, `length`
/// is 0. The server flushes, records the barrier and answers; writes after it belong to the
/// next checkpoint epoch.
pub const CMD_COLO_BARRIER: u16 = 0x4342;
/// colo-blk extension, only after [`OPT_COLO`] was acknowledged: the server's disk adopts the
/// data generation in `offset` (`length` 0), in order with the connection's requests like
/// [`CMD_COLO_BARRIER`]: every write sent before it is on the disk when the generation is
/// recorded (durably) and answered. See `replication/generation.rs`.
pub const CMD_COLO_ADOPT: u16 = 0x4341;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
/// Write zeroes must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 2;
/// Read: do not fragment the structured reply (colo-blk never does).
pub const CMD_FLAG_DF: u16 = 4;
/// Block status: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 8;

/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk without payload (a successful reply to a request that returns no data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk with u64 offset followed by data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk with u32 context id followed by (u32 length, u32 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk with u32 error, u16 message length, message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `base:allocation` extent flag: not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` extent flag: reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// The one metadata context colo-blk offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Errors.
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Out of memory.
pub const ENOMEM: u32 = 12;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload accepted (as QEMU: 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during negotiation.
pub const MAX_OPTION: u32 = 64 << 10;
/// Size of a transmission request.
pub const REQUEST_LEN: usize = 28;

/// A decoded transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub cmd: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Decodes a 28-byte request; `None` if the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            cmd: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(b[8..16].try_into().ok()?),
            offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
            length: u32::from_be_bytes(b[24..28].try_into().ok()?),
        })
    }

    /// Encodes the request.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Encodes a structured reply chunk header for a payload of `length` bytes.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// The server's greeting that opens newstyle negotiation: [`NBD_MAGIC`], [`IHAVEOPT`], u16
/// handshake flags (`FLAG_*`).
pub fn server_hello(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// One reply to a negotiation option (fixed newstyle): [`OPT_REPLY_MAGIC`] (u64), the option
/// it answers (u32), the reply type (u32, `REP_*`), the payload length (u32), the payload.
/// The constructors lay out the payloads colo-blk's server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option answered.
    pub option: u32,
    /// The reply type (`REP_*`; errors have bit 31 set).
    pub kind: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl OptionReply {
    /// A reply of type `kind` carrying `payload` as it is.
    pub fn new(option: u32, kind: u32, payload: impl Into<Vec<u8>>) -> OptionReply {
        OptionReply { option, kind, payload: payload.into() }
    }

    /// `REP_ACK` without payload.
    pub fn ack(option: u32) -> OptionReply {
        OptionReply::new(option, REP_ACK, Vec::new())
    }

    /// An error reply (`kind` is one of the `REP_ERR_*` types) with a message for humans
    /// (may be empty).
    pub fn error(option: u32, kind: u32, message: &str) -> OptionReply {
        debug_assert!(kind & 1 << 31 != 0, "{kind:#x} is not an error reply type");
        OptionReply::new(option, kind, message.as_bytes())
    }

    /// `REP_SERVER`, one export of a LIST answer: u32 name length, name (no description).
    pub fn server(option: u32, name: &[u8]) -> OptionReply {
        let mut p = Vec::with_capacity(4 + name.len());
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name);
        OptionReply::new(option, REP_SERVER, p)
    }

    /// `REP_INFO` of type [`INFO_EXPORT`]: u16 type, u64 export size, u16 transmission flags.
    pub fn info_export(option: u32, size: u64, flags: u16) -> OptionReply {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        OptionReply::new(option, REP_INFO, p)
    }

    /// `REP_INFO` of type [`INFO_BLOCK_SIZE`]: u16 type, then the minimum, preferred and
    /// maximum block sizes (u32 each).
    pub fn info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> OptionReply {
        let mut p = Vec::with_capacity(14);
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for v in [minimum, preferred, maximum] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        OptionReply::new(option, REP_INFO, p)
    }

    /// `REP_ACK` to [`OPT_COLO`]: u64 last barrier number, u64 data generation, u8 flags
    /// (bit 0: `continuous`, every write since the generation was adopted was applied).
    pub fn colo_ack(last_barrier: u64, generation: u64, continuous: bool) -> OptionReply {
        let mut p = Vec::with_capacity(17);
        p.extend_from_slice(&last_barrier.to_be_bytes());
        p.extend_from_slice(&generation.to_be_bytes());
        p.push(u8::from(continuous));
        OptionReply::new(OPT_COLO, REP_ACK, p)
    }

    /// The reply as sent: header, then payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + self.payload.len());
        b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&self.option.to_be_bytes());
        b.extend_from_slice(&self.kind.to_be_bytes());
        b.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.payload);
        b
    }
}

/// Encodes an option reply header followed by `data` (see [`OptionReply`]).
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    OptionReply::new(option, reply, data).to_bytes()
}

/// The server's answer to [`OPT_EXPORT_NAME`], which has no option reply header: u64 export
/// size, u16 transmission flags, then 124 zero bytes unless the client set
/// [`CLIENT_NO_ZEROES`] (`zeroes` false).
pub fn export_name_reply(size: u64, flags: u16, zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// Maps an I/O error to the NBD error code sent to the client.
pub fn errno_to_nbd(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r =
            Request { flags: CMD_FLAG_FUA, cmd: CMD_WRITE, handle: 0x1122334455667788, offset: 1 << 40, length: 4096 };
        let b = r.encode();
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn reply_layouts() {
        let s = simple_reply(EIO, 7);
        assert_eq!(&s[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(u32::from_be_bytes(s[4..8].try_into().unwrap()), 5);
        let c = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9, 6);
        assert_eq!(&c[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(u16::from_be_bytes([c[6], c[7]]), 0x8001);
        assert_eq!(u32::from_be_bytes(c[16..20].try_into().unwrap()), 6);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(u64::from_be_bytes(o[0..8].try_into().unwrap()), OPT_REPLY_MAGIC);
    }

    /// The 20-byte header every option reply starts with, field by field.
    fn header(option: u32, kind: u32, len: u32) -> Vec<u8> {
        let mut h = vec![0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
        h.extend_from_slice(&option.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn option_reply_header_layout() {
        // OPT_GO (7), REP_ACK (1), no payload: magic 0x3e889045565a9, then three u32.
        assert_eq!(
            OptionReply::ack(OPT_GO).to_bytes(),
            [
                0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // magic
                0x00, 0x00, 0x00, 0x07, // option
                0x00, 0x00, 0x00, 0x01, // reply type
                0x00, 0x00, 0x00, 0x00, // payload length
            ]
        );
        assert_eq!(header(OPT_GO, REP_ACK, 0).len(), OPTION_REPLY_HEADER_LEN);
        assert_eq!(option_reply(OPT_GO, REP_ACK, &[]), OptionReply::ack(OPT_GO).to_bytes());
    }

    #[test]
    fn option_reply_errors_carry_their_message() {
        let b = OptionReply::error(OPT_STARTTLS, REP_ERR_POLICY, "no").to_bytes();
        let mut want = header(5, 0x8000_0002, 2);
        want.extend_from_slice(b"no");
        assert_eq!(b, want);
        // Error types as the protocol numbers them: bit 31 plus the error's number.
        assert_eq!(&b[12..16], &[0x80, 0x00, 0x00, 0x02]);
        assert_eq!(OptionReply::error(99, REP_ERR_UNSUP, "").to_bytes(), header(99, 0x8000_0001, 0));
        assert_eq!(&OptionReply::error(1, REP_ERR_INVALID, "").to_bytes()[12..16], &[0x80, 0, 0, 3]);
        assert_eq!(&OptionReply::error(1, REP_ERR_TLS_REQD, "").to_bytes()[12..16], &[0x80, 0, 0, 5]);
        assert_eq!(&OptionReply::error(1, REP_ERR_UNKNOWN, "").to_bytes()[12..16], &[0x80, 0, 0, 6]);
        assert_eq!(&OptionReply::error(1, REP_ERR_SHUTDOWN, "").to_bytes()[12..16], &[0x80, 0, 0, 7]);
    }

    #[test]
    fn list_server_reply_layout() {
        // OPT_LIST (3), REP_SERVER (2), payload: u32 name length, name.
        let b = OptionReply::server(OPT_LIST, b"disk").to_bytes();
        let mut want = header(3, 2, 8);
        want.extend_from_slice(&[0, 0, 0, 4, b'd', b'i', b's', b'k']);
        assert_eq!(b, want);
    }

    #[test]
    fn info_reply_layouts() {
        // REP_INFO (3) of NBD_INFO_EXPORT (0): u16 type, u64 size, u16 flags.
        let b = OptionReply::info_export(OPT_INFO, 0x0102_0304_0506_0708, 0x016d).to_bytes();
        let mut want = header(6, 3, 12);
        want.extend_from_slice(&[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x01, 0x6d]);
        assert_eq!(b, want);
        // REP_INFO of NBD_INFO_BLOCK_SIZE (3): u16 type, u32 minimum, preferred, maximum.
        let b = OptionReply::info_block_size(OPT_GO, 512, 4096, MAX_PAYLOAD).to_bytes();
        let mut want = header(7, 3, 14);
        want.extend_from_slice(&[0, 3, 0, 0, 0x02, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        assert_eq!(b, want);
    }

    #[test]
    fn colo_ack_layout() {
        let b = OptionReply::colo_ack(0x0a0b, 0x1122_3344_5566_7788, true).to_bytes();
        let mut want = header(0x434f_4c4f, 1, 17);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x0a, 0x0b]);
        want.extend_from_slice(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 1]);
        assert_eq!(b, want);
        assert_eq!(OptionReply::colo_ack(0, 0, false).to_bytes()[OPTION_REPLY_HEADER_LEN + 16], 0);
    }

    #[test]
    fn server_hello_layout() {
        assert_eq!(&server_hello(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn export_name_reply_layout() {
        let b = export_name_reply(0x1000, TF_HAS_FLAGS | TF_READ_ONLY, false);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3]);
        let z = export_name_reply(0x1000, TF_HAS_FLAGS, true);
        assert_eq!(z.len(), 8 + 2 + 124);
        assert_eq!(&z[..10], &[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1]);
        assert!(z[10..].iter().all(|&x| x == 0));
    }
}
