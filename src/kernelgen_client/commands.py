"""Client commands of ``kernelgen``: generate, generate-group, flops, models, health.

Every command takes ``--target`` (default ``$KERNELGEN_TARGET``, else
127.0.0.1:50051), ``--timeout`` and the TLS/token options. Exit codes:

    0  success (for ``health``: SERVING)
    1  the server answered with an error, or is not SERVING
    2  bad arguments
    3  no server reachable at the target, or it is unavailable
    4  unknown model
    5  deadline exceeded

Handlers import the client when they run; ``health`` imports no numpy, so a
container health check starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernelgen_client._channel import TLSConfig, default_target
from kernelgen_client.errors import (
    ConnectionFailed,
    DeadlineExceeded,
    InvalidRequest,
    KernelServiceError,
    KernelTooLarge,
    ModelNotFound,
    Unavailable,
)
from kernelgen_wire.metadata import Reason
from kernelgen_wire.sizes import kernel_spatial

if TYPE_CHECKING:
    from kernelgen_client.results import KernelResult, ModelConfig, ModelInfo

__all__ = ["EXIT_CODES", "SEQ_LENS_HELP", "register", "seq_lens_from_text"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_CODES = {
    "ok": EXIT_OK,
    "error": EXIT_ERROR,
    "usage": EXIT_USAGE,
    "unavailable": EXIT_UNAVAILABLE,
    "not-found": EXIT_NOT_FOUND,
    "timeout": EXIT_TIMEOUT,
}
_EPILOG = (
    "exit codes: 0 ok, 1 server error, 2 bad arguments, 3 unreachable, 4 unknown model or group, 5 timeout"
)


#: What ``--seq-lens`` takes, for every command that has it.
SEQ_LENS_HELP = "one length s per axis, comma-separated: 15,15 gives a 29x29 kernel (2*s-1 points per axis)"


def seq_lens_from_text(text: str) -> tuple[int, ...]:
    """``"15,15"`` as seq_lens ``(15, 15)``; ``ValueError`` saying what is expected otherwise.

    ``AxB`` is never read as seq_lens: it is how a kernel's shape is written (seq_lens 15,15
    give a 29x29 kernel), and reading it as seq_lens would ask for a kernel of nearly twice the size.
    """
    parts = [part.strip() for part in text.split(",")]
    if "x" in text.lower():
        sizes = [part.strip() for part in text.lower().replace(",", "x").split("x")]
        if all(size.isdigit() and int(size) % 2 == 1 for size in sizes):
            lens = ",".join(str((int(size) + 1) // 2) for size in sizes)
            raise ValueError(
                f"seq_lens are comma-separated lengths, got {text!r}: {text} is a kernel's shape; "
                f"for a {text} kernel give {lens} (2*s-1 points per axis)"
            )
        raise ValueError(f"seq_lens are comma-separated lengths like 15,15, got {text!r}")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"seq_lens are integers like 15,15, got {text!r}") from None
    if min(values) < 1:
        raise ValueError(f"seq_lens are integers >= 1 like 15,15, got {text!r}")
    return values


def _seq_lens(text: str) -> list[int]:
    try:
        return list(seq_lens_from_text(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def connection_options(timeout: float) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=None,
        help="server address host:port, several comma-separated, or dns:///name:port "
        "[KERNELGEN_TARGET] (default: 127.0.0.1:50051)",
    )
    group.add_argument(
        "--timeout", type=_positive, default=timeout, help=f"deadline in seconds (default: {timeout:g})"
    )
    group.add_argument("--tls", action="store_true", help="use TLS with the system's trust store")
    group.add_argument("--ca-cert", type=Path, help="PEM CA bundle to verify the server (implies --tls)")
    group.add_argument("--cert", type=Path, help="PEM client certificate for mutual TLS")
    group.add_argument("--key", type=Path, help="PEM private key of --cert")
    group.add_argument("--server-name", help="expected name in the server's certificate")
    group.add_argument("--token", default=None, help="bearer token [KERNELGEN_TOKEN]")
    return parent


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    tls: TLSConfig | None = None
    if args.tls or args.ca_cert or args.cert or args.server_name:
        tls = TLSConfig(
            root_certificates=args.ca_cert,
            certificate_chain=args.cert,
            private_key=args.key,
            server_name_override=args.server_name,
        )
    return {
        "target": args.target or default_target(),
        "timeout": args.timeout,
        "tls": tls,
        "token": args.token or os.environ.get("KERNELGEN_TOKEN") or None,
    }


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"kernelgen {args.command}: {message}", file=sys.stderr)
    return code


def handle_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn client errors into one clear line on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ConnectionFailed as exc:
            target = args.target or default_target()
            return _fail(
                args,
                f"cannot reach a kernelgen server at {target} ({_why(exc.message)}); is it running? "
                "Set --target or KERNELGEN_TARGET.",
                EXIT_UNAVAILABLE,
            )
        except ModelNotFound as exc:
            return _fail(args, f"{exc.message}{_known_models(args)}", EXIT_NOT_FOUND)
        except InvalidRequest as exc:
            return _fail(args, _invalid(args, exc), EXIT_USAGE)
        except KernelTooLarge as exc:
            from kernelgen_client._generate import GenerateCall

            if getattr(args, "stream", None) is False and GenerateCall.wants_stream(exc):
                return _fail(args, f"{exc.message} (drop --no-stream: it is then streamed)", EXIT_ERROR)
            return _fail(args, f"{exc.message} [{exc.code.name}]", EXIT_ERROR)
        except DeadlineExceeded:
            return _fail(args, f"no answer within {args.timeout:g} s (raise --timeout)", EXIT_TIMEOUT)
        except Unavailable as exc:
            return _fail(args, f"server unavailable: {exc.message}", EXIT_UNAVAILABLE)
        except KernelServiceError as exc:
            return _fail(args, f"{exc.message} [{exc.code.name}]", EXIT_ERROR)
        except (ValueError, OSError) as exc:
            return _fail(args, str(exc), EXIT_USAGE)

    return run


def _invalid(args: argparse.Namespace, error: InvalidRequest) -> str:
    """An invalid request's line: the server's words, and the ``kernelgen`` command that fits a name
    of the other kind (a group's where a model's is expected, or the reverse)."""
    # The client's own hint names a Python method; the CLI names its command instead.
    said = error.__cause__ if isinstance(error.__cause__, InvalidRequest) else error
    if error.reason == Reason.GROUP_NOT_MODEL:
        name = args.model
        fetch = (
            f"kernelgen generate-group {name} --seq-lens ... fetches them all, "
            if args.command == "generate"
            else ""
        )
        return f"{said.message}; {fetch}kernelgen models lists its members"
    if error.reason == Reason.MODEL_NOT_GROUP:
        return f"{said.message}; kernelgen generate {args.group} --seq-lens ... fetches its kernel"
    return f"invalid request: {error.message}"


def _why(message: str) -> str:
    """The gist of gRPC's connection-failure text."""
    lowered = message.lower()
    for marker, gist in (
        ("connection refused", "connection refused"),
        ("resolv", "the name does not resolve"),
        ("timed out", "connection timed out"),
        ("unreachable", "network unreachable"),
        ("handshake", "TLS handshake failed"),
    ):
        if marker in lowered:
            return gist
    return message


