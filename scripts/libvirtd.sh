#!/usr/bin/env bash
# Start or stop libvirtd (and virtlogd) where no service manager does: containers, CI
# machines booted without systemd.  Run as root.
#   scripts/libvirtd.sh start    start both daemons unless libvirtd answers already;
#                                prints "started PID" or "running" (someone else's)
#   scripts/libvirtd.sh stop     stop the daemons this script started (pid files below)
#   scripts/libvirtd.sh status   exit 0 if libvirtd answers on qemu:///system
# What libvirtd needs here (measured on Debian 12 without systemd): /var/log/libvirt, a
# libvirt-qemu user (resolved at start even when unused), and a user for QEMU.  Without a qemu.conf (Debian ships none without libvirt-daemon-system)
# this script writes one running QEMU as root: the build default, libvirt-qemu, neither
# exists here nor may open /dev/kvm (0600), which makes libvirtd re-probe QEMU's
# capabilities at every domain start (~45 s), and it could not write a serial log under
# a private test directory.  An existing qemu.conf is left alone.
set -euo pipefail

state=${HV_LIBVIRTD_STATE:-/run/hv-libvirtd}
uri=qemu:///system
say() { printf 'libvirtd.sh: %s\n' "$*"; }
die() { printf 'libvirtd.sh: error: %s\n' "$*" >&2; exit 1; }

answers() { timeout 10 virsh -q -c "$uri" uri >/dev/null 2>&1; }

start() {
    [ "$(id -u)" = 0 ] || die "run as root"
    command -v libvirtd >/dev/null || die "libvirtd is not installed (bash scripts/setup.sh --with-libvirt)"
    if answers; then say "running"; return 0; fi
    mkdir -p /var/log/libvirt /run/libvirt "$state"
    # libvirtd resolves its build-default user before reading qemu.conf: it must exist.
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    id libvirt-qemu >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin --gid libvirt-qemu libvirt-qemu
    if [ ! -e /etc/libvirt/qemu.conf ]; then
        mkdir -p /etc/libvirt
        printf '# written by hv scripts/libvirtd.sh (no service manager here)\nuser = "root"\ngroup = "root"\n' \
            >/etc/libvirt/qemu.conf
    fi
    if ! pgrep -x virtlogd >/dev/null; then
        virtlogd -d -p "$state/virtlogd.pid" || die "virtlogd did not start"
    fi
    libvirtd -d -p "$state/libvirtd.pid" || die "libvirtd did not start (see /var/log/libvirt)"
    for _ in $(seq 100); do
        if answers; then say "started $(cat "$state/libvirtd.pid")"; return 0; fi
        sleep 0.1
    done
    die "libvirtd started but does not answer on $uri within 10 s"
}

stop_one() {  # stop_one NAME: SIGTERM the daemon in NAME.pid, wait up to 10 s
    local f="$state/$1.pid" pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ]; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && die "$1 ($pid) did not stop within 10 s"
    fi
    rm -f "$f"
}

case "${1:-}" in
    start) start ;;
    stop) stop_one libvirtd; stop_one virtlogd; say "stopped" ;;
    status) answers ;;
    *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
