#!/usr/bin/env bash
# shellcheck disable=SC2317 # functions called through trap, poll and eval
# Soak run of a colo-blk primary + secondary pair on loopback under fio load.
#
# A secondary (--replication secondary, NBD server on a UNIX socket) and a
# primary (--replication primary, --secondary-timeout 2, 2 queues) replicate
# through contrib/soak-proxy.py, a proxy that severs every link connection on
# SIGUSR1 (the primary then sees the link drop, reconnects and resyncs the
# ranges the secondary missed) and hangs the link on SIGUSR2 (a partition: no
# byte passes, nothing is closed, new connections are held) for --hang-for s.
# With --tls the link is NBD over TLS on loopback TCP instead: the secondary
# listens on 127.0.0.1 (--nbd-tls-creds, --nbd-allow 127.0.0.1), the primary
# connects through the proxy (TCP too) with --secondary-tls-creds; the
# certificates (a CA, a server certificate for 127.0.0.1/localhost and a client
# certificate) are made with openssl in DIR/tls at the start. Meanwhile:
#   load        the test guest (contrib/guest/run-fio.sh, QEMU TCG) runs fio jobs
#               with crc32c verify against the primary's vhost-user socket, one
#               boot after another until --duration is over (verify and mixed,
#               alternating, region sizes rotating); each boot must PASS.
#   checkpoint  every --checkpoint-every s: wait (bounded) until the primary is
#               in sync (link connected, dirty-bytes 0, inflight 0); skipped when
#               the link is down or a resync runs; else replication-checkpoint on
#               the primary (barrier N) and replication-checkpoint barrier=N on the
#               secondary (a no-op if a primary write committed it already).
#   link cut    every --cut-every s: SIGUSR1 to the proxy; measures the time until
#               the primary's link is connected again and until dirty-bytes is 0,
#               and the bytes the resync copied.
#   link hang   every --hang-every s (never during a cut's recovery, and at least
#               5 s after one; a cut waits likewise): once guest writes are seen
#               flowing (forwarded-ops grows; at most 30 s), SIGUSR2 to the proxy;
#               measures the time until the primary reports the link down, and,
#               after the hang ends, the time until the link is connected again
#               and dirty-bytes is 0 (at most 60 s), and the bytes the resync
#               copied. A forwarded request seen in flight (or sent) during the
#               hang early enough for its timeout to expire before the hang ends
#               must bring the link down within --secondary-timeout + 3 s of being
#               seen; a hang without one ("idle": the guest stopped writing just
#               then) need not. No checkpoint is taken meanwhile.
#   resources   every 10 s: RSS, fds and threads of both colo-blk processes
#               (resources.csv).
# At the end: the load stops, the primary gets in sync, a last checkpoint is
# committed on the secondary, the secondary fails over (replication-stop
# failover=true: merges its buffers, which must be empty), and its disk must be
# byte-identical to the primary's. The summary flags: failed guest runs, verify
# errors, a failed cut recovery, a failed final checkpoint/failover, the disks
# differing, fd or thread growth between the idle states before and after the
# load, private RSS (VmRSS - RssShmem; guest RAM mapped by vhost-user is
# shmem) growing > 20% after the first 2 minutes, a daemon dying or not
# shutting down cleanly, a hang with writes flowing that the primary did not
# notice in time, a hang not recovered. Exit 0 only if nothing was flagged.
#
# usage: contrib/soak.sh [options]
#   --duration S          load duration, seconds (default 1800); the guest run
#                         in progress at the end finishes first
#   --workdir DIR         images, logs, CSVs (default ${TMPDIR:-/tmp}/colo-blk-soak;
#                         the images and logs of an earlier soak in DIR are removed)
#   --colo-blk BIN        colo-blk binary (default target/release/colo-blk of this
#                         repo); copied into DIR so a rebuild does not disturb the run
#   --checkpoint-every S  checkpoint period (default 5)
#   --cut-every S         link cut period (default 60; 0 = no cuts)
#   --hang-every S        link hang period (default 0 = no hangs; e.g. 90)
#   --hang-for S          how long a link hang lasts (default 8)
#   --tls                 NBD over TLS on loopback TCP (default: plain NBD on a
#                         UNIX socket)
#   --size SIZE           disk size, sparse files (default 2G)
#   --bufdir DIR          where the secondary's active and hidden buffers go
#                         (default: the workdir; e.g. /dev/shm for tmpfs buffers)
#   --guest-timeout S     a guest boot that runs longer is killed: FAIL (default 900)
#   --keep                keep the disk images (default: removed after a PASS)
# Needs python3, jq, qemu-system-x86_64 and the guest build of contrib/guest
# (built on demand by its build.sh); openssl with --tls.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

usage() { sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 2; }
die() { echo "soak: error: $*" >&2; exit 2; }

duration=1800 workdir=${TMPDIR:-/tmp}/colo-blk-soak bin=$repo/target/release/colo-blk
ckpt_every=5 cut_every=60 size=2G guest_timeout=900 keep=0 bufdir='' hang_every=0 hang_for=8 tls=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --duration) duration=${2:?}; shift 2 ;;
        --workdir) workdir=${2:?}; shift 2 ;;
        --colo-blk) bin=${2:?}; shift 2 ;;
        --checkpoint-every) ckpt_every=${2:?}; shift 2 ;;
        --cut-every) cut_every=${2:?}; shift 2 ;;
        --hang-every) hang_every=${2:?}; shift 2 ;;
        --hang-for) hang_for=${2:?}; shift 2 ;;
        --tls) tls=1; shift ;;
        --size) size=${2:?}; shift 2 ;;
        --bufdir) bufdir=${2:?}; shift 2 ;;
        --guest-timeout) guest_timeout=${2:?}; shift 2 ;;
        --keep) keep=1; shift ;;
        -h | --help) usage ;;
        *) echo "soak: unknown argument: $1" >&2; usage ;;
    esac
done
for v in duration ckpt_every cut_every hang_every hang_for guest_timeout; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "--${v//_/-} takes whole seconds"
done
((ckpt_every > 0)) || die "--checkpoint-every must be > 0"
((hang_for > 0)) || die "--hang-for must be > 0"
[[ -x $bin ]] || die "$bin is not executable"
tools=(python3 jq qemu-system-x86_64 cmp)
((tls)) && tools+=(openssl)
for t in "${tools[@]}"; do
    command -v "$t" >/dev/null || die "$t not found"
