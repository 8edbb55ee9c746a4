"""``kernelgen init | import | inspect``: make and examine model repositories.

``import --prefix P`` copies one kernel generator out of a training
checkpoint; ``import --all`` finds every generator of a trained network with
its layer's mask, infers each config from the tensors and the base config and
writes them as one group (``discovery``, ``repository.write_group``); what the
base left unsaid or said in vain is printed as warnings on stderr.

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
    from kernelgen_server.repository.import_plan import PlannedModel
    from kernelgen_server.repository.store import FailedModel, LoadedModel, ModelRepository

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
        help="extract kernel generators from a training checkpoint",
        description=(
            "Copy one kernel generator out of a training checkpoint (--prefix, checked strictly against "
            "--config), or every one of them (--all) as a group NAME/0, NAME/1, ... in prefix order, "
            "each with its layer's mask (<layer>.mask.*) and its config inferred from the tensors (sizes, "
            "generator family); --config BASE then gives what the weights cannot tell (omega_0, L_cache, "
            "the generator class and its other arguments, each masked layer's 'mask', 'causal'), with "
            "per-generator 'overrides' keyed by prefix. Checkpoints: .pt/.ckpt/.pth read with "
            "weights_only=True, .safetensors, sharded "
            "safetensors (their *.safetensors.index.json, or the folder holding it). The state may be "
            "wrapped under 'state_dict'; legacy kernel_network.{2i} names become hidden_linears.{i}."
        ),
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="CKPT",
        help="training checkpoint: .pt, .ckpt, .pth, .safetensors, a shard index, or a folder holding one",
    )
    p.add_argument(
        "--prefix",
        metavar="P",
        help="key prefix of the kernel module, e.g. 'model.blocks.0.filter.kernel' ('' for none); "
        "with --all, import only the generators under P",
    )
    p.add_argument(
        "--all",
        action="store_true",
        dest="all_generators",
        help="import every kernel generator of the checkpoint as the group NAME",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="JSON",
        help="config of the kernel module; with --all, the BASE of every generator's config",
    )
    p.add_argument("--name", required=True, metavar="NAME", help="model (or, with --all, group) name")
    p.add_argument("--repo", required=True, type=Path, metavar="DIR", help="model repository folder")
    p.add_argument("--force", action="store_true", help="replace a model or group of the same name")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --all: print what was found and would be written, and write nothing",
    )
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
    from kernelgen_server.model.config import ModelConfig
    from kernelgen_server.repository.store import load_model, write_model

    config = ModelConfig.from_file(args.config)
    module = config.build(seed=args.seed)
    model_dir = write_model(args.repo, args.name, config, module.state_dict(), force=args.force)
    return _report_written("initialised", load_model(model_dir))


@_reports_errors
def _import(args: argparse.Namespace) -> int:
    if args.all_generators:
        return _import_all(args)
    if args.dry_run:
        raise ValueError("--dry-run goes with --all")
    if args.prefix is None or args.config is None:
        raise ValueError("--prefix and --config are required to import one generator (or pass --all)")
    from torch import Tensor

    from kernelgen_server.repository.checkpoint import (
        CheckpointError,
        extract_kernel_state,
        load_module,
        read_checkpoint,
        training_state,
    )
    from kernelgen_server.repository.discovery import mask_prefix
    from kernelgen_server.repository.store import check_model_name, load_model, write_model

    check_model_name(args.name)
    config = _whole_config(args)
    raw = read_checkpoint(args.checkpoint)
    fourier = config.kernel == "RandomFourierKernelND"  # its kernel_network.{2i} are its own names
    tensors = extract_kernel_state(raw, args.prefix, args.checkpoint, legacy_names=not fourier)
    # The layer's mask beside the generator comes with it: a kernel is never imported without its mask.
    head = mask_prefix(args.prefix.strip("."))
    if head is not None:
        state = training_state(raw, args.checkpoint)
        mask = {f"mask.{k[len(head) + 1 :]}": v for k, v in state.items() if k.startswith(f"{head}.")}
        if mask and config.mask is None:
            raise ValueError(
                f"{args.checkpoint}: the layer of {args.prefix!r} has a mask "
                f"({', '.join(map(repr, sorted(mask)))} under {head!r}) that {args.config} does not "
                "describe: add its \"mask\" section (docs/architecture.md, 'Served models'); a kernel "
                "is never imported without its mask"
            )
        tensors.update((k, v) for k, v in mask.items() if isinstance(v, Tensor))
    try:
        load_module(config, tensors, args.checkpoint)
    except CheckpointError as exc:
        # Keys were stripped of the prefix; say which prefix they were under.
        raise CheckpointError(exc.path, f"under prefix {args.prefix!r}: {exc.detail}", exc.key) from None
    model_dir = write_model(args.repo, args.name, config, tensors, force=args.force)
    return _report_written("imported", load_model(model_dir))


def _whole_config(args: argparse.Namespace) -> Any:
    """``--config`` as a model's whole config.json; a base that only ``--all`` can complete (from the
    weights' shapes) is refused with the command that imports it."""
    from kernelgen_server.model.config import ConfigError, ModelConfig
    from kernelgen_server.repository.import_plan import ImportBase

    try:
        return ModelConfig.from_file(args.config)
    except ConfigError as exc:
        try:
            ImportBase.from_file(args.config)
        except ConfigError:
            raise exc from None
        prefix = args.prefix or "''"
        raise ValueError(
            f"{exc}. {args.config.name} is a base config, which only --all completes from the weights' "
            f"shapes: pass --all --prefix {prefix} to import the generator under that prefix "
            f"with the rest inferred (as the group {args.name!r}, model {args.name}/0; --dry-run shows the "
            "config), or give --config a whole config.json"
        ) from None


