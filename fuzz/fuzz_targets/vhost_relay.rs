//! The vhost-user message stream the relay parses: any bytes from the frontend, relayed to
//! a stand-in handler that answers GET_FEATURES (the relay's ordering barrier) and reads
//! everything else; plus the descriptor-size checks on memory tables and dirty logs.
#![no_main]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

use colo_blk::vhost::proxy::{DeviceShape, check_message_parts, relay};
use libfuzzer_sys::fuzz_target;

/// The handler side: reads messages and answers GET_FEATURES until the relay closes.
fn handler(mut s: UnixStream) {
    let mut hdr = [0u8; 12];
    while s.read_exact(&mut hdr).is_ok() {
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        if u32::from_le_bytes(hdr[0..4].try_into().unwrap()) == 1 {
            let mut r = Vec::new();
            r.extend_from_slice(&1u32.to_le_bytes());
            r.extend_from_slice(&5u32.to_le_bytes());
            r.extend_from_slice(&8u32.to_le_bytes());
            r.extend_from_slice(&0x1_4000_0000u64.to_le_bytes());
            if s.write_all(&r).is_err() {
                return;
            }
        }
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: plain syscalls; the descriptor is owned by the File.
    unsafe {
        let fd = libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        let f = File::from_raw_fd(fd);
        f.set_len(len).unwrap();
        f
    }
}

fuzz_target!(|data: &[u8]| {
    // Size checks: request, file size and payload from the input.
    if data.len() >= 3 {
        let request = [5u32, 6, 37][usize::from(data[0]) % 3];
        let f = memfd(u64::from(data[1]) * 4096);
        let ok = check_message_parts(request, &data[2..], std::slice::from_ref(&f));
        if let Ok(()) = ok
            && request == 6
            && data.len() >= 18
        {
            let size = u64::from_le_bytes(data[2..10].try_into().unwrap());
            let offset = u64::from_le_bytes(data[10..18].try_into().unwrap());
            assert!(offset.checked_add(size).is_some_and(|e| e <= u64::from(data[1]) * 4096));
        }
    }
    // The relay over a frontend that sends `data` and hangs up, reading what comes back.
    let (fe, fe_peer) = UnixStream::pair().unwrap();
    let (be, be_peer) = UnixStream::pair().unwrap();
    let h = std::thread::spawn(move || handler(be_peer));
    let shape = DeviceShape { num_queues: 2, queue_size: 256 };
    let r = std::thread::spawn(move || relay(fe_peer, be, shape, Default::default()));
    let mut w = fe.try_clone().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut sink = Vec::new();
    let _ = (&fe).read_to_end(&mut sink);
    drop(fe);
    let _ = writer.join();
    let _ = r.join().expect("relay panicked");
    h.join().expect("handler panicked");
});
