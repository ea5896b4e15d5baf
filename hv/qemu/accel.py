"""Pick the accelerator by measurement, not by the presence of /dev/kvm.

On nested set-ups /dev/kvm can exist while the guest's kernel-mode code is emulated
instruction by instruction; a Linux kernel then never finishes booting under KVM,
while TCG boots it in seconds.  So hv times the same tight ring-0 loop (a 64 KiB
"BIOS" that spins reading CR0 and exits through isa-debug-exit) under KVM and under
TCG, and uses KVM only if it really runs guest code faster than TCG does.  The verdict
is cached in the run directory, so it is measured once per host boot.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hv import paths
from hv.errors import HostError

QEMU = "qemu-system-x86_64"
LOOP_ITERATIONS = 20_000_000  # ~20 ms of guest code on hardware KVM; long enough to time
KVM_TIMEOUT_S = 3.0  # hardware runs the loop in well under 0.1 s; emulation needs ~30 s
EXIT_VALUE = 0x21  # written to isa-debug-exit; QEMU exits with (v << 1) | 1
KVM_MIN_SPEEDUP = 2.0  # KVM must beat TCG by this much to be worth it (hardware: ~100x)


@dataclass(frozen=True)
class AccelVerdict:
    accel: str  # "kvm" or "tcg"
    reason: str
    kvm_ns_per_iter: float | None
    tcg_ns_per_iter: float | None


def probe_rom(iterations: int) -> bytes:
    """A 64 KiB BIOS image: ``cli; mov ecx,N; 1: mov eax,cr0; dec ecx; jnz 1b; out 0xf4``."""
    code = (bytes([0xFA, 0x66, 0xB9]) + struct.pack("<I", iterations)
            + bytes([0x0F, 0x20, 0xC0,  # mov eax, cr0 (privileged)
                     0x66, 0x49,  # dec ecx
                     0x75, 0xF9,  # jnz back to mov
                     0xB0, EXIT_VALUE, 0xE6, 0xF4,  # mov al, v; out 0xf4, al
                     0xF4, 0xEB, 0xFD]))  # hlt; jmp $-1
    rom = bytearray(65536)
    rom[: len(code)] = code
    rom[0xFFF0:0xFFF5] = bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # reset vector: jmp f000:0000
    return bytes(rom)


def _run_rom(accel: str, rom: Path, timeout_s: float) -> float | None:
    """Wall seconds for QEMU to run ``rom`` to its exit; None on timeout or failure."""
    cmd = [QEMU, "-accel", accel, "-m", "16", "-nodefaults", "-display", "none",
           "-no-user-config", "-no-reboot", "-bios", str(rom),
           "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != (EXIT_VALUE << 1) | 1:
        return None
    return time.monotonic() - start


def _ns_per_iter(accel: str, workdir: Path, timeout_s: float) -> float | None:
    short, long_ = workdir / "short.rom", workdir / "long.rom"
    short.write_bytes(probe_rom(1))
    long_.write_bytes(probe_rom(LOOP_ITERATIONS))
    base = _run_rom(accel, short, timeout_s)
    if base is None:
        return None
    loop = _run_rom(accel, long_, timeout_s + base)
    if loop is None:
        return None
    return max(loop - base, 1e-6) / LOOP_ITERATIONS * 1e9


def measure() -> AccelVerdict:
    """Time the probe under TCG and KVM and decide."""
    if shutil.which(QEMU) is None:
        raise HostError(f"{QEMU} not found: install qemu-system-x86 (scripts/setup.sh)")
    with tempfile.TemporaryDirectory(prefix="hv-accel-") as tmp:
        tcg = _ns_per_iter("tcg", Path(tmp), 30.0)
        if tcg is None:
            raise HostError("QEMU cannot run even the TCG probe; see `hv doctor`")
        try:
            os.close(os.open("/dev/kvm", os.O_RDWR))
        except OSError as exc:
            return AccelVerdict("tcg", f"/dev/kvm unusable ({exc.strerror}); using TCG", None, tcg)
        kvm = _ns_per_iter("kvm", Path(tmp), KVM_TIMEOUT_S)
    if kvm is None:
        lower = KVM_TIMEOUT_S / LOOP_ITERATIONS * 1e9
        return AccelVerdict("tcg", f"KVM did not finish a {LOOP_ITERATIONS:,}-iteration ring-0 loop "
                            f"in {KVM_TIMEOUT_S:.0f} s (>{lower:.0f} ns/iteration vs {tcg:.1f} under "
                            "TCG): guest kernel code is emulated here, using TCG", None, tcg)
    if kvm * KVM_MIN_SPEEDUP > tcg:
        return AccelVerdict("tcg", f"KVM runs ring-0 code at {kvm:.1f} ns/iteration, TCG at "
                            f"{tcg:.1f}: KVM is not really accelerating, using TCG", kvm, tcg)
    return AccelVerdict("kvm", f"KVM runs ring-0 code at {kvm:.1f} ns/iteration "
                        f"(TCG {tcg:.1f}); using KVM", kvm, tcg)


def _cache_file() -> Path:
    return paths.run_dir() / "accel.json"


def choose(reprobe: bool = False) -> AccelVerdict:
    """The accelerator to use: ``HV_ACCEL`` if set, else the cached or fresh measurement."""
    forced = os.environ.get("HV_ACCEL")
    if forced in ("kvm", "tcg"):
        return AccelVerdict(forced, f"HV_ACCEL={forced} set in the environment", None, None)
    cache = _cache_file()
    if not reprobe and cache.exists():
        try:
            return AccelVerdict(**json.loads(cache.read_text()))
        except (ValueError, TypeError):
            pass
    verdict = measure()
    paths.write_json_atomic(cache, asdict(verdict))
    return verdict
