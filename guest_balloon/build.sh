#!/usr/bin/env bash
# Build the hv guest initramfs: busybox-static, the virtio modules of the guest
# kernel, the guest init and the static C workloads, as a gzip'd newc cpio.
#
#   build.sh --kernel-root DIR --out FILE.cpio.gz [--force]
#
# DIR is an extracted kernel package: DIR/boot/vmlinuz-VERSION and
# DIR/lib/modules/VERSION/ (with modules.dep).  The output is rebuilt only when
# an input is newer than it or the inputs changed (FILE.inputs records them);
# --force rebuilds anyway.  Prints the output path.  BUSYBOX overrides the
# busybox binary (default /bin/busybox, from the busybox-static package).
set -euo pipefail

# The modules init loads, with their dependencies resolved from modules.dep:
# the PCI transport, the balloon, and a disk and console for later use.
readonly WANTED_MODULES=(virtio_pci virtio_balloon virtio_blk virtio_console)
readonly WORKLOADS=(toucher hog filecache)

die() {
	echo "build.sh: $*" >&2
	exit 1
}

usage() {
	echo "usage: $0 --kernel-root DIR --out FILE.cpio.gz [--force]" >&2
	exit 2
}

kernel_root=""
out=""
force=0
while (($#)); do
	case "$1" in
	--kernel-root) kernel_root=${2:?}; shift 2 ;;
	--out) out=${2:?}; shift 2 ;;
	--force) force=1; shift ;;
	-h | --help) usage ;;
	*) usage ;;
	esac
done
[[ -n $kernel_root && -n $out ]] || usage

src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
busybox=${BUSYBOX:-/bin/busybox}

[[ -x $busybox ]] || die "busybox not found at $busybox (install busybox-static)"
if readelf -l "$busybox" 2>/dev/null | grep -q 'program interpreter'; then
	die "$busybox is dynamically linked (install busybox-static)"
fi
[[ -d $kernel_root ]] || die "kernel root $kernel_root does not exist"
vmlinuz=$(find "$kernel_root/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort | tail -n 1)
[[ -n $vmlinuz ]] || die "no boot/vmlinuz-* under kernel root $kernel_root"
version=${vmlinuz##*/vmlinuz-}
moddir=$kernel_root/lib/modules/$version
[[ -f $moddir/modules.dep ]] || die "no $moddir/modules.dep (run depmod -b $kernel_root $version)"

# shellcheck source=modules.sh
source "$src/modules.sh"
for m in "${WANTED_MODULES[@]}"; do resolve "$m"; done

inputs=("$src/build.sh" "$src/modules.sh" "$src/init" "$src/common.h" "$src/common.c" "$busybox"
	"$moddir/modules.dep")
for w in "${WORKLOADS[@]}"; do inputs+=("$src/$w.c"); done
for m in "${modules[@]}"; do inputs+=("$moddir/$m"); done

stamp=$out.inputs
if ((!force)) && [[ -f $out && -f $stamp ]] &&
	[[ $(printf '%s\n' "${inputs[@]}") == "$(cat "$stamp")" ]] &&
	[[ -z $(find "${inputs[@]}" -newer "$out" -print -quit) ]]; then
	echo "$out"
	exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,lib/modules,dev,proc,sys,tmp}

stage_busybox "$busybox" "$stage"

stage_modules "$stage"

for w in "${WORKLOADS[@]}"; do
	gcc -static -O2 -Wall -Wextra -s -o "$stage/bin/hv-$w" "$src/$w.c" "$src/common.c" ||
		die "compiling $w.c failed"
done
install -m 0755 "$src/init" "$stage/init"

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
	cpio --quiet -o -H newc --owner=0:0) | gzip -6 >"$out.tmp"
mv "$out.tmp" "$out"
printf '%s\n' "${inputs[@]}" >"$stamp"
echo "$out"
