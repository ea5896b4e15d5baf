#!/usr/bin/env bash
# Build the services variant of hv's Debian guest: build_debian.sh's guest plus real
# services from Debian packages (nginx, PostgreSQL, Redis, Python 3) and a boot-time
# load, selected by hv.service=NAME on the kernel command line (guest_balloon/services/).
#
#   build_services.sh --kernel-root DIR --out-dir DIR [--mirror URL] [--size-mib 2048] [--force]
#
# Outputs, in --out-dir (give it its own, e.g. $HV_CACHE_DIR/debian-services; never
# build_debian.sh's own folder, which other tests boot):
#   debian.ext4, debian-initrd.cpio.gz   as build_debian.sh's, booted the same way
# On the serial console, besides build_debian.sh's ready line, the guest prints the
# hv-guest: event=service_* lines of guest_balloon/services/hv-service.  The services
# are installed but disabled: only the one hv.service names is started (none without
# it).  The tree (rootfs/) and packages (debs/) are kept and reused; --force rebuilds.
# A separate script, not an option of build_debian.sh: scripts/setup.sh rebuilds the
# shared Debian image whenever build_debian.sh changes.  Needs root.
set -euo pipefail

readonly PACKAGES=(nginx-light postgresql-15 postgresql-client-15 redis-server redis-tools
                   python3)
readonly SERVICES=(nginx postgresql redis-server)

die() {
	echo "build_services.sh: $*" >&2
	exit 1
}
usage() {
	echo "usage: $0 --kernel-root DIR --out-dir DIR [--mirror URL] [--size-mib N] [--force]" >&2
	exit 2
}

kernel_root="" out="" mirror_args=() size_mib=2048 force=0
while (($#)); do
	case "$1" in
	--kernel-root) kernel_root=${2:?}; shift 2 ;;
	--out-dir) out=${2:?}; shift 2 ;;
	--mirror) mirror_args=(--mirror "${2:?}"); shift 2 ;;
	--size-mib) size_mib=${2:?}; shift 2 ;;
	--force) force=1; shift ;;
	*) usage ;;
	esac
done
[[ -n $kernel_root && -n $out ]] || usage
((EUID == 0)) || die "needs root (debootstrap, chroot)"
src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HV_CACHE_DIR:-/var/cache/hv}
[[ $(realpath -m "$out") != $(realpath -m "$cache/debian") ]] ||
	die "--out-dir $out is build_debian.sh's shared image: give the services variant its own folder"

# 1. The base guest (debootstrap tree, initramfs), as build_debian.sh builds it.
force_args=()
((force)) && force_args=(--force)
bash "$src/build_debian.sh" --kernel-root "$kernel_root" --out-dir "$out" --size-mib "$size_mib" \
	"${mirror_args[@]}" "${force_args[@]}" >/dev/null
rootfs=$out/rootfs

# 2. The services, from Debian packages (installed once per tree; not started here).
stamp=$rootfs/.hv-services-packages
if [[ ! -f $stamp || $(cat "$stamp") != "${PACKAGES[*]}" ]]; then
	mounted=()
	cleanup() {
		local m
		for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" || true; done
		rm -f "$rootfs/usr/sbin/policy-rc.d"
	}
	trap cleanup EXIT
	for m in proc sys dev dev/pts; do
		mount --bind "/$m" "$rootfs/$m"
		mounted+=("$rootfs/$m")
	done
	printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d" # no service starts in the chroot
	chmod +x "$rootfs/usr/sbin/policy-rc.d"
	cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
	chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
	chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends -o Dir::Cache::Archives=/var/cache/apt/archives "${PACKAGES[@]}" >&2
	cp -a "$rootfs/var/cache/apt/archives/"*.deb "$out/debs/" 2>/dev/null || true
	chroot "$rootfs" apt-get clean
	cleanup
	trap - EXIT
	echo "${PACKAGES[*]}" >"$stamp"
fi
chroot "$rootfs" systemctl disable "${SERVICES[@]}" >/dev/null 2>&1 || true
[[ -x $rootfs/usr/lib/postgresql/15/bin/pgbench ]] || die "no pgbench in the tree"

# 3. The load: hv-service at boot, and files for nginx to serve (same content every build).
install -d "$rootfs/usr/local/lib/hv"
install -m 0755 "$src/services/hv-service" "$rootfs/usr/local/sbin/hv-service"
install -m 0644 "$src/services/load.py" "$rootfs/usr/local/lib/hv/load.py"
cat >"$rootfs/etc/systemd/system/hv-service.service" <<'UNIT'
[Unit]
Description=hv: start the service named by hv.service= and put a load on it
After=multi-user.target hv-ready.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/hv-service

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/hv-service.service \
	"$rootfs/etc/systemd/system/multi-user.target.wants/hv-service.service"
if [[ ! -f $rootfs/var/www/html/hv/index.txt ]]; then
	python3 - "$rootfs/var/www/html/hv" <<'PY'
import os, random, sys
# 240 files of 16-512 KiB (about 40 MiB): text-like, different from each other.
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
rng = random.Random(5)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 10)))
         for _ in range(5000)]
names = []
for i in range(240):
    size = rng.choice((16, 32, 64, 128, 256, 512)) * 1024
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    name = f"page{i:03d}.html"
    with open(os.path.join(root, name), "wb") as f:
        f.write(out[:size])
    names.append(name)
with open(os.path.join(root, "index.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
PY
fi

# 4. The root file system image again, now with the services.
rm -f "$out/debian.ext4.tmp"
mkfs.ext4 -q -F -L hvroot -d "$rootfs" "$out/debian.ext4.tmp" "${size_mib}M"
mv "$out/debian.ext4.tmp" "$out/debian.ext4"
echo "$out/debian.ext4"
echo "$out/debian-initrd.cpio.gz"
