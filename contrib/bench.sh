#!/usr/bin/env bash
# Compare colo-blk with qemu-storage-daemon (QSD) as vhost-user-blk backends.
#
# Host rows: `colo-blk bench` (a libblkio load generator that works against
# any vhost-user-blk backend) drives each backend in turn. Both backends serve
# the same 1 GiB image of random data with O_DIRECT (colo-blk --direct,
# QSD cache.direct=on, aio=io_uring), then a 1 GiB null device (colo-blk
# --disk null, QSD null-co). Both offer 2 queues. Only one backend is under
# load at any time: each row runs colo-blk, QSD, colo-blk, QSD, ... (--repeat
# times each) and the table shows the median of the runs. Every run also
# reports the CPU time used by each backend and by other processes (the
# machine may be shared; see --retries and --quiet-wait).
# Guest rows (--guest): boots the test guest of contrib/guest under QEMU TCG
# on each backend in turn and runs contrib/guest/jobs/bench-randrw.fio
# (4k randread, then 4k randwrite, libaio, iodepth 32, 2 jobs on 2 vCPUs).
#
# usage: contrib/bench.sh [options]
#   --runtime SECS    seconds per host run (default 5)
#   --repeat N        runs per backend and row, alternating (default 2)
#   --rows REGEX      only host rows whose name matches REGEX (grep -E);
#                     names look like img-4k-randread-qd32-q2, null-4k-randread-qd1-q1
#   --retries N       when other processes used more than 25% of a CPU during
#                     a run, redo that colo-blk/QSD pair up to N times (default 3)
#   --quiet-wait S    before each pair, wait up to S seconds for the machine
#                     to be idle (<25% of a CPU busy over 2 s; default 120, 0 = off)
#   --guest           also run the guest fio job against both backends
#   --guest-only      run only the guest fio job
#   --guest-dir DIR   guest build dir for run-fio.sh (default: its default)
#   --workdir DIR     where the image is cached and logs go
#                     (default ${TMPDIR:-/tmp}/colo-blk-bench-work)
#   --poll-us N       pass --poll-us N to colo-blk serve (default: its default)
#   --qsd-iothread    run the QSD export in an iothread (adaptive polling)
#                     instead of QSD's main loop
#   --list            print the host row names and exit
# env: COLO_BLK  colo-blk binary (default target/release/colo-blk of this repo)
#      QSD       qemu-storage-daemon binary (default: from PATH)
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail

bench_tag=bench.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

qsd=${QSD:-qemu-storage-daemon}
runtime=5 repeat=2 retries=3 quiet_max=120 rows_re='' do_host=1 do_guest=0 guest_dir='' poll_us='' qsd_iothread=0 list=0
workdir=${TMPDIR:-/tmp}/colo-blk-bench-work
while [[ $# -gt 0 ]]; do
    case $1 in
        --rows) rows_re=${2:?}; shift 2 ;;
        --retries) retries=${2:?}; shift 2 ;;
        --quiet-wait) quiet_max=${2:?}; shift 2 ;;
        --guest) do_guest=1; shift ;;
        --guest-only) do_guest=1 do_host=0; shift ;;
        --guest-dir) guest_dir=${2:?}; shift 2 ;;
        --poll-us) poll_us=${2:?}; shift 2 ;;
        --qsd-iothread) qsd_iothread=1; shift ;;
        --list) list=1; shift ;;
        *) bench_arg "$@"; shift "$bench_shift" ;;
    esac
done
need_posint "$runtime" --runtime
need_posint "$repeat" --repeat
[[ $retries =~ ^[0-9]+$ ]] || die "--retries takes a number"
[[ $quiet_max =~ ^[0-9]+$ ]] || die "--quiet-wait takes a number of seconds"

# name|device|rw|bs|iodepth (per queue)|queues
rows=()
for rw in randread randwrite; do
    for qd in 1 32; do
        for q in 1 2; do
            rows+=("img-4k-$rw-qd$qd-q$q|img|$rw|4K|$qd|$q")
        done
    done
done
rows+=("img-1m-read-qd8-q1|img|read|1M|8|1" "img-1m-write-qd8-q1|img|write|1M|8|1")
for qd in 1 32; do
    for q in 1 2; do
        rows+=("null-4k-randread-qd$qd-q$q|null|randread|4K|$qd|$q")
    done
