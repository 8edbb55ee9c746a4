"""``kernelgen serve``: flags generated from the one settings model.

Every ``ServerSettings`` field is a flag (``--max-batch-size``) and an
environment variable (``KERNELGEN_MAX_BATCH_SIZE``); flags win. This module
imports no torch: the ``kernelgen`` parser is built from it on every call.

Exit codes: 0 drained after SIGTERM or SIGINT; 1 no model to serve, a model
failed under ``--strict``, or the server failed; 2 invalid settings, or an
address it cannot listen on.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from kernelgen_server.settings import (
    ServerSettings,
    SettingsError,
    env_of,
    flag,
    help_default,
    load_settings,
)

__all__ = ["raise_open_files_limit", "register"]

log = logging.getLogger("kernelgen.serve")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_EPILOG = (
    "exit codes: 0 drained after SIGTERM or SIGINT, 1 no model to serve (or one failed under --strict), "
    "2 invalid settings or an address it cannot listen on"
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the gRPC kernel server",
        description=(
            "Serve the models of a repository over gRPC (default: the embedded models). Every flag "
            "can also be set as KERNELGEN_<FLAG> in the environment or in a --config file; "
            "flags take precedence over the environment, which takes precedence over the file."
        ),
        epilog=_EPILOG,
    )
    for name, field in ServerSettings.model_fields.items():
        help_text = (
            f"{field.description or name.replace('_', ' ')} [{env_of(name)}] (default: {help_default(name)})"
        )
        # Switches (and tri-state ones, bool | None: unset picks a default by device) take --x / --no-x.
        if field.annotation in (bool, bool | None):
            parser.add_argument(
                flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag(name), dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text
            )
    parser.set_defaults(handler=_run)


def _fail(message: object, code: int) -> int:
    print(f"kernelgen serve: {message}", file=sys.stderr)
    return code


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one, and log both; returns (soft, hard).

    Every client connection is a descriptor: at a soft limit of 1,024 (a common default) a
    thousand idle sockets lock every new client out. Worker processes inherit the raised limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's per-process maximum.
    target = hard if hard != resource.RLIM_INFINITY else _kernel_open_files_maximum()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
        else:
            soft = target
    log.info(
        "open-files limit: soft %s, hard %s", soft, "unlimited" if hard == resource.RLIM_INFINITY else hard
    )
    return soft, hard


def _kernel_open_files_maximum() -> int:
    try:
        return int(open("/proc/sys/fs/nr_open").read())
    except (OSError, ValueError):
        return 1 << 20


def _run(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    try:
        settings = load_settings(values)
    except SettingsError as exc:
        return _fail(exc, EXIT_USAGE)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kernelgen_server.transport.ports import ListenError

    raise_open_files_limit()
    if settings.workers > 1:
        # The supervisor loads no torch: each worker process does, and holds the device.
        from kernelgen_server.ops.supervisor import WorkerExit, supervise

        try:
            return asyncio.run(supervise(settings))
        except ListenError as exc:
            return _fail(exc, EXIT_USAGE)
        except WorkerExit as exc:
            return _fail(exc, exc.exit_code)
        except (OSError, RuntimeError) as exc:
            return _fail(exc, EXIT_FAILED)
    from kernelgen_server.transport.server import ModelsFailedError, serve  # torch loads here

    try:
        return asyncio.run(serve(settings))
    except ListenError as exc:
        return _fail(exc, EXIT_USAGE)
    except (ModelsFailedError, OSError, RuntimeError) as exc:
        return _fail(exc, EXIT_FAILED)