def _known_models(args: argparse.Namespace) -> str:
    """`` (the server has: a, b)``, best effort, for an unknown-model message."""
    from kernelgen_client.client import KernelClient

    try:
        with KernelClient(**{**client_kwargs(args), "timeout": min(args.timeout, 5.0)}) as client:
            names = [m.name for m in client.list_models()]
    except Exception:
        return ""
    return f" (the server has: {', '.join(names)})" if names else ""


# --- generate, generate-group -------------------------------------------------------------------
def _load_conditioning(path: Path) -> Any:
    """The ``[rows, cond_dim]`` array of a ``.npy`` file; ``ValueError`` saying what is expected."""
    import numpy as np

    expected = "a .npy file holding one [rows, cond_dim] float32 array (numpy.save)"
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"--conditioning {path}: no such file") from None
    except (OSError, ValueError, EOFError):  # not .npy: numpy would speak of pickles; never unpickle
        raise ValueError(f"--conditioning {path}: not a .npy array; expected {expected}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError(f"--conditioning {path}: an .npz archive; expected {expected}")
    if array.ndim not in (1, 2) or array.dtype.kind not in "fiu":
        raise ValueError(
            f"--conditioning {path}: holds a {array.dtype} array of shape {list(array.shape)}; "
            f"expected {expected}"
        )
    return array


def _conditioning(args: argparse.Namespace, cond_dim: Callable[[], int | None], what: str) -> Any:
    """The conditioning ``--conditioning`` or ``--random-conditioning`` asks for, or None.

    ``cond_dim()`` asks the server for the width, only when random rows are to be drawn.
    """
    import numpy as np

    if args.conditioning is not None:
        return _load_conditioning(args.conditioning)
    if args.random_conditioning is None:
        return None
    width = cond_dim()
    if width is None:
        raise ValueError(f"{what} takes no conditioning (no FiLM generator)")
    rng = np.random.default_rng(args.seed)
    return rng.standard_normal((args.random_conditioning, width), dtype=np.float32)


def _check_out(args: argparse.Namespace, suffixes: Sequence[str]) -> str | None:
    if args.out is not None and args.out.suffix.lower() not in suffixes:
        return f"--out must end in {' or '.join(suffixes)}, got {args.out.name!r}"
    return None


def _generate(args: argparse.Namespace) -> int:
    from kernelgen_client._save import SUFFIXES, save_kernel
    from kernelgen_client.client import KernelClient

    problem = _check_out(args, SUFFIXES)
    if problem:
        return _fail(args, problem, EXIT_USAGE)
    if args.save_factors and (args.out is None or args.out.suffix.lower() != ".safetensors"):
        return _fail(args, "--save-factors writes .safetensors: give --out NAME.safetensors", EXIT_USAGE)
    with KernelClient(**client_kwargs(args)) as client:

        def cond_dim() -> int | None:
            config = client.get_model(args.model).config
            return config.cond_dim if config is not None else None

        conditioning = _conditioning(args, cond_dim, f"model {args.model!r}")
        result = client.generate(
            args.model,
            args.seq_lens,
            conditioning,
            dtype=args.dtype,
            return_grid=args.grid,
            with_report=True,
            stream=args.stream,
            representation=args.representation,
        )
    if args.save_factors and result.representation != "factored":
        return _fail(args, "--save-factors needs a factored kernel (--representation factored)", EXIT_USAGE)
    if args.out is not None:
        meta = {
            "model": args.model,
            "seq_lens": ",".join(map(str, args.seq_lens)),
            "content_hash": result.report.content_hash,
        }
        save_kernel(args.out, result, meta, factors=args.save_factors)
    report = result.report
    if args.json:
        print(
            json.dumps({"model": args.model, **_summary(result), "out": str(args.out) if args.out else None})
        )
        return EXIT_OK
    print(
        f"{args.model}: {_what(result)}, {_size(result.nbytes)}"
        f" ({'streamed' if result.streamed else 'unary'}), cache hit {'yes' if report.cache_hit else 'no'},"
        f" batch {report.batch_size} rows/{report.batch_requests} requests, queue {report.queue_ms:.2f} ms,"
        f" compute {report.compute_ms:.2f} ms, total {result.elapsed_ms:.1f} ms"
        + (f" -> {args.out}" if args.out else "")
    )
    return EXIT_OK


def _what(result: KernelResult[Any]) -> str:
    """``kernel [1, 57, 57, 384] float32``, or a factored kernel's factors and the dense shape they give."""
    if result.representation == "dense":
        return f"kernel {list(result.shape)} {result.wire_dtype}"
    factors = [int(n) for n in result.kernel.factors.shape]
    return f"factored kernel: factors {factors} {result.wire_dtype} (dense kernel {list(result.shape)})"


def _summary(result: KernelResult[Any]) -> dict[str, Any]:
    """What ``--json`` says of one kernel: ``shape`` the dense kernel's, ``factors_shape`` what travelled."""
    report = result.report
    factored = result.representation == "factored"
    return {
        "shape": list(result.shape),
        "factors_shape": [int(n) for n in result.kernel.factors.shape] if factored else None,
        "dtype": result.wire_dtype,
        "representation": result.representation,
        "bytes": result.nbytes,
        "streamed": result.streamed,
        "cache_hit": report.cache_hit,
        "batch_size": report.batch_size,
        "batch_requests": report.batch_requests,
        "queue_ms": report.queue_ms,
        "compute_ms": report.compute_ms,
        "elapsed_ms": result.elapsed_ms,
        "content_hash": report.content_hash,
        "worker": report.worker,
    }


def _generate_group(args: argparse.Namespace) -> int:
    from kernelgen_client._save import save_group
    from kernelgen_client.client import KernelClient

    problem = _check_out(args, (".safetensors",))
    if problem:
        return _fail(args, f"{problem} (one tensor per member)", EXIT_USAGE)
    with KernelClient(**client_kwargs(args)) as client:

        def cond_dim() -> int | None:
            widths = {m.config.cond_dim if m.config else None for m in client.get_group(args.group).members}
            if len(widths) != 1:
                raise ValueError(f"the members of group {args.group!r} take conditioning of different widths")
            return widths.pop()

        conditioning = _conditioning(args, cond_dim, f"group {args.group!r}")
        results = client.generate_group(
            args.group,
            args.seq_lens,
            conditioning,
            dtype=args.dtype,
            with_report=True,
            representation=args.representation,
        )
    if args.out is not None:
        save_group(args.out, results, {"group": args.group, "seq_lens": ",".join(map(str, args.seq_lens))})
    if args.json:
        members = [{"model": name, **_summary(result)} for name, result in results.items()]
        print(
            json.dumps({"group": args.group, "members": members, "out": str(args.out) if args.out else None})
        )
        return EXIT_OK
    total = sum(result.nbytes for result in results.values())
    elapsed = max((result.elapsed_ms for result in results.values()), default=0.0)
    print(
        f"{args.group}: {len(results)} kernels, {_size(total)} (streamed), total {elapsed:.1f} ms"
        + (f" -> {args.out}" if args.out else "")
    )
    for name, result in results.items():
        report = result.report
        hit = "yes" if report.cache_hit else "no"
        print(
            f"  {name}: {_what(result)}, {_size(result.nbytes)}, cache hit {hit}, batch {report.batch_size} "
            f"rows/{report.batch_requests} requests, compute {report.compute_ms:.2f} ms"
        )
    return EXIT_OK


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


# --- flops, models, health ------------------------------------------------------------------------
def _flops(args: argparse.Namespace) -> int:
    from kernelgen_client.client import KernelClient

    with KernelClient(**client_kwargs(args)) as client:
        report = client.flop_count(args.model, args.seq_lens, inference=args.inference)
        config = None if args.json else client.get_model(args.model).config
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        causal = config is not None and config.causal
        shape = "x".join(map(str, kernel_spatial(args.seq_lens, causal)))
        print(
            f"{args.model} seq_lens {','.join(map(str, args.seq_lens))}: {report.flops} FLOPs"
            f"{' (inference)' if args.inference else ''}, kernel {shape} ({report.grid_points} points),"
            f" {report.kernel_bytes} kernel bytes (float32), FiLM {'yes' if report.film else 'no'}"
        )
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from kernelgen_client.client import KernelClient
    from kernelgen_client.results import GroupInfo

    with KernelClient(**client_kwargs(args)) as client:
        infos = client.list_models()
    if args.json:
        print(json.dumps([asdict(info) for info in infos]))
        return EXIT_OK
    header = ("NAME", "READY", "DIMS", "OUT", "COND", "KERNEL", "PARAMS", "HASH", "REASON")
    _table([header, *(_model_row(info) for info in infos)])
    groups = GroupInfo.collect(infos)
    if groups:
        print()
        rows = [("GROUP", "MODELS", "READY", "MEMBERS", "FROM")]
        for group in groups:
            names, sources = group.names, [m.source for m in group.members]
            rows.append(
                (
                    group.name,
                    str(len(names)),
                    "yes" if group.ready else "no",
                    names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}",
                    sources[0] if len(sources) == 1 else f"{sources[0]} .. {sources[-1]}",
                )
            )
        _table(rows)
    return EXIT_OK


