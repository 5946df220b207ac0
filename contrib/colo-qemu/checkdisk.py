#!/usr/bin/env python3
"""Check a disk image written by guest/bootsector.S against the guest's RAM state.

Usage:
    checkdisk.py IMAGE [--state STATE_JSON | --counter C --done L] [--nsect N]
                 [--json] [--quiet]

STATE_JSON is the output of `qmp.py SOCK state` (or the "state" object the
harness writes).  Without a state, only the records themselves are checked
(magic, lba, filler).

Invariant checked for a VM that is stopped with counter C and last completed L:
  * for every c with max(1, C-N+1) <= c <= L: the sector at 1 + c mod N holds
    the record of counter c                      -> otherwise "missing/stale"
  * no sector holds a record with counter > C    -> otherwise "future"
  * every non-zero sector in 1..N is a well-formed record whose lba field is
    its own LBA and whose filler matches its counter -> otherwise "corrupt"
Exit status 0 if the invariant holds, 1 if not, 2 on usage errors.
"""

import argparse
import json
import struct
import sys

SECTOR = 512
MAGIC = b"COLOSECT"


def filler(counter):
    x = counter & 0xFFFFFFFF
    out = []
    for _ in range(122):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        out.append(x)
    return struct.pack("<122I", *out)


def parse(sec, lba):
    """Return ('zero', None) | ('ok', counter) | ('corrupt', reason)."""
    if sec == bytes(SECTOR):
        return "zero", None
    if sec[:8] != MAGIC:
        return "corrupt", "bad magic"
    counter, rec_lba = struct.unpack_from("<QQ", sec, 8)
    if rec_lba != lba:
        return "corrupt", f"lba field {rec_lba} != {lba} (counter {counter})"
    if sec[24:] != filler(counter):
        return "corrupt", f"bad filler for counter {counter}"
    return "ok", counter


def scan(path, nsect):
    recs = {}  # lba -> counter
    zero, corrupt = [], []
    with open(path, "rb") as f:
        f.seek(SECTOR)
        data = f.read(nsect * SECTOR)
    for i in range(nsect):
        lba = 1 + i
        sec = data[i * SECTOR:(i + 1) * SECTOR]
        if len(sec) < SECTOR:
            zero.append(lba)
            continue
        kind, val = parse(sec, lba)
        if kind == "zero":
            zero.append(lba)
        elif kind == "ok":
            recs[lba] = val
        else:
            corrupt.append((lba, val))
    return recs, zero, corrupt


def lba_of(c, nsect):
    return 1 + c % nsect


def ranges(nums):
    """Compress a sorted list of ints into 'a-b' strings."""
    out, start, prev = [], None, None
    for n in nums:
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return out


def check(path, nsect, counter=None, done=None):
    recs, zero, corrupt = scan(path, nsect)
    res = {
        "image": path,
        "nsect": nsect,
        "records": len(recs),
        "zero_sectors": len(zero),
        "corrupt": [f"lba {l}: {r}" for l, r in corrupt],
        "max_counter_on_disk": max(recs.values()) if recs else None,
    }
    ok = not corrupt
    if counter is not None:
        future = sorted(c for c in recs.values() if c > counter)
        missing, stale = [], []
        lo = max(1, counter - nsect + 1)
        for c in range(lo, (done or 0) + 1):
            have = recs.get(lba_of(c, nsect))
            if have is None:
                missing.append(c)
            elif have != c:
                stale.append(c)
        in_progress = None
        if counter > (done or 0):
            in_progress = recs.get(lba_of(counter, nsect))
        res.update({
            "ram_counter": counter,
            "ram_last_completed": done,
            "expected_range": [lo, done],
            "future_records": len(future),
            "future_counters": ranges(future)[:20],
            "missing": len(missing),
            "missing_counters": ranges(missing)[:20],
            "stale": len(stale),
            "stale_counters": ranges(stale)[:20],
            "in_progress_sector_holds": in_progress,
        })
        ok = ok and not future and not missing and not stale
    res["consistent"] = ok
    return res


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--state", help="JSON object from qmp.py state (or a file with it)")
    ap.add_argument("--counter", type=int)
    ap.add_argument("--done", type=int)
    ap.add_argument("--nsect", type=int)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv[1:])
    counter, done, nsect = a.counter, a.done, a.nsect
    if a.state:
        s = a.state
        if not s.lstrip().startswith("{"):
            with open(s) as f:
                s = f.read()
        st = json.loads(s)
        counter, done = st["counter"], st["last_completed"]
        nsect = nsect or st.get("nsect")
    nsect = nsect or 2048
    if counter is not None and done is None:
        done = counter - 1
    res = check(a.image, nsect, counter, done)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0 if res["consistent"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
