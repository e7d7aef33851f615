"""Shell completion for ``hearth`` and ``hearth-gateway`` through argcomplete, an optional
dependency (``pip install 'hearth-device-sdk[completion]'``; the Debian package ships it).

``hearth completion bash`` prints the line to put in ``~/.bashrc`` (or a file for
``/etc/bash_completion.d``); zsh and fish likewise. While a shell asks for completions it runs the
command with ``_ARGCOMPLETE`` set: only then is argcomplete imported, so an ordinary run pays
nothing for it."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["SHELLS", "add_completion_command", "autocomplete", "print_shellcode"]

SHELLS = ("bash", "zsh", "fish")


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell and exit, when the shell is asking; otherwise return at once."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return  # not installed: no completions, and the command runs as typed
    argcomplete.autocomplete(parser)


def add_completion_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], prog: str
) -> None:
    c = sub.add_parser(
        "completion",
        help="print the shell code that enables tab completion (needs argcomplete)",
        description="Print the shell code that enables tab completion of "
        f"{prog}'s commands and options (needs argcomplete).",
        epilog=f'example:\n  eval "$({prog} completion bash)"     # in ~/.bashrc\n'
        f"  {prog} completion fish > ~/.config/fish/completions/{prog}.fish\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("shell", choices=SHELLS, help="the shell to print it for")


def print_shellcode(prog: str, shell: str) -> int:
    """The registration code for ``prog`` in ``shell``; 1 without argcomplete."""
    try:
        from argcomplete.shell_integration import shellcode
    except ImportError:
        print(
            f"{prog}: shell completion needs argcomplete: "
            "pip install 'hearth-device-sdk[completion]'",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(shellcode([prog], shell=shell))
    return 0
