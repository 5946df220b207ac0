#!/usr/bin/env bash
# Benchmark colo-blk's COLO primary (`serve --replication primary`) against
# QEMU's own primary data path.
#
# colo-blk: every guest write goes to the local disk and, over NBD, to a
# qemu-nbd secondary; `replication-start mode=primary [sync=full]`.
# QEMU: qemu-system-x86_64 -machine none (no guest), graph of
# docs/COLO-FT.txt built with blockdev-add: quorum (fifo, vote-threshold=1)
# over [local raw disk, replication(mode=primary) -> nbd client], exported as
# vhost-user-blk, started with xen-set-replication. Baselines: the same
# program without replication (colo-blk mode none; the same QEMU exporting
# only the local raw node). Secondary for both: qemu-nbd on a raw file over a
# UNIX socket. Guest load: `colo-blk bench` (libblkio).
#
# Rows: 1 4K randwrite QD32 x 2 queues (plus 1b: QD8 x 2, and a "secondary
# ceiling": qemu-img bench 4K writes QD32 straight into plain qemu-nbd);
# 2 1M sequential write QD8 x 2 queues (CPU of backend, qemu-nbd and host
# recorded for rows 1-2); 3 full sync of the whole disk (colo-blk: replication-start
# sync=full until REPLICATION_IN_SYNC; QEMU has no such mode, its documented
# re-protection is a full drive-mirror, so: blockdev-mirror sync=full to the
# nbd node until BLOCK_JOB_READY) vs the backend's 1M write rate of row 2;
# 4 incremental resync: the secondary dies (SIGKILL) during 2 s of guest 4K
# randwrite, then comes back: dirty-bytes before vs resync.copied-bytes
# after, guest IOPS while it was down (QEMU: guest IOPS only; it has no
# incremental resync); 4b the same with a hung (SIGSTOP) secondary.
# Rows 1-3 run --repeat rounds, colo-blk/QEMU order alternating.
#
# usage: contrib/bench-primary.sh [options]
#   --runtime SECS     seconds per throughput run (default 5)
#   --repeat N         rounds (default 2)
#   --cache MODE       direct (default): colo-blk --direct, QEMU
#                      cache.direct=on, qemu-nbd --cache=none; buffered:
#                      page cache everywhere (qemu-nbd --cache=writeback)
#   --disk-size MIB    disk size in MiB (default 1024; small for smoke tests)
#   --rows LIST        rows to run, any of 1 2 3 4 (default 1234; rows 3 and 4
#                      use row 2's baselines when present)
#   --sync-timeout S   give up on a sync/resync after S seconds, or after 20 s
#                      without progress while an error is reported (default 600)
#   --workdir DIR      images and logs (default ${TMPDIR:-/tmp}/colo-blk-bench-pri)
#   --secondary-dir D  where the secondary's image lives (default: --workdir,
#                      i.e. the same disk as the primary's); on tmpfs qemu-nbd
#                      uses --cache=writeback (tmpfs has no O_DIRECT)
#   --secondary-server S  qemu-nbd (default: one thread, on the secondary's
#                      image) or nbdkit-memory (nbdkit's memory plugin, 8
#                      threads, data in RAM: a secondary that costs little CPU,
#                      so the rows show the primary's own cost; its data does
#                      not survive the restarts of row 4), or nbdkit-null
#                      (nbdkit's null plugin: writes are dropped, the cheapest
#                      secondary there is; rows 1 and 2 only)
#   --no-wait          don't wait for other contrib/bench* scripts or cargo
#   --max-build-wait S wait at most S seconds for cargo/rustc to finish
#                      (default 1800; other contrib/bench* are always waited for)
# env: COLO_BLK  colo-blk binary (default target/release/colo-blk of this repo)
#      QEMU qemu-system-x86_64, QEMU_NBD qemu-nbd (defaults: from PATH)
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail

bench_tag=bench-primary bench_log_time=1 bench_problem_word=PROBLEM bench_stop_secs=15 bench_stop_complain=1
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

qemu=${QEMU:-qemu-system-x86_64}
qnbd=${QEMU_NBD:-qemu-nbd}
runtime=5 repeat=2 cache=direct disk_mib=1024 rows=1234 sync_timeout=600 do_wait=1 max_build_wait=1800
workdir=${TMPDIR:-/tmp}/colo-blk-bench-pri
secdir='' secserver=qemu-nbd
while [[ $# -gt 0 ]]; do
    case $1 in
        --cache) cache=${2:?}; shift 2 ;;
        --disk-size) disk_mib=${2:?}; shift 2 ;;
        --rows) rows=${2:?}; shift 2 ;;
        --sync-timeout) sync_timeout=${2:?}; shift 2 ;;
        --secondary-dir) secdir=${2:?}; shift 2 ;;
        --secondary-server) secserver=${2:?}; shift 2 ;;
        --no-wait) do_wait=0; shift ;;
        --max-build-wait) max_build_wait=${2:?}; shift 2 ;;
        *) bench_arg "$@"; shift "$bench_shift" ;;
    esac
done
need_posint "$runtime" --runtime
need_posint "$repeat" --repeat
[[ $disk_mib =~ ^[1-9][0-9]*$ && $disk_mib -ge 16 ]] || die "--disk-size takes an integer >= 16 (MiB)"
[[ $cache == direct || $cache == buffered ]] || die "--cache is direct or buffered"
[[ $rows =~ ^[1-4]+$ ]] || die "--rows takes digits 1-4"
need_posint "$sync_timeout" --sync-timeout
need_colo
[[ $secserver =~ ^(qemu-nbd|nbdkit-memory|nbdkit-null)$ ]] || die "--secondary-server is qemu-nbd, nbdkit-memory or nbdkit-null"
[[ $secserver != nbdkit-null || ! $rows =~ [34] ]] || die "--secondary-server nbdkit-null keeps no data: rows 1 and 2 only"
[[ $secserver == qemu-nbd ]] || command -v nbdkit >/dev/null || die "nbdkit not found (apt-get install nbdkit)"
for b in "$qemu" "$qnbd" python3 cmp dd; do
    command -v "$b" >/dev/null || die "$b not found"
done
want() { [[ $rows == *$1* ]]; }

