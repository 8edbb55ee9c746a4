"""Client commands of ``kernelgen``: generate, flops, models, health.

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
    ModelNotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from kernelgen_client.results import ModelInfo

__all__ = ["EXIT_CODES", "register"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_CODES = {
    "ok": EXIT_OK,
    "error": EXIT_ERROR,
    "usage": EXIT_USAGE,
    "unavailable": EXIT_UNAVAILABLE,
    "not-found": EXIT_NOT_FOUND,
    "timeout": EXIT_TIMEOUT,
}
_EPILOG = "exit codes: 0 ok, 1 server error, 2 bad arguments, 3 unreachable, 4 unknown model, 5 timeout"


def _seq_lens(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 29,29, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 like 29,29, got {text!r}")
    return values


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
        "--timeout", type=_positive, default=timeout, help=f"deadline in seconds ({timeout:g})"
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
            return _fail(args, f"invalid request: {exc.message}", EXIT_USAGE)
        except DeadlineExceeded:
            return _fail(args, f"no answer within {args.timeout:g} s (raise --timeout)", EXIT_TIMEOUT)
        except Unavailable as exc:
            return _fail(args, f"server unavailable: {exc.message}", EXIT_UNAVAILABLE)
        except KernelServiceError as exc:
            return _fail(args, f"{exc.message} [{exc.code.name}]", EXIT_ERROR)
        except (ValueError, OSError) as exc:
            return _fail(args, str(exc), EXIT_USAGE)

    return run


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


# --- generate -------------------------------------------------------------------------------------
def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from kernelgen_client._save import SUFFIXES, save_kernel
    from kernelgen_client.client import KernelClient

    if args.out is not None and args.out.suffix.lower() not in SUFFIXES:
        return _fail(args, f"--out must end in {' or '.join(SUFFIXES)}, got {args.out.name!r}", EXIT_USAGE)
    if args.save_factors and (args.out is None or args.out.suffix.lower() != ".safetensors"):
        return _fail(args, "--save-factors writes .safetensors: give --out NAME.safetensors", EXIT_USAGE)
    conditioning = None
    if args.conditioning is not None:
        conditioning = np.load(args.conditioning, allow_pickle=False)
    with KernelClient(**client_kwargs(args)) as client:
        if args.random_conditioning is not None:
            info = client.get_model(args.model)
            cond_dim = info.config.cond_dim if info.config is not None else None
            if cond_dim is None:
                return _fail(
                    args, f"model {args.model!r} takes no conditioning (no FiLM generator)", EXIT_USAGE
                )
            rng = np.random.default_rng(args.seed)
            conditioning = rng.standard_normal((args.random_conditioning, cond_dim), dtype=np.float32)
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
            json.dumps(
                {
                    "model": args.model,
                    "shape": list(result.shape),
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
                    "out": str(args.out) if args.out else None,
                }
            )
        )
        return EXIT_OK
    what = "kernel" if result.representation == "dense" else "factored kernel"
    print(
        f"{args.model}: {what} {list(result.shape)} {result.wire_dtype}, {_size(result.nbytes)}"
        f" ({'streamed' if result.streamed else 'unary'}), cache hit {'yes' if report.cache_hit else 'no'},"
        f" batch {report.batch_size} rows/{report.batch_requests} requests, queue {report.queue_ms:.2f} ms,"
        f" compute {report.compute_ms:.2f} ms, total {result.elapsed_ms:.1f} ms"
        + (f" -> {args.out}" if args.out else "")
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
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(
            f"{args.model} {list(args.seq_lens)}: {report.flops} FLOPs"
            f"{' (inference)' if args.inference else ''}, {report.grid_points} grid points,"
            f" {report.kernel_bytes} kernel bytes (float32), cacheable {'yes' if report.cacheable else 'no'}"
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
    header = ("NAME", "READY", "DIMS", "OUT", "COND", "PARAMS", "HASH", "REASON")
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
        str(info.parameter_count) if info.ready else "-",
        info.content_hash[:12] or "-",
        info.reason,
    )


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
def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``generate``, ``flops``, ``models`` and ``health`` to the ``kernelgen`` parser."""
    slow, quick = connection_options(timeout=60.0), connection_options(timeout=10.0)

    p = sub.add_parser(
        "generate",
        parents=[slow],
        help="generate a kernel and print a one-line summary",
        description="Generate one kernel on the server, print a summary, optionally save it.",
        epilog=_EPILOG,
    )
    p.add_argument("model", help="model name on the server")
    p.add_argument("--seq-lens", type=_seq_lens, required=True, help="one length per axis, e.g. 29,29")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--conditioning", type=Path, help="[B, cond_dim] float32 conditioning (.npy)")
    source.add_argument(
        "--random-conditioning", type=int, metavar="B", help="B rows of standard normal conditioning"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-conditioning (0)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument(
        "--grid", action="store_true", help="also fetch the coordinate grid (saved in .safetensors)"
    )
    p.add_argument(
        "--representation",
        choices=("dense", "factored", "auto"),
        default="dense",
        help="what travels: the kernel, its factors and the model's output head, or the smaller (dense)",
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
        help="force or forbid streaming (default: by predicted size)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=handle_errors(_generate))

    p = sub.add_parser("flops", parents=[quick], help="FLOP count and kernel size of a grid", epilog=_EPILOG)
    p.add_argument("model", help="model name on the server")
    p.add_argument("--seq-lens", type=_seq_lens, required=True, help="one length per axis, e.g. 29,29")
    p.add_argument("--inference", action="store_true", help="count as at inference (cached kernels cost 0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=handle_errors(_flops))

    p = sub.add_parser(
        "models", parents=[quick], help="list the server's models, and the groups they form", epilog=_EPILOG
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=handle_errors(_models))

    p = sub.add_parser(
        "health",
        parents=[connection_options(timeout=5.0)],
        help="exit 0 only when the server (or MODEL) is SERVING",
        description="grpc.health.v1 check, usable as a container health check.",
        epilog=_EPILOG,
    )
    p.add_argument("model", nargs="?", default=None, help="check one model instead of the server")
    p.set_defaults(handler=handle_errors(_health))
