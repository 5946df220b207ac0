#!/usr/bin/env bash
# Full sync of a sparse disk: colo-blk `replication-start mode=primary sync=full`
# beside QEMU's drive-mirror of the same image, in the same run (issue 15 item 5).
#
# The primary image is sparse: SIZE MiB with DATA MiB of random data in 16
# pieces spread over it, the rest a hole. Each round, alternating the order:
#   colo-blk  : colo-blk serve --replication primary, then QMP
#               `replication-start mode=primary sync=full secondary=...` until
#               the REPLICATION_IN_SYNC event;
#   QEMU      : qemu-storage-daemon with the image (raw/file) and an nbd node,
#               blockdev-mirror sync=full until BLOCK_JOB_READY (then cancel);
#   colo-blk->colo-blk (extra row): the same sync into a colo-blk secondary
#               that replicates (copy-before-write on).
# Target for the first two: qemu-nbd --discard=unmap --cache=writeback on a fresh
# sparse file (so WRITE_ZEROES may punch), over a UNIX socket. For each run the
# script records the time, the target's allocated MiB (du), and checks the
# target is byte-identical to the primary (cmp).
#
# usage: contrib/bench-sync.sh [--size MIB] [--data MIB] [--repeat N] [--workdir DIR]
#   defaults: --size 1024 --data 64 --repeat 3 --workdir ${TMPDIR:-/tmp}/colo-blk-bench-sync
# env: COLO_BLK (default target/release/colo-blk of this repo), QSD
#      (qemu-storage-daemon), QEMU_NBD (qemu-nbd)
# The markdown table goes to stdout, progress to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
colo=${COLO_BLK:-$repo/target/release/colo-blk}
qsd=${QSD:-qemu-storage-daemon}
qnbd=${QEMU_NBD:-qemu-nbd}
size=1024 data=64 repeat=3 work=${TMPDIR:-/tmp}/colo-blk-bench-sync

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
log() { echo "bench-sync: $(date -u +%H:%M:%S) $*" >&2; }
die() { echo "bench-sync: error: $*" >&2; exit 1; }
for b in "$colo" "$qsd" "$qnbd" python3 cmp; do command -v "$b" >/dev/null || die "$b not found"; done

mkdir -p "$work"
work=$(cd "$work" && pwd)
pri=$work/pri.img sec=$work/sec.img nbd=$work/nbd.sock
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# The sparse primary image.
rm -f "$pri"
truncate -s "${size}M" "$pri"
piece=$((data / 16)) gap=$((size / 16))
((piece >= 1 && piece <= gap)) || die "--data must be 16..--size MiB"
for i in $(seq 0 15); do
    dd if=/dev/urandom of="$pri" bs=1M seek=$((i * gap + gap / 2)) count=$piece conv=notrunc status=none
done
sync
log "primary: $size MiB, $(du -m "$pri" | cut -f1) MiB allocated"

alloc_mib() { du -m "$1" | cut -f1; }

start_target() { # fresh sparse target served by qemu-nbd
    rm -f "$sec" "$nbd"
    truncate -s "${size}M" "$sec"
    "$qnbd" -f raw -x exp -t -e 8 --cache=writeback --discard=unmap -k "$nbd" "$sec" 2>>"$work/qemu-nbd.log" &
    tpid=$!
    pids+=("$tpid")
    local n=0
    until [[ -S $nbd ]]; do ((++n < 500)) || die "qemu-nbd did not start"; sleep 0.01; done
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

cat >"$work/qmp.py" <<'EOF'
# mirror SOCK TIMEOUT: blockdev-mirror src -> tgt sync=full on a
#   qemu-storage-daemon until BLOCK_JOB_READY (then cancel);
# colo SOCK TIMEOUT URI: colo-blk replication-start mode=primary sync=full
#   until REPLICATION_IN_SYNC.
# Prints the seconds from the command to the event.
import json, socket, sys, time
mode, path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.time() + 20
while True:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.02)
f = s.makefile("rwb", buffering=0)
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
events = []
read()
cmd("qmp_capabilities")
t0 = time.perf_counter()
if mode == "colo":
    cmd("replication-start", {"mode": "primary", "sync": "full", "secondary": sys.argv[4]})
    while not any(e["event"] == "REPLICATION_IN_SYNC" for e in events):
        if time.perf_counter() - t0 > timeout: raise SystemExit("not in sync")
        events.append(read())
    print("%.3f" % (time.perf_counter() - t0))
    sys.exit(0)
