#!/usr/bin/env bash
# Online verify rate: colo-blk `replication-verify` over the checksum extension (a
# colo-blk secondary hashes its blocks) next to read-and-compare (qemu-nbd as the
# secondary, the primary reads every block over NBD), issue 15 item 4.
#
# Two primary images of SIZE MiB: "sparse" (DATA MiB of random data in 16 pieces,
# the rest a hole) and "full" (random data everywhere). The secondary's image is a
# copy (cp --sparse=always), so the pair is in sync and replication starts with
# sync=none. Each round, for each image, alternating the order of the two targets:
#   checksum : colo-blk serve --replication secondary (replicating) as the target;
#   read     : qemu-nbd --cache=writeback -e 8 as the target.
# The time is from the `replication-verify` command to REPLICATION_VERIFY_DONE; the
# run fails unless the verify covered the whole disk and found 0 differing bytes.
# No guest I/O runs meanwhile. The images stay in the page cache after the first
# round (the machine's memory is far larger): rounds after the first are warm.
#
# usage: contrib/bench-verify.sh [--size MIB] [--data MIB] [--repeat N] [--workdir DIR]
#   defaults: --size 1024 --data 64 --repeat 3 --workdir ${TMPDIR:-/tmp}/colo-blk-bench-verify
# env: COLO_BLK (default target/release/colo-blk of this repo), QEMU_NBD (qemu-nbd)
# The markdown table goes to stdout, progress to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
colo=${COLO_BLK:-$repo/target/release/colo-blk}
qnbd=${QEMU_NBD:-qemu-nbd}
size=1024 data=64 repeat=3 work=${TMPDIR:-/tmp}/colo-blk-bench-verify

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 2; }
while (($#)); do
    case $1 in
    --size) size=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --workdir) work=$2; shift 2 ;;
    *) usage ;;
    esac
done
log() { echo "bench-verify: $(date -u +%H:%M:%S) $*" >&2; }
die() { echo "bench-verify: error: $*" >&2; exit 1; }
for b in "$colo" "$qnbd" python3; do command -v "$b" >/dev/null || die "$b not found"; done

mkdir -p "$work"
work=$(cd "$work" && pwd)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# The primary images and their in-sync copies.
piece=$((data / 16)) gap=$((size / 16))
((piece >= 1 && piece <= gap)) || die "--data must be 16..--size MiB"
rm -f "$work"/*.img
truncate -s "${size}M" "$work/sparse.img"
for i in $(seq 0 15); do
    dd if=/dev/urandom of="$work/sparse.img" bs=1M seek=$((i * gap + gap / 2)) count=$piece conv=notrunc status=none
done
dd if=/dev/urandom of="$work/full.img" bs=1M count="$size" status=none
for img in sparse full; do cp --sparse=always "$work/$img.img" "$work/$img-sec.img"; done
sync
log "images: sparse $(du -m "$work/sparse.img" | cut -f1) MiB allocated, full $(du -m "$work/full.img" | cut -f1) MiB"

cat >"$work/qmp.py" <<'EOF'
# SOCK URI: replication-start mode=primary sync=none to URI, then replication-verify
# until REPLICATION_VERIFY_DONE; prints the seconds and the verify object.
import json, socket, sys, time
path, uri = sys.argv[1], sys.argv[2]
deadline = time.time() + 20
while True:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.02)
f = s.makefile("rwb", buffering=0)
events = []
def read():
    return json.loads(f.readline())
def cmd(name, args=None):
    m = {"execute": name}
    if args: m["arguments"] = args
    f.write((json.dumps(m) + "\n").encode())
    while True:
        r = read()
        if "event" in r:
            events.append(r); continue
        if "error" in r: raise SystemExit("%s: %s" % (name, r["error"]))
        return r["return"]
read()
cmd("qmp_capabilities")
cmd("replication-start", {"mode": "primary", "secondary": uri})
t0 = time.perf_counter()
cmd("replication-verify")
while not any(e["event"] == "REPLICATION_VERIFY_DONE" for e in events):
    if time.perf_counter() - t0 > 600: raise SystemExit("verify did not end")
    events.append(read())
t = time.perf_counter() - t0
v = cmd("query-replication")["verify"]
if v["error"] or v["differing-bytes"] or v["done-bytes"] != v["total-bytes"]:
    raise SystemExit("verify failed: %s" % json.dumps(v))
print("%.3f %s" % (t, v["method"]))
EOF

rows=()
run() { # image target
    local img=$1 kind=$2 r=$work/run uri tpid
    rm -rf "$r"; mkdir -p "$r"
    local sec=$work/$img-sec.img nbd=$r/nbd.sock
    if [[ $kind == read ]]; then
        "$qnbd" -f raw -x exp -t -e 8 --cache=writeback -k "$nbd" "$sec" 2>>"$work/qemu-nbd.log" &
        tpid=$!
        pids+=("$tpid")
        local n=0
        until [[ -S $nbd ]]; do ((++n < 1000)) || die "qemu-nbd did not start"; sleep 0.01; done
        uri="nbd+unix:///exp?socket=$nbd"
    else
        "$colo" serve --replication secondary --disk "$sec" --size "${size}M" --active "$r/a.img" --hidden "$r/h.img" \
            --nbd-listen "unix:$nbd" --socket "$r/s.sock" --qmp "$r/s.qmp" 2>"$r/s.log" &
        tpid=$!
        pids+=("$tpid")
        local n=0
        until [[ -S $r/s.qmp && -S $nbd ]]; do ((++n < 1000)) || die "colo-blk secondary did not start"; sleep 0.01; done
        "$colo" ctl --qmp "$r/s.qmp" replication-start mode=secondary >/dev/null
        uri="nbd+unix:///?socket=$nbd"
    fi
    "$colo" serve --replication primary --disk "$work/$img.img" --size "${size}M" --socket "$r/p.sock" \
        --qmp "$r/p.qmp" 2>"$r/p.log" &
    local ppid=$!
    pids+=("$ppid")
    local n=0 out secs method
    until [[ -S $r/p.qmp ]]; do ((++n < 1000)) || die "colo-blk primary did not start"; sleep 0.01; done
    out=$(python3 "$work/qmp.py" "$r/p.qmp" "$uri") || die "verify failed: $(tail -n 2 "$r/p.log")"
    read -r secs method <<<"$out"
    [[ $method == "$kind" ]] || die "expected method $kind, the verify used $method"
    stop_pid "$ppid"
    stop_pid "$tpid"
    local rate
    rate=$(python3 -c "print('%.0f' % ($size / $secs))")
    rows+=("| $img | $kind ($([[ $kind == read ]] && echo qemu-nbd || echo colo-blk secondary)) | $secs | $rate |")
    log "$img, $kind: $secs s ($rate MiB/s)"
}

for round in $(seq 1 "$repeat"); do
    for img in sparse full; do
        if ((round % 2)); then run "$img" checksum; run "$img" read; else run "$img" read; run "$img" checksum; fi
    done
done

echo "Online verify: $size MiB images (sparse: $data MiB data; full: all data), $repeat rounds ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "| image | method (secondary) | seconds | MiB/s |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
