"""``kernelgen serve``: flags generated from the one settings model.

Every ``ServerSettings`` field is a flag (``--max-batch-size``) and an
environment variable (``KERNELGEN_MAX_BATCH_SIZE``); flags win. This module
imports no torch: the ``kernelgen`` parser is built from it on every call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from kernelgen_server.settings import ServerSettings, SettingsError, load_settings

__all__ = ["raise_open_files_limit", "register"]

log = logging.getLogger("kernelgen.serve")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the gRPC kernel server",
        description=(
            "Serve the models of a repository over gRPC (default: the embedded models). Every flag "
            "can also be set as KERNELGEN_<FLAG> in the environment or in a --config file; "
            "flags take precedence over the environment, which takes precedence over the file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"KERNELGEN_{name.upper()}"
        help_text = f"{field.description or name.replace('_', ' ')} [{env}]"
        # Tri-state switches (bool | None: unset picks a default by device) take the flag form too.
        if field.annotation in (bool, bool | None):
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            default = field.default if field.default is not None else "unset"
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=f"{help_text} (default: {default})",
            )
    parser.set_defaults(handler=_run)


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
        print(f"kernelgen serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise_open_files_limit()
    if settings.workers > 1:
        # The supervisor loads no torch: each worker process does, and holds the device.
        from kernelgen_server.ops.supervisor import supervise

        try:
            return asyncio.run(supervise(settings))
        except (OSError, RuntimeError) as exc:
            print(f"kernelgen serve: {exc}", file=sys.stderr)
            return 1
    from kernelgen_server.transport.server import ModelsFailedError, serve  # torch loads here

    try:
        return asyncio.run(serve(settings))
    except ModelsFailedError as exc:
        print(f"kernelgen serve: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as exc:
        print(f"kernelgen serve: {exc}", file=sys.stderr)
        return 1
