"""Loopback ports: everything the harness starts listens on 127.0.0.1 only."""

from __future__ import annotations

import socket
import time

__all__ = ["LOOPBACK", "free_port", "listening", "wait_for_port"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (someone may take it before we bind
    it: Mosquitto.start tries again when that happens)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def listening(port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` now."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if listening(port, timeout_s=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port}")
