#!/usr/bin/env bash
# Run a QEMU 7.2 COLO pair on loopback (KVM), one vhost-user-blk disk per
# side, booting the guest/bootsector.S disk-I/O loop; checkpoint K times,
# kill the primary, fail over to the secondary, and report what the guest
# and the disks show.
#
# Usage:
#   colo-pair.sh --qsd                       # test mode: start two qemu-storage-daemon exports
#   colo-pair.sh --colo-blk BIN              # a colo-blk primary + secondary pair (replicated),
#                                            # with the VM-stop hook; fails on any disk mismatch
#   colo-pair.sh --psock P.sock --ssock S.sock   # external vhost-user-blk backends (e.g. colo-blk)
#   colo-pair.sh --make-image OUT            # write the initial disk image and exit
#
# Options:
#   --workdir DIR       where sockets, logs, images go (default: mktemp -d /tmp/colo-pair.XXXXXX)
#   --image IMG         initial image for --qsd (default: boot sector + zeros, $SIZE)
#   --checkpoints K     checkpoints to wait for before killing the primary (default 5)
#   --delay MS          x-checkpoint-delay (default 1000)
#   --after SEC         seconds the secondary runs after failover (default 5)
#   --mem MB            guest RAM (default 128)
#   --port N            migration port on 127.0.0.1 (default 9998)
#   --hook SOCK         add an NBD "hook" blockdev (export "hook") to the PRIMARY,
#                       served at unix socket SOCK (env COLO_HOOK_SOCK)
#   --hook-qemu-nbd     (test) start qemu-nbd with a 1 MiB file as export "hook" on
#                       WORKDIR/hook.sock and use it as --hook; trace its requests
#   --trace PATTERNS    comma-separated -trace patterns for both QEMUs (logs in WORKDIR/{p,s}.trace)
#   --keep              leave processes running at the end (default: clean up)
#   --no-hook           (control experiment) with --colo-blk, do not give QEMU the hook node:
#                       no barriers, so the secondary never commits a checkpoint and the
#                       disk check must fail
#   --kill-primary-blk  with --colo-blk, also kill -9 the primary colo-blk at the failover
#                       freeze point, before the secondary is told to fail over (a primary
#                       host failure takes the backend down with QEMU)
# Env:
#   QEMU72              QEMU 7.2 wrapper (default: output of fetch-qemu72.sh)
#   SIZE                image size for --qsd / --make-image (default 16M)
#   NSECT, DELAY        passed to guest/build.sh
#
# Both disks must start identical: with --qsd the script copies one image to
# p.img and s.img.  With external backends, create both images with
# --make-image (or copy one) before starting the backends.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
QSD=0 PSOCK= SSOCK= WORKDIR= IMAGE= K=5 DELAY_MS=1000 AFTER=5 MEM=128 PORT=9998
HOOK=${COLO_HOOK_SOCK:-} HOOK_NBD=0 TRACE= KEEP=0 MAKE_IMAGE= COLOBLK= NO_HOOK=0
KILL_PBLK=0
SIZE=${SIZE:-16M}

while [[ $# -gt 0 ]]; do
    case $1 in
    --qsd) QSD=1 ;;
    --colo-blk) COLOBLK=$2; shift ;;
    --psock) PSOCK=$2; shift ;;
    --ssock) SSOCK=$2; shift ;;
    --workdir) WORKDIR=$2; shift ;;
    --image) IMAGE=$2; shift ;;
    --checkpoints) K=$2; shift ;;
    --delay) DELAY_MS=$2; shift ;;
    --after) AFTER=$2; shift ;;
    --mem) MEM=$2; shift ;;
    --port) PORT=$2; shift ;;
    --hook) HOOK=$2; shift ;;
    --hook-qemu-nbd) HOOK_NBD=1 ;;
    --trace) TRACE=$2; shift ;;
    --keep) KEEP=1 ;;
    --no-hook) NO_HOOK=1 ;;
    --kill-primary-blk) KILL_PBLK=1 ;;
    --make-image) MAKE_IMAGE=$2; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//; /^set -e/d'; exit 0 ;;
    *) echo "colo-pair.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "colo-pair: $*" >&2; }

make_image() { # OUT
    local boot
    boot=$("$here/guest/build.sh" "$(mktemp /tmp/colo-boot.XXXXXX)")
    rm -f "$1"
    truncate -s "$SIZE" "$1"
    dd if="$boot" of="$1" conv=notrunc status=none
    rm -f "$boot"
}

if [[ -n $MAKE_IMAGE ]]; then
    make_image "$MAKE_IMAGE"
    echo "$MAKE_IMAGE"
    exit 0
fi

if [[ $QSD == 0 && -z $COLOBLK && ( -z $PSOCK || -z $SSOCK ) ]]; then
    echo "colo-pair.sh: need --qsd, --colo-blk BIN, or both --psock and --ssock" >&2
    exit 2
fi

