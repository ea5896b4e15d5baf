"""Security of what hv writes and talks to: modes, another user, the QMP peer, doctor.

Page-state files hold host frame numbers and content hashes; status, the event log and
the guard file name VMs, sockets and memory figures.  Another local user must read
none of it: directories 0700, files 0600, whatever the umask hv runs under.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.daemon.status import status_file
from tests.conftest import REPO, Guests, hv_cli, kill_pid, wait_for
from tests.functional.hvrun import (HvRun, assert_ksm_restored, bare_qemu, ksm_snapshot,
                                   write_config)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users may enter (unlike pytest's tmp_path, under a 0700 root's):
    so only hv's own modes keep them out of what hv writes in it."""
    d = Path(tempfile.mkdtemp(prefix="hv-perm-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *cmd], capture_output=True,
                          text=True, timeout=60, cwd="/", env={**os.environ, **(env or {})})


def modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
            except FileNotFoundError:
                continue  # a temporary file renamed meanwhile
    out["."] = stat.S_IMODE(root.stat().st_mode)
    return out


def test_state_and_run_files_are_private(guests: Guests, run_dir: Path, open_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    state = open_dir / "state"
    (state / "daemon").mkdir(parents=True)  # as an older hv left them: hv tightens them
    for d in (state, state / "daemon"):
        d.chmod(0o755)
    monkeypatch.setenv("HV_STATE_DIR", str(state))
    g = guests.launch("perm", mem="256M")
    guests.wait_event(g, "ready", 90)
    before = ksm_snapshot()
    config = write_config(open_dir / "hv.toml", {"managed": "4G", "share_interval_s": 1},
                          {"perm": {"min": "256M", "max": "256M"}})
    logs = open_dir / "logs"  # an admin's folder, open to all: the event log itself is 0600
    logs.mkdir(mode=0o755)
    log = logs / "events.jsonl"
    old_umask = os.umask(0)  # hv's modes must not depend on the umask it inherits
    try:
        run = HvRun(config, log)
    finally:
        os.umask(old_umask)
    try:
        run.wait_event("share", 60)
        wanted = {"daemon", "daemon/status.json", "daemon/guard.json",
                  "daemon/lock", "sharing", "sharing/perm.pages", "ksm-saved.json"}
        def all_there() -> dict[str, int] | None:
            m = modes(state)
            return m if wanted <= set(m) else None

        found = wait_for(all_there, 30, f"{wanted} in {state}")
        assert found["."] == 0o700, found
        for name, mode in found.items():
            is_dir = (state / name).is_dir()
            assert mode == (0o700 if is_dir else 0o600), f"{name}: {oct(mode)}"
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        done = as_nobody("cat", str(log))
        assert done.returncode != 0 and "Permission denied" in done.stderr
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((run_dir / "perm").stat().st_mode) == 0o700
        assert stat.S_IMODE((run_dir / "perm" / "qmp.sock").stat().st_mode) == 0o600

        # Another user cannot even list the state directory...
        done = as_nobody("ls", str(state))
        assert done.returncode != 0 and "Permission denied" in done.stderr
        # ...and with every directory opened up, each file still keeps it out.  hv is
        # stopped meanwhile (SIGSTOP): it would tighten the directories again.
        run.proc.send_signal(signal.SIGSTOP)
        try:
            files = [p for p in state.rglob("*") if p.is_file()]
            assert {str(p.relative_to(state)) for p in files} >= wanted - {"daemon", "sharing"}
            for d in [state, *(p for p in state.rglob("*") if p.is_dir())]:
                d.chmod(0o755)
            assert as_nobody("ls", str(state / "sharing")).returncode == 0  # it gets in
            for f in files:
                done = as_nobody("cat", str(f))
                assert done.returncode != 0 and "Permission denied" in done.stderr, f
        finally:
            run.proc.send_signal(signal.SIGCONT)
        assert run.stop() == 0
    finally:
        run.close()
    assert_ksm_restored(log, state, before)
    assert not status_file().exists()


IMPOSTOR = r"""
import asyncio, json, sys

async def serve(reader, writer):
    writer.write(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                 "package": ""}, "capabilities": []}}).encode() + b"\n")
    await writer.drain()
    while line := await reader.readline():
        cmd = json.loads(line)
        with open(sys.argv[2], "a") as log:
            log.write(cmd["execute"] + "\n")
        writer.write(json.dumps({"return": {}, "id": cmd.get("id")}).encode() + b"\n")
        await writer.drain()

async def main():
    server = await asyncio.start_unix_server(serve, sys.argv[1])
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def test_attached_socket_is_checked_at_every_connect(guests: Guests, run_dir: Path,
                                                     tmp_path: Path) -> None:
    """`hv attach` registered a QEMU's socket; later another process serves the same path:
    at the next connect hv refuses, naming the process, before it sends anything."""
    sock, qemu_pid = bare_qemu(tmp_path, "ext")
    guests.adopt(qemu_pid)
    done = hv_cli("attach", "web", str(sock))
    assert done.returncode == 0, done.stderr
    assert hv_cli("status", "web").returncode == 0
    kill_pid(qemu_pid)
    sock.unlink(missing_ok=True)
    asked = tmp_path / "asked.txt"
    impostor = subprocess.Popen([sys.executable, "-c", IMPOSTOR, str(sock), str(asked)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "listening\n"
        for cmd in (["status", "web"], ["balloon", "web", "128M"], ["share", "web"]):
            done = hv_cli(*cmd)
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 1 and len(lines) == 1, done.stderr
            assert f"served by process {impostor.pid} (python" in lines[0], lines[0]
            assert "not QEMU" in lines[0]
        # The impostor heard nothing of hv's, not even the handshake.
        assert not asked.exists()
    finally:
        kill_pid(impostor.pid)
        impostor.wait(5)
    assert hv_cli("stop", "web").returncode == 0


@pytest.fixture
def world_readable_hv(open_dir: Path) -> Path:
    """A copy of the hv package that user nobody can import (the checkout may sit under
    a 0700 home, and the virtualenv's interpreter under /root)."""
    shutil.copytree(REPO / "hv", open_dir / "hv",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for p in [open_dir, *open_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return open_dir


def test_doctor_process_madvise_really_pages_out(world_readable_hv: Path) -> None:
    """As root the check pages out a child's page; as nobody the same check fails (it
    used to pass for anyone: an empty call is never refused)."""
    code = "from hv.host import doctor; c = doctor._process_madvise(); print(c.verdict, c.reason)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.stdout.startswith("ok ") and "advised 4096 bytes" in done.stdout, done
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None
    done = as_nobody(python, "-c", code, env={"PYTHONPATH": str(world_readable_hv)})
    assert done.stdout.startswith("fail ") and "not permitted" in done.stdout, done
