#!/usr/bin/env bash
# Build a Debian guest for hv: a root file system image (debootstrap minbase +
# systemd, booted to multi-user from a virtio disk) and a small initramfs that
# mounts it.
#
#   build_debian.sh --kernel-root DIR --out-dir DIR [--suite bookworm]
#                   [--mirror URL] [--size-mib 1024] [--force]
#
# DIR is the extracted guest kernel (as for build.sh).  Outputs, in --out-dir:
#   debian.ext4            the root file system (raw ext4, built by mkfs.ext4 -d,
#                          no mount needed); attach it with
#                          -drive file=debian.ext4,if=virtio,format=raw,snapshot=on
#   debian-initrd.cpio.gz  busybox, the virtio/ext4 modules and init_debian
# The debootstrap tree (rootfs/) and downloaded packages (debs/) are kept there
# and reused; --force rebuilds the tree.  On the serial console the guest prints
#   hv-guest: event=ready workload=debian kernel=VERSION memtotal_kib=N
# once multi-user.target is reached (hv-ready.service).  Needs root.
set -euo pipefail

readonly WANTED_MODULES=(virtio_pci virtio_balloon virtio_blk ext4)

die() {
	echo "build_debian.sh: $*" >&2
	exit 1
}
usage() {
	echo "usage: $0 --kernel-root DIR --out-dir DIR [--suite S] [--mirror URL] [--size-mib N] [--force]" >&2
	exit 2
}

kernel_root="" out="" suite=bookworm mirror="" size_mib=1024 force=0
while (($#)); do
	case "$1" in
	--kernel-root) kernel_root=${2:?}; shift 2 ;;
	--out-dir) out=${2:?}; shift 2 ;;
	--suite) suite=${2:?}; shift 2 ;;
	--mirror) mirror=${2:?}; shift 2 ;;
	--size-mib) size_mib=${2:?}; shift 2 ;;
	--force) force=1; shift ;;
	*) usage ;;
	esac
done
[[ -n $kernel_root && -n $out ]] || usage
if [[ -z $mirror ]]; then
	# The Debian mirror this host's apt already uses for the suite's main component.
	mirror=$(apt-cache policy 2>/dev/null | awk -v s=" $suite/main " 'index($0, s) {print $2; exit}')
	[[ -n $mirror ]] || die "no apt source for $suite/main on this host: pass --mirror URL"
fi
((EUID == 0)) || die "needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
busybox=${BUSYBOX:-/bin/busybox}
[[ -x $busybox ]] || die "busybox not found at $busybox (install busybox-static)"
vmlinuz=$(find "$kernel_root/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort | tail -n 1)
[[ -n $vmlinuz ]] || die "no boot/vmlinuz-* under kernel root $kernel_root"
version=${vmlinuz##*/vmlinuz-}
moddir=$kernel_root/lib/modules/$version
[[ -f $moddir/modules.dep ]] || die "no $moddir/modules.dep"

mkdir -p "$out/debs"
rootfs=$out/rootfs
if ((force)) || [[ ! -f $rootfs/.hv-debootstrap-done ]]; then
	rm -rf "$rootfs"
	debootstrap --variant=minbase --include=systemd-sysv,udev,procps \
		--cache-dir="$(cd "$out/debs" && pwd)" "$suite" "$rootfs" "$mirror" >&2
	touch "$rootfs/.hv-debootstrap-done"
fi

# Configure: host name, fstab, passwordless root on the serial console, readiness line.
echo hv-debian >"$rootfs/etc/hostname"
echo "/dev/vda / ext4 defaults 0 1" >"$rootfs/etc/fstab"
chroot "$rootfs" passwd -d root >/dev/null
cat >"$rootfs/etc/systemd/system/hv-ready.service" <<'UNIT'
[Unit]
Description=hv: report readiness on the serial console
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "hv-guest: event=ready workload=debian kernel=$(uname -r) memtotal_kib=$(sed -n "s/^MemTotal: *\\([0-9]*\\).*/\\1/p" /proc/meminfo)" >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$rootfs/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/hv-ready.service "$rootfs/etc/systemd/system/multi-user.target.wants/hv-ready.service"
rm -rf "$rootfs/lib/modules/$version"
mkdir -p "$rootfs/lib/modules"
cp -a "$moddir" "$rootfs/lib/modules/$version"
rm -rf "$rootfs/var/cache/apt/archives/"*.deb

# The root file system image, built from the tree without mounting it.
rm -f "$out/debian.ext4.tmp"
mkfs.ext4 -q -F -L hvroot -d "$rootfs" "$out/debian.ext4.tmp" "${size_mib}M"
mv "$out/debian.ext4.tmp" "$out/debian.ext4"

# The initramfs: busybox, modules in dependency order (as build.sh), init_debian.
# shellcheck source=modules.sh
source "$src/modules.sh"
for m in "${WANTED_MODULES[@]}"; do resolve "$m"; done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,lib/modules,dev,proc,sys,newroot}
stage_busybox "$busybox" "$stage"
stage_modules "$stage"
install -m 0755 "$src/init_debian" "$stage/init"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
	cpio --quiet -o -H newc --owner=0:0) | gzip -6 >"$out/debian-initrd.cpio.gz.tmp"
mv "$out/debian-initrd.cpio.gz.tmp" "$out/debian-initrd.cpio.gz"
echo "$out/debian.ext4"
echo "$out/debian-initrd.cpio.gz"
