"""``hv doctor``: every capability hv relies on, each with a verdict and the reason.

Verdicts: ``ok``; ``warn`` (hv works, with less: e.g. TCG instead of KVM, no swap yet);
``fail`` (something hv needs is missing).  Checks only read, except the KSM check,
which writes KSM's current ``run`` value back to prove the file is writable, the
process_madvise check, which pages out one page of a child process it starts, and the
node_reclaim check, which asks per-node reclaim for 0 bytes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

from hv import paths
from hv.errors import HvError
from hv.qemu import accel
from hv.units import format_size

KSM_DIR = "/sys/kernel/mm/ksm"
MIN_KERNEL = (5, 10)  # process_madvise(2) arrived in Linux 5.10
MIN_QEMU = (5, 0)  # memory-backend merge=, gpa2hva and guest-stats all predate 5.0
# x86_64 syscall numbers (ctypes has no header to read them from).
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # ok | warn | fail
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _root() -> Check:
    if os.geteuid() == 0:
        return Check("root", "ok", "running as root: pagemap frame numbers, kpageflags, KSM and "
                     "process_madvise on QEMU are available")
    return Check("root", "fail", "hv needs root for /proc/PID/pagemap frame numbers, "
                 "/proc/kpageflags, KSM sysfs and process_madvise on QEMU processes")


def _kernel() -> Check:
    release = platform.release()
    nums = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    if nums >= MIN_KERNEL:
        return Check("kernel", "ok", f"Linux {release} (needs {MIN_KERNEL[0]}.{MIN_KERNEL[1]}+ "
                     "for process_madvise)")
    return Check("kernel", "fail", f"Linux {release} is older than 5.10: no process_madvise")


def _qemu() -> Check:
    exe = shutil.which(accel.QEMU)
    if exe is None:
        return Check("qemu", "fail", f"{accel.QEMU} not found: apt-get install qemu-system-x86")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    first = out.splitlines()[0] if out else "unknown version"
    try:
        ver = tuple(int(x) for x in first.split("version ")[1].split()[0].split(".")[:2])
    except (IndexError, ValueError):
        return Check("qemu", "warn", f"cannot read the version of {exe}: {first!r}")
    verdict = "ok" if ver >= MIN_QEMU else "fail"
    return Check("qemu", verdict, f"{first} at {exe}")


def _accel() -> Check:
    try:
        verdict = accel.choose()
    except HvError as exc:
        return Check("accelerator", "fail", str(exc))
    return Check("accelerator", "ok" if verdict.accel == "kvm" else "warn",
                 f"{verdict.accel}: {verdict.reason}")


def _ksm() -> Check:
    run = os.path.join(KSM_DIR, "run")
    if not os.path.exists(run):
        return Check("ksm", "fail", "no /sys/kernel/mm/ksm: kernel built without CONFIG_KSM; "
                     "page sharing cannot be realized")
    try:
        with open(run) as f:
            current = f.read().strip()
        with open(run, "w") as f:
            f.write(current)
    except OSError as exc:
        return Check("ksm", "fail", f"cannot write {run}: {exc.strerror}")
    extras = [name for name in ("use_zero_pages", "advisor_mode", "smart_scan", "general_profit")
              if os.path.exists(os.path.join(KSM_DIR, name))]
    return Check("ksm", "ok", f"writable (run={current}); has {', '.join(extras) or 'basic knobs only'}")


def _ksm_stat() -> Check:
    if os.path.exists("/proc/self/ksm_stat"):
        return Check("ksm_stat", "ok", "/proc/PID/ksm_stat present: per-VM merged pages measurable")
    return Check("ksm_stat", "warn", "no /proc/PID/ksm_stat (Linux < 6.1): per-VM merges are "
                 "counted from kpageflags only")


def _swap() -> Check:
    with open("/proc/swaps") as f:
        lines = f.read().splitlines()[1:]
    if not lines:
        return Check("swap", "warn", "no host swap: the working-set sampler and hypervisor swap "
                     "need it: `hv swap create 1G` makes one (`hv swap remove` removes it)")
    total = sum(int(line.split()[2]) for line in lines) * 1024
    used = sum(int(line.split()[3]) for line in lines) * 1024
    return Check("swap", "ok", f"{len(lines)} area(s), {format_size(total)} total, "
                 f"{format_size(used)} used")


def _node_reclaim() -> Check:
    from hv.host import reclaim

    files = reclaim.nodes()
    if not files:
        return Check("node_reclaim", "warn", "no /sys/devices/system/node/node*/reclaim (Linux "
                     "< 6.17): memory hypervisor swap pages out stays in the swap cache until "
                     "the kernel reclaims, so free memory rises late")
    problem = reclaim.request(files[0], 0)  # parses the request, reclaims nothing
    if problem is not None:
        return Check("node_reclaim", "warn", f"{files[0]} refuses a request: {problem}")
    return Check("node_reclaim", "ok", f"per-node proactive reclaim ({len(files)} node(s)) "
                 "frees what hypervisor swap pages out")


def _pagemap() -> Check:
    buf = mmap.mmap(-1, 4096)
    buf[0] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // 4096 * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
    except OSError as exc:
        return Check("pagemap", "fail", f"cannot read /proc/self/pagemap: {exc.strerror}")
    finally:
        del addr
    pfn = entry & ((1 << 55) - 1)
    if entry >> 63 and pfn:
        return Check("pagemap", "ok", "present bits and frame numbers readable")
    return Check("pagemap", "fail", "pagemap hides frame numbers (needs CAP_SYS_ADMIN): "
                 "KSM frames cannot be identified")


def _kpageflags() -> Check:
    try:
        with open("/proc/kpageflags", "rb") as f:
            f.read(8)
    except OSError as exc:
        return Check("kpageflags", "fail", f"cannot read /proc/kpageflags: {exc.strerror}")
    return Check("kpageflags", "ok", "readable: KSM and zero-page frames are known without reading")


# A child that maps and touches one page, says where, and waits to be told to exit:
# the process the process_madvise check pages out.
_MADVISE_VICTIM = (
    "import mmap, ctypes, sys\n"
    "m = mmap.mmap(-1, mmap.PAGESIZE)\n"
    "m[0] = 1\n"
    "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
    "sys.stdin.read()\n"
)
MADV_PAGEOUT = 21  # include/uapi/asm-generic/mman-common.h


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _process_madvise() -> Check:
    """MADV_PAGEOUT on one touched page of another process, for real: the kernel checks
    ptrace access and CAP_SYS_NICE only when there is something to advise, so an empty
    call succeeds for anyone and proves nothing."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    victim = subprocess.Popen([sys.executable, "-c", _MADVISE_VICTIM], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None
        addr = int(victim.stdout.readline())
        pidfd = libc.syscall(SYS_PIDFD_OPEN, victim.pid, 0)
        if pidfd < 0:
            return Check("process_madvise", "fail",
                         f"pidfd_open: {os.strerror(ctypes.get_errno())}")
        try:
            iov = _IoVec(addr, mmap.PAGESIZE)
            ret = libc.syscall(SYS_PROCESS_MADVISE, pidfd, ctypes.byref(iov), 1, MADV_PAGEOUT, 0)
            err = ctypes.get_errno()
        finally:
            os.close(pidfd)
    finally:
        victim.kill()
        victim.wait()
    if ret < 0:
        why = {38: "the kernel lacks process_madvise",
               1: "not permitted (needs CAP_SYS_NICE and ptrace access: run as root)"}
        return Check("process_madvise", "fail", f"MADV_PAGEOUT on another process: "
                     f"{why.get(err, os.strerror(err))}")
    return Check("process_madvise", "ok", f"MADV_PAGEOUT on another process works "
                 f"(advised {ret} bytes; pages go out given swap)")


