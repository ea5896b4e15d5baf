"""A socket that is not what it claims (issue 10, cases 2, 7 and 8): one line, non-zero exit.

The peers here are not QEMU (tests/functional/peers.py): a server that greets like
QMP but answers with the wrong shapes, one that sends garbage, a regular file and a
directory.  Every command that opens a VM meets the same checks, because every answer
hv reads goes through hv/qemu/answers.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import hv_cli
from tests.functional.hvrun import write_config
from tests.functional.peers import FakeQMP
from tests.functional.test_cli_errors import one_line_error

# Every command that attaches to a VM given by its socket.
COMMANDS = [("status", "{sock}"), ("pause", "{sock}"), ("balloon", "{sock}", "128M"),
            ("attach", "peer", "{sock}")]


def run_each(sock: Path) -> list[str]:
    """The one error line of each command against ``sock``."""
    return [one_line_error(hv_cli(*(a.format(sock=sock) for a in args), timeout_s=60))
            for args in COMMANDS]


@pytest.mark.parametrize("answers, command, field", [
    ({"query-memory-size-summary": {"base-memory": "lots"}}, "query-memory-size-summary",
     "'base-memory' is 'lots'"),
    ({"query-memory-size-summary": {"base-memory": -4096}}, "query-memory-size-summary",
     "'base-memory' is -4096"),
    ({"query-memory-size-summary": {}}, "query-memory-size-summary", "'base-memory' is missing"),
    ({"query-kvm": [1, 2]}, "query-kvm", "the answer (expected an object)"),
    ({"query-kvm": {"enabled": "yes"}}, "query-kvm", "'enabled' is 'yes'"),
    ({"qom-list": {"not": "a list"}}, "qom-list", "expected a list of objects"),
    ({"qom-list": [{"name": "balloon0"}]}, "qom-list", "'type' is missing"),
])
def test_malformed_answer_names_command_and_field(run_dir: Path, tmp_path: Path,
                                                  answers: dict[str, Any], command: str,
                                                  field: str) -> None:
    sock = tmp_path / "liar.sock"
    hmp = {"hmp:gpa2hva 0": "Host virtual address for 0x0 (pc.ram) is 0x7f0000000000",
           "hmp:info ramblock": "              Block Name    PSize              Offset"
                                "               Used              Total\n"
                                "                  pc.ram    4 KiB  0x0000000000000000 "
                                "0x0000000010000000 0x0000000010000000\n"}
    with FakeQMP(sock, {**hmp, **answers}):
        for err in run_each(sock):
            assert f"{command}: malformed answer:" in err and field in err, err
    assert not [p for p in run_dir.iterdir() if p.is_dir()], "a refused attach registered a VM"


def test_malformed_balloon_answers(run_dir: Path, tmp_path: Path) -> None:
    """A balloon device found, then answers about it of the wrong shape."""
    sock = tmp_path / "balloon.sock"
    hmp = {"hmp:gpa2hva 0": "Host virtual address for 0x0 (pc.ram) is 0x7f0000000000",
           "hmp:info ramblock": "  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 "
                                "0x0000000010000000\n"}
    balloon = {"qom-list": [{"name": "balloon0", "type": "child<virtio-balloon-pci>"}]}
    cases = [(("balloon", "128M", "--force"), {"qom-get": "maybe"},
              "qom-get: malformed answer: deflate-on-oom is 'maybe'"),
             (("status",), {"qom-get": False, "query-balloon": {"actual": 1.5}},
              "query-balloon: malformed answer: field 'actual' is 1.5")]
    for (command, *args), answers, message in cases:
        sock.unlink(missing_ok=True)
        with FakeQMP(sock, {**hmp, **balloon, **answers}):
            err = one_line_error(hv_cli(command, str(sock), *args))
            assert message in err, err


def test_not_a_socket_says_what_it_is(run_dir: Path, tmp_path: Path) -> None:
    regular = tmp_path / "notes.txt"
    regular.write_text("hello\n")
    folder = tmp_path / "folder.sock"
    folder.mkdir()
    for path, kind in ((regular, "is a regular file"), (folder, "is a directory")):
        for err in run_each(path):
            assert f"{kind}, not a QMP socket" in err, err
    config = write_config(tmp_path / "hv.toml", {"managed": "1G"},
                          {"g": {"socket": str(folder), "min": "128M"}})
    err = one_line_error(hv_cli("run", "--config", str(config)))
    assert "is a directory, not a QMP socket" in err


@pytest.mark.parametrize("greeting", [b"HTTP/1.1 400 Bad Request\r\n\r\n",
                                      b"\x00\xff\xfe\n", b'{"QMP": 5}\n'])
def test_garbage_server_is_one_line(run_dir: Path, tmp_path: Path, greeting: bytes) -> None:
    sock = tmp_path / "garbage.sock"
    with FakeQMP(sock, greeting=greeting):
        for err in run_each(sock):
            assert "does not speak QMP" in err, err
