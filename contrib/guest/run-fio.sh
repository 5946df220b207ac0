#!/usr/bin/env bash
# Boot the colo-blk test guest under QEMU (TCG) with a vhost-user-blk disk on
# SOCK, run one fio job in it and report the result.
#
# usage: contrib/guest/run-fio.sh --socket SOCK --job NAME [options]
#   --guest DIR      guest build dir (default ${XDG_CACHE_HOME:-$HOME/.cache}/colo-blk-guest;
#                    built with build.sh first if needed)
#   --vcpus N        vCPUs (default 2)
#   --queues N       virtqueues, num-queues= of the device (default: vCPUs;
#                    the backend must offer at least this many)
#   --mem SIZE       guest memory, QEMU syntax (default 512M)
#   --size SIZE      per-fio-job region, fio syntax (default 64m)
#   --timeout S      kill QEMU after S seconds (default 120; a dead backend
#                    leaves the guest's I/O hanging, only this ends it)
#   --reconnect-ms N QEMU reconnects to SOCK N ms after the backend goes away
#                    (for backend restart tests; default: no reconnect)
#   --log FILE       console log (default: a new file under ${TMPDIR:-/tmp})
#   --kernel K       vmlinux|bzImage (default: what build.sh chose)
#   --append ARGS    extra kernel command line
#   --qemu BIN       QEMU binary (default qemu-system-x86_64)
#   --quiet          do not echo the console while it runs
# Exit status: 0 if the guest printed "GUEST-RESULT: PASS", 1 otherwise,
# 2 on usage errors. The last line printed names the console log.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 2; }
die() { echo "run-fio.sh: error: $*" >&2; exit 2; }

sock='' job='' guest=${XDG_CACHE_HOME:-$HOME/.cache}/colo-blk-guest
vcpus=2 mem=512M size=64m timeout_s=120 logf='' kernel_sel='' extra='' quiet=0 reconnect='' queues=''
qemu='qemu-system-x86_64'
while [[ $# -gt 0 ]]; do
    case $1 in
        --socket) sock=${2:?}; shift 2 ;;
        --job) job=${2:?}; shift 2 ;;
        --guest) guest=${2:?}; shift 2 ;;
        --vcpus) vcpus=${2:?}; shift 2 ;;
        --queues) queues=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --size) size=${2:?}; shift 2 ;;
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --log) logf=${2:?}; shift 2 ;;
        --kernel) kernel_sel=${2:?}; shift 2 ;;
        --append) extra=${2:?}; shift 2 ;;
        --qemu) qemu=${2:?}; shift 2 ;;
        --reconnect-ms) reconnect=${2:?}; shift 2 ;;
        --quiet) quiet=1; shift ;;
        -h | --help) usage ;;
        *) echo "run-fio.sh: unknown argument: $1" >&2; usage ;;
    esac
done
[[ -n $sock && -n $job ]] || usage
[[ -S $sock ]] || die "$sock is not a UNIX socket (is the backend running?)"
jobs_list() { local f; for f in "$here"/jobs/*.fio; do f=${f##*/}; printf '%s ' "${f%.fio}"; done; }
[[ -f $here/jobs/$job.fio ]] || die "no job $job (have: $(jobs_list))"
command -v "$qemu" >/dev/null || die "$qemu not found (run .ci/install-guest-deps.sh)"

"$here/build.sh" "$guest" >&2
case $kernel_sel in
    "") kernel=$guest/kernel ;;
    vmlinux) kernel=$guest/kernel; grep -q '^KERNEL_FORMAT=vmlinux' "$guest/guest.env" || die "no vmlinux in $guest" ;;
    bzImage) kernel=$guest/bzImage ;;
    *) die "--kernel takes vmlinux or bzImage" ;;
esac

initrd=$guest/initrd.cpio.gz
[[ -f $guest/initrd.cpio ]] && initrd=$guest/initrd.cpio

if [[ -z $logf ]]; then
    logf=$(mktemp "${TMPDIR:-/tmp}/colo-blk-guest-$job.XXXXXX.log")
fi
: >"$logf"

# TCG: /dev/kvm on these machines hangs stock kernels (see design.md §6).
# vhost-user needs guest RAM in a shared fd: memfd, share=on, used as the
# machine's RAM through memory-backend=.
append="console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off tsc=reliable i8042.noaux i8042.nokbd i8042.nopnp"
append+=" fiojob=$job fiosize=$size${extra:+ $extra}"
# shellcheck disable=SC2054 # commas are QEMU option syntax
cmd=(
    "$qemu"
    -accel tcg
    -machine q35,memory-backend=mem
    -cpu max
    -smp "$vcpus"
    -m "$mem"
    -object "memory-backend-memfd,id=mem,size=$mem,share=on"
    -nodefaults -no-user-config
    -display none -vga none
    -serial stdio
    -no-reboot
    -kernel "$kernel"
    -initrd "$initrd"
    -append "$append"
    -chardev "socket,id=c0,path=$sock${reconnect:+,reconnect-ms=$reconnect}"
    -device "vhost-user-blk-pci,chardev=c0,num-queues=${queues:-$vcpus}"
)
echo "run-fio.sh: ${cmd[*]}" >>"$logf"

start=$(date +%s.%N)
set +e
if [[ $quiet == 1 ]]; then
    timeout --kill-after=10 "$timeout_s" "${cmd[@]}" </dev/null >>"$logf" 2>&1
    rc=$?
else
    timeout --kill-after=10 "$timeout_s" "${cmd[@]}" </dev/null 2>&1 | tee -a "$logf"
    rc=${PIPESTATUS[0]}
fi
set -e
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

result=$(tr -d '\r' <"$logf" | grep -a '^GUEST-RESULT: ' | tail -n1 || true)
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "run-fio.sh: QEMU killed after ${timeout_s}s timeout" >&2
fi
if [[ $result == "GUEST-RESULT: PASS" ]]; then
    echo "run-fio.sh: PASS job=$job (${secs}s, qemu rc=$rc)"
    status=0
else
    if [[ $quiet == 1 ]]; then
        echo "run-fio.sh: console lines of interest:"
        tr -d '\r' <"$logf" | grep -aiE '^GUEST-|err=|error|bad |verify:|panic|qemu-system' \
            | tail -n 25 | sed 's/^/  | /' || true
    fi
    echo "run-fio.sh: FAIL job=$job (${secs}s, qemu rc=$rc): ${result:-no GUEST-RESULT line}"
    status=1
fi
echo "run-fio.sh: console log: $logf"
exit $status
