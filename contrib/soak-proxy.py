#!/usr/bin/env python3
"""Helpers for contrib/soak.sh (python3 standard library only).

  soak-proxy.py proxy --listen ADDR --target ADDR [--hang-for S] [--log FILE]
      A proxy for the replication link: every connection accepted on ADDR is
      joined to a new connection to the target (the secondary's NBD server). ADDR
      is HOST:PORT (TCP; port 0 picks a free one, logged) or a UNIX socket path.
      SIGUSR1 cuts every connection open at that moment (both sides are shut
      down, so the primary and the secondary both see the link drop); new
      connections are accepted as before.
      SIGUSR2 hangs the link for --hang-for seconds (default 8), as a network
      partition does: no byte is forwarded in either direction, no end is closed
      (no FIN, no RST: an end that closes meanwhile is passed on only after the
      hang), and new connections are accepted but held, not joined to the target,
      until the hang ends; then everything is forwarded again (held bytes first).
      A SIGUSR2 during a hang is ignored. SIGTERM/SIGINT exit. One log line per
      connection, cut, hang start and end, and close, with a wall-clock timestamp.

  soak-proxy.py events --qmp PATH --out FILE
      Connects to a colo-blk control socket, leaves negotiation mode, creates FILE
      and appends every event line (as received) to it until the socket closes or
      SIGTERM.
"""

import argparse
import os
import re
import select
import signal
import socket
import sys
import threading
import time


def stamp():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + ".%03d" % (int(time.time() * 1000) % 1000)


def parse_addr(a):
    """HOST:PORT -> (AF_INET/AF_INET6, (host, port)); anything else is a UNIX socket path."""
    m = re.fullmatch(r"\[?([^/\[\]]*?)\]?:(\d+)", a)
    if m:
        host = m.group(1) or "127.0.0.1"
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(m.group(2)))
    return socket.AF_UNIX, a


def show(fam, addr):
    if fam == socket.AF_UNIX:
        return addr
    return ("[%s]:%d" if fam == socket.AF_INET6 else "%s:%d") % addr[:2]


