#!/usr/bin/env bash
# Benchmark colo-blk's COLO secondary against QEMU's own replication data path.
#
# colo-blk: `colo-blk serve --replication secondary` (NBD server for the
# primary's writes, copy-before-write into the hidden buffer, VM on the active
# buffer). QEMU: qemu-system-x86_64 -machine none (no guest) with the
# graph of docs/COLO-FT.txt: raw secondary disk `sec` <- qcow2 hidden <-
# qcow2 active <- replication (mode=secondary, top-id = itself); `rep`
# exported as vhost-user-blk, `sec` exported over NBD; driven with
# xen-set-replication / xen-colo-do-checkpoint. Both use the same disk image
# (one process at a time) and keep their buffers in --bufdir (tmpfs).
#
# Baselines: VM rows against the same disk without replication (colo-blk
# mode none; qemu-storage-daemon vhost-user-blk export of raw-over-file); NBD
# rows against plain qemu-nbd. VM load: `colo-blk bench` (libblkio). NBD
# load: `qemu-img bench` over nbd+unix.
#
# Rows: 1 VM 4K randread QD32 x2 queues, empty buffers; 2 VM 4K randwrite
# QD32 x2 while the active buffer fills; 3 NBD 4K sequential writes QD32 with
# copy-before-write (the whole disk once); 4 NBD 4K writes one per 64 KiB;
# 5 NBD 1M writes QD8; 6 checkpoint round trip with 0 / 1k / 50k dirty 4K
# blocks in each buffer (active: VM 4K sequential writes over N blocks;
# hidden: NBD 4K writes one per 16 KiB); 7 failover merge of 256 MiB (128 MiB
# VM 1M writes + 128 MiB NBD 1M writes) vs the disk's 1M sequential write
# rate; 8 RSS with a 1 TiB sparse disk after replication-start (and, as an
# extra, after 2 s of VM 4K randwrite over the whole 1 TiB).
#
# usage: contrib/bench-replication.sh [options]
#   --runtime SECS     seconds per VM throughput run (default 5)
#   --repeat N         rounds; each round runs every row for both, the
#                      order colo-blk/QEMU alternating between rounds (default 2)
#   --cache MODE       direct (default): O_DIRECT disk and buffers in colo-blk
#                      (--direct), cache.direct=on in QEMU, QSD and qemu-nbd
#                      (--cache=none); buffered: page cache everywhere
#   --disk-size SIZE   secondary disk size in MiB (default 1024; small values
#                      scale the counts, for smoke tests)
#   --workdir DIR      disk image and logs (default ${TMPDIR:-/tmp}/colo-blk-bench-rep)
#   --bufdir DIR       where both keep active/hidden buffers (default /dev/shm)
#   --only WHO         colo or qemu: skip the other's replication rows
#   --no-rss           skip row 8
#   --vm-only          run only the VM rows: 1, 2 and 2b (4K randread with 256 MiB
#                      in the active buffer) and their mode-none baselines; no NBD
#                      rows, checkpoints, merge or RSS
#   --checkpoint-only  run only row 6 (checkpoint with 0 / 1k / 50k dirty blocks per
#                      buffer); no baselines, no merge, no RSS
#   --wait-for REGEX   before every measurement, wait while `pgrep -f REGEX`
#                      finds a process (default 'contrib/bench[.]sh': never run
#                      together with contrib/bench.sh); write a letter in
#                      brackets so the pattern does not match this script
#   --no-wait          don't wait for anything
# Every measurement also records the CPU time other processes used meanwhile
# (% of one CPU, [in brackets] in the run table; for the short checkpoint and
# merge timings: during the idle 0.5 s just before); > 25 % is listed as a problem.
# env: COLO_BLK  colo-blk binary (default target/release/colo-blk of this repo)
#      QEMU      qemu-system-x86_64, QSD qemu-storage-daemon, QEMU_NBD qemu-nbd,
#      QEMU_IMG  qemu-img (defaults: from PATH)
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail

bench_tag=bench-replication bench_problem_word=PROBLEM bench_stop_secs=15 bench_stop_complain=1
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

qemu=${QEMU:-qemu-system-x86_64}
qsd=${QSD:-qemu-storage-daemon}
qnbd=${QEMU_NBD:-qemu-nbd}
qimg=${QEMU_IMG:-qemu-img}
runtime=5 repeat=2 cache=direct disk_mib=1024 only='' do_rss=1 ckpt_only=0 vm_only=0 do_wait=1 wait_re='contrib/bench[.]sh'
workdir=${TMPDIR:-/tmp}/colo-blk-bench-rep
bufroot=/dev/shm
while [[ $# -gt 0 ]]; do
    case $1 in
        --cache) cache=${2:?}; shift 2 ;;
        --disk-size) disk_mib=${2:?}; shift 2 ;;
        --bufdir) bufroot=${2:?}; shift 2 ;;
        --only) only=${2:?}; shift 2 ;;
        --no-rss) do_rss=0; shift ;;
        --checkpoint-only) ckpt_only=1; do_rss=0; shift ;;
        --vm-only) vm_only=1; do_rss=0; shift ;;
        --wait-for) wait_re=${2:?}; shift 2 ;;
        --no-wait) do_wait=0; shift ;;
        *) bench_arg "$@"; shift "$bench_shift" ;;
    esac
