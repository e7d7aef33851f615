"""``python -m hearth_gateway._pdeathsig [--pid-file PATH] [--user NAME] PROGRAM ARGS...``:
run PROGRAM as the one child of a small watcher, such that neither outlives the process that
started the watcher (the gateway daemon), whichever of the three is killed, SIGKILL included.

Linux's parent-death signal (PR_SET_PDEATHSIG) does it, twice:

* the watcher holds one aimed at the daemon: SIGTERM, which it passes on to the child (Mosquitto
  then saves its persistence and exits);
* the child holds one aimed at the watcher, set after its last change of credentials and just
  before exec. The kernel clears a parent-death signal whenever a process changes its uid or
  gid, which Mosquitto does when started as root (it drops to its own user). So with ``--user``
  the watcher's child drops to that user itself before setting the signal, and Mosquitto,
  started unprivileged, has nothing left to drop. Run by an unprivileged daemon (systemd's
  DynamicUser) nothing changes credentials and the same holds without ``--user``.

Alternatives, and why not: a PID namespace whose init is the watcher gives the same guarantee
but needs CAP_SYS_ADMIN, and the systemd unit allows no PID namespace (RestrictNamespaces=user
net); a subreaper only keeps the orphans of a process that is still alive, and Mosquitto makes
none; the daemon alone (a pidfd, the process group) cannot act once it is the one killed. The
daemon does keep the broker's pid, from the pid file the child writes before exec, to end a
broker that survived anyway (see broker.py), never one found by name.

``--pid-file``: the child writes its own pid there (atomically, before exec), so that the daemon,
or the next daemon after a crash of both, can find it. ``--user``: as above; root only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import NoReturn

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: reload (broker.py)
_ESCALATE_S = 5  # after passing on SIGTERM or SIGINT, a child still running gets SIGKILL


def _set_pdeathsig(signum: int) -> None:
    # Not Linux: no parent-death signal, but the daemon's own close() still stops the child.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def _write_pid(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.replace(path)


def _exec_child(argv: list[str], pid_file: Path | None, user: str | None, watcher: int) -> NoReturn:
    """In the forked child: never returns."""
    try:
        for signum in _FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)  # exec keeps the mask
        if pid_file is not None:
            _write_pid(pid_file)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.initgroups(entry.pw_name, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
        _set_pdeathsig(signal.SIGTERM)  # after the last change of credentials, see above
        if os.getppid() != watcher:  # the watcher died before the signal was armed
            os._exit(1)
        os.execvp(argv[0], argv)  # noqa: S606 - running the program it was given is the point
    except BaseException as exc:  # noqa: BLE001 - a forked child must not return into main()
        print(f"_pdeathsig: cannot run {argv[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


def _parse(args: list[str]) -> tuple[Path | None, str | None, list[str]]:
    pid_file: Path | None = None
    user: str | None = None
    while args and args[0] in ("--pid-file", "--user", "--"):
        option = args.pop(0)
        if option == "--":
            break
        if not args:
            raise SystemExit(f"_pdeathsig: {option} needs a value")
        value = args.pop(0)
        if option == "--pid-file":
            pid_file = Path(value)
        else:
            user = value
    if not args:
        raise SystemExit(
            "usage: python -m hearth_gateway._pdeathsig [--pid-file PATH] [--user NAME] "
            "PROGRAM ARGS..."
        )
    return pid_file, user, args


def main(args: list[str] | None = None) -> int:
    pid_file, user, argv = _parse(list(sys.argv[1:] if args is None else args))
    parent = os.getppid()
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the daemon died before prctl took effect
        return 1
    # Blocked until the handlers below are in place: a signal that arrives meanwhile is passed
    # on too, not lost or fatal to the watcher alone.
    signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
    watcher = os.getpid()
    child = os.fork()
    if child == 0:
        _exec_child(argv, pid_file, user, watcher)

    escalating: list[bool] = []  # armed once: a second SIGTERM does not put SIGKILL off

    def forward(signum: int, _frame: FrameType | None) -> None:
        # The child is not reaped before these handlers are blocked again (below): its pid
        # cannot belong to anyone else yet.
        os.kill(child, signum)
        if signum != signal.SIGHUP and not escalating:
            escalating.append(True)
            signal.alarm(_ESCALATE_S)

    def escalate(_signum: int, _frame: FrameType | None) -> None:
        os.kill(child, signal.SIGKILL)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    signal.signal(signal.SIGALRM, escalate)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    signal.pthread_sigmask(signal.SIG_BLOCK, (*_FORWARDED, signal.SIGALRM))
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)  # the shell's convention: the daemon can tell
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
