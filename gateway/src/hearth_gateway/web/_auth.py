"""The owner's token: a random secret in the state directory (mode 0600), printed by
``hearth-gateway web-token``. The browser keeps it in an HttpOnly cookie after the login form;
every form also carries a value derived from it (``csrf``), which another site cannot read, so
a cross-site post with the cookie alone is refused."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["COOKIE", "csrf_for", "same", "web_token"]

COOKIE = "hearth_web"
_FILE = "web-token"


def web_token(state_dir: Path, *, new: bool = False) -> str:
    """The token for this state directory, made on first use (or anew: ``new``; the daemon
    reads it at start, so a new one takes effect when it restarts)."""
    path = state_dir / _FILE
    if not new:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(24)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    tmp.replace(path)
    return token


def csrf_for(token: str) -> str:
    """What forms carry: tied to the token, useless for logging in."""
    return hmac.new(token.encode(), b"hearth-web-form", hashlib.sha256).hexdigest()


def same(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
