#!/usr/bin/env bash
# Compare colo-blk serving a qcow2 image (serve --format qcow2) with
# qemu-storage-daemon (QSD) serving the same image through QEMU's qcow2 driver.
#
# The image is a fully allocated qcow2 (random data converted with qemu-img,
# 64 KiB clusters, every cluster allocated), so the rows measure the mapped data
# path: 4 KiB random reads and random overwrites, no allocations. Both backends
# offer 2 queues and are driven by `colo-blk bench` (a libblkio load generator
# that works against any vhost-user-blk backend). Both take the image's write
# lock, so they run one after the other: for each cache mode and repetition,
# colo-blk serves the image and runs every row, is stopped, then QSD does the
# same (the order alternates between repetitions). The table shows the median
# of the runs and the CPU time the backend used (% of one CPU).
#
# Cache modes: `direct` = O_DIRECT (colo-blk --direct, QSD cache.direct=on),
# `page` = host page cache (the image is then read from memory once warm).
#
# usage: contrib/bench-qcow2.sh [options]
#   --size SIZE       virtual size of the image (default 1G; K/M/G suffixes)
#   --runtime SECS    seconds per run (default 10)
#   --repeat N        runs per backend, row and cache mode (default 2)
#   --cache MODE      direct, page or both (default both)
#   --rows REGEX      only rows whose name matches REGEX (grep -E); names look
#                     like 4k-randread-qd32-q2 (see --list)
#   --workdir DIR     where the image is cached and logs go
#                     (default ${TMPDIR:-/tmp}/colo-blk-bench-qcow2)
#   --poll-us N       pass --poll-us N to colo-blk serve (default: its default)
#   --qsd-iothread    run the QSD export in an iothread
#   --list            print the row names and exit
# env: COLO_BLK  colo-blk binary (default target/release/colo-blk of this repo)
#      QSD       qemu-storage-daemon binary (default: from PATH)
#      QEMU_IMG  qemu-img binary (default: from PATH)
# The markdown report goes to stdout, progress to stderr.
set -euo pipefail

bench_tag=bench-qcow2.sh
. "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

qsd=${QSD:-qemu-storage-daemon}
qemu_img=${QEMU_IMG:-qemu-img}
size_arg=1G runtime=10 repeat=2 cache_arg=both rows_re='' poll_us='' qsd_iothread=0 list=0
workdir=${TMPDIR:-/tmp}/colo-blk-bench-qcow2
while [[ $# -gt 0 ]]; do
    case $1 in
        --size) size_arg=${2:?}; shift 2 ;;
        --cache) cache_arg=${2:?}; shift 2 ;;
        --rows) rows_re=${2:?}; shift 2 ;;
        --poll-us) poll_us=${2:?}; shift 2 ;;
        --qsd-iothread) qsd_iothread=1; shift ;;
        --list) list=1; shift ;;
        *) bench_arg "$@"; shift "$bench_shift" ;;
    esac
done
need_posint "$runtime" --runtime
need_posint "$repeat" --repeat
case $cache_arg in
    direct) caches=(direct) ;;
    page) caches=(page) ;;
    both) caches=(direct page) ;;
    *) die "--cache takes direct, page or both" ;;
esac
case $size_arg in
    *[kK]) size=$((${size_arg%?} << 10)) ;;
    *[mM]) size=$((${size_arg%?} << 20)) ;;
    *[gG]) size=$((${size_arg%?} << 30)) ;;
    *) size=$size_arg ;;
esac
[[ $size =~ ^[1-9][0-9]*$ ]] && ((size % (1 << 20) == 0)) || die "--size must be a positive number of MiB (e.g. 256M, 1G)"