done
need_posint "$runtime" --runtime
need_posint "$repeat" --repeat
[[ $disk_mib =~ ^[1-9][0-9]*$ && $disk_mib -ge 16 ]] || die "--disk-size takes an integer >= 16 (MiB)"
[[ $cache == direct || $cache == buffered ]] || die "--cache is direct or buffered"
[[ -z $only || $only == colo || $only == qemu ]] || die "--only is colo or qemu"
need_colo
for b in "$qemu" "$qsd" "$qnbd" "$qimg" python3; do
    command -v "$b" >/dev/null || die "$b not found"
done

make_rundir
bufdir=$(mktemp -d "$bufroot/colo-blk-bench-rep.XXXXXX")
disk=$workdir/random-${disk_mib}m.img
size=$((disk_mib << 20))
export_name=parent0

# Counts derived from the disk size (1 GiB: 262144 / 16384 / 1024 requests).
n_seq4k=$((size / 4096))
n_step64k=$((size / 65536))
n_1m=$((size >> 20))
max_fill=$(((size - 8192) / 16384))
fills=(0 $((max_fill < 1000 ? max_fill : 1000)) $((max_fill < 50000 ? max_fill : 50000)))
merge_part=$((size / 4 < (128 << 20) ? size / 4 : (128 << 20))) # bytes per buffer
merge_mib=$((2 * merge_part >> 20))

if [[ $cache == direct ]]; then
    colo_cache=(--direct) qcache=true nbd_cache=none
else
    colo_cache=() qcache=false nbd_cache=writeback
fi

# ------------------------------------------------------------ QMP helper ---

cat >"$run/qmp.py" <<'EOF'
# QMP client: run <sock> executes JSON commands from stdin (one per line) and
# prints each answer with "us" (round trip); failover-colo / failover-qemu
# <sock> <timeout> start a failover and poll until the merge is done.
import json, socket, sys, time

