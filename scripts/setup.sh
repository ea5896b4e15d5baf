#!/usr/bin/env bash
# One-command set-up of hv on a fresh Debian 12 machine (run as root). Idempotent:
# a second run only checks and takes seconds.
#   - Debian packages hv needs (QEMU, busybox-static, xxHash, a C compiler, ...)
#   - a virtualenv in .venv with hv installed from setup.py (builds native/)
#   - the guest kernel from Debian's linux-image-cloud-amd64, extracted into the cache
#     (never installed on the host): $HV_CACHE_DIR/kernel/current
#   - the guest image: $HV_CACHE_DIR/guest/initramfs.cpio.gz
#   - with --with-debian, also a Debian guest (debootstrap minbase + systemd, booted from
#     a virtio disk): $HV_CACHE_DIR/debian/{debian.ext4,debian-initrd.cpio.gz}
#   - with --with-services, also the services variant of the Debian guest (nginx, PostgreSQL,
#     Redis, Python 3 from Debian packages; for `hv bench workloads`):
#     $HV_CACHE_DIR/debian-services/{debian.ext4,debian-initrd.cpio.gz}
#   - with --with-libvirt, also libvirt (libvirt-daemon, libvirt-daemon-driver-qemu,
#     libvirt-clients) and Debian's python3-libvirt, linked into the virtualenv;
#     scripts/libvirtd.sh starts libvirtd where no service manager does
set -euo pipefail

with_debian=0
with_services=0
with_libvirt=0
for arg in "$@"; do
    case "$arg" in
        --with-debian) with_debian=1 ;;
        --with-services) with_services=1 ;;
        --with-libvirt) with_libvirt=1 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: error: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${HV_CACHE_DIR:-/var/cache/hv}
venv=${HV_VENV:-$repo/.venv}
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, /var/cache/hv, KSM and pagemap need it)"

# 1. Debian packages ----------------------------------------------------------------
packages=(qemu-system-x86 qemu-utils busybox-static libxxhash-dev xxhash cpio kmod gcc make
          libc6-dev python3 python3-venv python3-dev zstd xz-utils util-linux procps)
[ "$with_debian" = 1 ] || [ "$with_services" = 1 ] && packages+=(debootstrap e2fsprogs)
packages+=(chromium fonts-dejavu-core tmux)  # the dashboard and `hv top` tests
[ "$with_libvirt" = 1 ] && packages+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
                                      python3-libvirt)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The virtualenv with hv (builds the cffi extension) -----------------------------------
python=${HV_PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip >"$venv/pip.log" 2>&1 || { cat "$venv/pip.log" >&2; die "pip upgrade failed"; }
fi
stamp="$venv/.hv-installed"
if [ ! -f "$stamp" ] || [ -n "$(find "$repo/setup.py" "$repo/native" -newer "$stamp" -type f 2>/dev/null | head -1)" ] \
   || ! "$venv/bin/python" -c 'import hv._native' 2>/dev/null; then
    say "installing hv into $venv (building native/)"
    "$venv/bin/pip" install -q -e "$repo[test,plot]" >"$venv/pip.log" 2>&1 \
        || { cat "$venv/pip.log" >&2; die "pip install failed (log above)"; }
    touch "$stamp"
fi

# 2b. libvirt's Python binding in the virtualenv ------------------------------------------
# Debian's python3-libvirt is built for Debian's python3; the venv's python must be the
# same minor version (its extension modules are named for the ABI, e.g. cpython-311).
if [ "$with_libvirt" = 1 ]; then
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    abi=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    dist=/usr/lib/python3/dist-packages
    [ -f "$dist/libvirtmod$abi" ] || die "python3-libvirt has no libvirtmod$abi for the venv's python ($("$venv/bin/python" -V)); use Debian's python3 (HV_PYTHON=/usr/bin/python3) or build libvirt-python against libvirt-dev"
    for f in libvirt.py libvirt_qemu.py libvirtaio.py "libvirtmod$abi" "libvirtmod_qemu$abi"; do
        ln -sfn "$dist/$f" "$site/$f"
    done
    "$venv/bin/python" -c 'import libvirt, libvirt_qemu' || die "the libvirt binding does not import in $venv"
fi

# 3. The guest kernel, extracted into the cache -----------------------------------------
if ! ls "$cache"/kernel/current/boot/vmlinuz-* >/dev/null 2>&1; then
    [ -n "$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep Candidate)" ] || apt-get update -qq
    image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$image" ] || die "cannot find the package behind linux-image-cloud-amd64"
    version=${image#linux-image-}
    say "extracting guest kernel $image into $cache/kernel/$version"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -q "$image" >/dev/null 2>&1) || die "apt-get download $image failed"
    rm -rf "$cache/kernel/$version"
    mkdir -p "$cache/kernel/$version"
    dpkg-deb -x "$tmp"/*.deb "$cache/kernel/$version"
    depmod -b "$cache/kernel/$version" "$version"
    ln -sfn "$version" "$cache/kernel/current"
fi

# 4. The guest image ------------------------------------------------------------------
mkdir -p "$cache/guest"
bash "$repo/guest_balloon/build.sh" --kernel-root "$cache/kernel/current" \
     --out "$cache/guest/initramfs.cpio.gz" >/dev/null

# 5. The Debian guest (optional) ------------------------------------------------------
if [ "$with_debian" = 1 ]; then
    deb="$cache/debian"
    if [ ! -f "$deb/debian.ext4" ] || [ ! -f "$deb/debian-initrd.cpio.gz" ] \
       || [ -n "$(find "$repo/guest_balloon/build_debian.sh" "$repo/guest_balloon/init_debian" \
                  -newer "$deb/debian.ext4" 2>/dev/null | head -1)" ]; then
        say "building the Debian guest in $deb (debootstrap; a few minutes the first time)"
        # build_debian.sh takes its mirror from apt's lists: make sure there are some.
        apt-cache policy 2>/dev/null | grep -q ' bookworm/main ' || apt-get update -qq
        bash "$repo/guest_balloon/build_debian.sh" --kernel-root "$cache/kernel/current" \
             --out-dir "$deb" >"$cache/debian-build.log" 2>&1 \
            || { tail -20 "$cache/debian-build.log" >&2; die "building the Debian guest failed"; }
    fi
fi

# 6. The services variant of the Debian guest (optional; `hv bench workloads`) ------------
if [ "$with_services" = 1 ]; then
    svc="$cache/debian-services"
    if [ ! -f "$svc/debian.ext4" ] || [ ! -f "$svc/debian-initrd.cpio.gz" ] \
       || [ -n "$(find "$repo/guest_balloon/build_services.sh" "$repo/guest_balloon/build_debian.sh" \
                  "$repo/guest_balloon/init_debian" "$repo/guest_balloon/services" \
                  -newer "$svc/debian.ext4" -type f 2>/dev/null | head -1)" ]; then
        say "building the services guest in $svc (debootstrap and packages; minutes the first time)"
        apt-cache policy 2>/dev/null | grep -q ' bookworm/main ' || apt-get update -qq
        bash "$repo/guest_balloon/build_services.sh" --kernel-root "$cache/kernel/current" \
             --out-dir "$svc" >"$cache/debian-services-build.log" 2>&1 \
            || { tail -20 "$cache/debian-services-build.log" >&2; die "building the services guest failed"; }
    fi
fi
say "ready: $("$venv/bin/hv" --version); guest image $cache/guest/initramfs.cpio.gz"
