"""``kernelgen init | import | inspect``: make and examine model repositories.

The ``kernelgen`` command builds its parser from ``register``, so importing
this module must stay cheap: torch and everything that needs it are imported
inside the handlers. Exit codes: 0 success, 1 ``inspect`` found a model that
failed to load, 2 bad arguments or inputs (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernelgen_server.repository import FailedModel, LoadedModel

__all__ = ["register"]

Handler = Callable[[argparse.Namespace], int]


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**63), got {value}")
    return value


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``init``, ``import`` and ``inspect`` subcommands."""
    p = sub.add_parser(
        "init",
        help="write a freshly initialised model into a repository",
        description="Create <DIR>/<NAME>/config.json and model.safetensors with SIREN-initialised weights.",
    )
    p.add_argument("name", metavar="NAME", help="model name, also the folder created under --repo")
    p.add_argument("--repo", required=True, type=Path, metavar="DIR", help="model repository folder")
    p.add_argument(
        "--config", required=True, type=Path, metavar="JSON", help="model config (the config.json schema)"
    )
    p.add_argument(
        "--seed", type=_seed, default=0, metavar="N", help="seed of the initial weights (default: 0)"
    )
    p.add_argument("--force", action="store_true", help="replace a model of the same name")
    p.set_defaults(handler=_init)

    p = sub.add_parser(
        "import",
        help="extract a kernel module from a training checkpoint",
        description=(
            "Copy one SIRENKernelND out of a training checkpoint (.pt read with weights_only=True, "
            "or .safetensors) into a repository, checked strictly against --config. The state may be "
            "wrapped under 'state_dict'; legacy kernel_network.{2i} names become hidden_linears.{i}."
        ),
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="training checkpoint (.pt or .safetensors)")
    p.add_argument(
        "--prefix",
        required=True,
        metavar="P",
        help="key prefix of the kernel module, e.g. 'model.blocks.0.filter.kernel' ('' for none)",
    )
    p.add_argument("--config", required=True, type=Path, metavar="JSON", help="config of the kernel module")
    p.add_argument("--name", required=True, metavar="NAME", help="model name in the repository")
    p.add_argument("--repo", required=True, type=Path, metavar="DIR", help="model repository folder")
    p.add_argument("--force", action="store_true", help="replace a model of the same name")
    p.set_defaults(handler=_import)

    p = sub.add_parser(
        "inspect",
        help="list the models of a repository",
        description=(
            "Load every model of a repository and list it, or the reason it was refused. "
            "Exits 1 if any model failed to load."
        ),
    )
    p.add_argument(
        "repo",
        nargs="?",
        type=Path,
        metavar="DIR",
        help="model repository folder (default: the models embedded in the package)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(handler=_inspect)


def _reports_errors(fn: Handler) -> Handler:
    """Turn a bad input (ValueError, OSError) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, OSError) as exc:
            message = " ".join(str(exc).split())  # one line, whatever the exception held
            print(f"kernelgen {args.command}: error: {message}", file=sys.stderr)
            return 2

    return run


@_reports_errors
def _init(args: argparse.Namespace) -> int:
    from kernelgen_server.config import ModelConfig
    from kernelgen_server.repository import load_model, write_model

    config = ModelConfig.from_file(args.config)
    module = config.build(seed=args.seed)
    model_dir = write_model(args.repo, args.name, config, module.state_dict(), force=args.force)
    return _report_written("initialised", load_model(model_dir))


@_reports_errors
def _import(args: argparse.Namespace) -> int:
    from kernelgen_server.checkpoint import (
        CheckpointError,
        extract_kernel_state,
        load_module,
        read_checkpoint,
    )
    from kernelgen_server.config import ModelConfig
    from kernelgen_server.repository import check_model_name, load_model, write_model

    check_model_name(args.name)
    config = ModelConfig.from_file(args.config)
    tensors = extract_kernel_state(read_checkpoint(args.checkpoint), args.prefix, args.checkpoint)
    try:
        load_module(config, tensors, args.checkpoint)
    except CheckpointError as exc:
        # Keys were stripped of the prefix; say which prefix they were under.
        raise CheckpointError(exc.path, f"under prefix {args.prefix!r}: {exc.detail}", exc.key) from None
    model_dir = write_model(args.repo, args.name, config, tensors, force=args.force)
    return _report_written("imported", load_model(model_dir))


def _report_written(verb: str, model: LoadedModel) -> int:
    print(
        f"{verb} model {model.name!r} in {model.path}: {model.parameter_count} parameters, "
        f"content hash {model.content_hash}"
    )
    return 0


@_reports_errors
def _inspect(args: argparse.Namespace) -> int:
    from kernelgen_server.repository import ModelRepository, embedded_repository

    root = args.repo if args.repo is not None else embedded_repository()
    repo = ModelRepository.load(root)
    records = [_describe(entry) for entry in repo.entries()]
    if args.json:
        print(json.dumps({"repository": str(root), "models": records}, indent=2))
    else:
        print(f"repository {root}: {len(repo.ready)} ready, {len(repo.failed)} failed")
        for record in records:
            print(_format_record(record))
    return 1 if repo.failed else 0


def _describe(entry: LoadedModel | FailedModel) -> dict[str, Any]:
    """A JSON-ready description of one repository entry."""
    from kernelgen_server.repository import FailedModel

    if isinstance(entry, FailedModel):
        return {"name": entry.name, "status": "failed", "path": str(entry.path), "reason": entry.reason}
    config = entry.config
    return {
        "name": entry.name,
        "status": "ready",
        "path": str(entry.path),
        "weights": entry.weights_path.name,
        "parameter_count": entry.parameter_count,
        "film": config.film is not None,
        "cond_dim": config.cond_dim,
        "flop_grid": list(config.cache_lens),
        "flop_count": entry.module.flop_count(config.cache_lens),
        "content_hash": entry.content_hash,
        "config": config.to_json_dict(),
    }


def _format_record(record: dict[str, Any]) -> str:
    if record["status"] == "failed":
        return f"{record['name']}: FAILED: {record['reason']}"
    film = f"yes, cond_dim {record['cond_dim']}" if record["film"] else "no"
    return "\n".join(
        [
            f"{record['name']}: ready",
            f"  parameters    {record['parameter_count']}",
            f"  film          {film}",
            f"  flops         {record['flop_count']} (one forward at L_cache {record['flop_grid']})",
            f"  content hash  {record['content_hash']}",
            f"  weights       {record['path']}/{record['weights']}",
            f"  config        {json.dumps(record['config'], sort_keys=True)}",
        ]
    )
