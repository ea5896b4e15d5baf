"""``hv run`` as a user runs it, for an experiment: a TOML file, an event log, signals.

    async with Daemon(workdir, progress) as hv:        # no daemon yet
        hv.write_config({"tax_rate": 0}, {"vm1": {"socket": s, "min": "256M"}})
        await hv.start()                                # `hv run --config --log`
        await hv.wait_event("sample", 60, vm="vm1")
        hv.write_config({"tax_rate": 0.75}, vms)
        await hv.reload()                               # SIGHUP, answered by `reload`
    # stopped here (SIGTERM, then SIGKILL), even after an error or ^C

The daemon gets a state directory of its own under ``workdir`` (its lock, published
status and saved estimators), so an experiment starts from nothing a previous run
learnt; its guests are the ones the experiment launched (``socket`` in the config).
What it did is read from its event log (``--log``), the daemon's public record.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from hv.eventlog import read_events
from hv.errors import HostError, HvError

__all__ = ["Daemon", "toml_table"]

START_TIMEOUT_S = 60.0  # attach to two guests and publish a first status
STOP_TIMEOUT_S = 30.0  # SIGTERM: resume what it paused, restore KSM, save estimators
RELOAD_TIMEOUT_S = 30.0  # a SIGHUP is answered within a tick or two
POLL_S = 0.25


def toml_table(name: str, table: dict[str, Any]) -> list[str]:
    """``[name]`` and its ``key = value`` lines (strings quoted, booleans lower case)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    return [f"[{name}]", *(f"{k} = {value(v)}" for k, v in table.items())]


class Daemon:
    """One ``hv run`` subprocess with its config, event log and state directory."""

    def __init__(self, workdir: Path, progress: Any = lambda s: None) -> None:
        self.workdir = workdir
        self.config = workdir / "hv.toml"
        self.log = workdir / "events.jsonl"
        self.state_dir = workdir / "state"
        self.stderr_path = workdir / "hv-run.stderr"
        self.progress = progress
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> "Daemon":
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def write_config(self, host: dict[str, Any], vms: dict[str, dict[str, Any]]) -> None:
        """Write the config file in one step (a reload never reads half of it)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = toml_table("host", host)
        for name, table in vms.items():
            lines += ["", *toml_table(f"vm.{name}", table)]
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config)

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HV_STATE_DIR": str(self.state_dir)}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hv.cli", "run", "--config", str(self.config),
                 "--log", str(self.log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        status = self.state_dir / "daemon" / "status.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not status.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise HvError(f"`hv run` published no status in {START_TIMEOUT_S:.0f} s "
                              f"(see {self.stderr_path})")
            await asyncio.sleep(POLL_S)
        self.progress(f"hv run started (pid {self.proc.pid}), log {self.log}")

    async def start_measured(self, names: list[str], sample_timeout_s: float) -> None:
        """Start, wait until hv has sampled every VM in ``names`` once, and check that the
        host is in the high state before any pressure (HostError if not: other work on
        the host needs memory, and the experiment would not start from rest)."""
        await self.start()
        for n in names:
            await self.wait_event("sample", sample_timeout_s, vm=n)
        first = await self.wait_event("tick", 30, after_ts=time.time())
        if first["state"] != "high":
            raise HostError(f"the host is under pressure before the locker ({first['state']}): "
                            "other work on it needs memory")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise HvError(f"`hv run` exited with {self.proc.returncode}: "
                          f"{tail[0] if tail else 'no message'}")

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [e for e in read_events(self.log, event)
                if all(e.get(k) == v for k, v in match.items())]

    async def wait_event(self, event: str, timeout_s: float, after_ts: float = 0.0,
                         **match: Any) -> dict[str, Any]:
        """The first ``event`` logged at or after ``after_ts`` (Unix time) matching ``match``."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            found = [e for e in self.events(event, **match) if e["ts"] >= after_ts]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise HvError(f"`hv run` logged no {event} {match or ''} in {timeout_s:.0f} s "
                              f"(see {self.log})")
            await asyncio.sleep(POLL_S)

    async def reload(self) -> dict[str, Any]:
        """SIGHUP; the ``reload`` event that answers it (a refusal is an error)."""
        assert self.proc is not None
        sent = time.time()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            refused = [e for e in self.events("reload_refused") if e["ts"] >= sent]
            if refused:
                raise HvError(f"`hv run` refused the new config: {refused[0].get('error')}")
            done = [e for e in self.events("reload") if e["ts"] >= sent]
            if done:
                return done[0]
            self.check_alive()
            await asyncio.sleep(POLL_S)
        raise HvError(f"`hv run` did not answer SIGHUP in {RELOAD_TIMEOUT_S:.0f} s")

    async def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop.  Its exit status (None: not run)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            if proc.poll() is None:
                proc.kill()
        code = proc.wait()
        self.progress(f"hv run stopped (exit {code})")
        return code
