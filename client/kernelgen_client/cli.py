"""The ``kernelgen`` command.

Client commands (``generate``, ``flops``, ``models``, ``health``; see
``kernelgen_client.commands``; ``loadtest``, see ``kernelgen_client.loadtest``)
need only this package. Server commands (``serve``, ``init``,
``import``, ``inspect``) come from ``kernelgen_server`` when the ``server``
extra is installed; importing their module must stay cheap (no torch), since
``kernelgen health`` runs as a container health check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

SERVER_COMMANDS = {
    "serve": "run the gRPC kernel server",
    "init": "write a freshly initialised model into a repository",
    "import": "extract a kernel module from a training checkpoint",
    "inspect": "list the models of a repository",
}


def _server_missing(args: argparse.Namespace) -> int:
    print(
        f"kernelgen {args.command}: this command needs the server extra: pip install 'kernelgen[server]'",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelgen",
        description="Serve and generate SIREN implicit convolution kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from kernelgen_client import commands
    from kernelgen_client.loadtest import cli as loadtest_cli

    commands.register(sub)
    loadtest_cli.register(sub)
    try:
        from kernelgen_server import cli as server_cli
    except ImportError:
        for name, help_text in SERVER_COMMANDS.items():
            p = sub.add_parser(name, help=f"{help_text} (needs kernelgen[server])", add_help=False)
            p.set_defaults(handler=_server_missing)
    else:
        server_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.handler is not _server_missing:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
