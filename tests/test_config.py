"""Loading config files: values as written, and one located error for every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from portway.addr import PortSpec
from portway.config.load import load_config_file, load_config_text
from portway.config.schema import RouteConfig, listeners_overlap
from portway.config.yamlload import load_yaml
from portway.errors import ConfigError

SEED = """\
routes:
  ssh-proxy:
    scheme: tcp4        # tcp, tcp4, tcp6, udp, udp4, udp6 (default tcp)
    host: 10.0.0.3      # target host: name, IPv4 or IPv6; default localhost
    bind: 0.0.0.0       # listen address; default all addresses of the scheme's family
    port: 2222:22       # [listening:]target; listening 0 or omitted = any free port
  dns-proxy:
    scheme: udp4
    port: 5353:53
  dns-by-name:
    scheme: udp
    port: 5354:domain   # a named target port is looked up as a service name (/etc/services)
"""


def test_seed_config_means_what_it_says() -> None:
    config = load_config_text(SEED, "seed.yml")
    ssh = config.routes["ssh-proxy"]
    assert ssh.port == PortSpec(2222, 22)  # not the base-60 integer 133342
    assert (ssh.scheme, ssh.host, ssh.bind) == ("tcp4", "10.0.0.3", "0.0.0.0")
    dns = config.routes["dns-proxy"]
    assert dns.port == PortSpec(5353, 53)
    assert dns.host == "localhost"
    assert dns.listen_host() == "0.0.0.0"
    assert config.routes["dns-by-name"].port == PortSpec(5354, 53)
    assert config.routes["dns-by-name"].listen_host() == "::"  # dual-stack


def test_defaults() -> None:
    route = load_config_text("routes:\n  a:\n    port: 22\n", "f.yml").routes["a"]
    assert route.scheme == "tcp"
    assert route.port == PortSpec(0, 22)
    assert route.udp_idle_timeout == 300
    assert route.connect_timeout == 5
    assert route.idle_timeout == 0
    assert route.half_close is True
    assert route.udp_max_sessions == 10_000


def test_yaml_values_are_read_as_written() -> None:
    doc = load_yaml("a: 2222:22\nb: NO\nc: 0o17\nd: ~\ne: 1_000\nf: 'x'\n", "t.yml")
    assert doc.data == {"a": "2222:22", "b": "NO", "c": "0o17", "d": None, "e": "1_000", "f": "x"}


def test_options_parse() -> None:
    text = (
        "routes:\n  a:\n    scheme: udp\n    port: 9000:53\n    udp_idle_timeout: 30s\n"
        "    udp_max_sessions: 100\n"
        "  b:\n    port: 9001:22\n    connect_timeout: 500ms\n    idle_timeout: 1h\n"
        "    half_close: false\n"
    )
    config = load_config_text(text, "f.yml")
    assert config.routes["a"].udp_idle_timeout == 30
    assert config.routes["a"].udp_max_sessions == 100
    assert config.routes["b"].connect_timeout == 0.5
    assert config.routes["b"].idle_timeout == 3600
    assert config.routes["b"].half_close is False


def test_yaml_anchors_and_merge_keys() -> None:
    text = "base: &b\n  scheme: tcp4\n  host: 127.0.0.1\nroutes:\n  a:\n    <<: *b\n    port: 9000:22\n"
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        load_config_text(text, "f.yml")
    text = "routes:\n  a: &b\n    scheme: tcp4\n    port: 9000:22\n  b:\n    <<: *b\n    port: 9001:22\n"
    config = load_config_text(text, "f.yml")
    assert config.routes["b"].scheme == "tcp4"
    assert config.routes["b"].port == PortSpec(9001, 22)


# Every class of bad input: (yaml text, the exact one-line message).
BAD = [
    pytest.param(
        "routes:\n  ssh:\n    prot: 2222:22\n",
        "f.yml:3:11, route 'ssh', field 'prot': unknown key 'prot' (did you mean 'port'?)",
        id="unknown-key",
    ),
    pytest.param(
        "rutes: {}\n",
        "f.yml:1:8, field 'rutes': unknown key 'rutes' (did you mean 'routes'?)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "routes:\n  ssh:\n    scheme: sctp\n    port: 22\n",
        "f.yml:3:13, route 'ssh', field 'scheme': unknown scheme 'sctp' "
        "(expected one of: tcp, tcp4, tcp6, udp, udp4, udp6)",
        id="unknown-scheme",
    ),
    pytest.param(
        "routes:\n  ssh:\n    port: 1:2:3\n",
        "f.yml:3:11, route 'ssh', field 'port': "
        "malformed port '1:2:3' (expected [listening:]target, e.g. 2222:22)",
        id="malformed-port",
    ),
    pytest.param(
        "routes:\n  ssh:\n    port: 70000:22\n",
        "f.yml:3:11, route 'ssh', field 'port': port 70000 out of range 0-65535",
        id="port-out-of-range",
    ),
    pytest.param(
        "routes:\n  dns:\n    scheme: udp\n    port: 53:nosuchservice\n",
        "f.yml:4:11, route 'dns', field 'port': unknown service name 'nosuchservice' for udp",
        id="unknown-service",
    ),
    pytest.param(
        "routes:\n  a:\n    port: 9000:22\n  b:\n    port: 9000:80\n",
        "f.yml:5:11, route 'b', field 'port': listens on the same address and protocol as route 'a' "
        "(:: port 9000/tcp)",
        id="same-listen-address",
    ),
    pytest.param(
        "routes:\n  a:\n    scheme: tcp4\n    port: 9000:22\n  b:\n    scheme: tcp4\n    bind: 127.0.0.1\n"
        "    port: 9000:80\n",
        "f.yml:8:11, route 'b', field 'port': listens on the same address and protocol as route 'a' "
        "(127.0.0.1 port 9000/tcp)",
        id="wildcard-covers-specific",
    ),
    pytest.param(
        "routes:\n  a: {port: 22\n",
        "f.yml:3:1: not valid YAML: "
        "while parsing a flow mapping: expected ',' or '}', but got '<stream end>'",
        id="not-yaml",
    ),
    pytest.param(
        "routes:\n  a:\n    port: 22\n    port: 23\n",
        "f.yml:4:5: duplicate key 'port'",
        id="duplicate-key",
    ),
    pytest.param(
        "routes:\n  a:\n    host: example.org\n",
        "f.yml:3:5, route 'a', field 'port': is required",
        id="missing-port",
    ),
    pytest.param(
        "routes:\n  a:\n    scheme: tcp4\n    host: '::1'\n    port: 22\n",
        "f.yml:4:11, route 'a', field 'host': ::1 is not an IPv4 address, which tcp4 pins",
        id="family-pinned",
    ),
    pytest.param(
        "routes:\n  a:\n    host: 127.0.0.1:22\n    port: 2222\n",
        "f.yml:3:11, route 'a', field 'host': '127.0.0.1:22' includes a port: "
        "write host: 127.0.0.1 and put the port (22) in `port:`",
        id="port-in-host-v4",
    ),
    pytest.param(
        "routes:\n  a:\n    host: '[::1]:22'\n    port: 2222\n",
        "f.yml:3:11, route 'a', field 'host': '[::1]:22' includes a port: "
        "write host: ::1 and put the port (22) in `port:`",
        id="port-in-host-v6",
    ),
    pytest.param(
        "routes:\n  a:\n    host: db.example.com:5432\n    port: 5432\n",
        "f.yml:3:11, route 'a', field 'host': 'db.example.com:5432' includes a port: "
        "write host: db.example.com and put the port (5432) in `port:`",
        id="port-in-host-name",
    ),
    pytest.param(
        "routes:\n  a:\n    bind: localhost\n    port: 22\n",
        "f.yml:3:11, route 'a', field 'bind': bind 'localhost' is not an IP address",
        id="bind-not-ip",
    ),
    pytest.param(
        "routes:\n  a:\n    port: 22\n    connect_timeout: soon\n",
        "f.yml:4:22, route 'a', field 'connect_timeout': malformed duration 'soon' "
        "(expected e.g. 500ms, 5s, 1m30s, 2h)",
        id="bad-duration",
    ),
    pytest.param(
        "routes:\n  a:\n    scheme: udp\n    port: 9001:53\n    half_close: false\n",
        "f.yml:3:5, route 'a': half_close is TCP only: a UDP route has no FIN to act on",
        id="half-close-on-udp",
    ),
    pytest.param(
        "routes:\n  a:\n    port: 22\n    half_close: maybe\n",
        "f.yml:4:17, route 'a', field 'half_close': "
        "Input should be a valid boolean, unable to interpret input",
        id="half-close-not-a-boolean",
    ),
    pytest.param(
        "workers: 0\n",
        "f.yml:1:10, field 'workers': 0 workers would serve nothing: use `auto` for one worker per CPU",
        id="zero-workers",
    ),
    pytest.param(
        "workers: ~\n",
        "f.yml:1:10, field 'workers': workers is a number of processes, or `auto` for one worker per CPU",
        id="null-workers",
    ),
    pytest.param(
        "- just\n- a list\n",
        "f.yml:1: the top level must be a mapping (e.g. `routes:`)",
        id="not-a-mapping",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_config(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "f.yml")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("host", ["::1", "[::1]", "2001:db8::1", "example.com", "192.0.2.1"])
def test_hosts_without_a_port_are_accepted(host: str) -> None:
    route = load_config_text(f"routes:\n  a:\n    host: '{host}'\n    port: 22\n", "f.yml").routes["a"]
    assert route.host == host.strip("[]")


@pytest.mark.parametrize(("written", "stored"), [("auto", None), ("AUTO", None), ("1", 1), ("4", 4)])
def test_workers(written: str, stored: int | None) -> None:
    assert load_config_text(f"workers: {written}\n", "f.yml").workers == stored


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yml: no such file"):
        load_config_file(tmp_path / "nope.yml")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config_file(tmp_path)


def test_empty_file_has_no_routes(tmp_path: Path) -> None:
    path = tmp_path / "empty.yml"
    path.write_text("")
    assert load_config_file(path).routes == {}


def _route(scheme: str, bind: str | None, port: str) -> RouteConfig:
    return RouteConfig.model_validate({"scheme": scheme, "bind": bind, "port": port})


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (("tcp", None, "9000:1"), ("tcp", None, "9000:2"), True),
        (("tcp", None, "9000:1"), ("udp", None, "9000:2"), False),  # tcp and udp ports are separate
        (("tcp4", "127.0.0.1", "9000:1"), ("tcp4", "127.0.0.2", "9000:2"), False),
        (("tcp4", "0.0.0.0", "9000:1"), ("tcp4", "127.0.0.2", "9000:2"), True),
        (("tcp6", "::", "9000:1"), ("tcp4", "127.0.0.1", "9000:2"), False),  # v6-only wildcard
        (("tcp", "::", "9000:1"), ("tcp4", "127.0.0.1", "9000:2"), True),  # dual-stack wildcard
        (("tcp", None, "0:1"), ("tcp", None, "0:2"), False),  # any free port: never a clash
    ],
)
def test_listeners_overlap(
    a: tuple[str, str | None, str], b: tuple[str, str | None, str], overlap: bool
) -> None:
    assert listeners_overlap(_route(*a), _route(*b)) is overlap
    assert listeners_overlap(_route(*b), _route(*a)) is overlap


@pytest.mark.parametrize(
    ("module", "must_not_import"),
    [
        ("portway.config.validate", ("portway.config.sources", "portway.config.load")),
        ("portway.config.sources", ("portway.config.load",)),
    ],
)
def test_loader_imports_flow_one_way(module: str, must_not_import: tuple[str, ...]) -> None:
    """validate <- sources <- load: no layer reaches up, so there is no cycle to import lazily around."""
    code = f"import sys, {module}; print([m for m in {must_not_import!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
