"""A real libvirtd for tests, and transient TCG domains booting hv's guest image.

``libvirtd`` starts the daemon with ``scripts/libvirtd.sh`` unless one answers already,
and stops it at the end only if it started it.  ``Domains`` defines transient domains
from XML (``virsh create``) and destroys every one at teardown, failed test or not,
printing their consoles when the test failed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv import paths
from hv.libvirt.domxml import POLICY_NS
from tests.conftest import REPO, console_events, wait_for

SCRIPT = REPO / "scripts" / "libvirtd.sh"

# Transient domains of these tests are named so, and nothing else is touched.
PREFIX = "hvt-"


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done


def libvirtd_script(action: str) -> str:
    """``scripts/libvirtd.sh ACTION``'s output (asserting it succeeded)."""
    done = subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"libvirtd.sh {action}: {done.stderr.strip()}"
    return done.stdout


def libvirtd_fixture() -> Iterator[bool]:
    """A libvirtd for the module; yields whether it is ours (started here, so a test
    may restart it)."""
    started = libvirtd_script("start").startswith("libvirtd.sh: started")
    try:
        yield started
    finally:
        leftovers = [n for n in virsh("list", "--name", "--all", check=False).stdout.split()
                     if n.startswith(PREFIX)]
        for name in leftovers:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
        if started:
            libvirtd_script("stop")


def domain_xml(name: str, console: Path, mem_mib: int = 256, balloon: bool = True,
               nosharepages: bool = False, policy: dict[str, str] | None = None,
               current_mib: int | None = None, **params: object) -> str:
    """A TCG domain booting hv's guest kernel and initramfs, console to a file."""
    kernel = paths.guest_kernel()
    initrd = paths.guest_initrd()
    append = " ".join(["console=ttyS0", "panic=-1",
                       *(f"hv.{k}={v}" for k, v in params.items())])
    meta = ""
    if policy:
        attrs = " ".join(f'{k}="{v}"' for k, v in policy.items())
        meta = f'<metadata><hv:policy xmlns:hv="{POLICY_NS}" {attrs}/></metadata>'
    memballoon = ("<memballoon model='virtio'><stats period='2'/></memballoon>" if balloon
                  else "<memballoon model='none'/>")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <currentMemory unit='MiB'>{current_mib or mem_mib}</currentMemory>
  {'<memoryBacking><nosharepages/></memoryBacking>' if nosharepages else ''}
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{append}</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  {meta}
  <devices>
    <serial type='file'><source path='{console}'/></serial>
    {memballoon}
  </devices>
</domain>
"""


class Domains:
    """Transient domains a test creates; all destroyed at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.names: list[str] = []
        self.consoles: dict[str, Path] = {}

    def create(self, short: str, **kw: object) -> str:
        name = PREFIX + short
        console = self.dir / f"{name}.console"
        xml = self.dir / f"{name}.xml"
        xml.write_text(domain_xml(name, console, **kw))  # type: ignore[arg-type]
        self.names.append(name)
        self.consoles[name] = console
        virsh("create", str(xml))
        return name

    def wait_event(self, name: str, event: str, timeout_s: float = 60) -> dict[str, str]:
        found = wait_for(lambda: console_events(self.consoles[name], event), timeout_s,
                         f"{name}: event={event} on the console")
        return found[-1]  # type: ignore[no-any-return]

    def memtotal_kib(self, name: str) -> int:
        """The guest's own MemTotal from its latest report."""
        return int(console_events(self.consoles[name], "report")[-1]["memtotal_kib"])

    def destroy(self, name: str) -> None:
        virsh("destroy", name, check=False)

    def teardown(self, failed: bool) -> None:
        for name in self.names:
            virsh("destroy", name, check=False)
        if failed:
            for name, log in self.consoles.items():
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-20:]
                    sys.stderr.write(f"\n--- console {name} ---\n" + "\n".join(tail) + "\n")


def domains_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Domains]:
    d = Domains(tmp_path)
    try:
        yield d
    finally:
        rep = getattr(request.node, "rep_call", None)
        d.teardown(failed=bool(rep and rep.failed))