def _import_all(args: argparse.Namespace) -> int:
    """``import --all``: every generator of the checkpoint as one group, or nothing."""
    from kernelgen_server.repository.checkpoint import read_training_checkpoint, training_state
    from kernelgen_server.repository.discovery import find_generators, generator_prefixes
    from kernelgen_server.repository.import_plan import ImportBase, plan_network
    from kernelgen_server.repository.layers import source_layer_hashes
    from kernelgen_server.repository.store import NewMember, check_model_name, group_holds, write_group

    check_model_name(args.name)
    base = ImportBase.from_file(args.config) if args.config is not None else ImportBase.empty()
    state = training_state(read_training_checkpoint(args.checkpoint), args.checkpoint)
    generators = find_generators(state, args.checkpoint, args.prefix or "")
    plans = plan_network(generators, base, args.checkpoint, generator_prefixes(state))
    members = [
        NewMember(
            plan.member,
            plan.generator.prefix,
            plan.config,
            plan.generator.tensors,
            source_layer_hashes(state, plan.generator.prefix, plan.config),
        )
        for plan in plans
        if plan.config is not None
    ]
    errors = [plan.error for plan in plans if plan.error is not None]
    unchanged = not errors and group_holds(args.repo, args.name, members)
    target = args.repo / args.name
    if args.dry_run:
        print(f"{args.checkpoint}: {len(plans)} kernel generator(s)")
        print(_plan_table(args.name, plans))
        for error in errors:
            print(f"kernelgen import: error: {' '.join(str(error).split())}", file=sys.stderr)
        _warn(plans)
        if errors:
            print(f"would write nothing: {len(errors)} generator(s) cannot be imported")
            return 2
        if unchanged:
            print(f"would write nothing: {target} already holds these {len(plans)} generators")
        else:
            verb = "replace" if target.exists() else "write"
            print(f"would {verb} group {args.name!r} in {target} ({len(plans)} models)")
        return 0
    if errors:
        raise errors[0]
    _warn(plans)
    if unchanged:
        print(
            f"group {args.name!r} in {target} already holds these {len(plans)} generators "
            "(same content hashes): nothing written"
        )
        return 0
    path = write_group(args.repo, args.name, members, checkpoint=args.checkpoint.name, force=args.force)
    print(_plan_table(args.name, plans))
    parameters = sum(plan.generator.parameter_count for plan in plans)
    print(f"imported group {args.name!r} in {path}: {len(plans)} models, {parameters} parameters")
    return 0


def _warn(plans: list[PlannedModel]) -> None:
    """Each plan's notes on stderr, one line each: what was assumed or written otherwise."""
    for plan in plans:
        for note in plan.notes:
            print(f"kernelgen import: warning: {' '.join(note.split())}", file=sys.stderr)


