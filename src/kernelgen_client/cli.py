"""The ``kernelgen`` command, assembled from the packages that are installed.

The client's own commands (``generate``, ``flops``, ``models``, ``health``;
see ``kernelgen_client.commands``) are always there. Other packages contribute
theirs through the ``kernelgen.commands`` entry-point group: each entry point
names a ``register(subparsers)`` function (the load tester's ``loadtest``, the
server's ``serve``, ``init``, ``import`` and ``inspect``). This package never
imports them by name. A contributor whose extra is not installed refuses to
load (ImportError); its commands are then listed with a stand-in that says
which extra to install.

Loading a contributor must stay cheap (no torch, no numpy): ``kernelgen
health`` builds this parser on every start, as a container health check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

__all__ = ["COMMAND_GROUP", "EXTRA_COMMANDS", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]
Register = Callable[["argparse._SubParsersAction[Any]"], None]

#: Entry-point group of the functions that add subcommands to ``kernelgen``.
COMMAND_GROUP = "kernelgen.commands"
#: Commands that an extra brings: name -> (extra, one-line help).
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server", "run the gRPC kernel server"),
    "init": ("server", "write a freshly initialised model into a repository"),
    "import": ("server", "extract a kernel module from a training checkpoint"),
    "inspect": ("server", "list the models of a repository"),
}


def _extra_missing(extra: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        print(
            f"kernelgen {args.command}: this command needs the {extra} extra: "
            f"pip install 'kernelgen[{extra}]'",
            file=sys.stderr,
        )
        return 2

    handler.extra_missing = True  # type: ignore[attr-defined]
    return handler


def _contributors() -> list[Register]:
    """The ``register`` functions of the installed contributors, by entry-point name."""
    found = []
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            found.append(entry.load())
        except ImportError:
            continue  # its extra is missing: its commands get stand-ins below
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelgen",
        description="Serve and generate SIREN implicit convolution kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from kernelgen_client import commands

    commands.register(sub)
    for register in _contributors():
        register(sub)
    for name, (extra, help_text) in EXTRA_COMMANDS.items():
        if name not in sub.choices:
            p = sub.add_parser(name, help=f"{help_text} (needs kernelgen[{extra}])", add_help=False)
            p.set_defaults(handler=_extra_missing(extra))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args.handler, "extra_missing", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
