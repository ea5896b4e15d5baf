"""The pure parts of the libvirt backend: naming, error mapping, domain XML and policy
metadata, the TOML keys, and which domains ``manage = "all"`` picks up."""

from __future__ import annotations

import pytest

from hv.daemon.domains import Discovery, discovered_config
from hv.errors import ConfigError, LibvirtError, UsageError, VMError, VMGone, VMNotFound
from hv.libvirt import errors as lverr
from hv.libvirt.domxml import POLICY_NS, XmlPolicy, merge_policy, parse_domain_xml
from hv.libvirt.naming import DEFAULT_URI, DomainRef, parse_ref, uri_of
from hv.policy.config import parse_config
from hv.units import GiB, MiB

HOST = 24 * GiB


# -- naming ---------------------------------------------------------------------------

def test_ref_default_uri_and_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HV_LIBVIRT_URI", raising=False)
    ref = parse_ref("libvirt:web")
    assert ref == DomainRef("web", DEFAULT_URI)
    assert ref.name == ref.address == "libvirt:web"


def test_ref_uri_from_option_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HV_LIBVIRT_URI", "qemu+ssh://h/system")
    assert parse_ref("libvirt:web").uri == "qemu+ssh://h/system"
    assert parse_ref("libvirt:web", "qemu:///session").uri == "qemu:///session"
    # An address carries a non-default URI, and reads back to the same domain.
    ref = parse_ref("libvirt:web")
    assert ref.address == "libvirt:web#qemu+ssh://h/system"
    assert parse_ref(ref.address, "ignored:///") == ref