# name|rw|bs|iodepth (per queue)|queues
rows=()
for rw in randread randwrite; do
    rows+=("4k-$rw-qd32-q2|$rw|4K|32|2" "4k-$rw-qd1-q1|$rw|4K|1|1")
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
[[ ${#selected[@]} -gt 0 ]] || die "--rows $rows_re matches no row (see --list)"

need_colo
command -v "$qsd" >/dev/null || die "$qsd not found (set QSD=)"
command -v "$qemu_img" >/dev/null || die "$qemu_img not found (set QEMU_IMG=)"

make_rundir
img=$workdir/random-$size.qcow2

# ------------------------------------------------------------------ image ---

make_image() {
    if [[ -f $img ]] && "$qemu_img" info -U --output=json "$img" 2>/dev/null | grep -q "\"virtual-size\": $size,"; then
        log "reusing $img"
    else
        log "writing $((size >> 20)) MiB of random data into $img (every cluster allocated)"
        head -c "$size" /dev/urandom >"$img.raw"
        "$qemu_img" convert -q -f raw -O qcow2 -S 0 "$img.raw" "$img.tmp"
        rm -f "$img.raw"
        mv "$img.tmp" "$img"
        sync "$img"
    fi
    # Every byte must be data in the qcow2 file itself (no holes, no zero clusters).
    local data
    data=$("$qemu_img" map -U --output=json "$img" |
        awk '/"data": true/ { if (match($0, /"length": [0-9]+/)) s += substr($0, RSTART + 10, RLENGTH - 10) } END { printf "%d", s }')
    [[ $data == "$size" ]] || die "$img is not fully allocated ($data of $size bytes are data)"
    "$qemu_img" check -q "$img" || die "qemu-img check $img failed"
}

# ---------------------------------------------------------------- daemons ---

daemon_pid=''

# start_daemon colo-blk|QSD direct|page: sets daemon_pid and sock
start_daemon() {
    local backend=$1 cache=$2 tag=$1-$2
    local logf=$run/$tag.log
    sock=$run/$tag.sock
    rm -f "$sock"
    if [[ $backend == colo-blk ]]; then
        local -a cargs=(--disk "$img" --format qcow2 --num-queues 2)
        [[ $cache == direct ]] && cargs+=(--direct)
        [[ -n $poll_us ]] && cargs+=(--poll-us "$poll_us")
        "$colo" serve --socket "$sock" "${cargs[@]}" </dev/null >>"$logf" 2>&1 &
        daemon_pid=$!
        wait_ready colo-blk "$daemon_pid" "$logf" colo_ready "$sock" "$logf"
    else
        local pidf=$run/$tag.pid direct=off
        [[ $cache == direct ]] && direct=on
        rm -f "$pidf"
        local exp="type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=2"
        local -a qargs=(--blockdev "driver=file,node-name=f,filename=$img,aio=io_uring,cache.direct=$direct"
            --blockdev "driver=qcow2,node-name=d,file=f")
        if [[ $qsd_iothread == 1 ]]; then
            qargs=(--object "iothread,id=io0" "${qargs[@]}")
            exp+=",iothread=io0"
        fi
        "$qsd" "${qargs[@]}" --export "$exp" --pidfile "$pidf" </dev/null >>"$logf" 2>&1 &
        daemon_pid=$!
        wait_ready qemu-storage-daemon "$daemon_pid" "$logf" qsd_ready "$sock" "$pidf"
    fi
}

# SIGTERM the daemon and reap it (SIGKILL after 10 s); a non-zero exit is a problem.
stop_daemon() {
    local what=$1
    [[ -n $daemon_pid ]] || return 0
    stop_pid "$daemon_pid"
    daemon_pid=''
    [[ $stop_rc == 0 ]] || problem "$what exited with status $stop_rc on SIGTERM"
}

cleanup() {
    [[ -z $daemon_pid ]] || kill -TERM "$daemon_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
bench_traps

# ----------------------------------------------------------------- helpers ---

# (CPU tick counters, other_warn, json_num and median are in bench-lib.sh.)
# field N of result lines for a row, cache mode and backend
pick() { awk -v r="$1" -v c="$2" -v b="$3" -v f="$4" '$1 == r && $2 == c && $3 == b { print $f }' "$results"; }
runs() { awk -v r="$1" -v c="$2" -v b="$3" '$1 == r && $2 == c && $3 == b { printf "%s%.0f [%s%%]", (n++ ? ", " : ""), $5, $10 }' "$results"; }
fmt0() { awk -v v="$1" 'BEGIN { if (v == "nan") print "n/a"; else printf "%.0f", v }'; }
fmt1() { awk -v v="$1" 'BEGIN { if (v == "nan") print "n/a"; else printf "%.1f", v }'; }

# ------------------------------------------------------------------- runs ---

results=$run/results.txt # row cache backend rep iops p50 p99 errors cpu% other%
: >"$results"

bench_rows() { # cache backend rep
    local cache=$1 backend=$2 rep=$3 r name rw bs qd q out t0 t1 c0 c1 b0 b1 k0 k1 iops p50 p99 err cpu other
    for r in "${selected[@]}"; do
        IFS='|' read -r name rw bs qd q <<<"$r"
        t0=$(date +%s%N) c0=$(pid_ticks "$daemon_pid") b0=$(cpu_busy) k0=$(child_ticks)
        if ! out=$("$colo" bench --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --queues "$q" \
            --runtime "$runtime" --label "$backend:$cache:$name" --json 2>>"$run/bench.err"); then
            problem "bench failed: $backend $cache $name run $rep (see $run/bench.err)"
            continue
        fi
        t1=$(date +%s%N) c1=$(pid_ticks "$daemon_pid") b1=$(cpu_busy) k1=$(child_ticks)
        echo "$out" >>"$run/bench.jsonl"
        iops=$(json_num iops "$out") p50=$(json_num p50_us "$out") p99=$(json_num p99_us "$out")
        err=$(json_num errors "$out")
        [[ -n $iops ]] || { problem "unparsable bench output: $out"; continue; }
        [[ ${err:-0} == 0 ]] || problem "$backend $cache $name run $rep: $err I/O errors"
        cpu=$(awk -v t=$((c1 - c0)) -v ns=$((t1 - t0)) -v hz="$hz" 'BEGIN { printf "%.0f", t * 100 / (ns / 1e9 * hz) }')
        # Busy CPU time not used by the backend or the load generator (the machine may be shared).
        other=$(awk -v b=$((b1 - b0)) -v k=$((k1 - k0)) -v c=$((c1 - c0)) -v ns=$((t1 - t0)) -v hz="$hz" \
            'BEGIN { o = (b - k - c) * 100 / (ns / 1e9 * hz); printf "%.0f", (o < 0 ? 0 : o) }')
        ((other <= other_warn)) || problem "$backend $cache $name run $rep: other processes used ${other}% of a CPU"
        echo "$name $cache $backend $rep $iops ${p50:-nan} ${p99:-nan} ${err:-0} $cpu $other" >>"$results"
        log "  $cache $name $backend #$rep: $(fmt0 "$iops") IOPS, p50 ${p50} us, p99 ${p99} us, backend CPU ${cpu}%," \
            "others ${other}%"
    done
}

load_start=$(loadavg)
started=$(date -u '+%Y-%m-%d %H:%M UTC')
log "logs in $run"
make_image
for cache in "${caches[@]}"; do
    for ((rep = 1; rep <= repeat; rep++)); do
        if ((rep % 2)); then order=(colo-blk QSD); else order=(QSD colo-blk); fi
        for backend in "${order[@]}"; do
            # Written pages of the previous backend must not be flushed during this one's runs.
            sync "$img"
            start_daemon "$backend" "$cache"
            log "$cache #$rep: $backend (pid $daemon_pid) on $sock"
            bench_rows "$cache" "$backend" "$rep"
            stop_daemon "$backend"
        done
    done
done
"$qemu_img" check -q "$img" || problem "qemu-img check $img failed after the runs"
load_end=$(loadavg)

echo "## colo-blk vs qemu-storage-daemon on a qcow2 image ($started)"
echo
echo "- colo-blk: \`$colo\` ($("$colo" --version 2>/dev/null | head -n1)), \`serve --format qcow2 --num-queues 2\`"
echo "- QSD: $("$qsd" --version | head -n1), \`driver=qcow2\` over \`driver=file,aio=io_uring\`$([[ $qsd_iothread == 1 ]] && echo ', export in an iothread')"
echo "- image: $((size >> 20)) MiB qcow2, 64 KiB clusters, fully allocated with random data"
echo "- host: $(nproc) CPUs, kernel $(uname -r); load average at start $load_start, at end $load_end"
echo "- ${runtime}s per run, $repeat run(s) per backend, row and cache mode (one backend at a time, order alternating); medians shown"
echo "- load generator: \`colo-blk bench\` (libblkio), on the same CPUs; CPU = the backend's CPU time, % of one CPU"
echo
echo "| cache | row | colo-blk IOPS | p50/p99 µs | CPU | QSD IOPS | p50/p99 µs | CPU | colo/QSD |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for cache in "${caches[@]}"; do
    for r in "${selected[@]}"; do
        name=${r%%|*}
        ci=$(pick "$name" "$cache" colo-blk 5 | median) qi=$(pick "$name" "$cache" QSD 5 | median)
        printf '| %s | %s | %s | %s / %s | %s%% | %s | %s / %s | %s%% | %s |\n' "$cache" "$name" \
            "$(fmt0 "$ci")" "$(fmt1 "$(pick "$name" "$cache" colo-blk 6 | median)")" \
            "$(fmt1 "$(pick "$name" "$cache" colo-blk 7 | median)")" "$(fmt0 "$(pick "$name" "$cache" colo-blk 9 | median)")" \
            "$(fmt0 "$qi")" "$(fmt1 "$(pick "$name" "$cache" QSD 6 | median)")" \
            "$(fmt1 "$(pick "$name" "$cache" QSD 7 | median)")" "$(fmt0 "$(pick "$name" "$cache" QSD 9 | median)")" \
            "$(ratio "$ci" "$qi")"
    done
done
echo
echo "Individual runs, in the order they ran: IOPS [CPU used by other processes during the run, % of one CPU]"
echo
echo "| cache | row | colo-blk | QSD |"
echo "| --- | --- | --- | --- |"
for cache in "${caches[@]}"; do
    for r in "${selected[@]}"; do
        name=${r%%|*}
        printf '| %s | %s | %s | %s |\n' "$cache" "$name" "$(runs "$name" "$cache" colo-blk)" "$(runs "$name" "$cache" QSD)"
    done
done
echo
if [[ ${#problems[@]} -gt 0 ]]; then
    echo "### Problems"
    echo
    printf -- '- %s\n' "${problems[@]}"
    echo
fi
log "raw results: $run"
