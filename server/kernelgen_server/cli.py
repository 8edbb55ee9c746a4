"""Server-side subcommands of ``kernelgen``.

Imported by ``kernelgen_client.cli`` to build the parser, so this module and
the modules it imports at top level must not import torch; handlers import
what they need when they run.
"""

from __future__ import annotations

import argparse
from typing import Any

from kernelgen_server import repo_cli, serve_cli


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``, ``init``, ``import`` and ``inspect`` to the ``kernelgen`` parser."""
    serve_cli.register(sub)
    repo_cli.register(sub)