def _model_row(info: ModelInfo) -> tuple[str, ...]:
    config = info.config
    return (
        info.name,
        "yes" if info.ready else "no",
        str(config.data_dim) if config else "-",
        str(config.out_dim) if config else "-",
        str(config.cond_dim) if config and config.cond_dim else "-",
        _kernel_text(config) if config else "-",
        str(info.parameter_count) if info.ready else "-",
        info.content_hash[:12] or "-",
        info.reason,
    )


def _kernel_text(config: ModelConfig) -> str:
    """What the model serves, in one word: ``SIREN``, ``LearnableOmegaSIREN+Gaussian,causal``, ..."""
    text = config.kernel.removesuffix("KernelND")
    if config.mask is not None:
        text += "+" + config.mask.removesuffix("ModulationND")
    return text + (",causal" if config.causal else "")


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _health(args: argparse.Namespace) -> int:
    # The light path (no numpy): a bare channel and the hand-encoded health messages.
    import grpc

    from kernelgen_client._base import METHODS, ClientConfig, open_channel
    from kernelgen_client._health import decode_response, encode_request
    from kernelgen_client.errors import from_rpc_error
    from kernelgen_client.results import HealthStatus

    kwargs = client_kwargs(args)
    config = ClientConfig.build(
        kwargs["target"],
        timeout=kwargs["timeout"],
        tls=kwargs["tls"],
        token=kwargs["token"],
        metadata=None,
        retries=None,  # a health check answers now, it does not wait for a better moment
        load_balancing="round_robin",
        options=(),
    )
    channel = open_channel(config, grpc)
    check = METHODS["Check"]
    with channel:
        stub = channel.unary_unary(
            check.path, request_serializer=check.serialize, response_deserializer=check.deserialize
        )
        try:
            status = decode_response(
                stub(
                    encode_request(args.model or ""), timeout=config.timeout, metadata=config.metadata or None
                )
            )
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, config.target)
            if not isinstance(error, ModelNotFound):
                raise error from exc
            status = HealthStatus.SERVICE_UNKNOWN
    print(f"{args.model}: {status.name}" if args.model else status.name)
    if status is HealthStatus.SERVICE_UNKNOWN:
        return EXIT_NOT_FOUND
    return EXIT_OK if status is HealthStatus.SERVING else EXIT_ERROR