def _thp() -> Check:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return Check("thp", "ok", "no transparent huge pages")
    return Check("thp", "ok", f"transparent huge pages '{mode}': KSM and page-out split them as needed")


def _guest_image() -> Check:
    try:
        kernel, initrd = paths.guest_kernel(), paths.guest_initrd()
    except HvError as exc:
        return Check("guest image", "warn", f"{exc} (needed only to launch test guests)")
    return Check("guest image", "ok", f"{kernel.name} + {initrd}")


def _native() -> Check:
    try:
        from hv import _native  # type: ignore[attr-defined,unused-ignore]  # noqa: F401
    except ImportError as exc:
        return Check("native", "fail", f"the cffi extension is not built ({exc}): pip install -e .")
    return Check("native", "ok", "cffi scanner extension loaded")


CHECKS: list[Callable[[], Check]] = [_root, _kernel, _qemu, _accel, _ksm, _ksm_stat, _swap,
                                      _node_reclaim,
                                      _pagemap, _kpageflags, _process_madvise, _thp,
                                      _guest_image, _native]


def run_checks() -> list[Check]:
    out = []
    for check in CHECKS:
        try:
            out.append(check())
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            out.append(Check(check.__name__.strip("_"), "fail", f"check crashed: {exc!r}"))
    return out
