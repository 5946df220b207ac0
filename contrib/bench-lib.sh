# Helpers shared by contrib/bench.sh, bench-qcow2.sh, bench-primary.sh and
# bench-replication.sh; sourced by them (not run), right after `set -euo pipefail`:
#
#   bench_tag=NAME                          # prefix of the script's messages
#   . "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
#
# Settings a script may make before sourcing (or at least before the use):
#   bench_log_time=1      log lines carry the UTC time (default: not)
#   bench_problem_word=W  problem() logs "W: ..." (default WARNING)
#   bench_stop_secs=N     stop_pid waits N s for a SIGTERMed process before SIGKILL
#                         (default 10)
#   bench_stop_complain=1 a SIGKILL by stop_pid is a problem (default: silent)
# Defines here (contrib/), repo, colo (the colo-blk binary: $COLO_BLK or
# target/release/colo-blk) and the functions below.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
bench_self=${BASH_SOURCE[1]}
colo=${COLO_BLK:-$repo/target/release/colo-blk}

# ------------------------------------------------------- messages, options ---

# The script's header comment (from line 2 to `set -euo`), then exit 2.
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$bench_self"; exit 2; }
die() { echo "$bench_tag: error: $*" >&2; exit 1; }
log() {
    if [[ ${bench_log_time:-0} == 1 ]]; then
        echo "$bench_tag: $(date -u +%H:%M:%S) $*" >&2
    else
        echo "$bench_tag: $*" >&2
    fi
}

problems=()
problem() { problems+=("$*"); log "${bench_problem_word:-WARNING}: $*"; }

# bench_arg "$@": the options every script takes (--runtime, --repeat, --workdir,
# -h/--help; they set runtime, repeat, workdir) and the error for an unknown one.
# The script's own `case` calls it last; it sets bench_shift to the words it used.
bench_shift=0
bench_arg() {
    case $1 in
        --runtime) runtime=${2:?}; bench_shift=2 ;;
        --repeat) repeat=${2:?}; bench_shift=2 ;;
        --workdir) workdir=${2:?}; bench_shift=2 ;;
        -h | --help) usage ;;
        *) echo "$bench_tag: unknown argument: $1" >&2; usage ;;
    esac
}

# need_posint VALUE OPTION: dies unless VALUE is a positive integer.
need_posint() { [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2 takes a positive integer"; }

need_colo() { [[ -x $colo ]] || die "$colo not found (cargo build --release, or set COLO_BLK=)"; }

# make_rundir: makes $workdir absolute (creating it) and sets run to a fresh
# directory in it for this run's logs and raw results.
make_rundir() {
    mkdir -p "$workdir"
    workdir=$(cd "$workdir" && pwd)
    run=$(mktemp -d "$workdir/run.XXXXXX")
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# bench_traps: run the script's cleanup() on exit; SIGINT/SIGTERM exit 130/143.
bench_traps() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# ----------------------------------------------------------------- daemons ---

pids=() # started and not yet reaped (a reaped pid may be reused: never signal it again)

forget() { local p=$1 i; for i in "${!pids[@]}"; do [[ ${pids[$i]} == "$p" ]] && unset "pids[$i]"; done; true; }

# wait_ready WHAT PID LOG CMD...: until CMD succeeds (up to 20 s); dies at once,
# showing LOG, if process PID exits.
wait_ready() {
    local what=$1 pid=$2 logf=$3 i
    shift 3
    for ((i = 0; i < 400; i++)); do
        "$@" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            sed 's/^/  | /' "$logf" >&2
            die "$what exited during startup (log: $logf)"
        fi
        sleep 0.05
    done
    sed 's/^/  | /' "$logf" >&2
    die "$what not ready after 20 s (log: $logf)"
}

colo_ready() { [[ -S $1 ]] && grep -q 'serving ' "$2" 2>/dev/null; } # SOCKET LOG
qsd_ready() { [[ -S $1 && -s $2 ]]; }                                 # SOCKET PIDFILE

# stop_pid PID: SIGCONT (it may have been stopped) and SIGTERM a process this
# shell started, SIGKILL after bench_stop_secs, reap it and forget it. Sets
# stop_rc to its exit status. (Not in a subshell: only this shell can reap it.)
stop_rc=0
stop_pid() {
    local pid=$1 i st=''
    stop_rc=0
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < ${bench_stop_secs:-10} * 20; i++)); do
        st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        [[ -z $st || $st == Z* ]] && break
        sleep 0.05
    done
    if [[ -n $st && $st != Z* ]]; then
        [[ ${bench_stop_complain:-0} == 1 ]] && problem "pid $pid did not exit within ${bench_stop_secs:-10} s of SIGTERM; killed"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || stop_rc=$?
    forget "$pid"
}

# random_image PATH BYTES WHAT: PATH holds BYTES of random data (an existing file
# of that size is reused); WHAT describes the size in the log.
random_image() {
    if [[ -f $1 && $(stat -c %s "$1") == "$2" ]]; then
        log "reusing $1"
        return
    fi
    log "writing $3 of random data to $1"
    head -c "$2" /dev/urandom >"$1.tmp"
    mv "$1.tmp" "$1"
    # Don't let the page cache write-back of the new image overlap the runs.
    sync "$1"
}

# ---------------------------------------------------------------- CPU time ---

# All in clock ticks. The machine may be shared (builds, tests): the scripts
# compare the busy time of the whole machine with their own processes' to see
# how much CPU others used during a run.
hz=$(getconf CLK_TCK)
other_warn=25 # % of one CPU used by other processes during a run: a problem beyond
cpu_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
pid_ticks() { # utime + stime of a live process (all its threads); 0 if PID is empty or gone
    local st
    [[ -n $1 ]] && st=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return 0; }
    st=${st##*) }
    awk '{ print $12 + $13 }' <<<"$st"
}
child_ticks() { # cutime + cstime of this shell: every child it has reaped
    local st
    st=$(cat "/proc/$$/stat")
    st=${st##*) }
    awk '{ print $14 + $15 }' <<<"$st"
}

# ----------------------------------------------------------------- results ---

# json_num KEY JSON: a number from a flat JSON object (colo-blk bench --json).
json_num() { sed -n "s/.*\"$1\":\([-0-9.eE+]*\).*/\1/p" <<<"$2"; }
# One value from a JSON document: jget 'python expression on r' JSON
jget() { python3 -c 'import json,sys; r=json.loads(sys.argv[2]); print(eval(sys.argv[1]))' "$1" "$2"; }

# qmp SOCK 'json' ...: runs the commands with the script's $run/qmp.py, prints
# the answers (exit 1 on an error).
qmp() {
    local sock=$1
    shift
    printf '%s\n' "$@" | python3 "$run/qmp.py" run "$sock"
}

# Median of the numbers on stdin ("nan" if none).
median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "nan" && b != "nan" && b > 0) printf "%.2f", a / b; else print "n/a" }'; }

# Result files of the form "row impl rep value ..." (value ERR for a failed run):
# the values of a row and impl, their median, the failures, " (N ERR)" if any.
vals() { awk -v r="$1" -v i="$2" '$1 == r && $2 == i && $4 != "ERR" { print $4 }' "$results"; }
med() { vals "$1" "$2" | median; }
nerr() { awk -v r="$1" -v i="$2" '$1 == r && $2 == i && $4 == "ERR" { n++ } END { print n + 0 }' "$results"; }
errs() { local e; e=$(nerr "$1" "$2"); [[ $e == 0 ]] || echo " ($e ERR)"; }
rec() { echo "$*" >>"$results"; }