# --- registration ---------------------------------------------------------------------------------
def _kernel_options(p: argparse.ArgumentParser, what: str) -> None:
    """The options ``generate`` and ``generate-group`` share: grid, conditioning, dtype, representation."""
    p.add_argument("--seq-lens", type=_seq_lens, required=True, metavar="S,S", help=SEQ_LENS_HELP)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--conditioning",
        type=Path,
        metavar="FILE",
        help=f"FiLM conditioning of {what}: a .npy of one [rows, cond_dim] float32 array (numpy.save) "
        "(default: none, the unconditioned kernel, which the server caches)",
    )
    source.add_argument(
        "--random-conditioning", type=int, metavar="B", help="B rows of standard normal conditioning"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-conditioning (default: 0)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="dtype of the kernel (or factors) on the wire; .npy files and numpy have no bfloat16, so it "
        "is widened to float32 there (default: float32)",
    )
    p.add_argument(
        "--representation",
        choices=("dense", "factored", "auto"),
        default="dense",
        help="what travels: the kernel, or its factors and the model's output head (materialised here), "
        "or the smaller of the two (default: dense)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``generate``, ``generate-group``, ``flops``, ``models`` and ``health`` to the parser."""
    slow, quick = connection_options(timeout=60.0), connection_options(timeout=10.0)

    p = sub.add_parser(
        "generate",
        parents=[slow],
        help="generate a kernel and print a one-line summary",
        description="Generate one model's kernel on the server, print a summary, optionally save it. "
        "A group's kernels come together with generate-group.",
        epilog=_EPILOG,
    )
    p.add_argument("model", help="model name on the server (kernelgen models lists them)")
    _kernel_options(p, "every row's kernel")
    p.add_argument(
        "--grid", action="store_true", help="also fetch the coordinate grid (saved in .safetensors)"
    )
    p.add_argument("--out", type=Path, help="write the (dense) kernel to a .npy or .safetensors file")
    p.add_argument(
        "--save-factors",
        action="store_true",
        help="with --out x.safetensors and a factored kernel: save its factors and head, not the kernel",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force or forbid streaming (default: streamed when predicted above 3.5 MiB)",
    )
    p.set_defaults(handler=handle_errors(_generate))

    p = sub.add_parser(
        "generate-group",
        parents=[slow],
        help="generate every kernel of a group (one network's generators) in one call",
        description="Generate the kernels of every member of a group for one seq_lens and conditioning "
        "in one call, print one line per member, optionally save them all into one .safetensors file.",
        epilog=_EPILOG,
    )
    p.add_argument("group", help="group name on the server (kernelgen models lists the groups)")
    _kernel_options(p, "every member's kernels")
    p.add_argument(
        "--out",
        type=Path,
        help="write the (dense) kernels into one .safetensors file, one tensor per member's model name",
    )
    p.set_defaults(handler=handle_errors(_generate_group))

    p = sub.add_parser(
        "flops",
        parents=[quick],
        help="FLOP count and kernel size of a grid",
        description="The reference model's exact FLOP count for seq_lens, the kernel's shape and size, "
        "and whether the model has FiLM.",
        epilog=_EPILOG,
    )
    p.add_argument("model", help="model name on the server")
    p.add_argument("--seq-lens", type=_seq_lens, required=True, metavar="S,S", help=SEQ_LENS_HELP)
    p.add_argument(
        "--inference",
        action="store_true",
        help="count as at inference (a model without FiLM costs 0: cached)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=handle_errors(_flops))

    p = sub.add_parser(
        "models",
        parents=[quick],
        help="list the server's models, and the groups they form",
        description="Every model of the server, ready or not (with the reason it failed to load), then "
        "the groups: the generators of one network, imported together.",
        epilog=_EPILOG,
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=handle_errors(_models))

    p = sub.add_parser(
        "health",
        parents=[connection_options(timeout=5.0)],
        help="exit 0 only when the server (or a model or group) is SERVING",
        description="grpc.health.v1 check, usable as a container health check.",
        epilog=_EPILOG,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="NAME",
        help="check one model or group (SERVING when every member is) instead of the server",
    )
    p.set_defaults(handler=handle_errors(_health))