done

mkdir -p "$workdir"
W=$(cd "$workdir" && pwd)
# Leftovers of an earlier soak in W (only the names this script uses).
rm -f "$W"/{p,s,s.active,s.hidden}.img "$W"/s.img.colo-state "$W"/*.sock "$W"/*.qmp "$W"/*.nbd \
    "$W"/*.log "$W"/*.events "$W"/*.csv "$W"/idle-*.txt "$W"/summary.txt "$W"/stop-load "$W"/colo-blk
rm -rf "$W/guest" "$W/tls"
if [[ -n $bufdir ]]; then
    mkdir -p "$bufdir"
    BUF=$(cd "$bufdir" && pwd)
    rm -f "$BUF"/{s.active,s.hidden}.img
else
    BUF=$W
fi
mkdir -p "$W/guest"
cp "$bin" "$W/colo-blk"
B=$W/colo-blk
version=$("$B" --version 2>/dev/null || echo '?')

log() { printf '%s soak: %s\n' "$(date +%T)" "$*" | tee -a "$W/soak.log" >&2; }

# ---------------------------------------------------------------- time, QMP
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
t_start=$(now_ms)
rel() { echo $((($(now_ms) - t_start) / 1000)); }

# ctl QMP CMD [ARGS]: one command, bounded (ctl itself has no timeout).
ctl() { local q=$1; shift; timeout 60 "$B" ctl --qmp "$q" "$@"; }
# Primary state in one line: connected dirty inflight connects failures copied sent
# forwarded-ops error
pstate() {
    ctl "$W/p.qmp" query-replication 2>/dev/null | jq -r '[.link.connected, ."dirty-bytes", .link.inflight,
        .link.connects, .link.failures, .resync."copied-bytes", .barriers.sent, ."forwarded-ops",
        (.error // "-")] | @tsv'
}
squery() { ctl "$W/s.qmp" query-replication; }

# ---------------------------------------------------------------- processes
s_pid='' p_pid='' proxy_pid='' load_pid='' ev_pids=()
# The descendants of PID (children first-level and deeper), by /proc.
descendants() {
    local p c
    for p in "$@"; do
        for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do
            echo "$c"
            descendants "$c"
        done
    done
}
kill_tree() {
    local all
    all=$(descendants "$@")
    # shellcheck disable=SC2086
    kill -TERM "$@" $all 2>/dev/null || true
}
cleaned=0
cleanup() {
    ((cleaned)) && return
    cleaned=1
    set +e
    [[ -n $load_pid ]] && kill -0 "$load_pid" 2>/dev/null && { touch "$W/stop-load"; kill_tree "$load_pid"; }
    for q in p s; do
        [[ -S $W/$q.qmp ]] && timeout 10 "$B" ctl --qmp "$W/$q.qmp" quit >/dev/null 2>&1
    done
    for p in $p_pid $s_pid; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    # shellcheck disable=SC2086
    kill -TERM $proxy_pid "${ev_pids[@]}" 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Poll until COND (a shell command) succeeds; at most T seconds. 0/1.
poll() {
    local t=$1 end; shift
    end=$(($(now_ms) + t * 1000))
    until "$@"; do
        (($(now_ms) < end)) || return 1
        sleep 0.05
    done
}
qmp_up() { "$B" ctl --qmp "$1" query-replication >/dev/null 2>&1; }

# ---------------------------------------------------------------- start the pair
sec_timeout=2
((tls)) && link_desc="NBD over TLS on loopback TCP" || link_desc="plain NBD on UNIX sockets"
log "workdir $W, colo-blk $version ($bin), duration ${duration}s, checkpoint every ${ckpt_every}s, cut every ${cut_every}s, hang every ${hang_every}s for ${hang_for}s, link: $link_desc, disk $size, buffers in $BUF"
"$here/guest/build.sh" >>"$W/soak.log" 2>&1 || die "contrib/guest/build.sh failed (see $W/soak.log)"

# make_creds DIR: a CA, a server and a client certificate signed by it, in the layout of
# QEMU's tls-creds-x509 (DIR/server: ca-cert, server-cert, server-key; DIR/client: ca-cert,
# client-cert, client-key). The server's is for 127.0.0.1 and localhost.
make_creds() (
    set -e
    mkdir -p "$1/gen" "$1/server" "$1/client"
    cd "$1/gen"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 3 \
        -subj "/CN=colo-blk soak CA" 2>/dev/null
    for who in server client; do
        if [[ $who == server ]]; then
            printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'extendedKeyUsage=serverAuth' \
                'keyUsage=digitalSignature,keyEncipherment' >"$who.ext"
        else
            printf '%s\n' 'extendedKeyUsage=clientAuth' 'keyUsage=digitalSignature,keyEncipherment' >"$who.ext"
        fi
        openssl req -newkey rsa:2048 -nodes -keyout "$who-key.pem" -out "$who.csr" \
            -subj "/CN=colo-blk soak $who" 2>/dev/null
        openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out "$who-cert.pem" -days 3 -extfile "$who.ext" 2>/dev/null
        cp ca-cert.pem "$who-cert.pem" "$who-key.pem" "../$who/"
    done
    chmod 600 ../server/server-key.pem ../client/client-key.pem
)
if ((tls)); then
    make_creds "$W/tls" || die "openssl could not make the TLS credentials in $W/tls"
    # Two free loopback ports, the secondary's NBD server and the proxy, below the
    # kernel's ephemeral range (where other programs' connections come and go).
    read -r nbd_port proxy_port < <(python3 -c 'import random, socket
lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
found = []
while len(found) < 2:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", random.randrange(10000, max(lo, 10002))))
        port = s.getsockname()[1]
        if port not in found:
            found.append(port)
    except OSError:
        pass
    s.close()
print(*found)')
    s_link=(--nbd-listen "127.0.0.1:$nbd_port" --nbd-tls-creds "$W/tls/server" --nbd-allow 127.0.0.1)
    proxy_link=(--listen "127.0.0.1:$proxy_port" --target "127.0.0.1:$nbd_port")
    p_link=(--secondary "nbd://127.0.0.1:$proxy_port/soak" --secondary-tls-creds "$W/tls/client")
else
    s_link=(--nbd-listen "unix:$W/s.nbd")
    proxy_link=(--listen "$W/proxy.sock" --target "$W/s.nbd")
    p_link=(--secondary "nbd+unix:///soak?socket=$W/proxy.sock")
fi

RUST_LOG=info "$B" serve --replication secondary --disk "$W/s.img" --size "$size" \
    --active "$BUF/s.active.img" --hidden "$BUF/s.hidden.img" \
    "${s_link[@]}" --nbd-export soak \
    --socket "$W/s.sock" --qmp "$W/s.qmp" >"$W/secondary.log" 2>&1 &
s_pid=$!
poll 30 qmp_up "$W/s.qmp" || die "secondary did not come up (see $W/secondary.log)"
python3 "$here/soak-proxy.py" events --qmp "$W/s.qmp" --out "$W/secondary.events" &
ev_pids+=($!)
poll 10 test -e "$W/secondary.events" || die "the secondary's event listener did not come up"
ctl "$W/s.qmp" replication-start mode=secondary >/dev/null

python3 "$here/soak-proxy.py" proxy "${proxy_link[@]}" --hang-for "$hang_for" --log "$W/proxy.log" &
proxy_pid=$!
proxy_up() { grep -q ' listening on ' "$W/proxy.log" 2>/dev/null; }
poll 10 proxy_up || die "proxy did not come up (see $W/proxy.log)"

RUST_LOG=info "$B" serve --replication primary --disk "$W/p.img" --size "$size" \
    "${p_link[@]}" --secondary-timeout "$sec_timeout" --num-queues 2 \
    --socket "$W/p.sock" --qmp "$W/p.qmp" >"$W/primary.log" 2>&1 &
p_pid=$!
poll 30 qmp_up "$W/p.qmp" || die "primary did not come up (see $W/primary.log)"
python3 "$here/soak-proxy.py" events --qmp "$W/p.qmp" --out "$W/primary.events" &
ev_pids+=($!)
poll 10 test -e "$W/primary.events" || die "the primary's event listener did not come up"
# Both images were created sparse and empty: identical, no full sync needed.
ctl "$W/p.qmp" replication-start mode=primary >/dev/null

in_sync() {
    local c d i
    read -r c d i _ < <(pstate) || return 1
    [[ $c == true && $d == 0 && $i == 0 ]]
}
poll 60 in_sync || die "the primary did not get in sync after replication-start"
log "pair up: secondary pid $s_pid, primary pid $p_pid, proxy pid $proxy_pid"

# ---------------------------------------------------------------- resources
# sample TAG: one CSV row per process: t,tag,role,VmRSS,RssAnon,RssFile,RssShmem,fds,threads
echo "t_s,tag,role,vmrss_kb,rssanon_kb,rssfile_kb,rssshmem_kb,fds,threads" >"$W/resources.csv"
# Threads and fds of PID once two readings 100 ms apart agree (a control-socket client the
# script itself just used keeps a thread and two descriptors for a moment after it hangs up).
settle() {
    local pid=$1 i prev='' cur
    for ((i = 0; i < 50; i++)); do
        cur="$(awk '/^Threads:/ {print $2}' "/proc/$pid/status" 2>/dev/null) $(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
        [[ $cur == "$prev" ]] && return 0
        prev=$cur
        sleep 0.1
    done
}
sample() {
    local tag=$1 role pid f
    for role in primary secondary; do
        if [[ $tag == idle-* ]]; then
            if [[ $role == primary ]]; then settle "$p_pid"; else settle "$s_pid"; fi
        fi
        [[ $role == primary ]] && pid=$p_pid || pid=$s_pid
        f=/proc/$pid/status
        [[ -r $f ]] || continue
        local rss anon file shm thr fds
        rss=$(awk '/^VmRSS:/ {print $2}' "$f")
        anon=$(awk '/^RssAnon:/ {print $2}' "$f")
        file=$(awk '/^RssFile:/ {print $2}' "$f")
        shm=$(awk '/^RssShmem:/ {print $2}' "$f")
        thr=$(awk '/^Threads:/ {print $2}' "$f")
        fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        echo "$(rel),$tag,$role,$rss,$anon,$file,$shm,$fds,$thr" >>"$W/resources.csv"
        # At the idle samples, what the threads and descriptors are (to explain a growth).
        if [[ $tag == idle-* ]]; then
            {
                echo "threads:"
                for t in /proc/"$pid"/task/*; do echo "  ${t##*/} $(cat "$t/comm" 2>/dev/null)"; done
                echo "fds:"
                for t in /proc/"$pid"/fd/*; do echo "  ${t##*/} $(readlink "$t" 2>/dev/null)"; done
            } >"$W/$tag-$role.txt"
        fi
    done
}
sample idle-start

