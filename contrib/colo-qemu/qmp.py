#!/usr/bin/env python3
"""Minimal QMP client (stdlib only) for the colo-blk COLO harness.

Library use:
    q = Qmp("/path/qmp.sock", timeout=10)
    q.cmd("migrate-set-capabilities", capabilities=[...])
    ev = q.wait_event("MIGRATION", lambda e: e["data"]["status"] == "colo", timeout=60)
    q.hmp("xp /8wx 0x9000")

Events that arrive while waiting for a command reply are queued and are seen
by later wait_event() calls, so no event is lost between two calls on the
same connection.  Every blocking call has a timeout.

CLI (one connection per call, so events are only seen within that call):
    qmp.py SOCK cmd NAME ['{"json":"args"}']
    qmp.py SOCK hmp 'xp /8wx 0x9000'
    qmp.py SOCK state            # guest state block at 0x9000 as JSON
    qmp.py SOCK wait-event NAME [TIMEOUT]
"""

import json
import os
import select
import socket
import sys
import time


class QmpError(Exception):
    """A QMP error reply, a protocol problem or a timeout."""


class QmpTimeout(QmpError):
    pass


class Qmp:
    def __init__(self, path, timeout=10.0, connect_timeout=10.0, log=None):
        self.path = path
        self.timeout = timeout
        self.log = log  # callable(str) or None
        self.events = []  # queued, not yet consumed events
        self.all_events = []  # every event seen, in order
        self._buf = b""
        self._id = 0
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpTimeout(f"connect {path}: {e}") from e
                time.sleep(0.05)
        greeting = self._read_msg(time.monotonic() + timeout)
        if "QMP" not in greeting:
            raise QmpError(f"bad greeting {greeting!r}")
        self.cmd("qmp_capabilities")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- transport ---------------------------------------------------------
    def _read_msg(self, deadline):
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout(f"{self.path}: timeout waiting for QMP data")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            data = self.sock.recv(65536)
            if not data:
                raise QmpError(f"{self.path}: connection closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "event" in msg:
            self.all_events.append(msg)
            if self.log:
                self.log(f"event {msg['event']} {json.dumps(msg.get('data', {}))}")
        return msg

    # -- commands ----------------------------------------------------------
    def cmd(self, name, timeout=None, **args):
        """Execute a command; return its 'return' value or raise QmpError."""
        self._id += 1
        req = {"execute": name, "id": self._id}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read_msg(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != self._id:
                continue
            if "error" in msg:
                raise QmpError(f"{name}: {msg['error'].get('desc', msg['error'])}")
            return msg.get("return")

    def hmp(self, line, timeout=None):
        return self.cmd("human-monitor-command", timeout=timeout, **{"command-line": line})

    # -- events ------------------------------------------------------------
    def wait_event(self, name, pred=None, timeout=None):
        """Return the first queued or new event called name (and matching pred)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and (pred is None or pred(ev)):
                    del self.events[i]
                    return ev
            msg = self._read_msg(deadline)
            if "event" in msg:
                self.events.append(msg)

    def poll_events(self, wait=0.0):
        """Read whatever events are pending (up to `wait` seconds); queue them."""
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            if b"\n" not in self._buf:
                r, _, _ = select.select([self.sock], [], [], left)
                if not r:
                    return
            try:
                msg = self._read_msg(time.monotonic() + 1.0)
            except QmpTimeout:
                return
            if "event" in msg:
                self.events.append(msg)

    def drop_events(self, name=None):
        self.events = [e for e in self.events if name is not None and e["event"] != name]


# -- guest state block (see guest/bootsector.S) -------------------------------
STATE_ADDR = 0x9000
STATE_FIELDS = ["counter", "last_completed", "err_count", "last_err",
                "first_err_counter", "boot_drive", "magic", "nsect", "cur_lba",
                "mm_counter", "mm_lba"]


def read_guest_state(q):
    """Read the guest's state block via HMP xp; returns a dict of u32 values."""
    out = q.hmp(f"xp /{len(STATE_FIELDS)}wx {STATE_ADDR:#x}")
    words = []
    for line in out.splitlines():
        if ":" not in line:
            continue
        words += [int(w, 16) for w in line.split(":", 1)[1].split()]
    if len(words) < len(STATE_FIELDS):
        raise QmpError(f"short xp output: {out!r}")
    st = dict(zip(STATE_FIELDS, words))
    st["magic_ok"] = st["magic"] == 0x214E5552
    return st


def event_time(ev):
    ts = ev.get("timestamp", {})
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, what = argv[1], argv[2]
    q = Qmp(path)
    try:
        if what == "cmd":
            args = json.loads(argv[4]) if len(argv) > 4 else {}
            print(json.dumps(q.cmd(argv[3], **args)))
        elif what == "hmp":
            print(q.hmp(argv[3]), end="")
        elif what == "state":
            print(json.dumps(read_guest_state(q)))
        elif what == "wait-event":
            t = float(argv[4]) if len(argv) > 4 else 30.0
            print(json.dumps(q.wait_event(argv[3], timeout=t)))
        else:
            print(f"unknown subcommand {what}", file=sys.stderr)
            return 2
    except QmpError as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 1
    finally:
        q.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
