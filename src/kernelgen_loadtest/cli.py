"""``kernelgen loadtest``: sweep concurrency or request rate against a server and gate on the result.

Importing this module is cheap (argparse only): the ``kernelgen`` parser
registers the subcommand on every start, ``kernelgen health`` included.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]

_EPILOG = """\
exit codes: 0 every step passed its gates; 1 a step failed (error rate, p99 SLO or
correctness); 2 bad arguments or workload; 3 no server reachable; 4 unknown model;
130 interrupted (finished steps are still reported and written).

examples:
  kernelgen loadtest hyena-2d --seq-lens 15,15 --concurrency 1,4,16,64 --plot sweep.png
  kernelgen loadtest hyena-2d --seq-lens 29,29 --seq-lens 15,15 --rows 1-4 --unconditioned 0.2 \\
      --rate 50,100,200 --duration 30 --json out.json --slo-p99-ms 250 --max-error-rate 0.001
  kernelgen loadtest --workload mix.yaml --concurrency 32 --workers 2 --check-correctness
  kernelgen loadtest hyena-2d --seq-lens 15,15 --concurrency 32 --protocol oip --shared-memory
"""


def _levels(kind: str, integer: bool) -> Any:
    def parse(text: str) -> list[float]:
        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values or min(values) <= 0 or (integer and any(v != int(v) for v in values)):
            example = "1,4,16,64" if integer else "50,100,200"
            raise argparse.ArgumentTypeError(f"expected positive {kind} like {example}, got {text!r}")
        return values

    return parse


def _number(minimum: float, maximum: float = float("inf"), integer: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not minimum <= value <= maximum or (integer and value != int(value)):
            bounds = f">= {minimum:g}" if maximum == float("inf") else f"in [{minimum:g}, {maximum:g}]"
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if integer else ' number'} {bounds}, got {text!r}"
            )
        return int(value) if integer else value

    return parse


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``loadtest`` to the ``kernelgen`` parser, with the client commands' connection options."""
    from kernelgen_client import commands

    p = sub.add_parser(
        "loadtest",
        parents=[commands.connection_options(timeout=30.0)],
        help="closed/open-loop load test with a latency and throughput report",
        description="Load a kernelgen server with GenerateKernel calls through AsyncKernelClient (or, with "
        "--protocol oip, Open Inference Protocol ModelInfer calls): a closed "
        "loop at each --concurrency or an open loop at each --rate. Reports throughput, latency "
        "percentiles, errors by status code and the server's batching, queueing and cache figures per step. "
        "--timeout is each call's deadline. Calls are not retried unless --retries says so: every failure "
        "is counted.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="MODEL[:WEIGHT]",
        help="models to load, with relative weights; a group's name sends GenerateGroup calls",
    )
    w = p.add_argument_group("workload (flags win over --workload)")
    w.add_argument(
        "-m", "--model", action="append", dest="model_flags", metavar="MODEL[:WEIGHT]",
        help="a model to load, as the positional names; repeat for a mix",
    )  # fmt: skip
    w.add_argument("--workload", type=Path, help="YAML or JSON workload file (models, seq_lens, rows, ...)")
    w.add_argument(
        "--seq-lens",
        action="append",
        metavar="S,S",
        help=f"{commands.SEQ_LENS_HELP}; repeat for a uniform mix (default: each model's L_cache)",
    )
    w.add_argument("--rows", help="conditioning rows per request: N or A-B (1)")
    w.add_argument(
        "--unconditioned", type=_number(0.0, 1.0), metavar="SHARE",
        help="share of requests sent without conditioning: cache traffic (0)",
    )  # fmt: skip
    w.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="output dtype (float32)")
    w.add_argument(
        "--representation", metavar="R",
        help="what the server sends: dense, factored, auto, or a mix like dense:1,factored:3 (dense)",
    )  # fmt: skip
    w.add_argument("--seed", type=int, help="seed of the conditioning vectors and the schedule (0)")
    w.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=None,
        help="force or forbid StreamKernel (default: by predicted size)",
    )  # fmt: skip

    load = p.add_argument_group("load")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument(
        "--concurrency", type=_levels("concurrencies", True), metavar="LIST",
        help="closed loop: requests always in flight, one step per value (default 1)",
    )  # fmt: skip
    levels.add_argument(
        "--rate", type=_levels("rates", False), metavar="LIST",
        help="open loop: requests per second, one step per value",
    )  # fmt: skip
    load.add_argument(
        "--distribution", choices=("poisson", "constant"), default="poisson",
        help="open-loop arrivals (poisson)",
    )  # fmt: skip
    length = load.add_mutually_exclusive_group()
    length.add_argument("--duration", type=_number(0.01), metavar="S", help="measured seconds per step (10)")
    length.add_argument(
        "--requests", type=_number(1, integer=True), metavar="N", help="measured requests per step"
    )
    load.add_argument(
        "--warmup",
        type=_number(0.0),
        default=2.0,
        metavar="S",
        help="unmeasured seconds before each step (2)",
    )
    load.add_argument(
        "--max-inflight", type=_number(1, integer=True), default=1024, metavar="N",
        help="open loop: most calls out at once; sends beyond are dropped and counted (1024)",
    )  # fmt: skip
    load.add_argument(
        "--workers", type=_number(1, 256, integer=True), default=1, metavar="N",
        help="client processes sharing the load, for when one process is the bottleneck (1)",
    )  # fmt: skip
    load.add_argument(
        "--connections", type=_number(1, 256, integer=True), default=1, metavar="N",
        help="connections per client process, taken in turn by its calls; more than one reaches "
        "every worker of a `kernelgen serve --workers N` server (1)",
    )  # fmt: skip
    load.add_argument(
        "--retries", type=_number(1, 5, integer=True), default=1, metavar="N",
        help="attempts per call: 1 counts every failure as the server answered it; more retries as an "
        "application's client does (kernelgen_client.RetryPolicy(max_attempts=N): gRPC's retries of "
        "UNAVAILABLE and of a full queue, and one replay of a call whose response was cut) (1)",
    )  # fmt: skip

    wire = p.add_argument_group("protocol")
    wire.add_argument(
        "--protocol", choices=("native", "oip"), default="native",
        help="kernelgen.v1 GenerateKernel calls (native), or Open Inference Protocol ModelInfer calls "
        "to the same server (oip) (native)",
    )  # fmt: skip
    wire.add_argument(
        "--shared-memory", action="store_true",
        help="have kernels written into shared-memory regions the client owns instead of the response "
        "(a server on this host started with --shared-memory; one connection per client process)",
    )  # fmt: skip

    out = p.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="write every step's results as JSON")
    out.add_argument("--csv", type=Path, metavar="PATH", help="write one CSV row per step")
    out.add_argument("--plot", type=Path, metavar="PATH", help="PNG of latency and throughput per step")
    out.add_argument("--quiet", action="store_true", help="no live progress, no table")

    gate = p.add_argument_group("checks and gates")
    gate.add_argument(
        "--check-correctness", type=_number(1, integer=True), nargs="?", const=16, default=0, metavar="N",
        help="recompute N sampled responses per step in-process, count mismatches (16; kernelgen[server])",
    )  # fmt: skip
    gate.add_argument("--model-repo", type=Path, help="models for --check-correctness (default: embedded)")
    gate.add_argument(
        "--max-error-rate", type=_number(0.0, 1.0), default=0.0, metavar="SHARE",
        help="fail a step whose errors and drops exceed this share of its requests (0)",
    )  # fmt: skip
    gate.add_argument(
        "--slo-p99-ms", type=_number(0.0), metavar="MS", help="fail a step whose p99 exceeds MS"
    )
    p.set_defaults(handler=commands.handle_errors(_loadtest))


def _loadtest(args: argparse.Namespace) -> int:
    from kernelgen_loadtest.session import Session

    return Session(args).run()