# ---------------------------------------------------------------- load
deadline=$(($(now_ms) + duration * 1000))
echo "run,job,size,rc,secs,verify_errors,log" >"$W/runs.csv"
load_loop() {
    local n=0 job sz lg rc t0 secs ve
    local jobs=(verify mixed) sizes=(256m 128m 512m)
    trap 'exit 0' TERM
    while [[ ! -e $W/stop-load ]] && (($(now_ms) < deadline)); do
        job=${jobs[n % 2]} sz=${sizes[(n / 2) % 3]}
        n=$((n + 1))
        lg=$W/guest/run-$(printf %03d $n)-$job-$sz.log
        t0=$(now_ms)
        rc=0
        "$here/guest/run-fio.sh" --socket "$W/p.sock" --job "$job" --size "$sz" --queues 2 \
            --timeout "$guest_timeout" --log "$lg" --quiet >>"$W/load.log" 2>&1 || rc=$?
        secs=$((($(now_ms) - t0) / 1000))
        # fio's verify failures: "verify: bad magic header", "crc32c: verify failed", ...
        ve=$(tr -d '\r' <"$lg" | grep -aciE 'verify failed|bad magic|bad header|verify type mismatch|verify: bad' || true)
        echo "$n,$job,$sz,$rc,$secs,$ve,$lg" >>"$W/runs.csv"
    done
}
load_loop &
load_pid=$!
log "load started (pid $load_pid); guest consoles in $W/guest/"

