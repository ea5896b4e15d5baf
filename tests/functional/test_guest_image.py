"""The guest image: guest_balloon/build.sh output booted under QEMU TCG.

Builds the initramfs from the kernel in $HV_KERNEL_ROOT (default: the cache
scripts/setup.sh fills, see hv.paths), boots small guests with each workload, and checks
the "hv-guest: key=value ..." lines they print on their serial console.  Every
wait polls the console log against a deadline; every QEMU is killed at teardown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "guest_balloon" / "build.sh"
QEMU = "qemu-system-x86_64"

GUEST_MIB = 256
BOOT_TIMEOUT_S = 30.0  # TCG reaches the ready line in ~3-4 s; allow a loaded host
EVENT_TIMEOUT_S = 30.0
POLL_S = 0.1
LINE_RE = re.compile(r"hv-guest: (.*)$")

pytestmark = [pytest.mark.guest] + (
    [pytest.mark.timeout(240)] if importlib.util.find_spec("pytest_timeout") else []
)

Event = dict[str, str]


def parse_line(text: str) -> Event | None:
    """The key=value pairs of one console line, or None if it is not an hv-guest line."""
    m = LINE_RE.search(text)
    if m is None:
        return None
    return dict(pair.split("=", 1) for pair in m.group(1).split() if "=" in pair)


class Guest:
    """One QEMU process booted from the hv initramfs, with its console log."""

    def __init__(self, proc: subprocess.Popen[bytes], console: Path, qmp_path: Path | None):
        self.proc = proc
        self.console = console
        self.qmp_path = qmp_path

    def events(self) -> list[Event]:
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [ev for line in text.splitlines() if (ev := parse_line(line)) is not None]

    def wait_for(
        self,
        event: str,
        match: Callable[[Event], bool] = lambda ev: True,
        timeout_s: float = EVENT_TIMEOUT_S,
    ) -> Event:
        """The first line with event=EVENT that satisfies `match`, polling until the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            for ev in self.events():
                if ev.get("event") == "error":
                    pytest.fail(f"guest reported an error: {ev}\n{self.tail()}")
                if ev.get("event") == event and match(ev):
                    return ev
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before event={event}\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no event={event} within {timeout_s} s\n{self.tail()}")
            time.sleep(POLL_S)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return "--- console tail ---\n" + "\n".join(text.splitlines()[-lines:])

    def qmp(self, command: str, **args: object) -> object:
        """Run one QMP command on a fresh connection."""
        from qemu.qmp import QMPClient

        assert self.qmp_path is not None, "guest booted without qmp=True"

        async def run() -> object:
            client = QMPClient("hv-test")
            await client.connect(str(self.qmp_path))
            try:
                return await client.execute(command, args or None)
            finally:
                await client.disconnect()

        return asyncio.run(run())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def kernel_root() -> Path:
    from hv import paths
    root = paths.kernel_root()  # HV_KERNEL_ROOT, else the cache scripts/setup.sh fills
    if not list(root.glob("boot/vmlinuz-*")):
        pytest.fail(f"no guest kernel: {root}/boot/vmlinuz-* missing (set HV_KERNEL_ROOT)")
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} not installed: run scripts/setup.sh")
    return root