@pytest.mark.parametrize("arg", ["libvirt:", "libvirt:a/b", "libvirt:a b", "web"])
def test_ref_refuses_bad_names(arg: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(arg)


def test_uri_with_space_refused() -> None:
    with pytest.raises(UsageError):
        uri_of("qemu:///system x")


# -- errors ---------------------------------------------------------------------------

def test_error_codes_match_the_binding() -> None:
    import libvirt  # type: ignore[import-untyped]
    for name in ("VIR_ERR_NO_SUPPORT", "VIR_ERR_NO_CONNECT", "VIR_ERR_OPERATION_DENIED",
                 "VIR_ERR_SYSTEM_ERROR", "VIR_ERR_RPC", "VIR_ERR_NO_DOMAIN",
                 "VIR_ERR_AUTH_FAILED", "VIR_ERR_OPERATION_INVALID",
                 "VIR_ERR_CONFIG_UNSUPPORTED", "VIR_ERR_AUTH_CANCELLED",
                 "VIR_ERR_OPERATION_UNSUPPORTED", "VIR_ERR_ACCESS_DENIED",
                 "VIR_ERR_AUTH_UNAVAILABLE"):
        assert getattr(lverr, name) == getattr(libvirt, name), name


@pytest.mark.parametrize("code, message, kind, needle", [
    (42, "Domain not found: no domain with matching name 'x'", VMNotFound, "no such libvirt domain"),
    (55, "Requested operation is not valid: domain is not running", VMGone, "shut off"),
    (55, "Requested operation is not valid: domain is already running", LibvirtError, "already"),
    (88, "access denied: 'x'", LibvirtError, "permission denied"),
    (38, "Cannot write data: Broken pipe", LibvirtError, "is it running?"),
    (84, "Operation not supported: stats period", LibvirtError, "not supported"),
    (1, "internal error: one\nsecond line", LibvirtError, "internal error: one"),
    (None, "", LibvirtError, "no message from libvirt"),
])
def test_from_libvirt(code: int | None, message: str, kind: type, needle: str) -> None:
    err = lverr.from_libvirt("libvirt:x", "suspend", code, message)
    assert type(err) is kind and isinstance(err, VMError)
    assert needle in str(err) and "\n" not in str(err)


def test_connect_errors() -> None:
    down = lverr.connect_error("libvirt:x", "qemu:///system", 38,
                               "Failed to connect socket to '/run/libvirt/libvirt-sock'")
    assert "is libvirtd running?" in str(down) and isinstance(down, LibvirtError)
    denied = lverr.connect_error("libvirt:x", "qemu:///system", 45, "authentication failed")
    assert "permission denied" in str(denied)


# -- domain XML -----------------------------------------------------------------------

def xml(devices: str = "<memballoon model='virtio'><stats period='2'/></memballoon>",
        extra: str = "", kind: str = "qemu") -> str:
    return (f"<domain type='{kind}'><name>d</name><memory unit='KiB'>262144</memory>"
            f"{extra}<devices>{devices}</devices></domain>")


def test_parse_domain_xml_facts() -> None:
    d = parse_domain_xml(xml(), "libvirt:d")
    assert (d.accel, d.memory_bytes, d.balloon_model, d.stats_period_s) == ("tcg", 256 * MiB,
                                                                          "virtio", 2)
    assert not d.deflate_on_oom and not d.nosharepages and d.policy == XmlPolicy()
    d = parse_domain_xml(xml("<memballoon model='virtio' deflate-on-oom='on'/>",
                             "<memoryBacking><nosharepages/></memoryBacking>", "kvm"), "x")
    assert d.accel == "kvm" and d.stats_period_s == 0 and d.deflate_on_oom and d.nosharepages
    assert parse_domain_xml(xml("<memballoon model='none'/>"), "x").balloon_model is None
    assert parse_domain_xml(xml(""), "x").balloon_model is None


def test_parse_policy_metadata() -> None:
    meta = (f"<metadata><hv:policy xmlns:hv='{POLICY_NS}' min='128M' max='1G' shares='2000'/>"
            "<other xmlns='urn:x'/></metadata>")
    assert parse_domain_xml(xml(extra=meta), "x").policy == XmlPolicy(128 * MiB, GiB, 2000)
    # Another namespace's <policy> is not hv's.
    foreign = "<metadata><p:policy xmlns:p='urn:other' min='1G'/></metadata>"
    assert parse_domain_xml(xml(extra=foreign), "x").policy == XmlPolicy()


@pytest.mark.parametrize("attrs, needle", [
    ("min='lots'", "hv:policy min"), ("shares='-1'", "shares"), ("shares='1.5'", "shares"),
    ("max='0'", "more than 0"), ("mni='1G'", "unknown attribute 'mni'")])
def test_bad_policy_metadata(attrs: str, needle: str) -> None:
    meta = f"<metadata><hv:policy xmlns:hv='{POLICY_NS}' {attrs}/></metadata>"
    with pytest.raises(ConfigError, match=needle):
        parse_domain_xml(xml(extra=meta), "libvirt:d")


def test_bad_domain_xml() -> None:
    with pytest.raises(VMError):
        parse_domain_xml("<domain", "x")
    with pytest.raises(VMError):
        parse_domain_xml("<domain type='qemu'/>", "x")


# -- policy merge ---------------------------------------------------------------------

def test_merge_toml_wins_then_domain_then_default() -> None:
    p = merge_policy("vm.w", XmlPolicy(min_bytes=200 * MiB), XmlPolicy(100 * MiB, 400 * MiB, 3000),
                     96 * MiB, 512 * MiB, 1000)
    assert (p.min_bytes, p.max_bytes, p.shares) == (200 * MiB, 400 * MiB, 3000)
    assert p.source == {"min": "config", "max": "domain", "shares": "domain"}
    p = merge_policy("vm.w", XmlPolicy(), XmlPolicy(), 96 * MiB, 512 * MiB, 1000)
    assert (p.min_bytes, p.max_bytes, p.shares) == (96 * MiB, 512 * MiB, 1000)
    assert set(p.source.values()) == {"default"}


def test_merge_refuses_min_above_max_naming_sources() -> None:
    with pytest.raises(ConfigError, match=r"from config.*from domain"):
        merge_policy("vm.w", XmlPolicy(min_bytes=300 * MiB), XmlPolicy(max_bytes=200 * MiB),
                     96 * MiB, 512 * MiB, 1000)


# -- TOML -----------------------------------------------------------------------------

def test_config_libvirt_vm_and_table() -> None:
    c = parse_config('[libvirt]\nuri = "qemu:///system"\nmanage = "all"\n'
                     '[vm.web]\nlibvirt = "web"\nshares = 2000\n', "t.toml", HOST)
    assert c.libvirt.manage_all and c.libvirt.uri == "qemu:///system"
    [vm] = c.vms
    assert vm.libvirt == "web" and vm.socket is None and vm.given == frozenset({"shares"})
    assert parse_config("[libvirt]\n", "t", HOST).libvirt.manage_all is False


@pytest.mark.parametrize("text, needle", [
    ('[vm.w]\nlibvirt = "w"\nsocket = "/s"\nmin = "1G"\n', "not both"),
    ('[vm.w]\nsocket = "/s"\nuri = "qemu:///system"\nmin = "1G"\n', "libvirt domain only"),
    ('[vm.w]\nlibvirt = "a/b"\n', "bad domain name"),
    ('[libvirt]\nmanage = "some"\n', "libvirt.manage"),
    ('[libvirt]\nurl = "x"\n', "unknown key"),
    ('[vm.a]\nlibvirt = "d"\n[vm.b]\nlibvirt = "d"\n', "already the libvirt of vm.a"),
])
def test_config_libvirt_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(text, "t.toml", HOST)


# -- manage = "all" -------------------------------------------------------------------

def test_discovery_new_refused_and_retried_after_restart() -> None:
    d = Discovery()
    assert d.new(["a", "b", "c"], taken={"a"}, configured={"c"}) == ["b"]
    assert "c" in d.refused  # a [vm.c] of another VM has the name: said once
    d.refused["b"] = "no balloon"
    assert d.new(["a", "b", "c"], taken={"a"}, configured={"c"}) == []
    assert d.new(["a"], taken={"a"}, configured={"c"}) == []  # b and c stopped: forgotten
    assert d.new(["a", "b"], taken={"a"}, configured={"c"}) == ["b"]  # b is back: tried again
    cfg = discovered_config("b")
    assert cfg.libvirt == "b" and cfg.given == frozenset()


# -- the discovery's connection ----------------------------------------------------------

class _FakeLibvirtError(Exception):
    def get_error_code(self) -> int:
        return lverr.VIR_ERR_SYSTEM_ERROR


class _FakeDomain:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


class _FakeConn:
    def __init__(self, names: list[str], dead: bool = False) -> None:
        self.names, self.dead, self.closed = names, dead, False

    def listAllDomains(self, flags: int) -> list[_FakeDomain]:  # noqa: N802 - libvirt's name
        if self.dead:
            raise _FakeLibvirtError("internal error: client socket is closed")
        return [_FakeDomain(n) for n in self.names]

    def close(self) -> None:
        self.closed = True


def test_lister_keeps_one_connection_and_reopens_a_dead_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from hv.libvirt import domain as lvdom
    fake = SimpleNamespace(libvirtError=_FakeLibvirtError, VIR_CONNECT_LIST_DOMAINS_ACTIVE=1)
    monkeypatch.setattr(lvdom, "binding", lambda: fake)
    opened: list[_FakeConn] = []

    def open_connection(name: str, uri: str) -> _FakeConn:
        opened.append(_FakeConn(["b", "a"]))
        return opened[-1]
    monkeypatch.setattr(lvdom, "open_connection", open_connection)
    lister = lvdom.Lister("qemu:///system")
    assert lister.active() == ["a", "b"] and lister.active() == ["a", "b"]
    assert len(opened) == 1  # kept from call to call
    opened[0].dead = True  # libvirtd restarted
    assert lister.active() == ["a", "b"]
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed
    # Both the old and a new connection failing: one LibvirtError naming libvirtd.
    monkeypatch.setattr(lvdom, "open_connection",
                        lambda name, uri: _FakeConn([], dead=True))
    opened[1].dead = True
    with pytest.raises(LibvirtError, match="listing domains: lost libvirtd"):
        lister.active()
    lister.close()