make_rundir
secdir=${secdir:-$workdir}
mkdir -p "$secdir"
secdir=$(cd "$secdir" && pwd)
pri=$workdir/primary-${disk_mib}m.img
sec=$secdir/secondary-${disk_mib}m.img
sec_fs=$(df -T "$secdir" | awk 'NR == 2 { print $2 }')
size=$((disk_mib << 20))
export_name=exp

if [[ $cache == direct ]]; then
    colo_cache=(--direct) qdirect=true nbd_cache=none dd_in=(iflag=direct) dd_out=(oflag=direct)
else
    colo_cache=() qdirect=false nbd_cache=writeback dd_in=() dd_out=()
fi
if [[ $sec_fs == tmpfs ]]; then
    nbd_cache=writeback dd_out=()
fi
if [[ $secserver == nbdkit-memory ]]; then
    sec_desc="nbdkit's memory plugin (8 threads, data in RAM)"
elif [[ $secserver == nbdkit-null ]]; then
    sec_desc="nbdkit's null plugin (8 threads, writes dropped)"
else
    sec_desc="qemu-nbd \`--cache=$nbd_cache\`"
fi

# ------------------------------------------------------------ QMP helper ---

cat >"$run/qmp.py" <<'EOF'
# Small QMP client (stdlib only).
#   run SOCK                 JSON commands from stdin, one a line; prints each answer
#   sync-colo SOCK TIMEOUT   replication-start mode=primary sync=full, then wait
#                            until REPLICATION_IN_SYNC and dirty-bytes == inflight == 0
#   wait-colo SOCK TIMEOUT [T0_NS]  no command; wait until the link is up and
#                            nothing is dirty or in flight (incremental resync);
#                            times from T0_NS (wall clock, ns) when given
#   mirror-qemu SOCK TIMEOUT blockdev-mirror local -> nbd0 sync=full until
#                            BLOCK_JOB_READY, then cancel (no pivot)
# The wait modes print one JSON line: times in µs from the start.
import json, select, socket, sys, time