@pytest.fixture(scope="session")
def initramfs(kernel_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guest") / "hv-guest.cpio.gz"
    started = time.monotonic()
    result = subprocess.run(
        [str(BUILD_SH), "--kernel-root", str(kernel_root), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"build.sh failed:\n{result.stderr}"
    assert result.stdout.strip().splitlines()[-1] == str(out)
    print(f"initramfs built in {time.monotonic() - started:.1f} s")
    return out


@pytest.fixture
def boot(
    kernel_root: Path, initramfs: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Guest]]:
    """A factory that boots guests; all of them are killed at teardown."""
    guests: list[Guest] = []
    vmlinuz = sorted(kernel_root.glob("boot/vmlinuz-*"))[-1]

    def start(params: str, extra_args: tuple[str, ...] = (), qmp: bool = False) -> Guest:
        n = len(guests)
        console = tmp_path / f"console{n}.log"
        qmp_path = tmp_path / f"qmp{n}.sock" if qmp else None
        cmd = [
            QEMU, "-accel", "tcg", "-m", str(GUEST_MIB), "-nographic", "-no-reboot",
            "-net", "none", "-display", "none", "-monitor", "none",
            "-kernel", str(vmlinuz), "-initrd", str(initramfs),
            "-append", f"console=ttyS0 quiet panic=-1 {params}",
            "-device", "virtio-balloon-pci,id=balloon0",
            "-serial", f"file:{console}",
            *(["-qmp", f"unix:{qmp_path},server=on,wait=off"] if qmp_path else []),
            *extra_args,
        ]
        with open(tmp_path / f"qemu{n}.out", "wb") as qemu_out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qemu_out,
                                    stderr=subprocess.STDOUT)
        guest = Guest(proc, console, qmp_path)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.kill()


def kib(ev: Event, key: str) -> int:
    return int(ev[key])


def test_hog_boots_and_touches(boot: Callable[..., Guest]) -> None:
    started = time.monotonic()
    guest = boot("hv.workload=hog hv.hog_mib=100")
    ready = guest.wait_for("ready", timeout_s=BOOT_TIMEOUT_S)
    boot_s = time.monotonic() - started
    assert ready["balloon"] == "1"
    assert ready["errors"] == "0"
    assert ready["modules"] == "8"
    assert ready["workload"] == "hog"
    assert 150 * 1024 < kib(ready, "memtotal_kib") <= GUEST_MIB * 1024

    touched = guest.wait_for("hog_touched")
    assert touched["mib"] == "100"
    assert touched["fill"] == "unique"
    # A report after the hog is resident shows its 100 MiB gone from MemFree.
    report = guest.wait_for(
        "report",
        lambda ev: kib(ev, "memfree_kib") < kib(ready, "memtotal_kib") - 100 * 1024,
    )
    assert kib(report, "memtotal_kib") == kib(ready, "memtotal_kib")
    print(f"ready after {boot_s:.1f} s; hog touch_s={touched['touch_s']}")


def test_toucher_changes_working_set(boot: Callable[..., Guest]) -> None:
    guest = boot("hv.workload=toucher hv.alloc_mib=64 hv.ws=16:3,48 hv.rate=4 hv.fill=shared")
    guest.wait_for("ready", timeout_s=BOOT_TIMEOUT_S)
    start = guest.wait_for("toucher_start")
    assert (start["alloc_mib"], start["ws"], start["rate"], start["fill"]) == (
        "64", "16:3,48", "4", "shared")
    first = guest.wait_for("toucher", lambda ev: ev["ws_mib"] == "16")
    assert first["alloc_mib"] == "64"
    change = guest.wait_for("toucher_ws")
    assert (change["ws_mib"], change["previous_mib"]) == ("48", "16")
    assert 2 <= float(change["t_s"]) <= 5
    later = guest.wait_for(
        "toucher",
        lambda ev: ev["ws_mib"] == "48" and int(ev["passes"]) > int(first["passes"]) + 4,
    )
    assert float(later["t_s"]) >= float(change["t_s"])


def test_filecache_fills_reclaimable_cache(boot: Callable[..., Guest], tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(24 << 20))
    guest = boot(
        "hv.workload=filecache hv.file_dev=/dev/vda hv.file_mib=0 hv.report_s=1",
        extra_args=("-drive", f"file={disk},if=virtio,format=raw,readonly=on"),
    )
    done = guest.wait_for("filecache_done", timeout_s=BOOT_TIMEOUT_S)
    assert (done["mib"], done["reclaimable"]) == ("24", "1")
    guest.wait_for("report", lambda ev: kib(ev, "buffers_kib") >= 24 * 1024)


def test_balloon_takes_back_freed_hog(boot: Callable[..., Guest]) -> None:
    guest = boot("hv.workload=hog hv.hog_mib=150 hv.hog_hold_s=1 hv.report_s=1", qmp=True)
    ready = guest.wait_for("ready", timeout_s=BOOT_TIMEOUT_S)
    guest.wait_for("hog_touched")
    guest.wait_for("hog_freed")
    target_mib = 128
    guest.qmp("balloon", value=target_mib << 20)
    # The driver hands inflated pages to the host and lowers MemTotal by as much.
    report = guest.wait_for(
        "report", lambda ev: kib(ev, "memtotal_kib") <= kib(ready, "memtotal_kib") - 100 * 1024
    )
    assert kib(report, "memfree_kib") > 0
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while (actual := guest.qmp("query-balloon")["actual"]) > target_mib << 20:  # type: ignore[index]
        assert time.monotonic() < deadline, f"balloon stuck at {actual >> 20} MiB"
        time.sleep(POLL_S)