def _plan_table(group: str, plans: list[PlannedModel]) -> str:
    """One row per generator: the model it becomes, where it came from, its config."""

    def shown(value: object) -> str:
        if value is None:
            return "?"
        if isinstance(value, tuple):
            return "x".join(map(str, value))
        return str(value)

    rows = [("MODEL", "PREFIX", "DIMS", "EMBED", "HIDDEN", "LAYERS", "OUT", "BIAS", "FILM", "L_CACHE",
             "OMEGA_0", "KERNEL", "MASK", "CAUSAL", "PARAMS", "NOTE")]  # fmt: skip
    for plan in plans:
        film = plan.generator.shape_values["film"]
        film_text = "-"
        if film is not None:
            film_text = f"cond {film['cond_dim']}, hidden {film['film_hidden_dim']}"
            if plan.generator.shape_values["film_after_pos_embed"]:
                film_text += ", +embedding"
        notes = ["legacy names"] if plan.generator.legacy else []
        if plan.error is not None:
            notes.append("cannot be imported (below)")
        elif plan.notes:
            notes.append("see the warning(s) below")
        config = plan.config
        rows.append(
            (
                f"{group}/{plan.member}",
                plan.generator.prefix or "(root)",
                shown(plan.value("data_dim")),
                shown(plan.value("embedding_dim")),
                shown(plan.value("mlp_hidden_dim")),
                shown(plan.value("num_layers")),
                shown(plan.value("out_dim")),
                "yes" if plan.value("use_bias") else "no",
                film_text,
                shown(plan.value("L_cache")),
                shown(plan.value("omega_0")) if config is None or config.omega_0 is not None else "-",
                "?" if config is None else config.kernel.removesuffix("KernelND"),
                _mask_text(plan),
                "?" if config is None else "yes" if config.causal else "no",
                str(plan.generator.parameter_count),
                "; ".join(notes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _mask_text(plan: PlannedModel) -> str:
    """The mask column: its type (without ``ModulationND``) and parametrisation, '?' where unknown."""
    if plan.config is None:
        return "-" if plan.generator.mask is None else "?"
    mask = plan.config.mask
    if mask is None:
        return "-"
    text = mask.type.removesuffix("ModulationND")
    parametrization = getattr(mask, "parametrization", None)
    return f"{text} {parametrization}" if parametrization is not None else text


def _report_written(verb: str, model: LoadedModel) -> int:
    print(
        f"{verb} model {model.name!r} in {model.path}: {model.parameter_count} parameters, "
        f"content hash {model.content_hash}"
    )
    return 0


@_reports_errors
def _inspect(args: argparse.Namespace) -> int:
    from kernelgen_server.repository.store import ModelRepository, embedded_repository

    root = args.repo if args.repo is not None else embedded_repository()
    repo = ModelRepository.load(root)
    records = [_describe(entry, repo) for entry in repo.entries()]
    groups = [_describe_group(name, repo) for name in sorted(repo.groups)]
    if args.json:
        print(json.dumps({"repository": str(root), "models": records, "groups": groups}, indent=2))
    else:
        counts = f"{len(repo.ready)} ready, {len(repo.failed)} failed"
        print(f"repository {root}: {counts}" + (f", {len(groups)} group(s)" if groups else ""))
        starts = {group["members"][0]: group for group in groups}
        for record in records:
            if record["name"] in starts:
                print(_format_group(starts[record["name"]]))
            print(_format_record(record))
    return 1 if repo.failed else 0


def _describe_group(name: str, repo: ModelRepository) -> dict[str, Any]:
    group = repo.groups[name]
    return {
        "name": name,
        "status": "ready" if repo.group_ready(name) else "failed",
        "path": str(group.path),
        "checkpoint": group.checkpoint,
        "members": list(group.members),
        "sources": list(group.sources),
    }


def _format_group(group: dict[str, Any]) -> str:
    origin = f", imported from {group['checkpoint']}" if group["checkpoint"] else ""
    failed = "" if group["status"] == "ready" else " (a member failed to load)"
    return f"group {group['name']}: {len(group['members'])} models{origin}{failed}"


def _describe(entry: LoadedModel | FailedModel, repo: ModelRepository) -> dict[str, Any]:
    """A JSON-ready description of one repository entry."""
    from kernelgen_server.repository.store import FailedModel

    place = repo.group_of(entry.name)
    membership: dict[str, Any] = {}
    if place is not None:
        group, index = place
        membership = {"group": group.name, "group_index": index, "source": group.sources[index]}
    if isinstance(entry, FailedModel):
        return {
            "name": entry.name,
            "status": "failed",
            "path": str(entry.path),
            "reason": entry.reason,
            **membership,
        }
    config = entry.config
    return {
        "name": entry.name,
        **membership,
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
    source = [f"  source        {record['source'] or '(root)'}"] if "source" in record else []
    return "\n".join(
        [
            f"{record['name']}: ready",
            *source,
            f"  parameters    {record['parameter_count']}",
            f"  film          {film}",
            f"  flops         {record['flop_count']} (one forward at L_cache {record['flop_grid']})",
            f"  content hash  {record['content_hash']}",
            f"  weights       {record['path']}/{record['weights']}",
            f"  config        {json.dumps(record['config'], sort_keys=True)}",
        ]
    )
