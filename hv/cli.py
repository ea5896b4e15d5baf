"""The ``hv`` command: parses, calls the library, prints, sets the exit code.

Only this module prints for the user or decides an exit status.  Every error hv
raises on purpose (:class:`hv.errors.HvError`) becomes one line on stderr and a
non-zero exit; so do OS errors and interrupts.  Never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from hv import __version__, backends, paths
from hv.errors import HvError, QMPBusy, UsageError
from hv.qemu import accel as accel_mod
from hv.qemu import launch as launcher
from hv.qemu.vm import VM
from hv.units import format_size, parse_size, table

# Modules that add their own subcommands: each has ``register(subparsers) -> None`` and
# sets ``func`` (an async handler taking the parsed arguments and returning the exit code).
COMMAND_MODULES: tuple[str, ...] = ("hv.sharing.commands", "hv.daemon_commands",
                                     "hv.bench.commands", "hv.ops.commands")

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Let "-5M", "-1e+16" or "-inf" reach the value's own parser (which refuses it
        # clearly) instead of being taken for an unknown option.
        self._negative_number_matcher = re.compile(
            r"^-(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?[A-Za-z]*$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _size(value: int | None) -> str | None:
    return None if value is None else format_size(value)


def _parse_target(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return value


# -- status ----------------------------------------------------------------------
def _daemon_row(name: str, sock: str) -> dict[str, Any] | None:
    """The row `hv run` wrote for this VM at its last tick, if it manages it."""
    from hv.published import running_status
    snapshot = running_status()
    if snapshot is None:
        return None
    real = os.path.realpath(sock)
    for vm_name, row in snapshot["vms"].items():
        if os.path.realpath(row["socket"]) == real:
            return {"vm": name, "accel": None, "ram": None, **row,
                    "managed_by": {"hv_run_pid": snapshot["pid"], "as_of": snapshot["time"],
                                   "name": vm_name, "state": snapshot["state"]}}
    return None


async def _status_one(vm: VM) -> dict[str, Any]:
    try:
        return await _status_live(vm)
    except QMPBusy:
        row = _daemon_row(vm.name, vm.socket_path)
        if row is None:
            raise
        return row


async def _status_live(vm: VM) -> dict[str, Any]:
    name = vm.name
    async with vm:
        info = vm.info
        row: dict[str, Any] = {
            "vm": name, "socket": info.socket, "pid": info.pid, "accel": info.accel,
            "run_state": await vm.status(), "max_bytes": info.ram_bytes,
            "ram": [{"block": r.block, "hva": r.hva, "size": r.size} for r in info.ram],
            "balloon_bytes": None, "guest": None, "managed_by": None,
        }
        if info.balloon_path is not None:
            row["balloon_bytes"] = await vm.balloon_actual()
            row["guest"] = (await vm.guest_stats()).as_dict()
        usage = vm.host_usage()
        row["host_resident_bytes"] = usage.rss_bytes
        row["host_swap_bytes"] = usage.swap_bytes
        row.update(backends.describe(vm, _daemon_row(name, info.socket)))
        # What the kernel says of the guest-RAM mapping (QOM merge=off, mem-merge=off and
        # <nosharepages/> all clear its mergeable flag): one reading, no QMP round trip.
        row["ksm"] = row["sharing"]
        return row


async def cmd_status(args: argparse.Namespace) -> int:
    targets = ([backends.open_vm(v, args.connect) for v in args.vm] if args.vm
               else [VM(n, s) for n, s in launcher.known_vms()])
    results = await asyncio.gather(*(_status_one(vm) for vm in targets), return_exceptions=True)
    rows: list[dict[str, Any]] = []
    failed = 0
    for name, res in zip((vm.name for vm in targets), results):
        if isinstance(res, HvError):
            failed += 1
            print(f"hv: error: {res}", file=sys.stderr)
            rows.append({"vm": name, "error": str(res)})
        elif isinstance(res, BaseException):
            raise res
        else:
            rows.append(res)
    if args.json:
        print(json.dumps({"vms": rows}, indent=1))
    elif not targets:
        print("no VMs known to hv (launch some with scripts/run_guests.sh, or `hv attach NAME SOCKET`)")
    else:
        header = ["VM", "PID", "ACCEL", "STATE", "MAX", "BALLOON", "GUEST-TOTAL", "GUEST-FREE",
                  "GUEST-AVAIL", "HOST-RSS", "HOST-SWAP", "KSM"]
        out: list[list[object]] = []
        for r in rows:
            if "error" in r:
                out.append([r["vm"], None, None, "unreachable"] + [None] * 8)
                continue
            g: dict[str, Any] = r["guest"] or {}
            run_state = r["run_state"]
            if r.get("managed_by"):
                run_state = f"{run_state} (hv run {r['managed_by']['hv_run_pid']})"
            out.append([r["vm"], r["pid"], r["accel"], run_state, _size(r["max_bytes"]),
                        _size(r["balloon_bytes"]), _size(g.get("total_bytes")),
                        _size(g.get("free_bytes")), _size(g.get("available_bytes")),
                        _size(r["host_resident_bytes"]), _size(r["host_swap_bytes"]),
                        r.get("ksm")])
        print(table(out, header))
        for line in backends.describe_lines(rows):
            print(line)
    return 1 if failed else 0


# -- balloon, pause, resume ------------------------------------------------------------
async def cmd_balloon(args: argparse.Namespace) -> int:
    target = _parse_target(args.size)
    # Every argument is checked before anything changes.
    if args.wait is not None and not (math.isfinite(args.wait) and args.wait >= 0):
        raise UsageError(f"--wait must be a number of seconds >= 0, not {args.wait:g}")
    async with backends.open_vm(args.vm, args.connect) as vm:
        name = vm.name
        await vm.set_balloon(target, force=args.force)
        if args.wait is not None:
            actual = await vm.wait_balloon(target, args.wait)
            print(f"{name}: balloon at {format_size(actual)} (target {format_size(target)})")
        else:
            print(f"{name}: balloon target set to {format_size(target)}")
    return 0


async def cmd_pause(args: argparse.Namespace) -> int:
    async with backends.open_vm(args.vm, args.connect) as vm:
        name = vm.name
        await (vm.pause() if args.command == "pause" else vm.resume())
        print(f"{name}: {await vm.status()}")
    return 0


# -- launch, stop, attach ------------------------------------------------------------
def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param takes KEY=VALUE, not {pair!r}")
        out[key.removeprefix("hv.")] = value
    return out


# Guests one `hv launch` starts, at most: each is a QEMU process on this host, and a
# count beyond this is a typo, not a test fleet.
MAX_LAUNCH = 256


async def cmd_launch(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_LAUNCH:
        raise UsageError(f"--count must be between 1 and {MAX_LAUNCH}")
    # Every argument is checked before the accelerator probe prints anything.
    mem = launcher.check_memory(_parse_target(args.mem))
    for i in range(1, args.count + 1):
        launcher.check_name(f"{args.prefix}{i}")
    params = _params(args.param)
    initrd = disk = None
    if args.image == "debian":
        initrd, disk = (str(p) for p in paths.debian_image())
    verdict = accel_mod.choose()
    if verdict.accel != "kvm":
        print(f"hv: notice: {verdict.reason}", file=sys.stderr)
    rows: list[list[object]] = []
    for i in range(1, args.count + 1):
        spec = launcher.GuestSpec(
            name=f"{args.prefix}{i}", mem_bytes=mem, workload=args.workload, params=params,
            accel=verdict.accel, deflate_on_oom=args.deflate_on_oom,
            free_page_reporting=args.free_page_reporting, initrd=initrd, disk=disk)
        try:
            vm = await launcher.launch(spec)
        except HvError:
            if rows:  # nothing is lost: say what is running before the error line
                print(table(rows, ["VM", "PID", "ACCEL", "MEM", "WORKLOAD", "QMP", "CONSOLE"]))
            raise
        rows.append([spec.name, vm.info.pid, vm.info.accel, format_size(mem), spec.workload,
                     vm.socket_path, launcher.console_log(spec.name)])
        await vm.detach()
    print(table(rows, ["VM", "PID", "ACCEL", "MEM", "WORKLOAD", "QMP", "CONSOLE"]))
    return 0


async def cmd_stop(args: argparse.Namespace) -> int:
    names = [n for n, _ in launcher.known_vms()] if args.all else args.vm
    if not names:
        raise UsageError("name the VMs to stop, or use --all")
    for name in names:
        launcher.socket_of(name)  # refuse unknown names before stopping anything
    for name in names:
        print(f"{name}: {await launcher.stop(name)}")
    return 0


async def cmd_attach(args: argparse.Namespace) -> int:
    vm = await launcher.attach_external(launcher.check_name(args.name), args.socket)
    info = vm.info
    await vm.detach()
    print(f"{args.name}: attached (pid {info.pid}, {info.accel}, {format_size(info.ram_bytes)})")
    return 0


async def cmd_accel(args: argparse.Namespace) -> int:
    verdict = await asyncio.to_thread(accel_mod.choose, args.reprobe)
    print(f"{verdict.accel}: {verdict.reason}")
    return 0


async def cmd_doctor(args: argparse.Namespace) -> int:
    from hv.host import doctor
    checks = await asyncio.to_thread(doctor.run_checks)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=1))
    else:
        print(table([[c.name, c.verdict, c.reason] for c in checks], ["CHECK", "VERDICT", "WHY"]))
    return 1 if any(c.verdict == "fail" for c in checks) else 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hv", description="Memory manager for QEMU/KVM virtual machines "
                "(ballooning, page sharing, shares and idle tax, after VMware ESX Server).")
    p.add_argument("--version", action="version", version=f"hv {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("doctor", help="check every capability hv relies on")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("status", help="table of VMs: balloon, guest and host memory")
    s.add_argument("vm", nargs="*", help="VM names, QMP socket paths or libvirt:DOMAIN "
                   "(default: all known)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("balloon", help="set a VM's balloon target (its memory size)")
    s.add_argument("vm")
    s.add_argument("size", help="target guest memory, e.g. 128M")
    s.add_argument("--wait", type=float, nargs="?", const=60.0, metavar="SECONDS",
                   help="wait until the balloon reaches the target (default 60 s)")
    s.add_argument("--force", action="store_true",
                   help="skip the check against the guest's own use (never the safe floor)")
    s.set_defaults(func=cmd_balloon)

    for verb in ("pause", "resume"):
        s = sub.add_parser(verb, help=f"{verb} a VM's vCPUs")
        s.add_argument("vm")
        s.set_defaults(func=cmd_pause)

    s = sub.add_parser("launch", help="launch test guests from the hv guest image")
    s.add_argument("-n", "--count", type=int, default=2)
    s.add_argument("-m", "--mem", default="256M")
    s.add_argument("-w", "--workload", default="idle", choices=launcher.WORKLOADS)
    s.add_argument("-p", "--prefix", default="g")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="workload parameter passed as hv.KEY=VALUE on the kernel command line")
    s.add_argument("--image", choices=("initramfs", "debian"), default="initramfs",
                   help="the hv initramfs (default), or the Debian root file system built by "
                   "scripts/setup.sh --with-debian, booted to multi-user from a virtio disk")
    s.add_argument("--deflate-on-oom", action="store_true")
    s.add_argument("--free-page-reporting", action="store_true")
    s.set_defaults(func=cmd_launch)

    s = sub.add_parser("stop", help="stop guests hv launched (forget attached ones)")
    s.add_argument("vm", nargs="*")
    s.add_argument("--all", action="store_true")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("attach", help="manage a VM hv did not start, by its QMP socket")
    s.add_argument("name")
    s.add_argument("socket")
    s.set_defaults(func=cmd_attach)

    s = sub.add_parser("accel", help="which accelerator hv uses here, and why")
    s.add_argument("--reprobe", action="store_true")
    s.set_defaults(func=cmd_accel)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    backends.add_connect_option(p, sub)
    return p


class Terminated(Exception):
    """SIGTERM reached a command: it was cancelled and its cleanup ran."""


async def _cancelled_by_sigterm(work: Coroutine[Any, Any, int]) -> int:
    """Run a command so that SIGTERM cancels it as ^C does: its ``finally`` blocks and
    context managers run (guests stopped, KSM and swap restored) before hv exits.
    ``hv run`` installs its own handler for the daemon's orderly stop."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    termed = False

    def on_term() -> None:
        nonlocal termed
        termed = True
        task.cancel()
    loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        return await work
    except asyncio.CancelledError:
        if termed:
            raise Terminated() from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.func
        return asyncio.run(_cancelled_by_sigterm(handler(args)))
    except Terminated:
        print("hv: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except QMPBusy as exc:
        from hv.published import running_status
        snapshot = running_status()
        hint = (f"; `hv run` (pid {snapshot['pid']}) manages its VMs: stop it first"
                if snapshot else "")
        print(f"hv: error: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except HvError as exc:
        print(f"hv: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hv: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"hv: error: {exc.strerror or exc}"
              + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
