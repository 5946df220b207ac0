//! The NBD server fed an arbitrary client byte stream (negotiation, then requests) over a
//! socket pair, against an in-memory export with COLO barriers and checksums: it must never panic, never
//! touch data outside the export, and always end the connection.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;

use colo_blk::nbd::NbdServerConfig;
use colo_blk::nbd::server::{NbdExport, NbdServer};
use colo_blk::nbd::transport::Stream;

const SIZE: usize = 1 << 16;

struct MemExport(Mutex<Vec<u8>>);

impl NbdExport for MemExport {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> std::io::Result<()> {
        self.0.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> std::io::Result<()> {
        self.trim(offset, len)
    }
    fn colo_barriers(&self) -> bool {
        true
    }
    fn barrier(&self, _seq: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn offers_checksums(&self) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let (mut client, server) = UnixStream::pair().unwrap();
    let cfg = NbdServerConfig {
        export_name: String::new(),
        max_clients: 1,
        threads_per_client: 2,
        allow: Default::default(),
        tls: None,
    };
    let export = Arc::new(MemExport(Mutex::new(vec![0u8; SIZE])));
    let t = std::thread::spawn(move || NbdServer::serve_stream(Stream::Unix(server), cfg, export));
    // Drain the server's output so it never blocks on a full socket.
    let mut reader = client.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 65536];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    let _ = client.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = t.join().expect("server thread panicked");
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = drain.join();
});
