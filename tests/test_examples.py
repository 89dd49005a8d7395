"""The example a newcomer copies first: it passes `portway check` and reaches no real host."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

from tests.portway_process import PORTWAY

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "portway.yml"

#: Addresses an example may name: documentation ranges (RFC 5737, RFC 3849) and loopback.
SAFE = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "127.0.0.0/8", "::1/128")
]


def test_example_passes_check() -> None:
    done = subprocess.run([*PORTWAY, "check", "-c", str(EXAMPLE)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.endswith(f"{EXAMPLE}: 3 route(s), OK\n")


def test_example_names_only_documentation_and_loopback_addresses() -> None:
    text = EXAMPLE.read_text()
    candidates = re.findall(r"(?<![\w:.])(\d+\.\d+\.\d+\.\d+|[0-9a-f]*:[0-9a-f:]*:[0-9a-f]*)(?:/\d+)?", text)
    addresses = []
    for candidate in candidates:
        try:
            addresses.append(ipaddress.ip_address(candidate))
        except ValueError:
            continue  # e.g. a port spec like 2222:22
    assert len(addresses) >= 5  # the scan does find the addresses
    unsafe = [str(a) for a in addresses if not any(a in net for net in SAFE)]
    assert unsafe == []
    names = re.findall(r"host: ([a-z][\w.-]*)", text)
    assert all(n == "localhost" or n.endswith("example.com") for n in names), names