# ---------------------------------------------------------------- checkpoints
echo "t_s,result,seq,wait_ms,primary_ms,barrier_us,commit_trigger,commit_us,detail" >"$W/checkpoints.csv"
ck_done=0 ck_skipped=0 ck_failed=0 ck_busy=0
ckpt_row() { echo "$(rel),$*" >>"$W/checkpoints.csv"; }
# checkpoint: one periodic checkpoint. Returns nothing; records a CSV row.
checkpoint() {
    local t0 end c d i seq wait_ms t1 pms bus sq pend lc trig cus out
    t0=$(now_ms)
    end=$((t0 + 3000))
    while :; do
        read -r c d i _ < <(pstate) || { c=x d=x i=x; }
        [[ $c == true && $d == 0 && $i == 0 ]] && break
        (($(now_ms) < end)) || break
        sleep 0.02
    done
    wait_ms=$(($(now_ms) - t0))
    if [[ $c != true ]]; then
        ck_skipped=$((ck_skipped + 1)); ckpt_row "skipped-link-down,,$wait_ms,,,,,"; return
    fi
    if [[ $d != 0 ]]; then
        ck_skipped=$((ck_skipped + 1)); ckpt_row "skipped-resyncing,,$wait_ms,,,,,dirty=$d"; return
    fi
    # Connected and clean, but forwarded writes in flight whenever we looked: the
    # barrier itself waits for them, so go on (counted).
    [[ $i == 0 ]] || ck_busy=$((ck_busy + 1))
    t1=$(now_ms)
    if ! out=$(ctl "$W/p.qmp" replication-checkpoint 2>&1); then
        ck_failed=$((ck_failed + 1))
        ckpt_row "failed,,$wait_ms,$(($(now_ms) - t1)),,,,\"${out//\"/\'}\""
        log "checkpoint failed: $out"
        return
    fi
    pms=$(($(now_ms) - t1))
    read -r _ _ _ _ _ _ seq _ < <(pstate)
    bus=$(ctl "$W/p.qmp" query-replication | jq -r '.barriers."last-us"')
    sq=$(squery)
    pend=$(jq -r '.colo."pending-barrier" // "null"' <<<"$sq")
    if [[ $pend != null ]]; then
        ctl "$W/s.qmp" replication-checkpoint barrier="$pend" >/dev/null
        sq=$(squery)
    fi
    lc=$(jq -r '.colo."last-commit" | if . == null then "null" else "\(.barrier) \(.trigger) \(."duration-us")" end' <<<"$sq")
    read -r lcb trig cus <<<"$lc"
    if [[ $pend != null && $pend != "$seq" ]]; then
        ck_failed=$((ck_failed + 1))
        ckpt_row "failed,$seq,$wait_ms,$pms,$bus,$trig,$cus,secondary pending $pend != primary barrier $seq"
        log "checkpoint $seq: the secondary had barrier $pend pending"
    elif [[ $lcb != "$seq" ]]; then
        # A later barrier cannot exist (only this script sends barriers).
        ck_failed=$((ck_failed + 1))
        ckpt_row "failed,$seq,$wait_ms,$pms,$bus,$trig,$cus,secondary last commit $lc"
        log "checkpoint $seq not committed on the secondary: last-commit $lc"
    else
        ck_done=$((ck_done + 1))
        ckpt_row "ok,$seq,$wait_ms,$pms,$bus,$trig,$cus,"
    fi
}

# ---------------------------------------------------------------- link cuts
echo "t_s,cut,reconnect_ms,in_sync_ms,resync_bytes,max_dirty_bytes,result" >"$W/cuts.csv"
cut_n=0 cut_failed=0 cut_state=0 cut_t0=0 cut_conn_ms='' cut_connects0=0 cut_copied0=0 cut_maxdirty=0
cut_start() {
    local c d i cn cp
    read -r c d i cn _ cp _ < <(pstate)
    cut_connects0=$cn cut_copied0=$cp cut_maxdirty=0 cut_conn_ms=''
    cut_n=$((cut_n + 1))
    cut_t0=$(now_ms)
    kill -USR1 "$proxy_pid"
    cut_state=1
}
# cut_poll: called every 50 ms while a cut is being measured.
cut_poll() {
    local c d i cn cp el
    read -r c d i cn _ cp _ < <(pstate) || return 0
    el=$(($(now_ms) - cut_t0))
    [[ $d =~ ^[0-9]+$ ]] && ((d > cut_maxdirty)) && cut_maxdirty=$d
    if [[ -z $cut_conn_ms && $c == true && $cn -gt $cut_connects0 ]]; then
        cut_conn_ms=$el
    fi
    if [[ -n $cut_conn_ms && $c == true && $d == 0 ]]; then
        echo "$(rel),$cut_n,$cut_conn_ms,$el,$((cp - cut_copied0)),$cut_maxdirty,ok" >>"$W/cuts.csv"
        log "cut $cut_n: reconnected after ${cut_conn_ms} ms, in sync after ${el} ms, resync $((cp - cut_copied0)) bytes"
        cut_state=0
    elif ((el > 120000)); then
        echo "$(rel),$cut_n,${cut_conn_ms:-},,,$cut_maxdirty,timeout" >>"$W/cuts.csv"
        log "cut $cut_n: not recovered after 120 s (connected=$c dirty=$d)"
        cut_failed=$((cut_failed + 1))
        cut_state=0
    fi
    ((cut_state)) || hang_quiet_until=$(($(now_ms) + 5000))
}