cmd("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"})
while not any(e["event"] == "BLOCK_JOB_READY" for e in events):
    if any(e["event"] == "BLOCK_JOB_COMPLETED" for e in events): raise SystemExit("mirror ended early")
    if time.perf_counter() - t0 > timeout: raise SystemExit("mirror not ready")
    events.append(read())
t = time.perf_counter() - t0
cmd("block-job-cancel", {"device": "m0"})
while not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in events):
    events.append(read())
print("%.3f" % t)
EOF

rows=()
run_colo() { # URI-kind: qemu-nbd | colo
    local kind=$1 r=$work/colo-run pq spid=
    rm -rf "$r"; mkdir -p "$r"
    pq=$r/p.qmp
    local uri
    if [[ $kind == qemu-nbd ]]; then
        start_target
        uri="nbd+unix:///exp?socket=$nbd"
    else
        rm -f "$sec" "$nbd" "$r"/a.img "$r"/h.img
        truncate -s "${size}M" "$sec"
        "$colo" serve --replication secondary --disk "$sec" --size "${size}M" --active "$r/a.img" --hidden "$r/h.img" \
            --nbd-listen "unix:$nbd" --socket "$r/s.sock" --qmp "$r/s.qmp" 2>"$r/s.log" &
        spid=$!
        pids+=("$spid")
        local n=0
        until [[ -S $r/s.qmp && -S $nbd ]]; do ((++n < 1000)) || die "colo-blk secondary did not start"; sleep 0.01; done
        "$colo" ctl --qmp "$r/s.qmp" replication-start mode=secondary >/dev/null
        uri="nbd+unix:///?socket=$nbd"
    fi
    "$colo" serve --replication primary --disk "$pri" --size "${size}M" --socket "$r/p.sock" --qmp "$pq" 2>"$r/p.log" &
    local ppid=$!
    pids+=("$ppid")
    local n=0
    until [[ -S $pq ]]; do ((++n < 1000)) || die "colo-blk primary did not start"; sleep 0.01; done
    local secs q
    secs=$(python3 "$work/qmp.py" colo "$pq" 600 "$uri") || die "colo-blk sync failed: $(tail -n 2 "$r/p.log")"

    q=$("$colo" ctl --qmp "$pq" query-replication)
    stop_pid "$ppid"
    [[ -n $spid ]] && stop_pid "$spid"
    [[ $kind == qemu-nbd ]] && stop_pid "$tpid"
    cmp -s "$pri" "$sec" || die "colo-blk ($kind): target differs from the primary"
    local dbytes
    dbytes=$(python3 -c 'import json,sys; r = json.loads(sys.argv[1])["resync"]; print(r["data-bytes"] >> 20 if "data-bytes" in r else "n/a")' "$q")
    rows+=("| colo-blk sync=full -> $kind | $secs | $dbytes | $(alloc_mib "$sec") |")
    log "colo-blk -> $kind: $secs s, payload $dbytes MiB, target $(alloc_mib "$sec") MiB allocated"
}

run_qemu() {
    local r=$work/qsd-run
    rm -rf "$r"; mkdir -p "$r"
    start_target
    "$qsd" --blockdev "driver=file,node-name=src-file,filename=$pri,aio=io_uring" \
        --blockdev "driver=raw,node-name=src,file=src-file" \
        --blockdev "driver=nbd,node-name=tgt,server.type=unix,server.path=$nbd,export=exp" \
        --chardev "socket,id=m,path=$r/qmp.sock,server=on,wait=off" --monitor chardev=m 2>"$r/qsd.log" &
    local qpid=$!
    pids+=("$qpid")
    local secs
    secs=$(python3 "$work/qmp.py" mirror "$r/qmp.sock" 600) || die "QEMU mirror failed: $(tail -n 2 "$r/qsd.log")"
    stop_pid "$qpid"
    stop_pid "$tpid"
    cmp -s "$pri" "$sec" || die "QEMU mirror: target differs from the primary"
    rows+=("| QEMU blockdev-mirror sync=full -> qemu-nbd | $secs | — | $(alloc_mib "$sec") |")
    log "QEMU mirror -> qemu-nbd: $secs s, target $(alloc_mib "$sec") MiB allocated"
}

for round in $(seq 1 "$repeat"); do
    if ((round % 2)); then run_colo qemu-nbd; run_qemu; else run_qemu; run_colo qemu-nbd; fi
    run_colo colo
done

echo "Sparse full sync: $size MiB image, $data MiB data in 16 pieces, $repeat rounds ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "| run | seconds to in sync / READY | payload MiB (resync.data-bytes) | target allocated MiB |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
