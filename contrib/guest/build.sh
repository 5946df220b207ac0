#!/usr/bin/env bash
# Build (and cache) the colo-blk test guest: a Debian 6.1 kernel and an
# initramfs holding busybox-static, fio with its shared libraries, the virtio
# modules, contrib/guest/init and contrib/guest/jobs/*.fio.
#
# usage: contrib/guest/build.sh [OUTDIR]
#   OUTDIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/colo-blk-guest
#   env KERNEL_PKG=linux-image-6.1.0-N-amd64 pins the kernel package.
#   env FORCE=1 rebuilds everything.
#   env INITRD_COMPRESS=none writes an uncompressed initrd.cpio instead of
#   initrd.cpio.gz: ~90 MB on disk, but the guest reaches /init ~1.2 s
#   sooner under TCG (gunzip of fio's ~80 MB of libraries is the slow part).
#   Later runs without INITRD_COMPRESS keep the format already built.
#
# Output in OUTDIR:
#   kernel          the image to boot: vmlinux (ELF with a PVH entry) when it
#                   could be extracted, else a copy of bzImage
#   bzImage         the package's /boot/vmlinuz
#   initrd.cpio.gz  the initramfs (initrd.cpio with INITRD_COMPRESS=none)
#   guest.env       KERNEL_PKG, KERNEL_VERSION, KERNEL_FORMAT
# A run with everything present and unchanged inputs does nothing.
# Needs: apt-get, dpkg-deb, cpio, gzip, xz/zstd (module/kernel payloads),
# busybox-static, fio, ldd, readelf (see .ci/install-guest-deps.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/colo-blk-guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

log() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

for tool in apt-get dpkg-deb cpio gzip ldd fio; do
    command -v "$tool" >/dev/null || die "$tool not found (run .ci/install-guest-deps.sh)"
done
busybox=/bin/busybox
if [[ ! -x $busybox ]] || ! "$busybox" --list-full >/dev/null 2>&1; then
    die "busybox-static not installed"
fi
bb_ldd=$(ldd "$busybox" 2>&1 || true)
[[ $bb_ldd == *"=>"* ]] && die "$busybox is dynamically linked; install busybox-static"

if [[ ${FORCE:-0} == 1 ]]; then
    rm -rf "$out/kernel" "$out/bzImage" "$out/guest.env" "$out/modules" \
        "$out/initrd.cpio.gz" "$out/initrd.cpio" "$out/initrd.stamp"
fi

# ---------------------------------------------------------------- kernel ---

pick_kernel_pkg() {
    if [[ -n ${KERNEL_PKG:-} ]]; then
        echo "$KERNEL_PKG"
        return
    fi
    local p
    # The 6.1 ABI package the metapackage points at (bookworm / -security) ...
    p=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1)
    # ... or the newest one apt knows of.
    if [[ -z $p ]]; then
        p=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null \
            | awk '{print $1}' | sort -V | tail -n1)
    fi
    [[ -n $p ]] || die "no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)"
    echo "$p"
}

# Extract the ELF vmlinux from a bzImage using the boot protocol header
# (setup_sects at 0x1f1, payload_offset/payload_length at 0x248/0x24c).
extract_vmlinux() {
    local bz=$1 dst=$2 setup_sects poff plen start magic
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    poff=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    plen=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
    [[ $setup_sects -eq 0 ]] && setup_sects=4
    start=$(((setup_sects + 1) * 512 + poff))
    magic=$(od -An -tx1 -j "$start" -N4 "$bz" | tr -d ' ')
    local -a dec
    case $magic in
        fd377a58) dec=(xz -dc --single-stream) ;;
        28b52ffd) dec=(zstd -dc) ;;
        1f8b*) dec=(gzip -dc) ;;
        *) log "unknown kernel payload compression (magic $magic)"; return 1 ;;
    esac
    command -v "${dec[0]}" >/dev/null || { log "${dec[0]} missing"; return 1; }
    # The payload may carry a trailing size word: ignore decoder complaints
    # about it and check the result instead.
    tail -c +$((start + 1)) "$bz" | head -c "$plen" | "${dec[@]}" >"$dst" 2>/dev/null || true
    [[ $(od -An -tx1 -N4 "$dst" | tr -d ' ') == 7f454c46 ]] || return 1
    # PVH entry point note: Xen ELF note type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
    command -v readelf >/dev/null || { log "readelf missing, cannot check the PVH note"; return 1; }
    readelf -n "$dst" 2>/dev/null | grep -A1 '^ *Xen' | grep -q '(0x00000012)'
}