# ---------------------------------------------------------------- link hangs
# hang_state: 0 none, 1 armed (waiting up to 30 s for guest writes to flow), 2 hung or
# recovering. Times in hangs.csv count from the SIGUSR2; the proxy forwards again
# hang_for s after it.
# traffic: "busy" once a forwarded request was seen in flight or sent during the hang
# (first_io_ms: when), else "idle".
echo "t_s,hang,traffic,first_io_ms,down_ms,reconnect_ms,in_sync_ms,resync_bytes,max_dirty_bytes,result" >"$W/hangs.csv"
hang_n=0 hang_failed=0 hang_state=0 hang_t0=0 hang_arm_t0=0 hang_ops0='' hang_io_ms=''
hang_down_ms='' hang_conn_ms='' hang_connects0=0 hang_failures0=0 hang_copied0=0 hang_maxdirty=0
hang_quiet_until=0 cut_quiet_until=0
# The link must be down within this of a request seen stuck (the link's watchdog cuts
# within about 1.25 timeouts), if that leaves the request's timeout time to expire
# before the hang ends (io_latest).
hang_down_bound=$((sec_timeout * 1000 + 3000))
hang_io_latest=$((hang_for * 1000 - sec_timeout * 1250 - 1000))
hang_arm() {
    hang_state=1 hang_arm_t0=$(now_ms) hang_ops0=''
}
# hang_arm_poll: called every 50 ms while armed; starts the hang once forwarded-ops grows.
hang_arm_poll() {
    local ops
    read -r _ _ _ _ _ _ _ ops _ < <(pstate) || return 0
    [[ $ops =~ ^[0-9]+$ ]] || return 0
    if [[ -n $hang_ops0 ]] && ((ops > hang_ops0)) || (($(now_ms) - hang_arm_t0 > 30000)); then
        hang_start
    else
        hang_ops0=$ops
    fi
}
hang_start() {
    local c d i cn fl cp ops
    hang_n=$((hang_n + 1))
    hang_t0=$(now_ms)
    kill -USR2 "$proxy_pid"
    # Counted after the signal: a request sent after this reading is stuck in the hang
    # (one sent just before is seen in flight, if it is).
    read -r c d i cn fl cp _ ops _ < <(pstate)
    hang_connects0=$cn hang_failures0=$fl hang_copied0=$cp hang_ops0=$ops
    hang_maxdirty=0 hang_down_ms='' hang_conn_ms='' hang_io_ms=''
    hang_state=2
}
# hang_poll: called every 50 ms while a hang is being measured.
hang_poll() {
    local c d i cn fl cp ops el result traffic
    read -r c d i cn fl cp _ ops _ < <(pstate) || return 0
    el=$(($(now_ms) - hang_t0))
    [[ $d =~ ^[0-9]+$ ]] && ((d > hang_maxdirty)) && hang_maxdirty=$d
    if [[ -z $hang_io_ms && -z $hang_down_ms && $i =~ ^[0-9]+$ && $ops =~ ^[0-9]+$ ]] && ((el < hang_for * 1000)) &&
        ((i > 0 || ops > hang_ops0)); then
        hang_io_ms=$el
    fi
    if [[ -z $hang_down_ms && $fl =~ ^[0-9]+$ ]] && ((fl > hang_failures0)); then
        hang_down_ms=$el
        log "hang $hang_n: the primary reports the link down after ${el} ms"
    fi
    if [[ -n $hang_down_ms && -z $hang_conn_ms && $c == true && $cn -gt $hang_connects0 ]]; then
        hang_conn_ms=$el
    fi
    # Recovered: after the heal, connected (again, if it went down) and nothing dirty.
    if ((el >= hang_for * 1000)) && [[ $c == true && $d == 0 && (-z $hang_down_ms || -n $hang_conn_ms) ]]; then
        result=ok traffic=idle
        [[ -n $hang_io_ms || -n $hang_down_ms ]] && traffic=busy
        if [[ -n $hang_io_ms ]] && ((hang_io_ms <= hang_io_latest)) &&
            { [[ -z $hang_down_ms ]] || ((hang_down_ms - hang_io_ms > hang_down_bound)); }; then
            result=late-down
            log "hang $hang_n: a forwarded request was in flight at ${hang_io_ms} ms, but the primary reported the link down after ${hang_down_ms:-never} ms (bound: ${hang_down_bound} ms later)"
            hang_failed=$((hang_failed + 1))
        fi
        echo "$(rel),$hang_n,$traffic,$hang_io_ms,$hang_down_ms,$hang_conn_ms,$el,$((cp - hang_copied0)),$hang_maxdirty,$result" >>"$W/hangs.csv"
        log "hang $hang_n ($traffic): link down after ${hang_down_ms:-never} ms, reconnected after ${hang_conn_ms:--} ms, in sync after ${el} ms (the proxy forwards again at $((hang_for * 1000)) ms), resync $((cp - hang_copied0)) bytes"
        hang_state=0
    elif ((el > hang_for * 1000 + 60000)); then
        traffic=idle
        [[ -n $hang_io_ms || -n $hang_down_ms ]] && traffic=busy
        echo "$(rel),$hang_n,$traffic,$hang_io_ms,$hang_down_ms,$hang_conn_ms,,,$hang_maxdirty,timeout" >>"$W/hangs.csv"
        log "hang $hang_n: not recovered 60 s after the hang ended (connected=$c dirty=$d)"
        hang_failed=$((hang_failed + 1))
        hang_state=0
    fi
    ((hang_state)) || cut_quiet_until=$(($(now_ms) + 5000))
}

