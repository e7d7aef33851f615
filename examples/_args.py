"""The command-line options every example device shares: how it finds its gateway."""

from __future__ import annotations

import argparse


def gateway_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --gateway and --interface (the SDK also reads $HEARTH_GATEWAY and
    $HEARTH_INTERFACE when they are not given)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--gateway",
        metavar="HOST:PORT",
        help="this gateway (default: $HEARTH_GATEWAY, else mDNS discovery)",
    )
    parser.add_argument("--interface", metavar="IP", help="discover on this interface only")
    return parser
