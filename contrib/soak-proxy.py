#!/usr/bin/env python3
"""Helpers for contrib/soak.sh (python3 standard library only).

  soak-proxy.py proxy --listen PATH --target PATH [--log FILE]
      A UNIX-socket proxy for the replication link: every connection accepted on
      PATH is joined to a new connection to the target (the secondary's NBD
      socket). SIGUSR1 cuts every connection open at that moment (both sides are
      shut down, so the primary and the secondary both see the link drop); new
      connections are accepted as before. SIGTERM/SIGINT exit. One log line per
      connection, cut and close, with a wall-clock timestamp.

  soak-proxy.py events --qmp PATH --out FILE
      Connects to a colo-blk control socket, leaves negotiation mode and appends
      every event line (as received) to FILE until the socket closes or SIGTERM.
"""

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time


def stamp():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + ".%03d" % (int(time.time() * 1000) % 1000)


class Proxy:
    def __init__(self, listen, target, log):
        self.listen = listen
        self.target = target
        self.log_f = log
        self.lock = threading.Lock()
        self.pairs = {}  # id -> (client, server)
        self.next_id = 0
        self.cuts = 0
        self.log_lock = threading.Lock()

    def log(self, msg):
        with self.log_lock:
            self.log_f.write("%s %s\n" % (stamp(), msg))
            self.log_f.flush()

    def cutter(self, ev):
        # The signal handler only sets ev (it runs in the main thread, which may hold
        # self.lock or the log lock at that moment); the cut itself runs here.
        while True:
            ev.wait()
            ev.clear()
            self.cut()

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

    def pump(self, cid, src, dst, done):
        try:
            while True:
                b = src.recv(1 << 20)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
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

    def serve(self):
        try:
            os.unlink(self.listen)
        except FileNotFoundError:
            pass
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(self.listen)
        ls.listen(16)
        self.log("listening on %s -> %s (pid %d)" % (self.listen, self.target, os.getpid()))
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
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.target)
            except OSError as e:
                self.log("target connect failed: %s" % e)
                c.close()
                s.close()
                continue
            with self.lock:
                self.next_id += 1
                cid = self.next_id
                self.pairs[cid] = (c, s)
            done = [0]
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self.pump, args=(cid, a, b, done), daemon=True).start()
            self.log("conn %d open" % cid)


def cmd_proxy(a):
    log = open(a.log, "a", buffering=1) if a.log else sys.stdout
    p = Proxy(a.listen, a.target, log)
    ev = threading.Event()
    threading.Thread(target=p.cutter, args=(ev,), daemon=True).start()
    signal.signal(signal.SIGUSR1, lambda *_: ev.set())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        p.serve()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        try:
            os.unlink(a.listen)
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
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--log")
    e = sub.add_parser("events")
    e.add_argument("--qmp", required=True)
    e.add_argument("--out", required=True)
    a = ap.parse_args()
    {"proxy": cmd_proxy, "events": cmd_events}[a.cmd](a)


if __name__ == "__main__":
    main()
