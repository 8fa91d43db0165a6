"""Free ports for test servers: distinct, and of this worker's slice when
pytest-xdist runs several workers side by side (``TIDSTORAGE_PORT_SLICE``)."""

from __future__ import annotations

import socket

from tidstorage.demo.cluster import PORT_SLICE_ENV, free_port, free_ports


def test_ports_are_free_and_distinct():
    ports = free_ports(20)
    assert len(set(ports)) == 20
    for port in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: nothing holds it


def test_each_worker_takes_its_own_slice(monkeypatch):
    seen = {}
    for k in (0, 1, 2):
        monkeypatch.setenv(PORT_SLICE_ENV, f"{k}/3")
        seen[k] = set(free_ports(15)) | {free_port()}
        assert all((p >> 1) % 3 == k for p in seen[k]), (k, seen[k])
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])


def test_a_bad_slice_means_no_slice(monkeypatch):
    for text in ("", "x", "1/0", "1/2/3"):
        monkeypatch.setenv(PORT_SLICE_ENV, text)
        assert len(set(free_ports(5))) == 5
