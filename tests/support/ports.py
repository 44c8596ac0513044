"""Loopback port allocation for the throwaway servers the tests start.

Tests must never collide with a developer's own PostgreSQL on 5432 or Vault on 8200,
nor with a second test run on the same machine, so every server gets a port that the
kernel has just reported free. That is inherently racy (another process may take the
port between our probe and the server's bind), so the launchers retry with a fresh port
when the server reports "address already in use"; these helpers only make that rare.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"
"""Tests bind to IPv4 loopback only: the machines running them have no other network."""

_MAX_PORT = 65535


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Binding to port 0 lets the kernel choose from its ephemeral range, which avoids the
    well-known ports developers run real services on.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def is_port_free(port: int) -> bool:
    """Whether ``port`` on 127.0.0.1 can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port_block(count: int, *, attempts: int = 50) -> int:
    """Return the first of ``count`` consecutive free ports on 127.0.0.1.

    OpenBao's dev mode also binds a cluster listener on the API port + 1, a port the kernel
    never handed us. If that port is taken, bao logs an ERROR but still serves; if it is
    free, bao may take it from under another server a test is starting. Reserving both
    avoids the misleading log line and the collision.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    for _ in range(attempts):
        base = free_port()
        if base + count - 1 > _MAX_PORT:
            continue
        if all(is_port_free(base + offset) for offset in range(1, count)):
            return base
    raise RuntimeError(f"no block of {count} consecutive free ports found on {LOOPBACK}")