# ---------------------------------------------------------------- main loop
dead='' nbd_clients=''
alive() {
    kill -0 "$p_pid" 2>/dev/null || { dead="primary (pid $p_pid)"; return 1; }
    kill -0 "$s_pid" 2>/dev/null || { dead="secondary (pid $s_pid)"; return 1; }
    kill -0 "$proxy_pid" 2>/dev/null || { dead="proxy (pid $proxy_pid)"; return 1; }
}
t0=$(now_ms)
next_ck=$((t0 + ckpt_every * 1000))
next_cut=$((cut_every > 0 ? t0 + cut_every * 1000 : 1 << 62))
next_hang=$((hang_every > 0 ? t0 + hang_every * 1000 : 1 << 62))
next_sample=$((t0 + 10000))
next_report=$((t0 + 60000))
while kill -0 "$load_pid" 2>/dev/null || ((cut_state || hang_state == 2)); do
    alive || break
    now=$(now_ms)
    if ((cut_state)); then
        cut_poll
        sleep 0.05
    elif ((hang_state == 2)); then
        hang_poll
        sleep 0.05
    elif ((hang_state == 1)); then
        if ((now < deadline)); then hang_arm_poll; else hang_state=0; fi
        sleep 0.05
    else
        nxt=$((next_ck < next_sample ? next_ck : next_sample))
        # A cut or hang that is due waits for the quiet gap after the other kind.
        at=$((next_cut > cut_quiet_until ? next_cut : cut_quiet_until))
        ((at < nxt && now < deadline)) && nxt=$at
        at=$((next_hang > hang_quiet_until ? next_hang : hang_quiet_until))
        ((at < nxt && now < deadline)) && nxt=$at
        wait_ms=$((nxt - now))
        ((wait_ms > 500)) && wait_ms=500
        ((wait_ms > 0)) && sleep "$(printf '%d.%03d' $((wait_ms / 1000)) $((wait_ms % 1000)))"
    fi
    now=$(now_ms)
    if ((now >= next_sample)); then
        sample load
        next_sample=$((next_sample + 10000))
    fi
    if ((now >= next_ck)); then
        if ((cut_state)); then
            ck_skipped=$((ck_skipped + 1)); ckpt_row "skipped-cut-recovery,,,,,,,"
        elif ((hang_state == 2)); then
            ck_skipped=$((ck_skipped + 1)); ckpt_row "skipped-hang,,,,,,,"
        else
            checkpoint
        fi
        next_ck=$((next_ck + ckpt_every * 1000))
        now=$(now_ms)
        ((next_ck > now)) || next_ck=$((now + ckpt_every * 1000))
    fi
    if ((cut_every > 0 && now >= next_cut && now < deadline && !cut_state && !hang_state && now >= cut_quiet_until)); then
        cut_start
        next_cut=$((next_cut + cut_every * 1000))
        ((next_cut > now)) || next_cut=$((now + cut_every * 1000))
    fi
    if ((hang_every > 0 && now >= next_hang && now < deadline && !cut_state && !hang_state && now >= hang_quiet_until)); then
        hang_arm
        next_hang=$((next_hang + hang_every * 1000))
        ((next_hang > now)) || next_hang=$((now + hang_every * 1000))
    fi
    if ((now >= next_report)); then
        runs=$(($(wc -l <"$W/runs.csv") - 1))
        log "t=$(rel)s: guest runs $runs, checkpoints ok $ck_done skipped $ck_skipped failed $ck_failed, cuts $cut_n, hangs $hang_n"
        next_report=$((next_report + 60000))
    fi
done
if [[ -n $dead ]]; then
    log "FAIL: $dead died; see its log in $W"
fi

# ---------------------------------------------------------------- final phase
touch "$W/stop-load"
if kill -0 "$load_pid" 2>/dev/null; then
    kill_tree "$load_pid"
fi
wait "$load_pid" 2>/dev/null || true
t_load_end=$(rel)
final_ok=1 final_notes=()
note() { final_notes+=("$*"); log "$*"; }
no_frontend() { [[ $(ctl "$W/p.qmp" query-block 2>/dev/null | jq -r '."frontend-connected"') == false ]]; }
if [[ -z $dead ]]; then
    poll 30 no_frontend || note "note: the primary still reports a frontend connected 30 s after the load"
    if poll 120 in_sync; then
        sample idle-end
    else
        final_ok=0; note "FAIL: the primary did not get in sync after the load ($(pstate))"
        sample idle-end
    fi
    if ((final_ok)); then
        if ! out=$(ctl "$W/p.qmp" replication-checkpoint 2>&1); then
            final_ok=0; note "FAIL: final checkpoint on the primary: $out"
        else
            read -r _ _ _ _ _ _ fseq _ < <(pstate)
            pend=$(squery | jq -r '.colo."pending-barrier" // "null"')
            if [[ $pend != "$fseq" ]]; then
                final_ok=0; note "FAIL: final barrier $fseq: the secondary has pending-barrier $pend"
            else
                ctl "$W/s.qmp" replication-checkpoint barrier="$fseq" >/dev/null
            fi
            sq=$(squery)
            read -r lcb trig ad hd < <(jq -r '[(.colo."last-commit".barrier // "null"), (.colo."last-commit".trigger // "null"),
                ."active-dirty-bytes", ."hidden-dirty-bytes"] | @tsv' <<<"$sq")
            if [[ $lcb != "$fseq" || $ad != 0 || $hd != 0 ]]; then
                final_ok=0; note "FAIL: final commit: last-commit $lcb ($trig), active-dirty $ad, hidden-dirty $hd"
            else
                log "final checkpoint: barrier $fseq committed on the secondary (trigger $trig)"
            fi
        fi
    fi
    nbd_clients=$(squery | jq -r '.nbd.clients')
    # Failover: the secondary merges its (empty) buffers into its disk.
    fo_t0=$(now_ms)
    if out=$(ctl "$W/s.qmp" replication-stop failover=true 2>&1); then
        stage_done() { [[ $(squery 2>/dev/null | jq -r .stage) == "done" ]]; }
        if poll 300 stage_done; then
            log "failover done in $(($(now_ms) - fo_t0)) ms"
        else
            final_ok=0; note "FAIL: failover did not reach stage done: $(squery | jq -c '{stage, error, commit}')"
        fi
    else
        final_ok=0; note "FAIL: replication-stop failover=true: $out"
    fi
    log "comparing p.img and s.img"
    if cmp_out=$(cmp "$W/p.img" "$W/s.img" 2>&1); then
        cmp_result="identical"
    else
        cmp_result="DIFFER: $cmp_out"
        final_ok=0
    fi
    log "final cmp: $cmp_result"
    pfinal=$(ctl "$W/p.qmp" query-replication 2>/dev/null || echo '{}')
    sfinal=$(squery 2>/dev/null || echo '{}')
    echo "$pfinal" >"$W/primary-final.json"
    echo "$sfinal" >"$W/secondary-final.json"
    # Clean shutdown of both daemons.
    for r in primary secondary; do
        if [[ $r == primary ]]; then q=$W/p.qmp pid=$p_pid; else q=$W/s.qmp pid=$s_pid; fi
        ctl "$q" quit >/dev/null 2>&1 || true
        rc=0
        if poll 60 eval '! kill -0 '"$pid"' 2>/dev/null'; then
            wait "$pid" || rc=$?
        else
            rc=timeout
        fi
        [[ $rc == 0 ]] || { final_ok=0; note "FAIL: $r quit: exit $rc"; }
    done
