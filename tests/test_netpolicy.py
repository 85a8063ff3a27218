"""streamcap.netpolicy: the Host and Origin rules, on header values a browser or an attacker sends."""

from __future__ import annotations

import pytest

from streamcap.netpolicy import (
    HostPolicy,
    OriginPolicy,
    host_names_problem,
    host_of,
    is_ip_literal,
    is_loopback,
    is_wildcard,
    normalise_origin,
)


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1")
    assert is_loopback("localhost") and is_loopback("[::1]") and is_loopback("LocalHost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    assert not is_loopback("192.168.1.5") and not is_loopback("myhost.lan")
    assert is_loopback(" localhost ") and is_loopback(" 127.0.0.1")


def test_wildcards_and_ip_literals() -> None:
    assert all(is_wildcard(h) for h in ("0.0.0.0", "::", "", "[::]", "::0", " 0.0.0.0"))
    assert not is_wildcard("127.0.0.1") and not is_wildcard("host.lan")
    assert is_ip_literal("10.1.2.3") and is_ip_literal("[fe80::1]") and is_ip_literal("::1")
    assert not is_ip_literal("localhost") and not is_ip_literal("10.1.2")


@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:8080", "127.0.0.1"), ("Example.LAN", "example.lan"), ("example.lan.:80", "example.lan"),
    ("[::1]:8765", "::1"), ("[::1]", "::1"), ("localhost", "localhost"),
])
def test_host_of_well_formed(header: str, host: str) -> None:
    assert host_of(header) == host


@pytest.mark.parametrize("header", [
    "", " ", "a b", "evil/x", "user@host", "host:port", "host:123456", "[::1", "[nope]:80",
    "host:80:80", "::1", "h\\x", "?", "#",
])
def test_host_of_malformed(header: str) -> None:
    assert host_of(header) is None


def test_host_policy_refuses_unknown_names() -> None:
    """A rebinding page's name is refused; addresses, localhost and configured names pass."""
    policy = HostPolicy.for_listener("127.0.0.1")
    assert policy.allows("127.0.0.1:8080") and policy.allows("[::1]:8080")
    assert policy.allows("localhost:8080") and policy.allows("app.localhost")
    assert policy.allows(None)
    assert not policy.allows("evil.example:8080") and not policy.allows("localhost.evil.example")
    assert not policy.allows("not a host")


def test_host_policy_names_from_bind_and_config() -> None:
    policy = HostPolicy.for_listener("Monitor.lan", ["Kitchen.Local.", " "])
    assert policy.names == frozenset({"monitor.lan", "kitchen.local"})
    assert policy.allows("monitor.lan:8080") and policy.allows("KITCHEN.local")
    assert not policy.allows("other.lan")
    assert HostPolicy.for_listener("0.0.0.0").names == frozenset()
    assert HostPolicy.for_listener("192.168.1.5").names == frozenset()


@pytest.mark.parametrize(("origin", "normal"), [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"), ("HTTPS://Example.com:443", "https://example.com"),
    ("http://example.com:80/", "http://example.com"), ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_normalise_origin(origin: str, normal: str) -> None:
    assert normalise_origin(origin) == normal


@pytest.mark.parametrize("origin", ["null", "", "file:///x", "http://", "http://h/path", "http://u:p@h",
                                    "http://h:99999", "http://h?x=1"])
def test_normalise_origin_refuses_non_origins(origin: str) -> None:
    assert normalise_origin(origin) is None


def test_origin_same_host_by_default() -> None:
    """The live page (HTTP port) may open the feed (WebSocket port) on the same host, or a
    loopback page a loopback address (both name this machine); other pages not."""
    policy = OriginPolicy.from_config(None)
    assert policy.allows(None, "127.0.0.1:8765")  # not a browser
    assert policy.allows("http://127.0.0.1:8080", "127.0.0.1:8765")
    assert policy.allows("http://LOCALHOST:8080", "localhost:8765")
    assert policy.allows("http://localhost:8080", "127.0.0.1:8765")
    assert policy.allows("http://[::1]:8080", "localhost:8765")
    assert policy.allows("http://monitor.lan:8080", "Monitor.LAN:8765")
    assert not policy.allows("https://evil.example", "127.0.0.1:8765")
    assert not policy.allows("http://localhost:8080", "192.168.1.5:8765")
    assert not policy.allows("http://192.168.1.5:8080", "localhost:8765")
    assert not policy.allows("null", "127.0.0.1:8765")
    assert not policy.allows("http://127.0.0.1:8080", None)
    assert not policy.allows("http://127.0.0.1:8080", "not a host")


def test_origin_allow_list_replaces_same_host_and_is_normalised_once() -> None:
    policy = OriginPolicy.from_config(["https://dash.example:443", "HTTP://127.0.0.1:3000/"])
    assert policy.allowed == frozenset({"https://dash.example", "http://127.0.0.1:3000"})
    assert policy.allows("https://dash.example", "127.0.0.1:8765")
    assert policy.allows("http://127.0.0.1:3000", "127.0.0.1:8765")
    assert not policy.allows("http://127.0.0.1:8080", "127.0.0.1:8765")
    assert not policy.allows("http://localhost:8080", "127.0.0.1:8765")  # no loopback rule
    assert not policy.allows("https://evil.example", "127.0.0.1:8765")
    assert OriginPolicy.from_config([]).allowed == frozenset()


@pytest.mark.parametrize("name", ["streamcap.lan", "Streamcap.Home.Example.", "a_b-c.lan",
                                  "192.168.1.5", "localhost", "xn--kse-qla.lan"])
def test_host_names_accepted(name: str) -> None:
    assert host_names_problem([name]) is None


@pytest.mark.parametrize("name", ["", " ", "http://x.lan", "x.lan:80", "x.lan/path", "[::1]",
                                  "k\u00e4se.lan", "x.lan\n", "a..b", "-x.lan", "a" * 64 + ".lan",
                                  "a." * 127 + "lan"])
def test_host_names_refused_without_quoting_them(name: str) -> None:
    """One rule for http.allowed_hosts and a WebSocket sink's allowed_hosts: ASCII DNS
    names (a Unicode name never matches a Host header: browsers send the xn-- form)."""
    problem = host_names_problem(["ok.lan", name])
    assert problem is not None and "host name without scheme, port or path" in problem
    assert name.strip() == "" or name not in problem
