"""Where hv keeps things on the host; each overridable by an environment variable.

- run directory (``HV_RUN_DIR``, default ``/run/hv``): one folder per VM hv knows,
  holding ``qmp.sock`` (QEMU's socket, or a symlink to the socket of a VM hv did not
  start), ``qemu.pid``, ``console.log``, ``meta.json``; and the accelerator verdict
  (``accel.json``), which lives in /run so it is measured again after a reboot.
- state directory (``HV_STATE_DIR``, default ``/var/lib/hv``): what survives hv.
- cache (``HV_CACHE_DIR``, default ``/var/cache/hv``): the extracted guest kernel
  (``kernel/current``) and the guest image (``guest/initramfs.cpio.gz``).

What hv writes in the run and state directories holds host frame numbers, page
hashes, guests' memory figures and QMP sockets: the directories are 0700 and the files
0600 (:func:`private_dir`, :func:`open_private`), whatever the umask, and an older,
looser directory or file is tightened when hv writes it again.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from hv.errors import HostError


PRIVATE_DIR_MODE = 0o700  # root only: frame numbers and page hashes are a side channel
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory.  Inside hv's run or state directory every
    level from that directory down is made (or tightened to) 0700; elsewhere (a
    ``--log`` in a folder of the admin's) only what is created is 0700."""
    root = next((r for r in (state_dir(), run_dir()) if path == r or r in path.parents), None)
    if root is None:
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        return path
    root.parent.mkdir(parents=True, exist_ok=True)
    for level in [root, *reversed([p for p in path.parents if root in p.parents]), path]:
        level.mkdir(exist_ok=True, mode=PRIVATE_DIR_MODE)
        if level.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
            os.chmod(level, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def open_private(path: Path, flags: int) -> int:
    """``os.open`` a file (created if missing) as 0600 in a private directory; an existing
    file is tightened to 0600 too.  Returns the descriptor."""
    private_dir(path.parent)
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_json_atomic(path: Path, data: object, indent: int | None = None) -> None:
    """Write ``data`` as JSON (0600) so a reader (or a crash) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    try:
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
            f.write(json.dumps(data, indent=indent))
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