else
    final_ok=0
    cmp_result="not done ($dead died)"
    pfinal='{}' sfinal='{}'
fi
t_end=$(rel)

# ---------------------------------------------------------------- summary
fail=0
flag() { fail=1; echo "  FAIL: $*"; }
{
    echo "=== colo-blk soak summary ==="
    echo "workdir: $W"
    echo "colo-blk: $version ($bin)"
    echo "options: duration ${duration}s, checkpoint every ${ckpt_every}s, cut every ${cut_every}s, hang every ${hang_every}s for ${hang_for}s, link: $link_desc, disk $size, buffers in $BUF"
    echo "wall time: ${t_end}s (load ran ${t_load_end}s)"
    echo
    # guest runs
    read -r nruns npass nfail nve secs_min secs_avg secs_max < <(awk -F, 'NR > 1 {
        n++; if ($4 == 0) p++; else f++; v += $6; s += $5
        if (min == "" || $5 < min) min = $5; if ($5 > max) max = $5 }
        END { printf "%d %d %d %d %s %s %s\n", n, p, f, v, (n ? min : "-"), (n ? int(s / n) : "-"), (n ? max : "-") }' "$W/runs.csv")
    echo "guest fio runs: $nruns (pass $npass, fail $nfail), run time min/avg/max ${secs_min}/${secs_avg}/${secs_max} s"
    awk -F, 'NR > 1 { k = $2 " " $3; n[k]++; if ($4 == 0) p[k]++ } END { for (k in n) printf "  %-14s %d runs, %d pass\n", k, n[k], p[k] }' "$W/runs.csv" | sort
    echo "verify errors: $nve"
    ((nruns > 0)) || flag "no guest run completed"
    ((nfail == 0)) || { flag "$nfail guest run(s) failed:"; awk -F, 'NR > 1 && $4 != 0 { print "    run " $1 " " $2 " " $3 " rc=" $4 " " $7 }' "$W/runs.csv"; }
    ((nve == 0)) || flag "$nve verify error line(s) in the guest consoles"
    echo
    # checkpoints
    echo "checkpoints: ok $ck_done, skipped $ck_skipped, failed $ck_failed (proceeded with writes in flight: $ck_busy)"
    awk -F, 'NR > 1 && $2 ~ /^skipped/ { n[$2]++ } END { for (k in n) printf "  %s: %d\n", k, n[k] }' "$W/checkpoints.csv"
    awk -F, 'NR > 1 && $2 == "ok" { n++; s += $5; if (min == "" || $5 < min) min = $5; if ($5 > max) max = $5
            b += $6; if (bmin == "" || $6 < bmin) bmin = $6; if ($6 > bmax) bmax = $6
            w += $4; if ($4 > wmax) wmax = $4; t[$7]++
            c += $8; if (cmin == "" || $8 < cmin) cmin = $8; if ($8 > cmax) cmax = $8 }
        END { if (n) {
            printf "  primary replication-checkpoint round trip min/avg/max: %d/%.1f/%d ms\n", min, s / n, max
            printf "  barrier (barriers.last-us)             min/avg/max: %.1f/%.1f/%.1f ms\n", bmin / 1000, b / n / 1000, bmax / 1000
            printf "  wait for in-sync before it             avg/max: %.0f/%d ms\n", w / n, wmax
            printf "  secondary commit (emptying the buffers) min/avg/max: %.1f/%.1f/%.1f ms\n", cmin / 1000, c / n / 1000, cmax / 1000
            printf "  committed on the secondary by:"; for (k in t) printf " %s=%d", k, t[k]; printf "\n" } }' "$W/checkpoints.csv"
    ((ck_failed == 0)) || { flag "$ck_failed periodic checkpoint(s) failed:"; awk -F, 'NR > 1 && $2 == "failed" { print "    t=" $1 "s " $0 }' "$W/checkpoints.csv" | head -10; }
    ((ck_done > 0)) || flag "no periodic checkpoint succeeded"
    echo
    # cuts
    echo "link cuts: $cut_n (recovered $(awk -F, 'NR > 1 && $7 == "ok"' "$W/cuts.csv" | wc -l), not recovered $cut_failed)"
    awk -F, 'NR > 1 && $7 == "ok" { n++; r += $3; s += $4; b += $5
            if (rmin == "" || $3 < rmin) rmin = $3; if ($3 > rmax) rmax = $3
            if (smin == "" || $4 < smin) smin = $4; if ($4 > smax) smax = $4
            if (bmin == "" || $5 < bmin) bmin = $5; if ($5 > bmax) bmax = $5 }
        END { if (n) {
            printf "  reconnect   min/avg/max: %d/%.0f/%d ms\n", rmin, r / n, rmax
            printf "  in sync     min/avg/max: %d/%.0f/%d ms\n", smin, s / n, smax
            printf "  resync bytes min/avg/max: %d/%.0f/%d (total %d)\n", bmin, b / n, bmax, b } }' "$W/cuts.csv"
    ((cut_failed == 0)) || flag "$cut_failed link cut(s) not recovered within 120 s"
    echo
    # hangs
    hang_down=$(awk -F, 'NR > 1 && $5 != ""' "$W/hangs.csv" | wc -l)
    echo "link hangs (${hang_for} s each; times from the hang's start, the proxy forwards again at $((hang_for * 1000)) ms): $hang_n (recovered $(awk -F, 'NR > 1 && $10 != "timeout"' "$W/hangs.csv" | wc -l), with requests in flight $(awk -F, 'NR > 1 && $3 == "busy"' "$W/hangs.csv" | wc -l), link seen down $hang_down, failed $hang_failed)"
    awk -F, -v hf="$((hang_for * 1000))" 'NR > 1 && $10 != "timeout" {
            if ($5 != "") { nd++; dn += $5; if (dmin == "" || $5 < dmin) dmin = $5; if ($5 > dmax) dmax = $5 }
            if ($6 != "") { nr++; r += $6 - hf; if (rmin == "" || $6 - hf < rmin) rmin = $6 - hf; if ($6 - hf > rmax) rmax = $6 - hf }
            n++; s += $7 - hf; b += $8
            if (smin == "" || $7 - hf < smin) smin = $7 - hf; if ($7 - hf > smax) smax = $7 - hf
            if (bmin == "" || $8 < bmin) bmin = $8; if ($8 > bmax) bmax = $8 }
        END {
            if (nd) printf "  link down after the hang began  min/avg/max: %d/%.0f/%d ms (%d hangs)\n", dmin, dn / nd, dmax, nd
            if (nr) printf "  reconnect after the hang ended  min/avg/max: %d/%.0f/%d ms (%d hangs)\n", rmin, r / nr, rmax, nr
            if (n) {
                printf "  in sync after the hang ended    min/avg/max: %d/%.0f/%d ms\n", smin, s / n, smax
                printf "  resync bytes min/avg/max: %d/%.0f/%d (total %d)\n", bmin, b / n, bmax, b } }' "$W/hangs.csv"
    awk -F, 'NR > 1 && $3 == "idle" { printf "  note: hang %d: no forwarded request in flight during it (the guest was not writing); the link stayed up\n", $2 }' "$W/hangs.csv"
    awk -F, -v late="$hang_io_latest" 'NR > 1 && $4 > late && $5 == "" { printf "  note: hang %d: the first request in flight was seen at %d ms, too late to time out before the hang ended; the link stayed up\n", $2, $4 }' "$W/hangs.csv"
    if ((hang_failed)); then
        flag "$hang_failed link hang(s) failed (link not down within ${hang_down_bound} ms of a request seen in flight, or not recovered within 60 s after the hang):"
        awk -F, 'NR > 1 && $10 != "ok" { print "    hang " $2 " t=" $1 "s " $10 " first_io_ms=" $4 " down_ms=" $5 " reconnect_ms=" $6 }' "$W/hangs.csv"
    fi
    echo
    pf=$(jq -r '.link.failures // "?"' <<<"$pfinal") pc=$(jq -r '.link.connects // "?"' <<<"$pfinal")
    echo "primary link: connects $pc, failures $pf (cuts $cut_n, hangs seen down $hang_down, +1 for the final failover)"
    if [[ $pf =~ ^[0-9]+$ ]] && ((pf > cut_n + hang_down + 1)); then
        echo "  note: $((pf - cut_n - hang_down - 1)) link failure(s) not caused by a cut or a hang (see primary.events / primary.log)"
    fi
    echo "  link-down reasons (primary REPLICATION_LINK events):"
    jq -r 'select(.event == "REPLICATION_LINK" and .data.connected == false) | .data.reason' "$W/primary.events" 2>/dev/null |
        sort | uniq -c | sed 's/^ */    /'
    echo "  secondary NBD clients before the failover: ${nbd_clients:-?} (1 expected: the primary's current link)"
    echo
    # resources
    echo "resources (resources.csv; private RSS = VmRSS - RssShmem, the guest RAM mapped by vhost-user is shmem):"
    base_t=$((t_load_end < 240 ? t_load_end / 2 : 120))
    for role in primary secondary; do
        awk -F, -v role="$role" -v bt="$base_t" '
            $3 != role { next }
            { priv = $4 - $7 }
            $2 == "idle-start" { s_rss = $4; s_priv = priv; s_fd = $8; s_thr = $9 }
            $2 == "idle-end" { e_rss = $4; e_priv = priv; e_fd = $8; e_thr = $9 }
            $2 == "load" { if (priv > maxpriv) maxpriv = priv; if ($4 > maxrss) maxrss = $4; if ($8 > maxfd) maxfd = $8; if ($9 > maxthr) maxthr = $9
                if (b_priv == "" && $1 >= bt) { b_priv = priv; b_t = $1 }
                l_priv = priv; l_t = $1 }
            END {
                printf "  %-9s VmRSS start %d kB, end %d kB, max %d kB | private start %d kB, at %ds %d kB, last under load (%ds) %d kB, end %d kB, max %d kB\n",
                    role, s_rss, e_rss, maxrss, s_priv, b_t, b_priv, l_t, l_priv, e_priv, maxpriv
                printf "  %-9s fds start %d, end %d, max %d | threads start %d, end %d, max %d\n", role, s_fd, e_fd, maxfd, s_thr, e_thr, maxthr
                if (b_priv != "" && (l_priv > 1.2 * b_priv || e_priv > 1.2 * b_priv))
                    printf "GROWTH %s private RSS grew > 20%% after %ds: %d kB -> last %d kB, end %d kB\n", role, b_t, b_priv, l_priv, e_priv
                if (e_fd > s_fd) printf "GROWTH %s fds grew: %d -> %d (idle before vs after the load)\n", role, s_fd, e_fd
                if (e_thr > s_thr) printf "GROWTH %s threads grew: %d -> %d (idle before vs after the load)\n", role, s_thr, e_thr
            }' "$W/resources.csv"
    done >"$W/resources.txt"
    grep -v '^GROWTH' "$W/resources.txt" || true
    while read -r _ msg; do flag "$msg"; done < <(grep '^GROWTH' "$W/resources.txt" || true)
    echo
    echo "final: sync + checkpoint + commit + failover: $([[ $final_ok == 1 ]] && echo ok || echo FAILED)"
    for n in "${final_notes[@]}"; do echo "  $n"; done
    echo "final cmp p.img s.img: $cmp_result"
    [[ $cmp_result == identical ]] || flag "the secondary's disk differs from the primary's"
    ((final_ok)) || flag "final phase failed"
    [[ -z $dead ]] || flag "$dead died"
    echo
    ((fail == 0)) && echo "RESULT: PASS" || echo "RESULT: FAIL"
} | tee "$W/summary.txt"
grep -q '^RESULT: PASS' "$W/summary.txt" && fail=0 || fail=1
if ((fail == 0 && keep == 0)); then
    rm -f "$W"/{p,s}.img "$BUF"/{s.active,s.hidden}.img
fi
exit $fail
