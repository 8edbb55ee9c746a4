"""The ``kernelgen`` command, assembled from the packages that are installed.

The client's own commands (``generate``, ``generate-group``, ``flops``, ``models``, ``health``;
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
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

__all__ = ["COMMAND_GROUP", "EXTRA_COMMANDS", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]
Register = Callable[["argparse._SubParsersAction[Any]"], None]

#: Entry-point group of the functions that add subcommands to ``kernelgen``.
COMMAND_GROUP = "kernelgen.commands"
#: Commands that an extra brings: name -> (extra, one-line help), the help its contributor gives.
EXTRA_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server", "run the gRPC kernel server"),
    "init": ("server", "write a freshly initialised model into a repository"),
    "import": ("server", "extract kernel generators from a training checkpoint"),
    "inspect": ("server", "list the models of a repository"),
}
#: A value that argparse would take for an option: a comma-separated list starting with a negative
#: number (``-3,29``), which it does not recognise as a negative number.
_NEGATIVE_LIST = re.compile(r"-\d+(,\s*-?\d*)+")


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
    from kernelgen_client import __version__

    parser = argparse.ArgumentParser(
        prog="kernelgen",
        description="Serve and generate SIREN implicit convolution kernels.",
    )
    parser.add_argument("--version", action="version", version=f"kernelgen {__version__}")
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


def _attach_negative_lists(argv: Sequence[str]) -> list[str]:
    """``--seq-lens -3,29`` as ``--seq-lens=-3,29``: argparse would take ``-3,29`` for an option
    and say only "expected one argument"; attached, the value reaches its own check."""
    out: list[str] = []
    for arg in argv:
        previous = out[-1] if out else ""
        if _NEGATIVE_LIST.fullmatch(arg) and previous.startswith("--") and "=" not in previous:
            out[-1] = f"{previous}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_attach_negative_lists(sys.argv[1:] if argv is None else argv))
    if extra and not getattr(args.handler, "extra_missing", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