# Modules needed for a virtio-pci block device, plus everything modules.dep
# says they need, in load order (dependencies first). Copies them,
# decompressed (busybox insmod takes plain .ko), to DST with DST/modules.load.
want_modules=(virtio_pci virtio_blk)
resolve_modules() {
    local moddir=$1 dst=$2 f name
    local -A path=() seen=()
    local -a order=()
    [[ -f $moddir/modules.dep ]] || die "no modules.dep in $moddir"
    while IFS= read -r f; do
        name=${f%%:*}
        name=${name##*/}
        name=${name%%.ko*}
        path[${name//-/_}]=${f%%:*}
    done <"$moddir/modules.dep"
    visit() {
        local n=${1//-/_} line d
        [[ -n ${seen[$n]:-} ]] && return
        seen[$n]=1
        [[ -n ${path[$n]:-} ]] || die "module $n not in modules.dep"
        line=$(grep -m1 "^${path[$n]}:" "$moddir/modules.dep")
        for d in ${line#*:}; do
            d=${d##*/}
            visit "${d%%.ko*}"
        done
        order+=("$n")
    }
    for name in "${want_modules[@]}"; do visit "$name"; done
    : >"$dst/modules.load"
    for name in "${order[@]}"; do
        f=$moddir/${path[$name]}
        case $f in
            *.ko) cp "$f" "$dst/$name.ko" ;;
            *.ko.xz) xz -dc "$f" >"$dst/$name.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$dst/$name.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$dst/$name.ko" ;;
            *) die "unknown module format: $f" ;;
        esac
        echo "$name.ko" >>"$dst/modules.load"
    done
    log "modules (load order): ${order[*]}"
}

build_kernel() {
    local pkg work deb ver
    pkg=$(pick_kernel_pkg)
    log "kernel package $pkg"
    work=$out/work
    rm -rf "$work" && mkdir -p "$work/dl" "$work/root"
    local -a aptopt=(-q)
    # As root, apt would drop to _apt, which cannot write here.
    [[ $(id -u) -eq 0 ]] && aptopt+=(-o APT::Sandbox::User=root)
    if ! (cd "$work/dl" && apt-get download "${aptopt[@]}" "$pkg" >&2); then
        if [[ $(id -u) -eq 0 ]]; then
            log "download failed; apt-get update and retry"
            apt-get update -q >&2
            (cd "$work/dl" && apt-get download "${aptopt[@]}" "$pkg" >&2)
        else
            die "apt-get download $pkg failed (stale apt lists? run apt-get update as root)"
        fi
    fi
    deb=$(ls "$work"/dl/*.deb)
    dpkg-deb -x "$deb" "$work/root"
    ver=$(ls "$work/root/lib/modules")
    [[ -n $ver && -f $work/root/boot/vmlinuz-$ver ]] || die "unexpected layout in $deb"

    cp "$work/root/boot/vmlinuz-$ver" "$out/bzImage.tmp"
    local fmt=bzImage
    if extract_vmlinux "$out/bzImage.tmp" "$out/kernel.tmp"; then
        fmt=vmlinux-pvh
    else
        log "no PVH-capable vmlinux could be extracted; booting bzImage"
        cp "$out/bzImage.tmp" "$out/kernel.tmp"
    fi

    # Modules: run depmod on the unpacked tree (the package ships no
    # modules.dep), resolve what the virtio disk needs, keep only those.
    local depmod
    depmod=$(PATH=$PATH:/sbin:/usr/sbin command -v depmod) || die "depmod not found (kmod)"
    "$depmod" -b "$work/root" "$ver"
    rm -rf "$out/modules" && mkdir -p "$out/modules"
    resolve_modules "$work/root/lib/modules/$ver" "$out/modules"

    mv "$out/bzImage.tmp" "$out/bzImage"
    mv "$out/kernel.tmp" "$out/kernel"
    cat >"$out/guest.env" <<EOF
KERNEL_PKG=$pkg
KERNEL_VERSION=$ver
KERNEL_FORMAT=$fmt
EOF
    rm -rf "$work"
    log "kernel $ver ready ($fmt)"
}

if [[ ! -f $out/guest.env || ! -f $out/kernel || ! -f $out/modules/modules.load ]]; then
    build_kernel
fi
# shellcheck source=/dev/null
. "$out/guest.env"

# ------------------------------------------------------------- initramfs ---

# The initramfs depends on the inputs below; rebuild it when they change.
stamp_inputs() {
    {
        echo "$KERNEL_VERSION"
        cat "$here/init" "$here"/jobs/*.fio
        cat "${BASH_SOURCE[0]}" "$out/modules/modules.load"
        fio --version
        "$busybox" --help 2>&1 | head -n1 || true
        echo "$INITRD_COMPRESS"
    } | sha256sum | cut -d' ' -f1
}
# Unset INITRD_COMPRESS keeps the format already built (gzip if none yet).
if [[ -z ${INITRD_COMPRESS:-} ]]; then
    INITRD_COMPRESS=gzip
    [[ -f $out/initrd.cpio && ! -f $out/initrd.cpio.gz ]] && INITRD_COMPRESS=none
fi
case $INITRD_COMPRESS in
    gzip) initrd=initrd.cpio.gz ;;
    none) initrd=initrd.cpio ;;
    *) die "INITRD_COMPRESS must be gzip or none" ;;
esac
stamp=$(stamp_inputs)
if [[ -f $out/$initrd && -f $out/initrd.stamp && $(cat "$out/initrd.stamp") == "$stamp" ]]; then
    log "up to date: $out ($KERNEL_FORMAT, $KERNEL_VERSION)"
    exit 0
fi

stage=$(mktemp -d "$out/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,jobs,lib/modules}

# busybox and its applet links
cp "$busybox" "$stage/bin/busybox"
while IFS= read -r applet; do
    [[ -e $stage/$applet || -L $stage/$applet ]] && continue
    mkdir -p "$stage/$(dirname "$applet")"
    ln -s /bin/busybox "$stage/$applet"
done < <("$busybox" --list-full)
ln -sf busybox "$stage/bin/sh"

# fio, every library ldd lists, and the dynamic loader
fio_bin=$(command -v fio)
cp -L "$fio_bin" "$stage/usr/bin/fio"
declare -A libdirs=()
while read -r lib; do
    [[ -n $lib ]] || continue
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
    libdirs[$(dirname "$lib")]=1
done < <(ldd "$fio_bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[[ -e $stage/lib64/ld-linux-x86-64.so.2 ]] || die "dynamic loader not found in ldd output"
(IFS=:; echo "${!libdirs[*]}") >"$stage/etc/ld-library-path"

# modules and their load order
cp "$out"/modules/*.ko "$stage/lib/modules/"
cp "$out/modules/modules.load" "$stage/etc/modules.load"

# init and jobs
install -m 0755 "$here/init" "$stage/init"
cp "$here"/jobs/*.fio "$stage/jobs/"

rm -f "$out/initrd.cpio.gz" "$out/initrd.cpio" "$out/initrd.stamp"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    | if [[ $INITRD_COMPRESS == gzip ]]; then gzip -1; else cat; fi >"$out/$initrd.tmp"
mv "$out/$initrd.tmp" "$out/$initrd"
echo "$stamp" >"$out/initrd.stamp"
log "initramfs $initrd ($(du -h "$out/$initrd" | cut -f1)) ready: $out ($KERNEL_FORMAT, $KERNEL_VERSION)"
