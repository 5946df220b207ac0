//! The NBD client of the replication link fed an arbitrary server byte stream over a socket
//! pair: the greeting and option replies of the negotiation (STARTTLS refusals, COLO, GO with
//! INFO, errors, the EXPORT_NAME fallback), then transmission replies (simple ones, and
//! structured-reply or garbage headers the client must refuse). It must never panic, never
//! allocate beyond the option limit, and always finish: the input ends with end of file and
//! the negotiation has a deadline.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

use colo_blk::nbd::client::{self, Deadline};
use colo_blk::nbd::transport::Stream;

fuzz_target!(|data: &[u8]| {
    let (client_end, mut server_end) = UnixStream::pair().unwrap();
    // Drain what the client sends so it never blocks on a full socket.
    let mut reader = server_end.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    let _ = server_end.write_all(data);
    let _ = server_end.shutdown(std::net::Shutdown::Write);
    let deadline = Deadline::after(Duration::from_secs(5), "the fuzzed negotiation");
    if let Ok((mut s, info)) = client::negotiate(Stream::Unix(client_end), "exp", &deadline, None) {
        let _ = (info.size, info.flags, info.colo);
        // Transmission: every reply the client accepts is a simple reply; anything else ends
        // the loop with an error.
        for _ in 0..1024 {
            match client::read_reply(&mut s) {
                Ok(r) => {
                    let _ = (r.error, r.handle);
                }
                Err(_) => break,
            }
        }
        s.shutdown();
    }
    let _ = server_end.shutdown(std::net::Shutdown::Both);
    let _ = drain.join();
});