class Proxy:
    def __init__(self, listen, target, hang_for, log):
        self.listen_fam, self.listen = parse_addr(listen)
        self.target_fam, self.target = parse_addr(target)
        self.hang_for = hang_for
        self.log_f = log
        self.lock = threading.Lock()
        self.pairs = {}  # id -> (client, server)
        self.next_id = 0
        self.cuts = 0
        self.hangs = 0
        self.held = []  # (id, client) accepted during a hang, not joined yet
        # Set while bytes flow; cleared during a hang (the pumps wait on it).
        self.flowing = threading.Event()
        self.flowing.set()
        self.log_lock = threading.Lock()

    def log(self, msg):
        with self.log_lock:
            self.log_f.write("%s %s\n" % (stamp(), msg))
            self.log_f.flush()

    def worker(self, ev, action):
        # The signal handlers only set ev (they run in the main thread, which may hold
        # self.lock or the log lock at that moment); the action itself runs here.
        while True:
            ev.wait()
            ev.clear()
            action()
            if action == self.hang and ev.is_set():
                ev.clear()
                self.log("hang signal during the hang ignored")

    def cut(self):
        # shutdown() only: the pump threads see EOF/errors and close the sockets.
        with self.lock:
            pairs = list(self.pairs.items())
            self.cuts += 1
            n = self.cuts
        for _, (c, s) in pairs:
            for x in (c, s):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.log("cut %d: %d connection(s) severed" % (n, len(pairs)))

    def hang(self):
        with self.lock:
            self.flowing.clear()
            self.hangs += 1
            n = self.hangs
            open_now = len(self.pairs)
        t0 = time.monotonic()
        self.log("hang %d start: %d connection(s) frozen for %g s" % (n, open_now, self.hang_for))
        time.sleep(self.hang_for)
        with self.lock:
            self.flowing.set()
            held, self.held = self.held, []
        self.log("hang %d end after %.3f s: forwarding again, %d held connection(s) to join"
                 % (n, time.monotonic() - t0, len(held)))
        for cid, c in held:
            self.join(cid, c)

    def pump(self, cid, src, dst, done):
        try:
            while True:
                b = src.recv(1 << 20)
                # During a hang nothing passes, an end of stream included.
                self.flowing.wait()
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            self.flowing.wait()
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            done[0] += 1
            last = done[0] == 2
            if last:
                self.pairs.pop(cid, None)
        if last:
            src.close()
            dst.close()
            self.log("conn %d closed" % cid)

    def join(self, cid, c):
        """Connects accepted client c to the target and starts its two pumps."""
        s = socket.socket(self.target_fam, socket.SOCK_STREAM)
        try:
            s.connect(self.target)
        except OSError as e:
            self.log("conn %d: target connect failed: %s" % (cid, e))
            c.close()
            s.close()
            return
        if self.target_fam != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.pairs[cid] = (c, s)
        done = [0]
        for a, b in ((c, s), (s, c)):
            threading.Thread(target=self.pump, args=(cid, a, b, done), daemon=True).start()
        self.log("conn %d open" % cid)

    def serve(self):
        if self.listen_fam == socket.AF_UNIX:
            try:
                os.unlink(self.listen)
            except FileNotFoundError:
                pass
        ls = socket.socket(self.listen_fam, socket.SOCK_STREAM)
        if self.listen_fam != socket.AF_UNIX:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(self.listen)
        ls.listen(16)
        self.log("listening on %s -> %s (pid %d)"
                 % (show(self.listen_fam, ls.getsockname()), show(self.target_fam, self.target), os.getpid()))
        # Python runs signal handlers in the main thread only, and only between
        # bytecodes: wake the accept loop through the wakeup fd whatever thread
        # the kernel delivered the signal to.
        wr, ww = socket.socketpair()
        wr.setblocking(False)
        ww.setblocking(False)
        signal.set_wakeup_fd(ww.fileno(), warn_on_full_buffer=False)
        while True:
            r, _, _ = select.select([ls, wr], [], [])
            if wr in r:
                try:
                    wr.recv(4096)
                except BlockingIOError:
                    pass
            if ls not in r:
                continue
            c, _ = ls.accept()
            if self.listen_fam != socket.AF_UNIX:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.next_id += 1
                cid = self.next_id
                hung = not self.flowing.is_set()
                if hung:
                    self.held.append((cid, c))
            if hung:
                self.log("conn %d accepted and held (hang)" % cid)
                continue
            self.join(cid, c)


def cmd_proxy(a):
    log = open(a.log, "a", buffering=1) if a.log else sys.stdout
    p = Proxy(a.listen, a.target, a.hang_for, log)
    cut_ev, hang_ev = threading.Event(), threading.Event()
    threading.Thread(target=p.worker, args=(cut_ev, p.cut), daemon=True).start()
    threading.Thread(target=p.worker, args=(hang_ev, p.hang), daemon=True).start()
    signal.signal(signal.SIGUSR1, lambda *_: cut_ev.set())
    signal.signal(signal.SIGUSR2, lambda *_: hang_ev.set())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        p.serve()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if p.listen_fam == socket.AF_UNIX:
            try:
                os.unlink(p.listen)
            except OSError:
                pass
        p.log("exit")


def cmd_events(a):
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(a.qmp)
    f = s.makefile("rb")
    f.readline()  # greeting
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    # FILE appears once the client is in (soak.sh waits for it: its idle resource samples
    # must count this client's thread and descriptors).
    for line in f:
        if b'"return"' in line:
            break
    with open(a.out, "ab", buffering=0) as out:
        try:
            for line in f:
                if line.startswith(b'{"event"') or b'"event"' in line:
                    out.write(line.rstrip(b"\r\n") + b"\n")
        except (OSError, SystemExit, KeyboardInterrupt):
            pass


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy")
    p.add_argument("--listen", required=True, help="HOST:PORT or a UNIX socket path")
    p.add_argument("--target", required=True, help="HOST:PORT or a UNIX socket path")
    p.add_argument("--hang-for", type=float, default=8.0, help="seconds a SIGUSR2 hang lasts (default 8)")
    p.add_argument("--log")
    e = sub.add_parser("events")
    e.add_argument("--qmp", required=True)
    e.add_argument("--out", required=True)
    a = ap.parse_args()
    {"proxy": cmd_proxy, "events": cmd_events}[a.cmd](a)


if __name__ == "__main__":
    main()
