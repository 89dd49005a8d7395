"""sdnotify.py against a fake NOTIFY_SOCKET: a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from portway import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_ready_reloading_stopping(notify_socket: socket.socket) -> None:
    assert sdnotify.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert sdnotify.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", notify_socket.recv(4096))
    assert sdnotify.ready("serving 3 routes")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 3 routes"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"portway-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_outside_systemd_and_on_errors_nothing_happens(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.stopping()
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert not sdnotify.ready()
