#!/usr/bin/env bash
# Install what the guest-level test harness (contrib/guest/) needs:
#   qemu-system-x86 10.x from bookworm-backports (matches the installed
#   qemu-utils 10.0.2; bookworm's own 7.2 conflicts with it), fio,
#   busybox-static, cpio, xz-utils, zstd, kmod.
# Idempotent, non-interactive, runs as root. Quick when everything is there.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

if [[ $(id -u) -ne 0 ]]; then
    echo "install-guest-deps: must run as root" >&2
    exit 1
fi

# Package -> command that proves it is installed.
declare -A plain=(
    [fio]=fio
    [busybox-static]=busybox
    [cpio]=cpio
    [xz-utils]=xz
    [zstd]=zstd
    [kmod]=depmod
    [openssl]=openssl
    [python3]=python3
    [gcc]=gcc
    [binutils]=objcopy
)

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\..*/\1/p')
    [[ -n $v && $v -ge 8 ]]
}

missing=()
for pkg in "${!plain[@]}"; do
    # busybox (non-static) also provides /bin/busybox; insist on the static one.
    if [[ $pkg == busybox-static ]]; then
        dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' \
            || missing+=("$pkg")
        continue
    fi
    command -v "${plain[$pkg]}" >/dev/null 2>&1 \
        || PATH=$PATH:/usr/sbin:/sbin command -v "${plain[$pkg]}" >/dev/null 2>&1 \
        || missing+=("$pkg")
done

need_qemu=0
qemu_ok || need_qemu=1

if [[ ${#missing[@]} -eq 0 && $need_qemu -eq 0 ]]; then
    echo "install-guest-deps: all present ($(qemu-system-x86_64 --version | head -n1))"
    exit 0
fi

# Does apt know bookworm-backports already?
have_backports() {
    grep -rqsE '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# The Debian mirror this machine already uses for bookworm (first match).
debian_mirror() {
    local m
    m=$(grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -vE 'security' \
        | awk '{ for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; exit } }' | head -n1)
    if [[ -z $m ]]; then
        # deb822 .sources: a stanza whose Suites mention plain bookworm.
        m=$(awk '
            /^[[:space:]]*$/ { if (uri != "" && suites ~ /(^|[[:space:]])bookworm([[:space:]]|$)/) { print uri; exit } uri = ""; suites = ""; next }
            /^URIs:/   { uri = $2 }
            /^Suites:/ { suites = $0 }
            END { if (uri != "" && suites ~ /(^|[[:space:]])bookworm([[:space:]]|$)/) print uri }
        ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

updated=0
apt_update() {
    if [[ $updated -eq 0 ]]; then
        apt-get update -q -o Acquire::Retries=3
        updated=1
    fi
}

if [[ $need_qemu -eq 1 ]]; then
    if ! have_backports; then
        mirror=$(debian_mirror)
        echo "install-guest-deps: adding bookworm-backports from $mirror"
        cat >/etc/apt/sources.list.d/bookworm-backports.sources <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt_update
    apt-get install -y -q -t bookworm-backports --no-install-recommends qemu-system-x86
fi

if [[ ${#missing[@]} -gt 0 ]]; then
    apt_update
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

qemu_ok || { echo "install-guest-deps: qemu-system-x86_64 >= 8 still missing" >&2; exit 1; }
echo "install-guest-deps: done ($(qemu-system-x86_64 --version | head -n1))"
