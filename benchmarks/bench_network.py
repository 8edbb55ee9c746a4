"""A whole network's inference forward, local against served (kernelgen_client.torch), in one run.

    python benchmarks/bench_network.py            # 3 interleaved rounds of 5 s per step
    python benchmarks/bench_network.py --quick    # a smoke run: 1 round of 2 s

The network is a stack of the real package's ``CKConvND`` layers (nvSubquadratic:
1-D, FiLM-conditioned SIREN kernels), trained a few steps, imported into a
repository as a group and served by one ``kernelgen serve``. Each step runs the
same forwards (a batch of ``--batch`` sequences, each with its own
conditioning row) in this process, closed loop, one at a time:

- ``local``: the network's own generators and masks;
- ``served dense`` / ``served factored``: ``serve_kernels`` with that
  representation, each layer fetching its kernels (one call per layer);
- ``served ... prefetch``: the same under ``ServedNetwork.prefetch``, every
  layer's kernels in one ``GenerateGroup`` call;
- ``served unconditioned``: the network without conditioning, its kernels
  answered from the client's cache after the first forward (no call).

Reported per step: forwards/s, calls and bytes per forward, and the share of
the forward spent waiting for kernels; the served / local ratio per round, its
median and range. On a CPU-only host the local forward computes every kernel
on the same cores as the server, so served is not expected to win here; the
GPU check (scripts/device_check.sh) runs this benchmark where a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_main, kernelgen_server, machine, markdown_table
from nvsubquadratic.lazy_config import LazyConfig
from nvsubquadratic.modules import kernels_nd
from nvsubquadratic.modules.ckconv_nd import CKConvND
from nvsubquadratic.modules.film import KernelFiLMGenerator
from torch import nn

from kernelgen_client import KernelClient, tune_malloc
from kernelgen_client.cli import main as kernelgen
from kernelgen_client.torch import ServedNetwork, serve_kernels

HIDDEN = 32  # the generators' hidden width: factors are channels / HIDDEN times smaller
COND_DIM = 16


def layer(channels: int, length: int, omega_0: float) -> CKConvND:
    film = LazyConfig(KernelFiLMGenerator)(
        cond_dim=COND_DIM, kernel_hidden_dim=HIDDEN, num_film_layers=2, film_hidden_dim=32
    )
    kernel = LazyConfig(kernels_nd.SIRENKernelND)(
        out_dim=channels, data_dim=1, mlp_hidden_dim=HIDDEN, num_layers=3, embedding_dim=HIDDEN,
        omega_0=omega_0, L_cache=length, use_bias=True, hidden_omega_0=1.0, film_cfg=film,
    )  # fmt: skip
    kwargs = {"data_dim": 1, "hidden_dim": channels, "grid_type": "double", "fft_padding": "zero"}
    return CKConvND(kernel_cfg=kernel, mask_cfg=LazyConfig(nn.Identity)(), **kwargs)


class Block(nn.Module):
    def __init__(self, conv: CKConvND, channels: int) -> None:
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.global_conv = conv
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        return x + self.proj(self.mixer.global_conv(x, conditioning=conditioning))


class Network(nn.Module):
    def __init__(self, depth: int, channels: int, length: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(layer(channels, length, 6.0 + i), channels) for i in range(depth))

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, conditioning)
        return x


def trained(network: Network, length: int, channels: int) -> Network:
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    x, c = torch.randn(2, length, channels), torch.randn(2, COND_DIM)
    for _ in range(2):
        optimiser.zero_grad()
        network(x, c).square().mean().backward()
        optimiser.step()
    return network.eval()


def imported(network: Network, folder: Path) -> Path:
    """The network as group ``net`` of a fresh repository (``kernelgen import --all``)."""
    checkpoint = folder / "net.ckpt"
    state = {f"network.{k}": v.cpu() for k, v in network.state_dict().items()}
    torch.save({"state_dict": state}, checkpoint)
    prefix = "network.blocks.{}.mixer.global_conv.kernel"
    overrides = {prefix.format(i): {"omega_0": 6.0 + i} for i in range(len(network.blocks))}
    base = folder / "base.json"
    base.write_text(json.dumps({"L_cache": network.blocks[0].mixer.global_conv.kernel.L_cache,
                                "hidden_omega_0": 1.0, "omega_0": 6.0, "overrides": overrides}))  # fmt: skip
    repo = folder / "repo"
    args = ["import", str(checkpoint), "--all", "--config", str(base), "--name", "net", "--repo", str(repo)]
    if kernelgen(args) != 0:
        raise SystemExit("kernelgen import failed")
    return repo


def warm(forward: Callable[[], object], seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        forward()


def measure(forward: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Forwards done and seconds taken, closed loop."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward()
        count += 1
    return count, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    tune_malloc()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the server keeps the other core
    info = machine()
    info["load_average_before"] = round(os.getloadavg()[0], 2)
    network = trained(Network(args.depth, args.channels, args.length), args.length, args.channels)
    device = torch.device(args.device)
    network.to(device)  # served kernels arrive there too (factored ones materialised there)
    x = torch.randn(args.batch, args.length, args.channels, device=device)
    c = torch.randn(args.batch, COND_DIM, device=device)
    steps: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        repo = imported(network, Path(tmp))
        with (
            kernelgen_server("--model-repo", str(repo), "--device", args.device) as server,
            KernelClient(server.target, timeout=120) as client,
        ):
            for round_index in range(args.rounds):

                def step(
                    name: str,
                    forward: Callable[[], object],
                    served: ServedNetwork | None,
                    index: int = round_index,
                ) -> None:
                    warm(forward, args.warmup)
                    before = served.counts.snapshot() if served is not None else None
                    count, elapsed = measure(forward, args.seconds)
                    row = {"round": index, "forwards_per_s": count / elapsed, "forwards": count}
                    if served is not None and before is not None:
                        after = served.counts.snapshot()
                        calls = after.calls - before.calls + after.group_calls - before.group_calls
                        row["calls_per_forward"] = calls / count
                        row["bytes_per_forward"] = (after.nbytes - before.nbytes) / count
                        row["fetch_share"] = (after.seconds - before.seconds) / elapsed
                    steps.setdefault(name, []).append(row)

                step("local", lambda: network(x, c), None)
                for representation in ("dense", "factored"):
                    with serve_kernels(network, client, "net", representation=representation) as served:
                        step(f"served {representation}", lambda: network(x, c), served)

                        def prefetched(served: ServedNetwork = served) -> object:
                            with served.prefetch(args.length, c):
                                return network(x, c)

                        step(f"served {representation} prefetch", prefetched, served)
                with serve_kernels(network, client, "net") as served:
                    step("served unconditioned", lambda: network(x), served)
                step("local unconditioned", lambda: network(x), None)
    info["load_average_after"] = round(os.getloadavg()[0], 2)
    return {
        "machine": info,
        "settings": {
            k: getattr(args, k)
            for k in ("depth", "channels", "length", "batch", "device", "seconds", "warmup", "rounds")
        },
        "steps": steps,
        "ratios": {
            f"{name} / {base_of(name)}": ratios(steps, name) for name in steps if name != base_of(name)
        },
    }


def base_of(step: str) -> str:
    """The local step a step is compared with: the same network, with or without conditioning."""
    return "local unconditioned" if "unconditioned" in step else "local"


def ratios(steps: dict[str, list[dict[str, float]]], name: str) -> dict[str, float]:
    """A step's forwards/s over its local step's, per round (the two measured seconds apart): the
    median and the range."""
    base = steps[base_of(name)]
    per_round = [row["forwards_per_s"] / base[i]["forwards_per_s"] for i, row in enumerate(steps[name])]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


def report(result: dict[str, Any]) -> str:
    steps, settings, m = result["steps"], result["settings"], result["machine"]

    def median(name: str, key: str) -> float:
        return statistics.median(row[key] for row in steps[name])

    def served(name: str, key: str, form: str, scale: float = 1.0) -> str:
        return form.format(scale * median(name, key)) if key in steps[name][0] else "-"

    rows = []
    for name in steps:
        r = ratios(steps, name)
        rows.append(
            {
                "step": name,
                "forwards/s": f"{median(name, 'forwards_per_s'):.1f}",
                "/ local": f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})",
                "calls/forward": served(name, "calls_per_forward", "{:.2f}"),
                "MB/forward": served(name, "bytes_per_forward", "{:.2f}", 1e-6),
                "fetching": served(name, "fetch_share", "{:.0f}%", 100),
            }
        )  # fmt: skip
    length, channels, batch = settings["length"], settings["channels"], settings["batch"]
    kernel_mb = batch * (2 * length - 1) * channels * 4 / 1e6
    device = m["cuda"] if settings["device"] != "cpu" and m.get("cuda") else settings["device"]
    return (
        f"# A network's forward, local and served\n\n{m['date']}, {m['platform']}, {m['cpus']} CPUs, "
        f"torch {m['torch']} ({m['torch_threads']} thread(s) in the benchmark's process), network and "
        f"server on {device}; load average {m.get('load_average_before', '?')} before, "
        f"{m.get('load_average_after', '?')} after. {settings['rounds']} interleaved round(s) of "
        f"{settings['seconds']:g} s per step ({settings['warmup']:g} s warm-up), one forward at a time.\n\n"
        f"{settings['depth']} CKConvND layers (the reference package's), {channels} channels, "
        f"length {length} (seq_lens {length}: {2 * length - 1}-point kernels), a batch of {batch} with "
        f"one FiLM row each ({kernel_mb:.1f} MB of dense float32 kernels per layer and forward). "
        "`/ local`: forwards/s over the local forward's in the same round (the unconditioned steps over "
        "`local unconditioned`), median and range of the rounds; calls count `GenerateKernel` and "
        "`GenerateGroup` calls alike; MB are the bytes that travelled (kernels, or factors); "
        "`fetching`: the share of the forward's time spent waiting for kernels.\n\n"
        f"{markdown_table(rows)}\n"
    )


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, default=4, help="CKConvND layers (4)")
    parser.add_argument("--channels", type=int, default=128, help="channels of each layer (128)")
    parser.add_argument("--length", type=int, default=512, help="the sequences' length (512)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward (8)")
    parser.add_argument("--device", default="cpu", help="the network's and the server's device (cpu)")


def main() -> None:
    benchmark_main(run, report, doc=__doc__, output="network", arguments=arguments)


if __name__ == "__main__":
    main()
