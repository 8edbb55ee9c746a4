"""The server's subcommands of ``kernelgen``: ``serve``, ``init``, ``import``, ``inspect``.

``register`` is this package's entry in the ``kernelgen.commands`` entry-point
group (see ``kernelgen_client.cli``). Importing this module raises ImportError
when the ``server`` extra is not installed, so that the ``kernelgen`` command
shows stand-ins naming the extra instead. It must stay cheap: no torch here or
in what it imports at top level; handlers import what they need when they run.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

#: Top-level modules of the ``server`` extra's requirements.
_SERVER_EXTRA = (
    "torch",
    "pydantic",
    "pydantic_settings",
    "safetensors",
    "grpc_health",
    "grpc_reflection",
    "prometheus_client",
)
_missing = [name for name in _SERVER_EXTRA if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"the server extra is not installed (missing: {', '.join(_missing)})")

from kernelgen_server.ops import repo_commands, serve_command  # noqa: E402 - after the extra is known present

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``, ``init``, ``import`` and ``inspect`` to the ``kernelgen`` parser."""
    serve_command.register(sub)
    repo_commands.register(sub)