class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.f = self.s.makefile("rwb", buffering=0)
        if "QMP" not in self.read():
            raise SystemExit("no QMP greeting")
        r = self.cmd("qmp_capabilities")
        if "error" in r:
            raise SystemExit("qmp_capabilities: %s" % json.dumps(r))

    def read(self):
        line = self.f.readline()
        if not line:
            raise SystemExit("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        t0 = time.perf_counter()
        self.f.write((json.dumps(msg) + "\n").encode())
        while True:
            m = self.read()
            if "event" not in m:
                m["us"] = round((time.perf_counter() - t0) * 1e6)
                return m

def ok(r, what):
    if "error" in r:
        print(json.dumps({"error": what + ": " + r["error"].get("desc", str(r["error"]))}))
        sys.exit(1)
    return r["return"]

def failover(q, who, timeout):
    t0 = time.perf_counter()
    if who == "colo":
        ok(q.cmd("replication-stop", {"failover": True}), "replication-stop")
    else:
        ok(q.cmd("xen-set-replication", {"enable": False, "primary": False, "failover": True}),
           "xen-set-replication")
    polls = 0
    while True:
        polls += 1
        now = time.perf_counter() - t0
        if who == "colo":
            r = ok(q.cmd("query-replication"), "query-replication")
            if r["stage"] in ("done", "failover-failed"):
                print(json.dumps({"us": round(now * 1e6), "stage": r["stage"], "error": r["error"],
                                  "commit": r["commit"], "polls": polls}))
                return r["stage"] == "done"
        else:
            # QEMU's commit job is internal (no job, no event). replication_done()
            # detaches the "hidden disk" child and clears the error that the
            # backup-job cancel left; the failure path keeps both.
            st = ok(q.cmd("query-xen-replication-status"), "query-xen-replication-status")
            nodes = ok(q.cmd("query-named-block-nodes", {"flat": True}), "query-named-block-nodes")
            rep = [n for n in nodes if n["node-name"] == "rep"][0]
            if not st["error"] and '"hidden disk"' not in rep["image"]["filename"]:
                print(json.dumps({"us": round(now * 1e6), "stage": "done",
                                  "file": rep["image"]["filename"], "polls": polls}))
                return True
        if now > timeout:
            print(json.dumps({"error": "merge not done after %s s" % timeout, "polls": polls}))
            return False
        time.sleep(0.001)

def main():
    mode, path = sys.argv[1], sys.argv[2]
    deadline = time.time() + 20
    while True:
        try:
            q = Qmp(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    if mode == "run":
        for line in sys.stdin:
            if line.strip():
                m = json.loads(line)
                r = q.cmd(m["execute"], m.get("arguments"))
                print(json.dumps(r), flush=True)
                if "error" in r:
                    sys.exit(1)
    elif mode in ("failover-colo", "failover-qemu"):
        sys.exit(0 if failover(q, mode.split("-")[1], float(sys.argv[3])) else 1)
    else:
        raise SystemExit("unknown mode " + mode)

main()
EOF

# (qmp SOCK 'json' ... and jget 'expression on r' JSON are in bench-lib.sh.)

# --------------------------------------------------------------- daemons ---

# (problem, stop_pid with its 15 s and pids are in bench-lib.sh.)

cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$bufdir"
}
bench_traps

# Wait while a process matching --wait-for runs (another benchmark, a build),
# polling every 30 s.
wait_idle() {
    [[ $do_wait == 1 ]] || return 0
    local said=0
    while pgrep -f "$wait_re" >/dev/null; do
        [[ $said == 1 ]] || log "waiting: $(pgrep -f "$wait_re" | head -n 1 | xargs -r ps -o args= -p | cut -c1-80) (polling every 30 s)"
        said=1
        sleep 30
    done
}

# CPU time used by anything but us (the daemon under test and every child this
# shell reaped: load generators, QMP client) during a measurement, as % of one
# CPU. Kernel threads doing our I/O count as "other", so a few % are normal.
# (The tick counters and other_warn are in bench-lib.sh.)
ours_ticks() { echo $(($(pid_ticks "${cur_pid:-0}") + $(child_ticks))); }
meas_start() { wait_idle; m_t0=$(date +%s%N) m_busy=$(cpu_busy) m_ours=$(ours_ticks); }
other=0
meas_end() { # WHAT: sets other (%), complains when high
    local busy ours t1
    busy=$(cpu_busy) ours=$(ours_ticks) t1=$(date +%s%N)
    other=$(awk -v b=$((busy - m_busy)) -v o=$((ours - m_ours)) -v ns=$((t1 - m_t0)) -v hz="$hz" \
        'BEGIN { p = (b - o) * 100 / (ns / 1e9 * hz); if (p < 0) p = 0; printf "%.0f", p }')
    ((other <= other_warn)) || problem "$1: other processes used $other % of a CPU meanwhile"
}
# Before a short timing: others' CPU over 0.5 s while our daemon is idle.
pre_window() { # WHAT
    meas_start
    sleep 0.5
    meas_end "$1 (0.5 s before)"
}

cur_pid='' cur_sock='' cur_qmp='' cur_nbd='' cur_log='' nstart=0

# colo-blk: start_colo none|secondary DISK
start_colo() {
    local mode=$1 d=$2 tag=colo-$1
    cur_sock=$run/$tag.sock cur_qmp=$run/$tag.qmp cur_log=$run/$tag.$((++nstart)).log cur_nbd=$run/$tag.nbd
    rm -f "$cur_sock" "$cur_qmp" "$cur_nbd" "$bufdir"/colo-*
    local -a args=(serve --disk "$d" --socket "$cur_sock" --qmp "$cur_qmp" --num-queues 2 "${colo_cache[@]}")
    if [[ $mode == secondary ]]; then
        args+=(--replication secondary --active "$bufdir/colo-active.img" --hidden "$bufdir/colo-hidden.img"
            --nbd-listen "unix:$cur_nbd" --nbd-export "$export_name")
    fi
    echo "+ $colo ${args[*]}" >>"$cur_log"
    "$colo" "${args[@]}" </dev/null >>"$cur_log" 2>&1 &
    cur_pid=$!
    pids+=("$cur_pid")
    wait_ready "colo-blk $mode" "$cur_pid" "$cur_log" colo_ready "$cur_sock" "$cur_log"
}

# qemu-storage-daemon, raw over file, vhost-user-blk export (QEMU's "mode none").
start_qsd() {
    local d=$1
    cur_sock=$run/qsd.sock cur_log=$run/qsd.$((++nstart)).log
    local pidf=$run/qsd.pid
    rm -f "$cur_sock" "$pidf"
    local -a args=(--blockdev "driver=file,node-name=f,filename=$d,aio=io_uring,cache.direct=$qcache"
        --blockdev "driver=raw,node-name=d,file=f,cache.direct=$qcache"
        --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$cur_sock,writable=on,num-queues=2"
        --pidfile "$pidf")
    echo "+ $qsd ${args[*]}" >>"$cur_log"
    "$qsd" "${args[@]}" </dev/null >>"$cur_log" 2>&1 &
    cur_pid=$!
    pids+=("$cur_pid")
    wait_ready qemu-storage-daemon "$cur_pid" "$cur_log" test -S "$cur_sock" -a -s "$pidf"
}

# Plain qemu-nbd (the NBD baseline).
start_qnbd() {
    local d=$1
    cur_nbd=$run/qemu-nbd.sock cur_log=$run/qemu-nbd.$((++nstart)).log
    rm -f "$cur_nbd"
    local -a args=(-f raw -t -x "$export_name" --socket "$cur_nbd" --cache="$nbd_cache" --aio=io_uring "$d")
    echo "+ $qnbd ${args[*]}" >>"$cur_log"
    "$qnbd" "${args[@]}" </dev/null >>"$cur_log" 2>&1 &
    cur_pid=$!
    pids+=("$cur_pid")
    wait_ready qemu-nbd "$cur_pid" "$cur_log" test -S "$cur_nbd"
}

# QEMU replication peer: qemu-system-x86_64 -machine none, graph built over QMP.
start_qemu() {
    local d=$1 sz=$2
    cur_sock=$run/qemu.sock cur_qmp=$run/qemu.qmp cur_nbd=$run/qemu.nbd cur_log=$run/qemu.$((++nstart)).log
    rm -f "$cur_sock" "$cur_qmp" "$cur_nbd" "$bufdir"/qemu-*
    local a=$bufdir/qemu-active.qcow2 h=$bufdir/qemu-hidden.qcow2
    "$qimg" create -q -f qcow2 "$h" "$sz"
    "$qimg" create -q -f qcow2 "$a" "$sz"
    local -a args=(-machine none -nodefaults -display none -qmp "unix:$cur_qmp,server=on,wait=off")
    echo "+ $qemu ${args[*]}" >>"$cur_log"
    "$qemu" "${args[@]}" </dev/null >>"$cur_log" 2>&1 &
    cur_pid=$!
    pids+=("$cur_pid")
    wait_ready qemu-system "$cur_pid" "$cur_log" test -S "$cur_qmp"
    local c="\"cache\":{\"direct\":$qcache}"
    local f="\"driver\":\"file\",\"aio\":\"io_uring\",$c"
    if ! qmp "$cur_qmp" \
        "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"sec\",$c,\"file\":{$f,\"filename\":\"$d\"}}}" \
        "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"qcow2\",\"node-name\":\"hidden\",$c,\"file\":{$f,\"filename\":\"$h\"},\"backing\":\"sec\"}}" \
        "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"qcow2\",\"node-name\":\"active\",$c,\"file\":{$f,\"filename\":\"$a\"},\"backing\":\"hidden\"}}" \
        '{"execute":"blockdev-add","arguments":{"driver":"replication","node-name":"rep","mode":"secondary","top-id":"rep","file":"active"}}' \
        "{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":{\"type\":\"unix\",\"data\":{\"path\":\"$cur_nbd\"}}}}" \
        "{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"nbd\",\"id\":\"nbd0\",\"node-name\":\"sec\",\"name\":\"$export_name\",\"writable\":true}}" \
        "{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"vhost-user-blk\",\"id\":\"vub0\",\"node-name\":\"rep\",\"addr\":{\"type\":\"unix\",\"path\":\"$cur_sock\"},\"writable\":true,\"num-queues\":2}}" \
        >>"$cur_log" 2>&1; then
        tail -n 3 "$cur_log" >&2
        die "building QEMU's replication graph failed (log: $cur_log)"
    fi
}

stop_cur() { # WHAT
    local n
    if [[ -n $cur_pid ]]; then
        stop_pid "$cur_pid"
        [[ $stop_rc == 0 ]] || problem "$1 exited with status $stop_rc on SIGTERM (log: $cur_log)"
        cur_pid=''
    fi
    # colo-blk logs WARN/ERROR for failed requests and operations: surface them.
    if [[ $1 == colo* ]]; then
        n=$(grep -cE '^\[[^]]* (WARN|ERROR) ' "$cur_log" || true)
        if ((n > 0)); then
            problem "$1: $n WARN/ERROR lines in $cur_log, first: $(grep -m 1 -E '^\[[^]]* (WARN|ERROR) ' "$cur_log")"
        fi
    fi
    rm -f "$bufdir"/colo-* "$bufdir"/qemu-*
}

alive() { # WHAT: the current daemon must still run
    kill -0 "$cur_pid" 2>/dev/null || die "$1 died (log: $cur_log)"
}

# ------------------------------------------------------------- helpers ---

results=$run/results.txt # row impl rep value [note]; rec, med, errs: bench-lib.sh
: >"$results"

runs() {
    awk -v r="$1" -v i="$2" '$1 == r && $2 == i {
        o = ($NF ~ /^o=/) ? " [" substr($NF, 3) "%]" : ""
        printf "%s%s%s", (n++ ? ", " : ""), ($4 == "ERR" ? $4 : sprintf("%.10g", $4)), o }' "$results"
}
fmt0() { awk -v v="$1" 'BEGIN { if (v == "nan") print "—"; else printf "%.0f", v }'; }
fmt1() { awk -v v="$1" 'BEGIN { if (v == "nan") print "—"; else printf "%.1f", v }'; }
fmt2() { awk -v v="$1" 'BEGIN { if (v == "nan") print "—"; else printf "%.2f", v }'; }

# vm ROW IMPL REP RW BS QD QUEUES RUNTIME [SPAN]: one colo-blk bench run on cur_sock;
# records IOPS (4K) or MiB/s (larger) unless ROW is -; sets vm_ops.
vm_ops=0
vm() {
    local row=$1 impl=$2 rep=$3 rw=$4 bs=$5 qd=$6 q=$7 rt=$8 span=${9:-} out iops mib err
    vm_ops=0
    meas_start
    if ! out=$(timeout $((rt + 60)) "$colo" bench --socket "$cur_sock" --rw "$rw" --bs "$bs" --iodepth "$qd" \
        --queues "$q" --runtime "$rt" ${span:+--span "$span"} --label "$impl:$row" --json 2>>"$run/bench.err"); then
        problem "$impl $row run $rep: colo-blk bench failed: $(tail -n 1 "$run/bench.err")"
        [[ $row == - ]] || rec "$row $impl $rep ERR"
        return 1
    fi
    meas_end "$impl $row run $rep"
    echo "$out" >>"$run/bench.jsonl"
    iops=$(json_num iops "$out") mib=$(json_num mib_s "$out") err=$(json_num errors "$out")
    vm_ops=$(awk -v i="$iops" -v t="$rt" 'BEGIN { printf "%.0f", i * t }')
    if [[ ${err:-0} != 0 ]]; then
        problem "$impl $row run $rep: $err of ~$vm_ops VM requests failed"
        [[ $row == - ]] || rec "$row $impl $rep ERR"
        return 1
    fi
    [[ $row == - ]] && return 0
    if [[ $bs == 4K ]]; then rec "$row $impl $rep $iops o=$other"; else rec "$row $impl $rep $mib o=$other"; fi
    log "  $row $impl #$rep: $(fmt0 "$iops") IOPS, $mib MiB/s; others used $other % CPU"
}

# nbd ROW IMPL REP BS STEP QD COUNT [OFFSET]: qemu-img bench writes over cur_nbd;
# records IOPS (4K) or MiB/s unless ROW is -.
nbd() {
    local row=$1 impl=$2 rep=$3 bs=$4 step=$5 qd=$6 count=$7 off=${8:-0} out secs v
    local url="nbd+unix:///$export_name?socket=$cur_nbd"
    meas_start
    if ! out=$(timeout 600 "$qimg" bench -f raw -w -t none -s "$bs" -S "$step" -d "$qd" -c "$count" -o "$off" \
        "$url" 2>&1); then
        problem "$impl $row run $rep: qemu-img bench -s $bs -S $step -c $count -o $off failed: $(grep -m 1 'qemu-img:' <<<"$out" || tail -n 1 <<<"$out")"
        [[ $row == - ]] || rec "$row $impl $rep ERR"
        return 1
    fi
    meas_end "$impl $row run $rep"
    [[ $row == - ]] && return 0
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
    [[ -n $secs ]] || { problem "unparsable qemu-img bench output: $out"; rec "$row $impl $rep ERR"; return 1; }
    if [[ $bs == 4096 ]]; then
        v=$(awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / (s > 0 ? s : 0.001) }')
        log "  $row $impl #$rep: $v IOPS ($count in ${secs}s); others used $other % CPU"
    else
        v=$(awk -v c="$count" -v b="$bs" -v s="$secs" 'BEGIN { printf "%.1f", c * b / 1048576 / (s > 0 ? s : 0.001) }')
        log "  $row $impl #$rep: $v MiB/s ($count in ${secs}s); others used $other % CPU"
    fi
    rec "$row $impl $rep $v o=$other"
}

# ckpt IMPL: one checkpoint; sets ck_us to its round trip in µs ("ERR" on failure).
ck_us=''
ckpt() {
    local cmd out
    if [[ $1 == colo ]]; then cmd='{"execute":"replication-checkpoint"}'; else cmd='{"execute":"xen-colo-do-checkpoint"}'; fi
    pre_window "$1 checkpoint"
    if ! out=$(qmp "$cur_qmp" "$cmd" 2>&1); then
        problem "$1: checkpoint failed: $out"
        ck_us=ERR
        return 0
    fi
    ck_us=$(jget 'r["us"]' "$out")
}

start_replication() { # IMPL
    local out
    if [[ $1 == colo ]]; then
        out=$(qmp "$cur_qmp" '{"execute":"replication-start","arguments":{"mode":"secondary"}}' 2>&1) ||
            die "colo-blk replication-start failed: $out"
    else
        out=$(qmp "$cur_qmp" '{"execute":"xen-set-replication","arguments":{"enable":true,"primary":false}}' 2>&1) ||
            die "QEMU xen-set-replication failed: $out"
    fi
}

colo_q() { qmp "$cur_qmp" '{"execute":"query-replication"}'; }

# ---------------------------------------------------------------- phases ---

phase_baselines() { # REP: mode-none VM baselines (colo-blk, QSD) and qemu-nbd
    local rep=$1 impl first second
    ((ckpt_only == 0)) || return 0
    if ((rep % 2)); then first=colo second=qsd; else first=qsd second=colo; fi
    for impl in $first $second; do
        wait_idle
        if [[ $impl == colo ]]; then start_colo none "$disk"; else start_qsd "$disk"; fi
        vm vm-4k-randread "$impl-none" "$rep" randread 4K 32 2 "$runtime" || true
        vm vm-4k-randwrite "$impl-none" "$rep" randwrite 4K 32 2 "$runtime" || true
        vm seq-1m-write "$impl-none" "$rep" write 1M 8 1 "$runtime" || true
        alive "$impl mode none"
        stop_cur "$impl mode none"
        sync
    done
    ((vm_only == 0)) || return 0
    wait_idle
    start_qnbd "$disk"
    nbd nbd-4k-seq qemu-nbd "$rep" 4096 4096 32 "$n_seq4k" || true
    nbd nbd-4k-step64k qemu-nbd "$rep" 4096 65536 32 "$n_step64k" || true
    nbd nbd-1m qemu-nbd "$rep" 1048576 1048576 8 "$n_1m" || true
    alive qemu-nbd
    stop_cur qemu-nbd
    sync
}

phase_replication() { # IMPL REP
    local impl=$1 rep=$2 n us q ad hd lc out span rt
    wait_idle
    if [[ $impl == colo ]]; then start_colo secondary "$disk"; else start_qemu "$disk" "$size"; fi
    start_replication "$impl"
    log "$impl: replication started (pid $cur_pid)"
    if ((ckpt_only == 0)); then
    # 1, 2: VM I/O with empty buffers, then while the active buffer fills.
    vm vm-4k-randread "$impl" "$rep" randread 4K 32 2 "$runtime" || true
    vm vm-4k-randwrite "$impl" "$rep" randwrite 4K 32 2 "$runtime" || true
    if ((vm_only)); then
        # 2b: reads with 256 MiB of the disk in the active buffer (a fresh epoch, the
        # first quarter of the disk written by the VM).
        ckpt "$impl"
        vm - "$impl" "$rep" write 1M 8 1 2 $((256 << 20)) || true
        vm vm-4k-randread-active256 "$impl" "$rep" randread 4K 32 2 "$runtime" || true
        alive "$impl secondary"
        # Stop replication first (drop the buffers), so colo-blk leaves its disk marked
        # clean rather than "stopped while replicating".
        [[ $impl == colo ]] && { qmp "$cur_qmp" '{"execute":"replication-stop","arguments":{"failover":false}}' >/dev/null 2>&1 || problem "colo: replication-stop failed"; }
        stop_cur "$impl secondary"
        sync
        return 0
    fi
    ckpt "$impl"
    # 3, 4, 5: NBD writes with copy-before-write, a fresh epoch for each.
    nbd nbd-4k-seq "$impl" "$rep" 4096 4096 32 "$n_seq4k" || true
    ckpt "$impl"
    nbd nbd-4k-step64k "$impl" "$rep" 4096 65536 32 "$n_step64k" || true
    ckpt "$impl"
    nbd nbd-1m "$impl" "$rep" 1048576 1048576 8 "$n_1m" || true
    ckpt "$impl"
    fi
    alive "$impl secondary"
    # 6: checkpoint with N dirty 4K blocks in each buffer.
    for n in "${fills[@]}"; do
        if ((n > 0)); then
            rt=$(((n + 9999) / 10000))
            vm - "$impl" "$rep" write 4K 32 1 "$rt" $((n * 4096)) || true
            ((vm_ops >= n)) || problem "$impl checkpoint-$n fill: only ~$vm_ops VM writes for $n blocks"
            nbd - "$impl" "$rep" 4096 16384 32 "$n" 8192 || true
        fi
        ad='' hd=''
        if [[ $impl == colo ]]; then
            out=$(colo_q)
            ad=$(jget 'r["return"]["active-dirty-bytes"]' "$out") hd=$(jget 'r["return"]["hidden-dirty-bytes"]' "$out")
        else
            ad=$(($(stat -c %b "$bufdir/qemu-active.qcow2") * 512)) hd=$(($(stat -c %b "$bufdir/qemu-hidden.qcow2") * 512))
        fi
        ckpt "$impl"
        us=$ck_us
        if [[ $us == ERR ]]; then
            rec "checkpoint-$n $impl $rep ERR"
            continue
        fi
        lc=''
        if [[ $impl == colo ]]; then
            out=$(colo_q)
            lc=$(jget 'r["return"]["last-checkpoint-us"]' "$out")
        fi
        rec "checkpoint-$n $impl $rep $(awk -v u="$us" 'BEGIN { printf "%.2f", u / 1000 }') ${lc:--} $ad $hd o=$other"
        log "  checkpoint-$n $impl #$rep: round trip $us us${lc:+, internal $lc us}; buffers before: active $ad B, hidden $hd B; others used $other % CPU"
    done
    if ((ckpt_only)); then
        alive "$impl secondary"
        # Stop replication first (drop the buffers), so colo-blk leaves its disk marked
        # clean rather than "stopped while replicating".
        [[ $impl == colo ]] && { qmp "$cur_qmp" '{"execute":"replication-stop","arguments":{"failover":false}}' >/dev/null 2>&1 || problem "colo: replication-stop failed"; }
        stop_cur "$impl secondary"
        sync
        return 0
    fi
    # 7: failover merge of 2 x merge_part bytes.
    span=$merge_part
    vm - "$impl" "$rep" write 1M 8 1 1 "$span" || true
    (((vm_ops << 20) >= span)) || problem "$impl merge fill: only ~$vm_ops MiB of VM writes for $((span >> 20)) MiB"
    nbd - "$impl" "$rep" 1048576 1048576 8 $((span >> 20)) $((size / 2)) || true
    if [[ $impl == colo ]]; then
        out=$(colo_q)
        log "  before failover: active $(jget 'r["return"]["active-dirty-bytes"]' "$out") B, hidden $(jget 'r["return"]["hidden-dirty-bytes"]' "$out") B"
    else
        log "  before failover: active.qcow2 $(stat -c %b "$bufdir/qemu-active.qcow2") blocks, hidden.qcow2 $(stat -c %b "$bufdir/qemu-hidden.qcow2") blocks"
    fi
    pre_window "$impl merge run $rep"
    if out=$(python3 "$run/qmp.py" "failover-$impl" "$cur_qmp" 300 2>&1); then
        us=$(jget 'r["us"]' "$out")
        rec "merge $impl $rep $(awk -v b=$((2 * span)) -v u="$us" 'BEGIN { printf "%.1f", b / 1048576 / (u / 1e6) }') $us o=$other"
        log "  merge $impl #$rep: $((2 * span >> 20)) MiB in $us us; others used $other % CPU ($out)"
        if [[ $impl == colo ]]; then
            local tot
            tot=$(jget 'r["commit"]["total-bytes"]' "$out")
            [[ $tot == $((2 * span)) ]] || problem "colo merge run $rep: commit total-bytes $tot, expected $((2 * span)) ($out)"
        fi
        # VM I/O must work on the merged disk.
        vm - "$impl" "$rep" randread 4K 32 2 1 || problem "$impl: VM reads fail after failover"
    else
        rec "merge $impl $rep ERR"
        problem "$impl failover merge run $rep: $out"
    fi
    alive "$impl secondary"
    stop_cur "$impl secondary"
    sync
}

rss_kib() { ps -o rss= -p "$1" | tr -d ' '; }

phase_rss() {
    local big=$workdir/sparse-1t.img impl
    rm -f "$big"
    truncate -s 1T "$big"
    for impl in colo qemu; do
        [[ -z $only || $only == "$impl" ]] || continue
        wait_idle
        if [[ $impl == colo ]]; then start_colo secondary "$big"; else start_qemu "$big" 1T; fi
        start_replication "$impl"
        sleep 1
        rec "rss-1t $impl 1 $(rss_kib "$cur_pid")"
        log "  rss-1t $impl: $(rss_kib "$cur_pid") KiB"
        # Extra: after 2 s of 4K random VM writes spread over the whole 1 TiB.
        vm - "$impl" 1 randwrite 4K 32 2 2 || true
        rec "rss-1t-randwrite $impl 1 $(rss_kib "$cur_pid") $vm_ops"
        log "  rss-1t-randwrite $impl: $(rss_kib "$cur_pid") KiB after ~$vm_ops writes"
        alive "$impl 1 TiB"
        stop_cur "$impl 1 TiB"
    done
    rm -f "$big"
}

make_disk() { random_image "$disk" "$size" "$disk_mib MiB"; }

# ------------------------------------------------------------------ report ---

report() {
    local colo_ver qemu_ver
    colo_ver=$("$colo" --version 2>/dev/null | head -n 1)
    qemu_ver=$("$qemu" --version | head -n 1)
    echo "## Replication (secondary)"
    echo
    echo "colo-blk \`--replication secondary\` against QEMU's own replication data path, $started."
    echo "Rerun: \`contrib/bench-replication.sh --cache $cache --repeat $repeat --runtime $runtime$([[ $disk_mib != 1024 ]] && echo " --disk-size $disk_mib")\` (report on stdout; raw data in \`$run\`)."
    echo
    echo "- colo-blk: \`$colo\` ($colo_ver); QEMU: $qemu_ver; $("$qsd" --version | head -n 1)"
    echo "- host: $(nproc) vCPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r); disk image on $(df -T "$workdir" | awk 'NR == 2 { print $2 " (" $1 ")" }'); buffers on $(df -T "$bufroot" | awk 'NR == 2 { print $2 }') ($bufroot)"
    echo "- load average at start $load_start, at end $load_end; $([[ $do_wait == 1 ]] && echo "waited before every measurement while \`pgrep -f '$wait_re'\` found a process; ")$repeat round(s), order colo-blk/QEMU alternating; medians shown, individual runs below"
    if [[ $cache == direct ]]; then
        echo "- cache: O_DIRECT everywhere: colo-blk \`--direct\` (disk and buffers), QEMU/QSD \`cache.direct=on\` on every node (disk, qcow2 buffers), qemu-nbd \`--cache=none\`; aio=io_uring"
    else
        echo "- cache: page cache everywhere: colo-blk without \`--direct\`, QEMU/QSD \`cache.direct=off\`, qemu-nbd \`--cache=writeback\`; aio=io_uring"
    fi
    echo "- disk: ${disk_mib} MiB raw image of random data; VM load \`colo-blk bench\` (libblkio, 2 queues x QD32, ${runtime} s); NBD load \`qemu-img bench -f raw -w -t none\` over nbd+unix (4K: QD32; 1M: QD8; each run writes the whole disk once, in a fresh checkpoint epoch)"
    echo
    local r c q cb qb unit base tgt
    echo "| row | colo-blk | ratio | QEMU | ratio | baseline (colo-blk none / QSD / qemu-nbd) | target |"
    echo "| --- | ---: | ---: | ---: | ---: | --- | --- |"
    for r in "vm-4k-randread|1. VM 4K randread QD32x2, empty buffers|IOPS|vm|≥ 0.98" \
        "vm-4k-randwrite|2. VM 4K randwrite QD32x2, buffers filling|IOPS|vm|≥ 0.9" \
        "vm-4k-randread-active256|2b. VM 4K randread QD32x2, 256 MiB in active (--vm-only)|IOPS|vm|≥ 0.9" \
        "nbd-4k-seq|3. NBD 4K sequential writes (CBW)|IOPS|nbd|≥ 0.9" \
        "nbd-4k-step64k|4. NBD 4K writes, one per 64 KiB|IOPS|nbd|≥ 0.7" \
        "nbd-1m|5. NBD 1M writes QD8|MiB/s|nbd|≥ 0.8"; do
        IFS='|' read -r row label unit kind tgt <<<"$r"
        c=$(med "$row" colo) q=$(med "$row" qemu)
        if [[ $kind == vm ]]; then
            cb=$(med "${row%-active256}" colo-none) qb=$(med "${row%-active256}" qsd-none)
            base="$(fmt0 "$cb") / $(fmt0 "$qb") / —"
        else
            cb=$(med "$row" qemu-nbd) qb=$cb
            base="— / — / $(fmt0 "$cb")"
        fi
        printf '| %s | %s %s%s | %s | %s %s%s | %s | %s %s | %s |\n' "$label" \
            "$(fmt0 "$c")" "$unit" "$(errs "$row" colo)" "$(ratio "$c" "$cb")" \
            "$(fmt0 "$q")" "$unit" "$(errs "$row" qemu)" "$(ratio "$q" "$qb")" "$base" "$unit" "$tgt"
    done
    local n
    for n in "${fills[@]}"; do
        c=$(med "checkpoint-$n" colo) q=$(med "checkpoint-$n" qemu)
        local lc
        lc=$(awk -v r="checkpoint-$n" '$1 == r && $2 == "colo" && $5 != "-" && $4 != "ERR" { print $5 / 1000 }' "$results" | median)
        printf '| 6. checkpoint, %s dirty 4K blocks per buffer | %s ms%s (internal %s ms) | | %s ms%s | | | < 20 ms |\n' \
            "$n" "$(fmt2 "$c")" "$(errs "checkpoint-$n" colo)" "$(fmt2 "$lc")" "$(fmt2 "$q")" "$(errs "checkpoint-$n" qemu)"
    done
    c=$(med merge colo) q=$(med merge qemu) cb=$(med seq-1m-write colo-none) qb=$(med seq-1m-write qsd-none)
    printf '| 7. failover merge of %s MiB (vs 1M QD8 sequential VM write, mode none) | %s MiB/s%s | %s | %s MiB/s%s | %s | %s / %s / — MiB/s | ≥ 0.8 |\n' \
        "$merge_mib" "$(fmt0 "$c")" "$(errs merge colo)" "$(ratio "$c" "$cb")" "$(fmt0 "$q")" "$(errs merge qemu)" "$(ratio "$q" "$qb")" "$(fmt0 "$cb")" "$(fmt0 "$qb")"
    if [[ $do_rss == 1 ]]; then
        c=$(med rss-1t colo) q=$(med rss-1t qemu)
        printf '| 8. RSS, 1 TiB sparse disk, after replication-start | %s MiB | | %s MiB | | | < 64 MiB |\n' \
            "$(fmt1 "$(awk -v v="$c" 'BEGIN { print (v == "nan") ? "nan" : v / 1024 }')")" "$(fmt1 "$(awk -v v="$q" 'BEGIN { print (v == "nan") ? "nan" : v / 1024 }')")"
        c=$(med rss-1t-randwrite colo) q=$(med rss-1t-randwrite qemu)
        printf '| 8b. (extra) RSS after 2 s VM 4K randwrite over the 1 TiB | %s MiB | | %s MiB | | | — |\n' \
            "$(fmt1 "$(awk -v v="$c" 'BEGIN { print (v == "nan") ? "nan" : v / 1024 }')")" "$(fmt1 "$(awk -v v="$q" 'BEGIN { print (v == "nan") ? "nan" : v / 1024 }')")"
    fi
    echo
    echo "Ratios: rows 1–2 against the same backend without replication (colo-blk mode none, QSD), rows 3–5"
    echo "against plain qemu-nbd, row 7 against the backend's own mode-none 1M sequential write rate."
    echo "Checkpoint = round trip of the QMP command (replication-checkpoint / xen-colo-do-checkpoint) on an"
    echo "open connection; colo-blk's own \`last-checkpoint-us\` in brackets. Active fill: VM 4K sequential"
    echo "writes over the first N blocks; hidden fill: NBD 4K writes at 8 KiB + k x 16 KiB."
    echo
    echo "Individual runs (in order; ERR = failed; [CPU other processes used meanwhile, % of one CPU]):"
    echo
    echo "| row | colo-blk | QEMU | colo-blk none | QSD | qemu-nbd |"
    echo "| --- | --- | --- | --- | --- | --- |"
    local rows
    mapfile -t rows < <(awk '!seen[$1]++ { print $1 }' "$results")
    for r in "${rows[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s |\n' "$r" "$(runs "$r" colo)" "$(runs "$r" qemu)" \
            "$(runs "$r" colo-none)" "$(runs "$r" qsd-none)" "$(runs "$r" qemu-nbd)"
    done
    echo
    echo "Buffer sizes before each checkpoint (bytes; colo-blk: active/hidden-dirty-bytes; QEMU: allocated size of the qcow2 files):"
    echo
    awk '$1 ~ /^checkpoint-/ && $4 != "ERR" { printf "- %s %s #%s: active %s, hidden %s\n", $1, $2, $3, $6, $7 }' "$results"
    echo
    if [[ ${#problems[@]} -gt 0 ]]; then
        echo "Problems seen by the script:"
        echo
        printf -- '- %s\n' "${problems[@]}"
        echo
    fi
}
# -------------------------------------------------------------------- main ---

started=$(date -u '+%Y-%m-%d %H:%M UTC')
wait_idle
load_start=$(loadavg)
log "logs in $run, buffers in $bufdir"
make_disk
for ((rep = 1; rep <= repeat; rep++)); do
    log "round $rep of $repeat"
    phase_baselines "$rep"
    if ((rep % 2)); then order="colo qemu"; else order="qemu colo"; fi
    for impl in $order; do
        [[ -z $only || $only == "$impl" ]] || continue
        phase_replication "$impl" "$rep"
    done
done
[[ $do_rss == 1 ]] && phase_rss
load_end=$(loadavg)
report
log "raw results: $run"
