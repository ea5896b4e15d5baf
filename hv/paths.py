"""Where hv keeps things on the host; each overridable by an environment variable.

- run directory (``HV_RUN_DIR``, default ``/run/hv``): one folder per VM hv knows,
  holding ``qmp.sock`` (QEMU's socket, or a symlink to the socket of a VM hv did not
  start), ``qemu.pid``, ``console.log``, ``meta.json``; and the accelerator verdict
  (``accel.json``), which lives in /run so it is measured again after a reboot.
- state directory (``HV_STATE_DIR``, default ``/var/lib/hv``): what survives hv.
- cache (``HV_CACHE_DIR``, default ``/var/cache/hv``): the extracted guest kernel
  (``kernel/current``) and the guest image (``guest/initramfs.cpio.gz``).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from hv.errors import HostError


def write_json_atomic(path: Path, data: object, indent: int | None = None) -> None:
    """Write ``data`` as JSON so a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=indent))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise


def run_dir() -> Path:
    return Path(os.environ.get("HV_RUN_DIR", "/run/hv"))


def state_dir() -> Path:
    return Path(os.environ.get("HV_STATE_DIR", "/var/lib/hv"))


def cache_dir() -> Path:
    return Path(os.environ.get("HV_CACHE_DIR", "/var/cache/hv"))


def kernel_root() -> Path:
    return Path(os.environ.get("HV_KERNEL_ROOT", str(cache_dir() / "kernel" / "current")))


def guest_kernel() -> Path:
    """The guest kernel image extracted by ``scripts/setup.sh``."""
    found = sorted(glob.glob(str(kernel_root() / "boot" / "vmlinuz-*")))
    if not found:
        raise HostError(f"no guest kernel under {kernel_root()}/boot: run scripts/setup.sh")
    return Path(found[-1])


def guest_initrd() -> Path:
    """The guest image built by ``guest_balloon/build.sh``."""
    path = Path(os.environ.get("HV_GUEST_INITRD", str(cache_dir() / "guest" / "initramfs.cpio.gz")))
    if not path.exists():
        raise HostError(f"no guest image at {path}: run scripts/setup.sh")
    return path


def debian_image() -> tuple[Path, Path]:
    """(initramfs, root file system) of the Debian guest built by ``build_debian.sh``."""
    where = cache_dir() / "debian"
    initrd, disk = where / "debian-initrd.cpio.gz", where / "debian.ext4"
    for f in (initrd, disk):
        if not f.exists():
            raise HostError(f"no Debian guest image at {f}: run scripts/setup.sh --with-debian")
    return initrd, disk