done
if [[ $list == 1 ]]; then
    printf '%s\n' "${rows[@]%%|*}"
    exit 0
fi
selected=()
for r in "${rows[@]}"; do
    if [[ -z $rows_re ]] || grep -qE -- "$rows_re" <<<"${r%%|*}"; then
        selected+=("$r")
    fi
done
[[ $do_host == 0 || ${#selected[@]} -gt 0 ]] || die "--rows $rows_re matches no row (see --list)"

need_colo
command -v "$qsd" >/dev/null || die "$qsd not found (set QSD=)"

make_rundir
img=$workdir/random-1g.img
img_size=$((1 << 30))

# ---------------------------------------------------------------- daemons ---

colo_pid='' qsd_pid=''

# start_daemons img|null
start_daemons() {
    local dev=$1 csock=$run/colo-$1.sock qsock=$run/qsd-$1.sock
    local clog=$run/colo-$1.log qlog=$run/qsd-$1.log qpid=$run/qsd-$1.pid
    local -a cargs qargs
    if [[ $dev == img ]]; then
        cargs=(--disk "$img" --direct)
        qargs=(--blockdev "driver=file,node-name=d,filename=$img,aio=io_uring,cache.direct=on")
    else
        cargs=(--disk null --size 1G)
        qargs=(--blockdev "driver=null-co,node-name=d,size=$img_size")
    fi
    local exp="type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$qsock,writable=on,num-queues=2"
    if [[ $qsd_iothread == 1 ]]; then
        qargs=(--object "iothread,id=io0" "${qargs[@]}")
        exp+=",iothread=io0"
    fi
    rm -f "$csock" "$qsock" "$qpid"
    "$colo" serve --socket "$csock" "${cargs[@]}" --num-queues 2 ${poll_us:+--poll-us "$poll_us"} \
        </dev/null >>"$clog" 2>&1 &
    colo_pid=$!
    "$qsd" "${qargs[@]}" --export "$exp" --pidfile "$qpid" </dev/null >>"$qlog" 2>&1 &
    qsd_pid=$!
    wait_ready colo-blk "$colo_pid" "$clog" colo_ready "$csock" "$clog"
    wait_ready qemu-storage-daemon "$qsd_pid" "$qlog" qsd_ready "$qsock" "$qpid"
    sock_colo=$csock sock_qsd=$qsock
    log "$dev: colo-blk pid $colo_pid on $csock, QSD pid $qsd_pid on $qsock"
}

stop_daemons() {
    if [[ -n $colo_pid ]]; then
        stop_pid "$colo_pid"
        [[ $stop_rc == 0 ]] || problem "colo-blk exited with status $stop_rc on SIGTERM"
        colo_pid=''
    fi
    if [[ -n $qsd_pid ]]; then
        stop_pid "$qsd_pid"
        [[ $stop_rc == 0 ]] || problem "qemu-storage-daemon exited with status $stop_rc on SIGTERM"
        qsd_pid=''
    fi
}

guest_pid=''
# SIGTERM a process and all its descendants, children first.
kill_tree() {
    local c
    for c in $(pgrep -P "$1" || true); do
        kill_tree "$c"
    done
    kill -TERM "$1" 2>/dev/null || true
}

cleanup() {
    local p
    [[ -z $guest_pid ]] || kill_tree "$guest_pid"
    for p in $colo_pid $qsd_pid; do
        kill -TERM "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
bench_traps

check_alive() {
    kill -0 "$colo_pid" 2>/dev/null || die "colo-blk died (log: $run)"
    kill -0 "$qsd_pid" 2>/dev/null || die "qemu-storage-daemon died (log: $run)"
}

# ------------------------------------------------------------------ image ---

make_image() { random_image "$img" "$img_size" "1 GiB"; }

# --------------------------------------------------------------- CPU time ---

# The machine may be shared (builds, tests). For every run, measure the CPU
# time used by colo-blk, by QSD and by everything else: busy time from
# /proc/stat minus the daemons' and that of this shell's reaped children
# (the load generator, QEMU). All as % of one CPU over the run. Kernel
# threads working for our I/O count as "other", so a few % are normal.
# (other_warn, % of one CPU, and the tick counters are in bench-lib.sh.)
idle_warn=5 # % of one CPU for the backend that is not under test
meas_start() {
    m_t0=$(date +%s%N) m_busy=$(cpu_busy) m_child=$(child_ticks)
    m_colo=$(pid_ticks "$colo_pid") m_qsd=$(pid_ticks "$qsd_pid")
}
# Sets m_other, m_colo_cpu and m_qsd_cpu for the time since meas_start.
meas_end() {
    local busy child colo qsd ns
    busy=$(cpu_busy) child=$(child_ticks) colo=$(pid_ticks "$colo_pid") qsd=$(pid_ticks "$qsd_pid")
    ns=$(($(date +%s%N) - m_t0))
    read -r m_other m_colo_cpu m_qsd_cpu < <(awk -v b=$((busy - m_busy)) -v c=$((child - m_child)) \
        -v x=$((colo - m_colo)) -v q=$((qsd - m_qsd)) -v ns="$ns" -v hz="$hz" 'BEGIN {
            t = ns / 1e9 * hz / 100; o = (b - c - x - q) / t; if (o < 0) o = 0
            printf "%.0f %.0f %.0f\n", o, x / t, q / t }')
}
# after meas_end: "tested idle" CPU % for backend $1 under test
cpu_split() { if [[ $1 == colo-blk ]]; then echo "$m_colo_cpu $m_qsd_cpu"; else echo "$m_qsd_cpu $m_colo_cpu"; fi; }
check_cpu() { # what backend; sets pair_busy when others used too much CPU
    local idle
    read -r _ idle < <(cpu_split "$2")
    ((m_other <= other_warn)) || pair_busy="$1 $2: other processes used ${m_other}% of a CPU"
    ((idle <= idle_warn)) || problem "$1 $2: the idle backend used ${idle}% of a CPU"
}

# Wait (at most --quiet-wait seconds) until less than other_warn % of one CPU
# is busy over 2 s, so that a run does not start in the middle of someone
# else's build. Our idle daemons use nothing.
wait_quiet() {
    ((quiet_max > 0)) || return 0
    local start=$SECONDS b0 t0 pct
    while :; do
        b0=$(cpu_busy) t0=$(date +%s%N)
        sleep 2
        pct=$(awk -v b=$(($(cpu_busy) - b0)) -v ns=$(($(date +%s%N) - t0)) -v hz="$hz" \
            'BEGIN { printf "%.0f", b * 100 / (ns / 1e9 * hz) }')
        ((pct > other_warn)) || return 0
        if ((SECONDS - start >= quiet_max)); then
            log "still ${pct}% of a CPU busy after ${quiet_max}s of waiting; going on"
            return 0
        fi
        log "waiting for a quiet machine: ${pct}% of a CPU busy"
    done
}

# pair CMD...: run "CMD colo-blk" then "CMD QSD" (each appends its result
# lines to $pair_out); keep them when no run saw other processes using more
# than other_warn % of a CPU, else retry the pair (--retries times) and keep
# the last attempt. Results go to file $pair_dst.
pair() {
    local attempt
    for ((attempt = 0; ; attempt++)); do
        wait_quiet
        pair_busy='' pair_attempt=$attempt
        : >"$pair_out"
        check_alive
        "$@" colo-blk
        check_alive
        "$@" QSD
        if [[ -z $pair_busy ]]; then
            break
        elif ((attempt >= retries)); then
            problem "$pair_busy (kept after $retries retries)"
            break
        fi
        log "retrying this pair: $pair_busy"
        retried=$((retried + 1))
    done
    cat "$pair_out" >>"$pair_dst"
}

# ----------------------------------------------------------------- helpers ---

# field N of results file lines matching row and backend
pick() { awk -v r="$1" -v b="$2" -v f="$3" '$1 == r && $2 == b { print $f }' "$4"; }

# "v1 [o1%], v2 [o2%]" for a row and backend: value column, then others' CPU
runs() {
    awk -v r="$1" -v b="$2" -v f="$3" -v o="$5" '$1 == r && $2 == b { printf "%s%.0f [%s%%]", (n++ ? ", " : ""), $f, $o }' "$4"
}

fmt_iops() { awk -v v="$1" 'BEGIN { printf "%.0f", v }'; }
fmt1() { awk -v v="$1" 'BEGIN { printf "%.1f", v }'; }

# ------------------------------------------------------------- host rows ---

pair_out=$run/pair.txt pair_busy='' pair_attempt=0 pair_dst='' retried=0
results=$run/host.txt # row backend rep iops mib_s p50 p99 errors other% cpu% idle-cpu%
: >"$results"

bench_one() { # name rw bs qd q rep backend
    local name=$1 rw=$2 bs=$3 qd=$4 q=$5 rep=$6 backend=$7 out sock=$sock_qsd
    [[ $backend == colo-blk ]] && sock=$sock_colo
    meas_start
    if ! out=$("$colo" bench --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues "$q" \
        --runtime "$runtime" --label "$backend:$name" --json 2>>"$run/bench.err"); then
        problem "bench failed: $backend $name run $rep (see $run/bench.err)"
        return 0
    fi
    meas_end
    echo "$out" >>"$run/bench.jsonl"
    local iops mib p50 p99 err
    iops=$(json_num iops "$out") mib=$(json_num mib_s "$out")
    p50=$(json_num p50_us "$out") p99=$(json_num p99_us "$out") err=$(json_num errors "$out")
    [[ -n $iops && -n $mib ]] || { problem "unparsable bench output: $out"; return 0; }
    [[ ${err:-0} == 0 ]] || problem "$backend $name run $rep: $err I/O errors"
    echo "$name $backend $rep $iops $mib ${p50:-nan} ${p99:-nan} ${err:-0} $m_other $(cpu_split "$backend")" >>"$pair_out"
    log "  $name $backend #$rep: $(fmt_iops "$iops") IOPS, $(fmt1 "$mib") MiB/s, p50 ${p50} us, p99 ${p99} us;" \
        "CPU % colo-blk $m_colo_cpu, QSD $m_qsd_cpu, other $m_other"
    check_cpu "$name run $rep" "$backend"
}

run_host() {
    local dev r name d rw bs qd q rep
    for dev in img null; do
        local todo=()
        for r in "${selected[@]}"; do
            IFS='|' read -r name d _ <<<"$r"
            [[ $d == "$dev" ]] && todo+=("$r")
        done
        [[ ${#todo[@]} -gt 0 ]] || continue
        [[ $dev == img ]] && make_image
        start_daemons "$dev"
        for r in "${todo[@]}"; do
            IFS='|' read -r name d rw bs qd q <<<"$r"
            for ((rep = 1; rep <= repeat; rep++)); do
                pair_dst=$results pair bench_one "$name" "$rw" "$bs" "$qd" "$q" "$rep"
            done
        done
        stop_daemons
    done
}

host_table() {
    local r name d rw bs unit col c q cp50 cp99 qp50 qp99
    echo "| row | colo-blk | p50/p99 µs | CPU | QSD | p50/p99 µs | CPU | colo/QSD |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for r in "${selected[@]}"; do
        IFS='|' read -r name d rw bs _ <<<"$r"
        if [[ $bs == 4K ]]; then unit=IOPS col=4; else unit=MiB/s col=5; fi
        c=$(pick "$name" colo-blk "$col" "$results" | median)
        q=$(pick "$name" QSD "$col" "$results" | median)
        cp50=$(pick "$name" colo-blk 6 "$results" | median) cp99=$(pick "$name" colo-blk 7 "$results" | median)
        qp50=$(pick "$name" QSD 6 "$results" | median) qp99=$(pick "$name" QSD 7 "$results" | median)
        if [[ $unit == IOPS ]]; then
            c="$(fmt_iops "$c") IOPS" q="$(fmt_iops "$q") IOPS"
        else
            c="$(fmt1 "$c") MiB/s" q="$(fmt1 "$q") MiB/s"
        fi
        printf '| %s | %s | %s / %s | %s%% | %s | %s / %s | %s%% | %s |\n' "$name" "$c" "$(fmt1 "$cp50")" "$(fmt1 "$cp99")" \
            "$(pick "$name" colo-blk 10 "$results" | median)" \
            "$q" "$(fmt1 "$qp50")" "$(fmt1 "$qp99")" "$(pick "$name" QSD 10 "$results" | median)" \
            "$(ratio "$(pick "$name" colo-blk "$col" "$results" | median)" "$(pick "$name" QSD "$col" "$results" | median)")"
    done
    echo
    echo "Individual runs in the order they ran: IOPS (MiB/s for 1m rows) [CPU used by other processes, % of one CPU]"
    echo
    echo "| row | colo-blk runs | QSD runs |"
    echo "| --- | --- | --- |"
    for r in "${selected[@]}"; do
        IFS='|' read -r name d rw bs _ <<<"$r"
        if [[ $bs == 4K ]]; then col=4; else col=5; fi
        printf '| %s | %s | %s |\n' "$name" "$(runs "$name" colo-blk "$col" "$results" 9)" "$(runs "$name" QSD "$col" "$results" 9)"
    done
}

# ------------------------------------------------------------ guest rows ---

gresults=$run/guest.txt # job backend rep iops other% cpu% idle-cpu%
: >"$gresults"

# Print "JOBNAME IOPS IOS" for every fio group result in a console log. fio's
# "IOPS=29.7k" has 3 digits; the count of issued I/Os over the run time
# printed on the same line is exact, so prefer that.
parse_fio() {
    tr -d '\r' <"$1" | awk '
        function flush() {
            if (job == "") return
            if (ms > 0 && n > 0) printf "%s %.0f %d\n", job, n * 1000 / ms, n
            else printf "%s %.0f 0\n", job, iops
            job = ""
        }
        /^[A-Za-z0-9_.-]+: \(groupid=/ { flush(); job = $1; sub(/:$/, "", job); iops = 0; ms = 0; n = 0 }
        job != "" && /^ *(read|write|trim): IOPS=/ {
            v = $0; sub(/.*IOPS=/, "", v); sub(/,.*/, "", v)
            m = 1
            if (v ~ /k$/) m = 1e3; else if (v ~ /M$/) m = 1e6
            sub(/[kM]$/, "", v)
            iops += v * m
            t = $0
            if (match(t, /\/[0-9]+msec\)/)) { t = substr(t, RSTART + 1, RLENGTH - 6); if (t + 0 > ms) ms = t + 0 }
        }
        job != "" && /issued rwts: total=/ {
            t = $0; sub(/.*total=/, "", t); sub(/ .*/, "", t)
            k = split(t, c, ",")
            for (i = 1; i <= k; i++) n += c[i]
        }
        /^Run status group/ { flush() }
        END { flush() }'
}

guest_one() { # rep backend
    local rep=$1 backend=$2 sock=$sock_qsd
    [[ $backend == colo-blk ]] && sock=$sock_colo
    local glog=$run/guest-$backend-$rep.$pair_attempt.log
    local -a gargs=(--socket "$sock" --job bench-randrw --size 256m --quiet --log "$glog" --timeout 180)
    [[ -n $guest_dir ]] && gargs+=(--guest "$guest_dir")
    meas_start
    "$here/guest/run-fio.sh" "${gargs[@]}" >>"$run/guest.out" 2>&1 &
    guest_pid=$!
    if ! wait "$guest_pid"; then
        guest_pid=''
        problem "guest run $backend #$rep did not PASS (log: $glog)"
        return 0
    fi
    guest_pid=''
    meas_end
    check_cpu "guest run $rep" "$backend"
    # Interrupts the guest took on its request queues (whole boot, mostly fio).
    local irqs ios=0 job iops n
    irqs=$(tr -d '\r' <"$glog" | sed -n 's/^GUEST-INFO: interrupts per virtqueue://p' | tail -n1 \
        | awk '{ for (i = 1; i <= NF; i++) { sub(/.*=/, "", $i); s += $i } } END { print s + 0 }')
    while read -r job iops n; do
        ios=$((ios + n))
        echo "$job $backend $rep $iops $m_other $(cpu_split "$backend")" >>"$pair_out"
        log "  guest $job $backend #$rep: $iops IOPS; CPU % over the whole QEMU run:" \
            "colo-blk $m_colo_cpu, QSD $m_qsd_cpu, other $m_other"
    done < <(parse_fio "$glog")
    echo "#irqs $backend $rep $irqs $ios" >>"$pair_out"
}

run_guest() {
    local rep
    make_image
    start_daemons img
    # Build the guest (if needed) before anything is timed.
    "$here/guest/build.sh" ${guest_dir:+"$guest_dir"} >&2
    for ((rep = 1; rep <= repeat; rep++)); do
        pair_dst=$gresults pair guest_one "$rep"
    done
    stop_daemons
}

irq_list() {
    awk -v b="$1" '$1 == "#irqs" && $2 == b {
        printf "%s%d (%s)", (k++ ? ", " : ""), $4, ($5 > 0 ? sprintf("%.0f", $4 * 1000 / $5) : "n/a") }' "$gresults"
}

guest_table() {
    local job c q
    local -a gjobs
    mapfile -t gjobs < <(awk '$1 != "#irqs" && !seen[$1]++ { print $1 }' "$gresults")
    echo "| guest fio job (4k, libaio, iodepth 32, 2 jobs) | colo-blk IOPS | CPU | QSD IOPS | CPU | colo/QSD | colo-blk runs [others' CPU] | QSD runs [others' CPU] |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    for job in "${gjobs[@]}"; do
        c=$(pick "$job" colo-blk 4 "$gresults" | median)
        q=$(pick "$job" QSD 4 "$gresults" | median)
        printf '| %s | %s | %s%% | %s | %s%% | %s | %s | %s |\n' "$job" "$(fmt_iops "$c")" \
            "$(pick "$job" colo-blk 6 "$gresults" | median)" "$(fmt_iops "$q")" \
            "$(pick "$job" QSD 6 "$gresults" | median)" "$(ratio "$c" "$q")" \
            "$(runs "$job" colo-blk 4 "$gresults" 5)" "$(runs "$job" QSD 4 "$gresults" 5)"
    done
    echo
    echo "Interrupts on the guest's request virtqueues per boot, and per 1000 I/Os measured by fio: colo-blk" \
        "$(irq_list colo-blk); QSD $(irq_list QSD)"
}

# -------------------------------------------------------------------- main ---

load_start=$(loadavg)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
log "logs in $run"
[[ $do_host == 1 ]] && run_host
[[ $do_guest == 1 ]] && run_guest
load_end=$(loadavg)

echo "## colo-blk vs qemu-storage-daemon ($started)"
echo
echo "- colo-blk: \`$colo\` ($("$colo" --version 2>/dev/null | head -n1))"
echo "- QSD: $("$qsd" --version | head -n1)$([[ $qsd_iothread == 1 ]] && echo ', export in an iothread')"
echo "- host: $(nproc) CPUs, kernel $(uname -r); load average at start $load_start, at end $load_end"
echo "- runtime ${runtime}s per host run; $repeat run(s) per backend and row, alternating colo-blk, QSD, colo-blk, ...; medians shown"
echo "- before each colo-blk/QSD pair the script waited for an idle machine (up to ${quiet_max}s); a pair during which" \
    "other processes used more than ${other_warn}% of a CPU was redone (up to $retries times): $retried pair(s) redone"
echo
if [[ $do_host == 1 ]]; then
    echo "### Host (libblkio, \`colo-blk bench\`)"
    echo
    echo "iodepth is per queue; \`img\` = 1 GiB file of random data, O_DIRECT in both backends; \`null\` = null device."
    echo "CPU = CPU time of the backend under test, % of one CPU (median); the load generator runs on the same 2 CPUs."
    echo
    host_table
    echo
fi
if [[ $do_guest == 1 ]]; then
    echo "### Guest (QEMU TCG, 2 vCPUs, 2 queues, fio \`bench-randrw\`)"
    echo
    echo "TCG emulates the guest CPU: these runs are bound by guest CPU time, not by the backend."
    echo "CPU = the backend's CPU time over the whole QEMU run (boot included), % of one CPU (median)."
    echo
    guest_table
    echo
fi
if [[ ${#problems[@]} -gt 0 ]]; then
    echo "### Problems"
    echo
    printf -- '- %s\n' "${problems[@]}"
    echo
fi
log "raw results: $run"