QEMU72=${QEMU72:-$("$here/fetch-qemu72.sh")}
WORKDIR=${WORKDIR:-$(mktemp -d /tmp/colo-pair.XXXXXX)}
mkdir -p "$WORKDIR"
WORKDIR=$(cd "$WORKDIR" && pwd)
cd "$WORKDIR"
log "workdir $WORKDIR, qemu $QEMU72"

PIDS=()
cleanup() {
    [[ $KEEP == 1 ]] && { log "--keep: leaving pids ${PIDS[*]:-}"; return; }
    local pid
    for pid in "${PIDS[@]:-}"; do
        [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [[ -n $pid ]] && wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_socket() { # PATH TIMEOUT_S
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        [[ -S $1 ]] && return 0
        sleep 0.05
    done
    log "timeout waiting for socket $1"
    return 1
}

# ---- backends ---------------------------------------------------------------
if [[ $QSD == 1 ]]; then
    if [[ -z $IMAGE ]]; then
        IMAGE=$WORKDIR/base.img
        make_image "$IMAGE"
    fi
    cp --sparse=always "$IMAGE" p.img
    cp --sparse=always "$IMAGE" s.img
    PSOCK=$WORKDIR/p.vhost.sock SSOCK=$WORKDIR/s.vhost.sock
    for side in p s; do
        sock=$WORKDIR/$side.vhost.sock
        rm -f "$sock"
        qemu-storage-daemon \
            --blockdev driver=file,node-name=f0,filename=$side.img \
            --blockdev driver=raw,node-name=d0,file=f0 \
            --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$sock,writable=on \
            >"$side.qsd.log" 2>&1 &
        PIDS+=($!)
    done
    wait_socket "$PSOCK" 10
    wait_socket "$SSOCK" 10
fi

ctl() { # SIDE COMMAND [ARGS...]
    local side=$1
    shift
    "$COLOBLK" ctl --qmp "$WORKDIR/$side.blk.qmp" "$@"
}

if [[ -n $COLOBLK ]]; then
    if [[ -z $IMAGE ]]; then
        IMAGE=$WORKDIR/base.img
        make_image "$IMAGE"
    fi
    cp --sparse=always "$IMAGE" p.img
    cp --sparse=always "$IMAGE" s.img
    PSOCK=$WORKDIR/p.vhost.sock SSOCK=$WORKDIR/s.vhost.sock HOOK=$WORKDIR/hook.sock
    rm -f s.active.img s.hidden.img
    RUST_LOG=${RUST_LOG:-info} "$COLOBLK" serve --socket "$SSOCK" --qmp "$WORKDIR/s.blk.qmp" --disk s.img \
        --num-queues 1 --replication secondary --active s.active.img --hidden s.hidden.img \
        --nbd-listen "unix:$WORKDIR/s.nbd.sock" --nbd-export colo >s.blk.log 2>&1 &
    PIDS+=($!)
    echo $! >s.blk.pid
    wait_socket "$WORKDIR/s.blk.qmp" 10
    ctl s replication-start mode=secondary >/dev/null
    RUST_LOG=${RUST_LOG:-info} "$COLOBLK" serve --socket "$PSOCK" --qmp "$WORKDIR/p.blk.qmp" --disk p.img \
        --num-queues 1 --replication primary --secondary "nbd+unix:///colo?socket=$WORKDIR/s.nbd.sock" \
        --colo-hook "unix:$HOOK" >p.blk.log 2>&1 &
    PIDS+=($!)
    echo $! >p.blk.pid
    wait_socket "$WORKDIR/p.blk.qmp" 10
    wait_socket "$HOOK" 10
    ctl p replication-start mode=primary >/dev/null
    log "colo-blk pair replicating (logs: p.blk.log, s.blk.log)"
fi

if [[ $HOOK_NBD == 1 ]]; then
    HOOK=$WORKDIR/hook.sock
    rm -f "$HOOK"
    truncate -s 1M hook.img
    qemu-nbd -f raw --socket "$HOOK" -x hook -t --trace 'nbd_*,file=hook.nbd.trace' hook.img \
        >hook.nbd.log 2>&1 &
    PIDS+=($!)
    wait_socket "$HOOK" 10
fi

# ---- QEMUs ------------------------------------------------------------------
COMMON=(
    -machine pc,memory-backend=mem -accel kvm -cpu qemu64 -m "$MEM" -smp 1
    -nodefaults -display none
    -object "memory-backend-memfd,id=mem,size=${MEM}M,share=on"
)

start_qemu() { # SIDE VHOST_SOCK [extra args...]
    local side=$1 sock=$2
    shift 2
    local tr=()
    if [[ -n $TRACE ]]; then
        local t
        IFS=, read -ra pats <<<"$TRACE"
        for t in "${pats[@]}"; do tr+=(-trace "$t"); done
        tr+=(-D "$WORKDIR/$side.trace")
    fi
    rm -f "$WORKDIR/$side.qmp"
    "$QEMU72" "${COMMON[@]}" -name "$side" \
        -chardev socket,id=vub,path="$sock" \
        -device vhost-user-blk-pci,chardev=vub,bootindex=0 \
        -qmp unix:"$WORKDIR/$side.qmp",server=on,wait=off \
        -serial none -monitor none \
        "${tr[@]}" "$@" >"$side.qemu.log" 2>&1 &
    PIDS+=($!)
    echo $! >"$side.pid"
}

start_qemu s "$SSOCK" -incoming "tcp:127.0.0.1:$PORT"
PEXTRA=()
if [[ -n $HOOK && $NO_HOOK == 0 ]]; then
    PEXTRA+=(-blockdev "driver=nbd,node-name=colohook,server.type=unix,server.path=$HOOK,export=hook")
fi
start_qemu p "$PSOCK" "${PEXTRA[@]}"
wait_socket p.qmp 10
wait_socket s.qmp 10

# Let the primary guest boot and start its loop before migrating, so that
# COLO starts with the I/O loop already running.
for ((i = 0; i < 100; i++)); do
    st=$(python3 "$here/qmp.py" p.qmp state 2>/dev/null || true)
    [[ $st == *'"magic_ok": true'* && $st != *'"counter": 0,'* ]] && break
    sleep 0.1
done
log "primary guest running: $st"

# While the secondary is frozen at the failover point, keep a copy of its
# disk (qsd test mode), to compare it with the RAM state it resumes with.
ON_FREEZE=
if [[ $QSD == 1 ]]; then
    ON_FREEZE="cp --sparse=always s.img s.failover.img"
fi
if [[ -n $COLOBLK ]]; then
    # The orchestrator's duty at failover: tell the secondary colo-blk before QEMU resumes.
    ON_FREEZE="'$COLOBLK' ctl --qmp '$WORKDIR/s.blk.qmp' replication-stop failover=true"
    if [[ $KILL_PBLK == 1 ]]; then
        ON_FREEZE="kill -9 $(cat p.blk.pid); date +%s.%N >p.blk.killed; $ON_FREEZE"
    fi
fi
set +e
python3 "$here/colo_drive.py" --pqmp p.qmp --sqmp s.qmp --ppid "$(cat p.pid)" --port "$PORT" \
    --checkpoints "$K" --delay "$DELAY_MS" --after "$AFTER" --out result.json \
    ${ON_FREEZE:+--on-freeze "$ON_FREEZE"} 2> >(tee drive.log >&2)
rc=$?
set -e
log "colo_drive.py exit $rc"

# ---- disks --------------------------------------------------------------------
if [[ -n $COLOBLK && -f result.json ]]; then
    for ((i = 0; i < 600; i++)); do
        ctl s query-replication 2>/dev/null | grep -q '"stage": "done"' && break
        sleep 0.05
    done
    ctl s query-replication >s.replication.json || true
    ctl p query-replication >p.replication.json 2>/dev/null || true
    python3 -c 'import json; r = json.load(open("result.json")); print(json.dumps(r["secondary_final"]))' \
        >final_state.json
    log "secondary colo-blk after failover: $(python3 -c 'import json; q = json.load(open("s.replication.json")); print(q["stage"], json.dumps(q["colo"]))')"
    log "survivor disk vs the secondary VM's final RAM state:"
    if python3 "$here/checkdisk.py" s.img --state final_state.json >check.txt 2>&1; then
        sed 's/^/  /' check.txt >&2
        log "PASS: the survivor's disk matches the VM state it resumed with"
    else
        sed 's/^/  /' check.txt >&2
        log "FAIL: the survivor's disk does not match its VM state"
        rc=1
    fi
fi
if [[ $QSD == 1 && -f result.json ]]; then
    python3 - <<'EOF' >final_state.json
import json
r = json.load(open("result.json"))
print(json.dumps(r["secondary_final"]))
EOF
    python3 - <<'EOF' >failover_state.json
import json
r = json.load(open("result.json"))
print(json.dumps(r.get("secondary_resumed_with")))
EOF
    if [[ -f s.failover.img ]]; then
        log "secondary disk AT FAILOVER vs the RAM state the secondary resumed with:"
        python3 "$here/checkdisk.py" s.failover.img --state failover_state.json | sed 's/^/  /' >&2 || true
    fi
    log "secondary disk vs secondary's final RAM state:"
    python3 "$here/checkdisk.py" s.img --state final_state.json | sed 's/^/  /' >&2 || true
    log "primary disk (no RAM state; records only):"
    python3 "$here/checkdisk.py" p.img | sed 's/^/  /' >&2 || true
    if cmp -s p.img s.img; then log "p.img and s.img are identical"; else
        log "p.img and s.img differ in $(cmp -l p.img s.img 2>/dev/null | wc -l) bytes"; fi
fi
if [[ -f hook.nbd.trace ]]; then
    log "hook NBD server saw $(grep -c 'NBD_CMD_FLUSH\|(flush)' hook.nbd.trace || true) flush-related trace lines"
fi
if [[ -f p.trace ]]; then
    log "primary trace: $(grep -c 'nbd_send_request.*flush' p.trace || true) nbd flush requests sent"
fi
log "results in $WORKDIR (result.json, drive.log, *.qemu.log)"
exit $rc