class Qmp:
    def __init__(self, path):
        deadline = time.time() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.s.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        if "QMP" not in self.read(None):
            raise SystemExit("no QMP greeting")
        self.ok(self.cmd("qmp_capabilities"), "qmp_capabilities")

    def read(self, timeout):
        while b"\n" not in self.buf:
            if timeout is not None:
                r, _, _ = select.select([self.s], [], [], timeout)
                if not r:
                    return None
            d = self.s.recv(65536)
            if not d:
                raise SystemExit("QMP connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        t0 = time.perf_counter()
        self.s.sendall((json.dumps(msg) + "\n").encode())
        while True:
            m = self.read(None)
            if "event" in m:
                m["t"] = time.perf_counter()
                self.events.append(m)
                continue
            m["us"] = round((time.perf_counter() - t0) * 1e6)
            return m

    def pump(self, timeout):
        """Collects events arriving within timeout seconds."""
        end = time.perf_counter() + timeout
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return
            m = self.read(left)
            if m is None:
                return
            if "event" in m:
                m["t"] = time.perf_counter()
                self.events.append(m)

    def ok(self, r, what):
        if "error" in r:
            print(json.dumps({"error": what + ": " + r["error"].get("desc", str(r["error"]))}))
            sys.exit(1)
        return r["return"]

    def seen(self, name):
        return [e for e in self.events if e["event"] == name]

def wait_colo(q, t0, timeout, need_event):
    """Polls query-replication until in sync; fails on a stalled error."""
    last_copied, last_progress, polls = -1, time.perf_counter(), 0
    while True:
        polls += 1
        r = q.ok(q.cmd("query-replication"), "query-replication")
        now = time.perf_counter()
        copied = r["resync"]["copied-bytes"]
        if copied != last_copied:
            last_copied, last_progress = copied, now
        done = (r["link"]["connected"] and r["dirty-bytes"] == 0 and r["link"]["inflight"] == 0
                and r["resync"]["remaining-bytes"] == 0)
        ev = q.seen("REPLICATION_IN_SYNC")
        if done and (ev or not need_event):
            out = {"us": round((now - t0) * 1e6), "polls": polls, "copied": copied,
                   "total": r["resync"]["total-bytes"], "error": r["error"],
                   "connects": r["link"]["connects"]}
            if ev:
                out["event_us"] = round((ev[0]["t"] - t0) * 1e6)
                out["event_data"] = ev[0].get("data")
            up = q.seen("REPLICATION_LINK")
            if up:
                out["link_events"] = [dict(e.get("data", {}), us=round((e["t"] - t0) * 1e6)) for e in up]
                ups = [e["us"] for e in out["link_events"] if e.get("connected")]
                if ups:
                    out["copy_us"] = out["us"] - max(ups)
            print(json.dumps(out))
            return True
        if now - t0 > timeout or (r["error"] and now - last_progress > 20):
            print(json.dumps({"error": "not in sync after %.1f s (%s)" % (now - t0, r["error"]),
                              "state": r, "polls": polls}))
            return False
        q.pump(0.005)

def mirror_qemu(q, timeout):
    t0 = time.perf_counter()
    q.ok(q.cmd("blockdev-mirror", {"job-id": "m0", "device": "local", "target": "nbd0",
                                    "sync": "full"}), "blockdev-mirror")
    while True:
        if q.seen("BLOCK_JOB_READY"):
            t = q.seen("BLOCK_JOB_READY")[0]["t"]
            break
        bad = [e for e in q.seen("BLOCK_JOB_COMPLETED")]
        if bad:
            print(json.dumps({"error": "mirror ended before ready: %s" % json.dumps(bad[0].get("data"))}))
            return False
        if time.perf_counter() - t0 > timeout:
            print(json.dumps({"error": "mirror not ready after %s s" % timeout}))
            return False
        q.pump(0.2)
    jobs = q.ok(q.cmd("query-block-jobs"), "query-block-jobs")
    q.ok(q.cmd("block-job-cancel", {"device": "m0"}), "block-job-cancel")
    end = time.perf_counter() + 60
    while not q.seen("BLOCK_JOB_COMPLETED") and time.perf_counter() < end:
        q.pump(0.2)
    c = q.seen("BLOCK_JOB_COMPLETED")
    print(json.dumps({"us": round((t - t0) * 1e6), "job": jobs[0] if jobs else None,
                      "completed": c[0].get("data") if c else None}))
    return bool(c) and "error" not in c[0].get("data", {})

def main():
    mode, path = sys.argv[1], sys.argv[2]
    q = Qmp(path)
    if mode == "run":
        for line in sys.stdin:
            if line.strip():
                m = json.loads(line)
                r = q.cmd(m["execute"], m.get("arguments"))
                print(json.dumps(r), flush=True)
                if "error" in r:
                    sys.exit(1)
    elif mode == "sync-colo":
        t0 = time.perf_counter()
        q.ok(q.cmd("replication-start", {"mode": "primary", "sync": "full"}), "replication-start")
        sys.exit(0 if wait_colo(q, t0, float(sys.argv[3]), True) else 1)
    elif mode == "wait-colo":
        t0 = time.perf_counter()
        if len(sys.argv) > 4:  # count from this wall-clock time (ns) instead
            t0 -= time.time() - int(sys.argv[4]) / 1e9
        sys.exit(0 if wait_colo(q, t0, float(sys.argv[3]), False) else 1)
    elif mode == "mirror-qemu":
        sys.exit(0 if mirror_qemu(q, float(sys.argv[3])) else 1)
    else:
        raise SystemExit("unknown mode " + mode)

main()
EOF

# (qmp SOCK 'json' ... and jget 'expression on r' JSON are in bench-lib.sh.)

# --------------------------------------------------------------- daemons ---

# (problem, stop_pid with its 15 s and pids/forget are in bench-lib.sh.)

cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -CONT "$p" 2>/dev/null || true
        kill -TERM "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
bench_traps

# Other benchmarks (contrib/bench*.sh but this one) must not overlap with ours;
# a cargo build/test is waited for at most --max-build-wait seconds in total.
build_waited=0
others() { # prints their command lines
    local p c
    for p in $(pgrep -f 'contrib/bench' || true); do
        [[ $p == "$$" ]] && continue
        # read again: a fork of this script may have exec'd something else meanwhile
        c=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") || continue
        [[ $c == *contrib/bench* && $c != *bench-primary* ]] && echo "$c"
    done
    return 0
}
building() { pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null; }
# overlap WHAT: after a phase, flag other benchmarks that started meanwhile.
overlap() {
    [[ $do_wait == 1 ]] || return 0
    local o
    o=$(others | sort -u | paste -sd';')
    [[ -z $o ]] || problem "$1 may have overlapped with another benchmark: $o"
}
wait_idle() {
    [[ $do_wait == 1 ]] || return 0
    local said=0
    while true; do
        if [[ -n $(others) ]]; then
            [[ $said == 1 ]] || log "waiting for $(others | sort -u | paste -sd';') (polling every 30 s)"
            said=1
            sleep 30
            continue
        fi
        if building && ((build_waited < max_build_wait)); then
            [[ $said == 2 ]] || log "waiting for cargo/rustc to finish (polling every 30 s; at most $((max_build_wait - build_waited)) s more)"
            said=2
            sleep 30
            build_waited=$((build_waited + 30))
            continue
        fi
        break
    done
    if building; then problem "cargo/rustc was running during a measurement (gave up waiting after ${max_build_wait}s)"; fi
}

nstart=0
nbd_pid='' nbd_sock=$run/nbd.sock nbd_log=''
start_nbd() {
    nbd_log=$run/qemu-nbd.$((++nstart)).log
    rm -f "$nbd_sock"
    if [[ $secserver == nbdkit-* ]]; then
        local -a args=(-f -U "$nbd_sock" --exportname "$export_name" -t 8 "${secserver#nbdkit-}" "size=$size")
        echo "+ nbdkit ${args[*]}" >>"$nbd_log"
        nbdkit "${args[@]}" </dev/null >>"$nbd_log" 2>&1 &
    else
        local -a args=(-f raw -x "$export_name" -t -e 8 --cache="$nbd_cache" --aio=io_uring -k "$nbd_sock" "$sec")
        echo "+ $qnbd ${args[*]}" >>"$nbd_log"
        "$qnbd" "${args[@]}" </dev/null >>"$nbd_log" 2>&1 &
    fi
    nbd_pid=$!
    pids+=("$nbd_pid")
    wait_ready qemu-nbd "$nbd_pid" "$nbd_log" test -S "$nbd_sock"
}
stop_nbd() {
    [[ -n $nbd_pid ]] || return 0
    stop_pid "$nbd_pid"
    nbd_pid=''
}

cur_pid='' cur_sock='' cur_qmp='' cur_log='' cur_impl=''

# start_colo none|primary
start_colo() {
    local mode=$1
    cur_impl=colo-$mode cur_sock=$run/colo.sock cur_qmp=$run/colo.qmp cur_log=$run/colo-$mode.$((++nstart)).log
    rm -f "$cur_sock" "$cur_qmp"
    local -a args=(serve --disk "$pri" --socket "$cur_sock" --qmp "$cur_qmp" --num-queues 2 "${colo_cache[@]}")
    if [[ $mode == primary ]]; then
        args=(serve --replication primary --disk "$pri" --size "${disk_mib}M"
            --secondary "nbd+unix:///$export_name?socket=$nbd_sock" --socket "$cur_sock" --qmp "$cur_qmp"
            --num-queues 2 "${colo_cache[@]}")
    fi
    echo "+ $colo ${args[*]}" >>"$cur_log"
    "$colo" "${args[@]}" </dev/null >>"$cur_log" 2>&1 &
    cur_pid=$!
    pids+=("$cur_pid")
    wait_ready "colo-blk $mode" "$cur_pid" "$cur_log" colo_ready "$cur_sock" "$cur_log"
}

# start_qemu plain|primary|mirror: qemu-system-x86_64 -machine none, graph over QMP.
#   plain: local raw exported; primary: quorum(local, replication -> nbd0)
#   exported; mirror: local + nbd0, nothing exported (row 3).
start_qemu() {
    local mode=$1
    cur_impl=qemu-$mode cur_sock=$run/qemu.sock cur_qmp=$run/qemu.qmp cur_log=$run/qemu-$mode.$((++nstart)).log
    rm -f "$cur_sock" "$cur_qmp"
    local -a args=(-machine none -nodefaults -display none -qmp "unix:$cur_qmp,server=on,wait=off")
    echo "+ $qemu ${args[*]}" >>"$cur_log"
    "$qemu" "${args[@]}" </dev/null >>"$cur_log" 2>&1 &
    cur_pid=$!
    pids+=("$cur_pid")
    wait_ready qemu-system "$cur_pid" "$cur_log" test -S "$cur_qmp"
    local c="\"cache\":{\"direct\":$qdirect}"
    local -a cmds=("{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"local\",$c,\"file\":{\"driver\":\"file\",\"filename\":\"$pri\",\"aio\":\"io_uring\",$c}}}")
    local top=local
    if [[ $mode != plain ]]; then
        cmds+=("{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"nbd\",\"node-name\":\"nbd0\",$c,\"server\":{\"type\":\"unix\",\"path\":\"$nbd_sock\"},\"export\":\"$export_name\"}}")
    fi
    if [[ $mode == primary ]]; then
        cmds+=('{"execute":"blockdev-add","arguments":{"driver":"replication","node-name":"rep","mode":"primary","file":"nbd0"}}'
            '{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["local","rep"]}}')
        top=colo-disk0
    fi
    if [[ $mode != mirror ]]; then
        cmds+=("{\"execute\":\"block-export-add\",\"arguments\":{\"type\":\"vhost-user-blk\",\"id\":\"vub0\",\"node-name\":\"$top\",\"addr\":{\"type\":\"unix\",\"path\":\"$cur_sock\"},\"writable\":true,\"num-queues\":2}}")
    fi
    if ! qmp "$cur_qmp" "${cmds[@]}" >>"$cur_log" 2>&1; then
        tail -n 3 "$cur_log" >&2
        die "building QEMU's $mode graph failed (log: $cur_log)"
    fi
}

stop_cur() {
    local n
    [[ -n $cur_pid ]] || return 0
    stop_pid "$cur_pid"
    [[ $stop_rc == 0 ]] || problem "$cur_impl exited with status $stop_rc on SIGTERM (log: $cur_log)"
    cur_pid=''
    if [[ $cur_impl == colo* ]]; then
        n=$(grep -cE '^\[[^]]* ERROR ' "$cur_log" || true)
        ((n == 0)) || log "  note: $n ERROR lines in $cur_log, first: $(grep -m 1 -E '^\[[^]]* ERROR ' "$cur_log")"
        if grep -q 'panicked' "$cur_log"; then problem "$cur_impl panicked: $(grep -m 1 panicked "$cur_log")"; fi
    fi
}

alive() { kill -0 "$cur_pid" 2>/dev/null || die "$cur_impl died (log: $cur_log)"; }

start_replication() { # colo|qemu
    local out
    if [[ $1 == colo ]]; then
        out=$(qmp "$cur_qmp" '{"execute":"replication-start","arguments":{"mode":"primary"}}' 2>&1) ||
            die "colo-blk replication-start failed: $out"
    else
        out=$(qmp "$cur_qmp" '{"execute":"xen-set-replication","arguments":{"enable":true,"primary":true}}' 2>&1) ||
            die "QEMU xen-set-replication failed: $out"
    fi
}

# check_state colo|qemu WHAT: after a run the replication must be healthy.
check_state() {
    local out
    if [[ $1 == colo ]]; then
        out=$(qmp "$cur_qmp" '{"execute":"query-replication"}' | tail -n 1)
        echo "$2: $out" >>"$run/state.log"
        [[ $(jget 'r["return"]["error"]' "$out") == None ]] || problem "colo-blk $2: error $(jget 'r["return"]["error"]' "$out")"
        [[ $(jget 'r["return"]["dirty-bytes"]' "$out") == 0 ]] || problem "colo-blk $2: dirty-bytes $(jget 'r["return"]["dirty-bytes"]' "$out")"
        [[ $(jget 'r["return"]["failed-ops"]' "$out") == 0 ]] || problem "colo-blk $2: failed-ops $(jget 'r["return"]["failed-ops"]' "$out")"
    else
        out=$(qmp "$cur_qmp" '{"execute":"query-xen-replication-status"}' | tail -n 1)
        echo "$2: $out" >>"$run/state.log"
        [[ $(jget 'r["return"]["error"]' "$out") == False ]] || problem "QEMU $2: replication status $out"
    fi
}

# ------------------------------------------------------------- helpers ---

results=$run/results.txt # row impl rep value [extra...]; rec, med, errs: bench-lib.sh
: >"$results"

runs() { awk -v r="$1" -v i="$2" '$1 == r && $2 == i { printf "%s%s", (n++ ? ", " : ""), ($4 == "ERR" ? $4 : sprintf("%.10g", $4)) }' "$results"; }
fmt0() { awk -v v="$1" 'BEGIN { if (v == "nan" || v == "") print "—"; else printf "%.0f", v }'; }
fmt1() { awk -v v="$1" 'BEGIN { if (v == "nan" || v == "") print "—"; else printf "%.1f", v }'; }

sys_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# vm ROW IMPL REP RW BS QD QUEUES RUNTIME: one colo-blk bench run on cur_sock;
# records IOPS (4K) or MiB/s (else) unless ROW is -; sets vm_iops, vm_json.
vm_iops=0 vm_json=''
vm() {
    local row=$1 impl=$2 rep=$3 rw=$4 bs=$5 qd=$6 q=$7 rt=$8 out err b0 n0 s0 w0 rc=0
    vm_iops=0 vm_json=''
    b0=$(pid_ticks "$cur_pid") n0=$(pid_ticks "${nbd_pid:-}") s0=$(sys_ticks) w0=$(date +%s%N)
    out=$(timeout $((rt + 60)) "$colo" bench --socket "$cur_sock" --rw "$rw" --bs "$bs" --iodepth "$qd" \
        --queues "$q" --runtime "$rt" --label "$impl:$row:$rep" --json 2>>"$run/bench.err") || rc=$?
    # CPU while it ran, in % of one CPU: the backend, qemu-nbd, the whole host.
    [[ $row == - ]] || rec "cpu-$row $impl $rep $(awk -v b=$(($(pid_ticks "$cur_pid") - b0)) -v n=$(($(pid_ticks "${nbd_pid:-}") - n0)) \
        -v s="$(sys_ticks) $s0" -v w=$(($(date +%s%N) - w0)) -v hz="$hz" \
        'BEGIN { split(s, a, " "); t = w / 1e9 * hz; printf "%.0f %.0f %.0f", 100 * b / t, 100 * n / t, 100 * (a[1] - a[2]) / t }')"
    if ((rc != 0)); then
        problem "$impl $row run $rep: colo-blk bench failed: $(tail -n 1 "$run/bench.err")"
        [[ $row == - ]] || rec "$row $impl $rep ERR"
        return 1
    fi
    echo "$out" >>"$run/bench.jsonl"
    vm_json=$out
    vm_iops=$(jget 'r["iops"]' "$out")
    err=$(jget 'r["errors"]' "$out")
    if [[ $err != 0 ]]; then
        problem "$impl $row run $rep: $err guest requests failed ($out)"
        [[ $row == - ]] || rec "$row $impl $rep ERR"
        return 1
    fi
    [[ $row == - ]] && return 0
    if [[ $bs == 4K ]]; then rec "$row $impl $rep $vm_iops"; else rec "$row $impl $rep $(jget 'r["mib_s"]' "$out")"; fi
    log "  $row $impl #$rep: $(fmt0 "$vm_iops") IOPS, $(jget 'r["mib_s"]' "$out") MiB/s, p99 $(jget 'r["p99_us"]' "$out") us"
}

make_disks() {
    random_image "$pri" "$size" "$disk_mib MiB"
    if [[ ! -f $sec || $(stat -c %s "$sec") != "$size" ]]; then
        log "writing $disk_mib MiB of zeros to $sec"
        dd if=/dev/zero of="$sec.tmp" bs=1M count="$disk_mib" status=none
        mv "$sec.tmp" "$sec"
    fi
    sync
}
zero_sec() { dd if=/dev/zero of="$sec" bs=1M count="$disk_mib" conv=notrunc,fsync status=none ${dd_out[@]+"${dd_out[@]}"}; }
# copy_pri_to_sec: the disks identical; prints the copy rate in MiB/s (dd, 1M, the cache mode's flags).
copy_pri_to_sec() {
    local t0 t1
    sync
    t0=$(date +%s%N)
    dd if="$pri" of="$sec" bs=1M count="$disk_mib" conv=notrunc,fsync status=none ${dd_in[@]+"${dd_in[@]}"} ${dd_out[@]+"${dd_out[@]}"}
    t1=$(date +%s%N)
    awk -v m="$disk_mib" -v ns=$((t1 - t0)) 'BEGIN { printf "%.1f", m / (ns / 1e9) }'
}
same_disks() { cmp -s "$pri" "$sec"; }

# ---------------------------------------------------------------- phases ---

# Rows 1-2 for one implementation: baseline (no replication), then the primary.
phase_io() { # colo|qemu REP
    local impl=$1 rep=$2 base
    if [[ $impl == colo ]]; then base=colo-none; else base=qemu-plain; fi
    wait_idle
    if [[ $impl == colo ]]; then start_colo none; else start_qemu plain; fi
    want 1 && { vm 4k-randwrite "$base" "$rep" randwrite 4K 32 2 "$runtime" || true; }
    want 1 && { vm 4k-randwrite-qd8 "$base" "$rep" randwrite 4K 8 2 "$runtime" || true; }
    want 2 && { vm 1m-write "$base" "$rep" write 1M 8 2 "$runtime" || true; }
    alive
    stop_cur
    wait_idle
    start_nbd
    if [[ $impl == colo ]]; then start_colo primary; else start_qemu primary; fi
    start_replication "$impl"
    want 1 && { vm 4k-randwrite "$impl" "$rep" randwrite 4K 32 2 "$runtime" || true; }
    want 1 && { vm 4k-randwrite-qd8 "$impl" "$rep" randwrite 4K 8 2 "$runtime" || true; }
    want 2 && { vm 1m-write "$impl" "$rep" write 1M 8 2 "$runtime" || true; }
    alive
    if [[ $impl == colo ]]; then
        local out
        if out=$(qmp "$cur_qmp" '{"execute":"replication-checkpoint"}' 2>&1); then
            rec "checkpoint colo $rep $(jget 'r["us"]' "$(tail -n 1 <<<"$out")")"
        else
            problem "colo-blk replication-checkpoint after rows 1-2 failed: $out"
        fi
    fi
    check_state "$impl" "after rows 1-2 run $rep"
    stop_cur
    kill -0 "$nbd_pid" 2>/dev/null || problem "qemu-nbd died during $impl rows 1-2 (log: $nbd_log)"
    stop_nbd
}

# What the secondary takes over one NBD connection: qemu-img bench, 4K writes
# QD32 (QEMU's NBD client and server both allow 16 in flight), offsets
# strided by 7919 x 4 KiB modulo the disk size (scattered like random writes).
phase_ceiling() { # REP
    local rep=$1 out secs count=$((size / 4096 < 200000 ? size / 4096 : 200000))
    command -v qemu-img >/dev/null || return 0
    wait_idle
    start_nbd
    if out=$(timeout 300 qemu-img bench -f raw -w -t none -s 4096 -S $((4096 * 7919)) -d 32 -c "$count" \
        "nbd+unix:///$export_name?socket=$nbd_sock" 2>&1); then
        secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
        rec "nbd-ceiling qemu-nbd $rep $(awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / s }')"
        log "  secondary ceiling #$rep: $count 4K writes in ${secs}s"
    else
        problem "qemu-img bench against qemu-nbd failed: $(tail -n 1 <<<"$out")"
    fi
    stop_nbd
}

# Row 3 for one implementation: full sync of the disk into a zeroed secondary.
phase_sync() { # colo|qemu REP
    local impl=$1 rep=$2 out us
    zero_sec
    wait_idle
    start_nbd
    if [[ $impl == colo ]]; then
        start_colo primary
        if out=$(python3 "$run/qmp.py" sync-colo "$cur_qmp" "$sync_timeout" 2>&1); then
            us=$(jget 'r["us"]' "$out")
            [[ $(jget 'r["total"]' "$out") == "$size" ]] || problem "colo-blk sync=full run $rep: total-bytes $(jget 'r["total"]' "$out"), expected $size"
            [[ $(jget 'r["copied"]' "$out") == "$size" ]] || problem "colo-blk sync=full run $rep: copied-bytes $(jget 'r["copied"]' "$out"), expected $size"
        fi
    else
        start_qemu mirror
        out=$(python3 "$run/qmp.py" mirror-qemu "$cur_qmp" "$sync_timeout" 2>&1) || true
        us=$(jget 'r.get("us", "")' "$out" 2>/dev/null || true)
    fi
    echo "$impl sync run $rep: $out" >>"$run/sync.log"
    if [[ -n ${us:-} ]]; then
        rec "sync $impl $rep $(awk -v b="$size" -v u="$us" 'BEGIN { printf "%.1f", b / 1048576 / (u / 1e6) }') $us"
        log "  sync $impl #$rep: $disk_mib MiB in $us us ($out)"
    else
        rec "sync $impl $rep ERR"
        problem "$impl full sync run $rep failed: $(jget 'r.get("error")' "$out" 2>/dev/null || echo "$out")"
    fi
    alive
    stop_cur
    stop_nbd
    if [[ -n ${us:-} ]]; then
        same_disks || problem "$impl full sync run $rep: secondary differs from the primary after the sync"
    fi
}

# Row 4: secondary down (kill) or hung (stop) during 2 s of guest 4K randwrite.
phase_resync() { # colo|qemu kill|stop
    local impl=$1 how=$2 out c0 dirty copied rate tag=$1-$2
    rate=$(copy_pri_to_sec)
    rec "dd-copy dd 1 $rate"
    log "  dd copy $disk_mib MiB primary -> secondary: $rate MiB/s"
    wait_idle
    start_nbd
    if [[ $impl == colo ]]; then start_colo primary; else start_qemu primary; fi
    start_replication "$impl"
    vm - "$impl" 1 randwrite 4K 32 2 2 && rec "resync-up-iops $tag 1 $vm_iops $(jget 'r["p99_us"]' "$vm_json")"
    if [[ $impl == colo ]]; then
        qmp "$cur_qmp" '{"execute":"replication-checkpoint"}' >/dev/null || problem "colo-blk checkpoint before row 4 failed"
        out=$(qmp "$cur_qmp" '{"execute":"query-replication"}' | tail -n 1)
        c0=$(jget 'r["return"]["resync"]["copied-bytes"]' "$out")
    fi
    if [[ $how == kill ]]; then
        kill -KILL "$nbd_pid"
        wait "$nbd_pid" 2>/dev/null || true
        forget "$nbd_pid"
        nbd_pid=''
    else
        kill -STOP "$nbd_pid"
    fi
    log "  row 4 $tag: secondary $([[ $how == kill ]] && echo killed || echo stopped), guest writes for 2 s"
    if vm - "$impl" 1 randwrite 4K 32 2 2; then
        rec "resync-down-iops $tag 1 $vm_iops $(jget 'r["p99_us"]' "$vm_json") $(jget 'r["p50_us"]' "$vm_json")"
    else
        rec "resync-down-iops $tag 1 ERR"
    fi
    log "  row 4 $tag: guest while secondary down: $vm_json"
    # A hung secondary first stalls the forwarded writes (colo-blk: until
    # --secondary-timeout breaks the link); measure again after that.
    if [[ $how == stop && $vm_iops != 0.0 && $vm_iops != 0 ]]; then
        if vm - "$impl" 1 randwrite 4K 32 2 2; then
            rec "resync-down2-iops $tag 1 $vm_iops $(jget 'r["p99_us"]' "$vm_json") $(jget 'r["p50_us"]' "$vm_json")"
        fi
        log "  row 4 $tag: guest, next 2 s: $vm_json"
    fi
    alive
    if [[ $impl == colo ]]; then
        sleep 1
        out=$(qmp "$cur_qmp" '{"execute":"query-replication"}' | tail -n 1)
        echo "$tag down: $out" >>"$run/state.log"
        dirty=$(jget 'r["return"]["dirty-bytes"]' "$out")
        log "  row 4 $tag: dirty-bytes $dirty, error $(jget 'r["return"]["error"]' "$out")"
        local back
        # The waiter connects first, so it sees the link come back (REPLICATION_LINK).
        local wpid rc=0
        back=$(date +%s%N)
        python3 "$run/qmp.py" wait-colo "$cur_qmp" "$sync_timeout" "$back" >"$run/wait.out" 2>&1 &
        wpid=$!
        sleep 0.5
        if [[ $how == kill ]]; then start_nbd; else kill -CONT "$nbd_pid"; fi
        wait "$wpid" || rc=$?
        out=$(cat "$run/wait.out")
        if ((rc == 0)); then
            copied=$(($(jget 'r["copied"]' "$out") - c0))
            rec "resync $tag 1 $dirty $copied $(jget 'r["us"]' "$out") $(jget 'r.get("copy_us", "-")' "$out")"
            log "  row 4 $tag: resync copied $copied bytes in $(jget 'r["us"]' "$out") us ($out)"
            [[ $copied == "$dirty" ]] || problem "row 4 $tag: resync copied $copied bytes, dirty-bytes was $dirty"
        else
            rec "resync $tag 1 $dirty ERR"
            problem "row 4 $tag: resync failed: $(jget 'r.get("error")' "$out" 2>/dev/null || echo "$out")"
        fi
        echo "$tag resync: $out" >>"$run/state.log"
        qmp "$cur_qmp" '{"execute":"replication-checkpoint"}' >/dev/null 2>&1 || problem "row 4 $tag: checkpoint after resync failed"
    else
        out=$(qmp "$cur_qmp" '{"execute":"query-xen-replication-status"}' | tail -n 1)
        echo "$tag down: $out" >>"$run/state.log"
        rec "qemu-status $tag 1 $(jget 'json.dumps(r["return"], separators=(",", ":"))' "$out" | tr ' ' '_')"
        [[ $how == kill ]] || kill -CONT "$nbd_pid"
    fi
    alive
    stop_cur
    stop_nbd
    if [[ $impl == colo ]] && ! same_disks; then
        grep -q "^resync $tag 1 $dirty ERR" "$results" || problem "row 4 $tag: secondary differs from the primary after the resync"
    fi
}

# ------------------------------------------------------------------ report ---

report() {
    local c q cb qb
    echo "## Replication (primary)"
    echo
    echo "colo-blk \`--replication primary\` against QEMU's own primary data path (quorum + replication + nbd), $started."
    echo "Rerun: \`contrib/bench-primary.sh --cache $cache --repeat $repeat --runtime $runtime$([[ $disk_mib != 1024 ]] && echo " --disk-size $disk_mib")$([[ $rows != 1234 ]] && echo " --rows $rows")$([[ $secdir != "$workdir" ]] && echo " --secondary-dir $secdir")$([[ $secserver != qemu-nbd ]] && echo " --secondary-server $secserver")\` (report on stdout; raw data in \`$run\`)."
    echo
    echo "- colo-blk: \`$colo\` ($("$colo" --version 2>/dev/null | head -n 1)); $("$qemu" --version | head -n 1); $("$qnbd" --version | head -n 1)"
    echo "- host: $(nproc) vCPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r); primary image on $(df -T "$workdir" | awk 'NR == 2 { print $2 " (" $1 ")" }'), secondary image on $(df -T "$secdir" | awk 'NR == 2 { print $2 " (" $1 ")" }'); secondary = $sec_desc on the same host over a UNIX socket"
    echo "- load average at start $load_start, at end $load_end; $repeat round(s), colo-blk/QEMU order alternating; medians, individual runs below"
    if [[ $cache == direct ]]; then
        echo "- cache: O_DIRECT: colo-blk \`--direct\`, QEMU \`cache.direct=on\` on every node (local file/raw, nbd), qemu-nbd \`--cache=$nbd_cache\`; aio=io_uring; dd \`${dd_in[*]:-} ${dd_out[*]:-}\`"
    else
        echo "- cache: page cache: colo-blk without \`--direct\`, QEMU \`cache.direct=off\`, qemu-nbd \`--cache=writeback\`; aio=io_uring"
    fi
    echo "- disk: $disk_mib MiB raw image of random data; guest load \`colo-blk bench\` (libblkio, writes zeros), ${runtime} s per run"
    echo
    echo "| row | colo-blk | ratio | QEMU | ratio | baseline colo-blk none / QEMU plain | target |"
    echo "| --- | ---: | ---: | ---: | ---: | --- | --- |"
    if want 1; then
        c=$(med 4k-randwrite colo) q=$(med 4k-randwrite qemu) cb=$(med 4k-randwrite colo-none) qb=$(med 4k-randwrite qemu-plain)
        printf '| 1. 4K randwrite QD32 x 2 queues | %s IOPS%s | %s | %s IOPS%s | %s | %s / %s IOPS | ≥ 0.7 |\n' \
            "$(fmt0 "$c")" "$(errs 4k-randwrite colo)" "$(ratio "$c" "$cb")" "$(fmt0 "$q")" "$(errs 4k-randwrite qemu)" "$(ratio "$q" "$qb")" "$(fmt0 "$cb")" "$(fmt0 "$qb")"
    fi
    if want 1; then
        c=$(med 4k-randwrite-qd8 colo) q=$(med 4k-randwrite-qd8 qemu) cb=$(med 4k-randwrite-qd8 colo-none) qb=$(med 4k-randwrite-qd8 qemu-plain)
        printf '| 1b. (extra) 4K randwrite QD8 x 2 queues (16 in flight) | %s IOPS%s | %s | %s IOPS%s | %s | %s / %s IOPS | — |\n' \
            "$(fmt0 "$c")" "$(errs 4k-randwrite-qd8 colo)" "$(ratio "$c" "$cb")" "$(fmt0 "$q")" "$(errs 4k-randwrite-qd8 qemu)" "$(ratio "$q" "$qb")" "$(fmt0 "$cb")" "$(fmt0 "$qb")"
    fi
    if want 2; then
        c=$(med 1m-write colo) q=$(med 1m-write qemu) cb=$(med 1m-write colo-none) qb=$(med 1m-write qemu-plain)
        printf '| 2. 1M sequential write QD8 x 2 queues | %s MiB/s%s | %s | %s MiB/s%s | %s | %s / %s MiB/s | ≥ 0.7 |\n' \
            "$(fmt1 "$c")" "$(errs 1m-write colo)" "$(ratio "$c" "$cb")" "$(fmt1 "$q")" "$(errs 1m-write qemu)" "$(ratio "$q" "$qb")" "$(fmt1 "$cb")" "$(fmt1 "$qb")"
    fi
    if want 3; then
        c=$(med sync colo) q=$(med sync qemu) cb=$(med 1m-write colo-none) qb=$(med 1m-write qemu-plain)
        printf '| 3. full sync of %s MiB (colo-blk sync=full; QEMU blockdev-mirror sync=full) vs 1M write (row 2 baseline) | %s MiB/s%s | %s | %s MiB/s%s | %s | %s / %s MiB/s (dd copy: %s MiB/s) | — |\n' \
            "$disk_mib" "$(fmt1 "$c")" "$(errs sync colo)" "$(ratio "$c" "$cb")" "$(fmt1 "$q")" "$(errs sync qemu)" "$(ratio "$q" "$qb")" "$(fmt1 "$cb")" "$(fmt1 "$qb")" "$(fmt1 "$(med dd-copy dd)")"
    fi
    if want 4; then
        local d cp
        d=$(awk '$1 == "resync" && $2 == "colo-kill" { print $4 }' "$results") cp=$(awk '$1 == "resync" && $2 == "colo-kill" { print $5 }' "$results")
        printf '| 4. resync after the secondary was killed during 2 s of guest 4K randwrite: dirty-bytes / resync copied-bytes | %s / %s B | %s | no incremental resync | | | copied = dirty |\n' \
            "${d:-—}" "${cp:-—}" "$(if [[ $cp == ERR ]]; then echo "resync failed"; elif [[ -n $d && $d == "$cp" ]]; then echo equal; else echo DIFFERENT; fi)"
    fi
    echo
    if want 4; then
        echo "Row 4 in detail (one run each; guest load 4K randwrite QD32 x 2 queues, 2 s runs; \"up\" = the run just before, link up; SIGSTOP: the first run includes the stall, a second run follows if the first completed anything):"
        echo
        echo "| secondary | impl | guest IOPS up | guest while secondary down: IOPS, p50 / p99 ms | dirty-bytes | resync copied-bytes | back -> in sync (of which copying) | replication state |"
        echo "| --- | --- | ---: | --- | ---: | ---: | --- | --- |"
        local t r how impl
        for t in colo-kill qemu-kill colo-stop qemu-stop; do
            how=${t#*-} impl=${t%-*}
            grep -q " $t " "$results" || continue
            local up down dd0 cc us cu st
            up=$(awk -v t="$t" '$1 == "resync-up-iops" && $2 == t { print $4 }' "$results")
            down=$(awk -v t="$t" '$1 ~ /^resync-down2?-iops$/ && $2 == t { if ($4 == "ERR") s = "ERR"; else s = sprintf("%.0f, %.1f / %.1f", $4, $6 / 1000, $5 / 1000)
                printf "%s%s%s", (n++ ? "; next 2 s: " : ""), ($1 == "resync-down-iops" && t ~ /stop/ ? "first 2 s: " : ""), s }' "$results")
            r=$(awk -v t="$t" '$1 == "resync" && $2 == t' "$results")
            dd0=$(awk '{ print $4 }' <<<"$r") cc=$(awk '{ print $5 }' <<<"$r") us=$(awk '{ print $6 }' <<<"$r") cu=$(awk '{ print $7 }' <<<"$r")
            if [[ $impl == qemu ]]; then
                st=$(awk -v t="$t" '$1 == "qemu-status" && $2 == t { print $4 }' "$results" | tr '_' ' ')
                st="query-xen-replication-status \`${st:-?}\`"
                dd0=— cc=— us=''
            else
                st=$(grep -m 1 "^$t down: " "$run/state.log" | sed "s/^$t down: //" || true)
                st="error: $(jget 'r["return"]["error"]' "$st" 2>/dev/null || echo ?)"
            fi
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$([[ $how == kill ]] && echo "SIGKILL, restarted after" || echo "SIGSTOP, SIGCONT after")" "$impl" "$(fmt0 "$up")" "${down:-—}" \
                "${dd0:-—}" "${cc:-—}" \
                "$(if [[ -n $us && $us != ERR ]]; then echo "$(fmt1 "$(awk -v u="$us" 'BEGIN { print u / 1000 }')") ms$([[ -n $cu && $cu != - ]] && echo " ($(fmt1 "$(awk -v u="$cu" 'BEGIN { print u / 1000 }')") ms)")"; elif [[ $us == ERR ]]; then echo ERR; else echo —; fi)" \
                "$st"
        done
    fi
    echo
    echo "Individual runs (in order; ERR = failed):"
    echo
    echo "| row | colo-blk | colo-blk none | QEMU | QEMU plain |"
    echo "| --- | --- | --- | --- | --- |"
    local r
    for r in 4k-randwrite 4k-randwrite-qd8 1m-write sync; do
        grep -q "^$r " "$results" || continue
        printf '| %s | %s | %s | %s | %s |\n' "$r" "$(runs "$r" colo)" "$(runs "$r" colo-none)" "$(runs "$r" qemu)" "$(runs "$r" qemu-plain)"
    done
    if grep -q '^cpu-' "$results"; then
        echo
        echo "CPU during rows 1-2 (% of one CPU, medians; the host has $(nproc) CPUs; host = all busy time incl. the load generator):"
        echo
        echo "| row | impl | backend | qemu-nbd | host |"
        echo "| --- | --- | ---: | ---: | ---: |"
        local i
        for r in 4k-randwrite 4k-randwrite-qd8 1m-write; do
            for i in colo-none colo qemu-plain qemu; do
                grep -q "^cpu-$r $i " "$results" || continue
                printf '| %s | %s | %s | %s | %s |\n' "$r" "$i" \
                    "$(awk -v r="cpu-$r" -v i="$i" '$1 == r && $2 == i { print $4 }' "$results" | median)" \
                    "$(awk -v r="cpu-$r" -v i="$i" '$1 == r && $2 == i { print $5 }' "$results" | median)" \
                    "$(awk -v r="cpu-$r" -v i="$i" '$1 == r && $2 == i { print $6 }' "$results" | median)"
            done
        done
    fi
    if grep -q '^nbd-ceiling ' "$results"; then
        echo
        echo "Secondary ceiling over one NBD connection (plain qemu-nbd, \`qemu-img bench -w -t none -s 4096 -S 32436224 -d 32\` (step 7919 x 4 KiB): 4K writes scattered over the disk; QEMU's NBD client and server both keep at most 16 requests in flight): $(runs nbd-ceiling qemu-nbd) IOPS."
    fi
    if grep -q '^checkpoint ' "$results"; then
        echo
        echo "colo-blk replication-checkpoint right after rows 1-2 (µs): $(runs checkpoint colo)"
    fi
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
log "logs in $run"
wait_idle
make_disks
load_start=$(loadavg)
for ((rep = 1; rep <= repeat; rep++)); do
    if ((rep % 2)); then order="colo qemu"; else order="qemu colo"; fi
    log "round $rep of $repeat ($order)"
    if want 1 || want 2; then
        for impl in $order; do phase_io "$impl" "$rep"; overlap "rows 1-2 $impl round $rep"; done
        if want 1; then phase_ceiling "$rep"; overlap "secondary ceiling round $rep"; fi
    fi
    if want 3; then
        for impl in $order; do phase_sync "$impl" "$rep"; overlap "row 3 $impl round $rep"; done
    fi
done
if want 4; then
    for how in kill stop; do
        for impl in colo qemu; do phase_resync "$impl" "$how"; overlap "row 4 $impl $how"; done
    done
fi
load_end=$(loadavg)
report
log "raw results: $run"
