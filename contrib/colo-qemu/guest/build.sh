#!/usr/bin/env bash
# Build the colo-blk boot-sector test guest.
#
# Usage: build.sh [OUT]        (default OUT: guest/bootsector.bin next to this script)
# Env:   NSECT  LBA window (power of two, default 2048)
#        DELAY  TSC cycles to busy-wait between iterations (default 2000000)
# Prints the path of the 512-byte raw sector (ends in 55 AA).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/bootsector.bin}
NSECT=${NSECT:-2048}
DELAY=${DELAY:-2000000}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gcc -c -m32 -nostdlib -Wa,--defsym,NSECT=$NSECT -Wa,--defsym,DELAY=$DELAY \
    -o "$tmp/boot.o" "$here/bootsector.S"
ld -m elf_i386 --no-warn-rwx-segments -N -e _start -Ttext 0x7c00 -o "$tmp/boot.elf" "$tmp/boot.o"
objcopy -O binary -j .text "$tmp/boot.elf" "$out"
size=$(stat -c %s "$out")
[[ $size -eq 512 ]] || { echo "build.sh: $out is $size bytes, want 512" >&2; exit 1; }
sig=$(od -An -tx1 -j510 -N2 "$out" | tr -d ' ')
[[ $sig == 55aa ]] || { echo "build.sh: bad boot signature $sig" >&2; exit 1; }
echo "$out"
