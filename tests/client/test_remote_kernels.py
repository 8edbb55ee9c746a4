"""A network of the real package's layers pointed at the server (kernelgen_client.torch).

The oracle is nvSubquadratic itself: its ``CKConvND`` layers, trained off their
initialisation, saved as a Lightning checkpoint, imported as a group, served;
the network's forward with served kernels must equal its local forward.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from nvsubquadratic.lazy_config import LazyConfig
from nvsubquadratic.modules import kernels_nd
from nvsubquadratic.modules.ckconv_nd import CKConvND
from nvsubquadratic.modules.film import KernelFiLMGenerator
from torch import nn

from kernelgen_client import AsyncKernelClient, KernelClient, ModelNotFound
from kernelgen_client.torch import (
    KernelCache,
    LayerMismatch,
    RemoteKernel,
    serve_kernels,
    serve_kernels_async,
)

from support import threaded_server

CHANNELS = 8
COND_DIM = 6
LENGTH = 24  # the input's length: grid_lens 24 on a double grid, above L_cache 16
#: float32 rounding of one network's two paths (FFT convolution of the same kernel, summed over layers).
ATOL = 2e-5


def conv(film: bool, omega_0: float) -> CKConvND:
    film_cfg = (
        LazyConfig(KernelFiLMGenerator)(
            cond_dim=COND_DIM, kernel_hidden_dim=8, num_film_layers=2, film_hidden_dim=12
        )
        if film
        else None
    )
    kernel = LazyConfig(kernels_nd.SIRENKernelND)(
        out_dim=CHANNELS, data_dim=1, mlp_hidden_dim=8, num_layers=3, embedding_dim=8,
        omega_0=omega_0, L_cache=16, use_bias=True, hidden_omega_0=1.0, film_cfg=film_cfg,
    )  # fmt: skip
    mask = LazyConfig(nn.Identity)()
    return CKConvND(
        data_dim=1,
        hidden_dim=CHANNELS,
        kernel_cfg=kernel,
        mask_cfg=mask,
        grid_type="double",
        fft_padding="zero",
    )


class Block(nn.Module):
    def __init__(self, layer: CKConvND) -> None:
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.global_conv = layer
        self.proj = nn.Linear(CHANNELS, CHANNELS)

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        return x + self.proj(self.mixer.global_conv(x, conditioning=conditioning))


class Net(nn.Module):
    def __init__(self, film: bool, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(conv(film, 6.0 + 2 * i)) for i in range(depth))

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, conditioning)
        return x


def trained(network: Net, seed: int) -> Net:
    """A few optimiser steps, so that no weight is at its initialisation."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    x = torch.randn(2, LENGTH, CHANNELS)
    c = torch.randn(2, COND_DIM)
    for _ in range(3):
        optimiser.zero_grad()
        network(x, c).square().mean().backward()
        optimiser.step()
    return network.eval()


def lightning_checkpoint(network: nn.Module, path: Path) -> Path:
    torch.save({"state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}, "epoch": 3}, path)
    return path


def imported(network: nn.Module, repo: Path, name: str, folder: Path) -> None:
    from kernelgen_client.cli import main

    checkpoint = lightning_checkpoint(network, folder / f"{name}.ckpt")
    base = folder / f"{name}-base.json"
    overrides = {
        f"network.blocks.{i}.mixer.global_conv.kernel": {"omega_0": 6.0 + 2 * i}
        for i in range(len(network.blocks))
    }
    base.write_text(
        json.dumps({"L_cache": 16, "hidden_omega_0": 1.0, "omega_0": 6.0, "overrides": overrides})
    )
    args = ["import", str(checkpoint), "--all", "--config", str(base), "--name", name, "--repo", str(repo)]
    assert main(args) == 0


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, Net]]]:
    folder = tmp_path_factory.mktemp("networks")
    repo = folder / "repo"
    nets = {"film": trained(Net(film=True), 0), "plain": trained(Net(film=False), 1)}
    for name, net in nets.items():
        imported(net, repo, name, folder)
    with threaded_server(model_repo=str(repo)) as server:
        yield server, nets


@pytest.fixture
def client(networks: tuple[Any, dict[str, Net]]) -> Iterator[KernelClient]:
    server, _ = networks
    with KernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        yield client


def inputs(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, LENGTH, CHANNELS, generator=generator), torch.randn(
        3, COND_DIM, generator=generator
    )


def test_a_served_network_computes_what_it_computes_locally(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    _, nets = networks
    x, c = inputs()
    for name, net in nets.items():
        conditioning = c if name == "film" else None
        with torch.inference_mode():
            local = net(x, conditioning)
        for representation in ("dense", "factored", "auto"):
            with serve_kernels(net, client, name, representation=representation) as served:
                assert sorted(served.layers) == [f"blocks.{i}.mixer.global_conv" for i in range(3)]
                with torch.inference_mode():
                    remote = net(x, conditioning)
            torch.testing.assert_close(remote, local, atol=ATOL, rtol=0)


def test_unconditioned_kernels_are_fetched_once_then_cached(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    net = networks[1]["plain"]
    x, _ = inputs()
    with serve_kernels(net, client, "plain") as served, torch.inference_mode():
        net(x)
        assert served.counts.snapshot().calls == 3  # one per layer
        for _ in range(3):
            net(x)
        assert served.counts.snapshot().calls == 3  # a repeated forward makes no call
        assert served.cache.hits == 9
        net(x[:, :10])  # another grid: one call per layer again
        assert served.counts.snapshot().calls == 6


def test_conditioned_layers_call_once_each_or_once_together_with_prefetch(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    net = networks[1]["film"]
    x, c = inputs()
    with torch.inference_mode():
        local = net(x, c)
    with serve_kernels(net, client, "film") as served, torch.inference_mode():
        net(x, c)
        assert (served.counts.snapshot().calls, served.counts.snapshot().group_calls) == (3, 0)
        with served.prefetch(LENGTH, c):
            assert served.counts.snapshot().group_calls == 1
            prefetched = net(x, c)
        counts = served.counts.snapshot()
        assert (counts.calls, counts.group_calls, counts.kernels) == (3, 1, 6)
        torch.testing.assert_close(prefetched, local, atol=ATOL, rtol=0)
        with served.prefetch(LENGTH, c):
            net(x, c + 1)  # other conditioning than prefetched: each layer fetches its own
        assert served.counts.snapshot().calls == 6


def test_reduced_dtypes_stay_within_their_bound(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    net = networks[1]["film"]
    x, c = inputs()
    with torch.inference_mode():
        local = net(x, c)
    with serve_kernels(net, client, "film") as served:
        for remote in (s.remote for s in served._served):
            remote.to(torch.bfloat16)  # kernels travel and arrive in bfloat16
        with torch.inference_mode():
            got = net(x, c)
    # One bfloat16 rounding of each kernel (2**-8 relative), through three residual layers.
    scale = local.abs().max().item()
    assert (got - local).abs().max().item() <= 3 * 2**-8 * scale


def test_restore_brings_back_the_very_same_modules(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    net = networks[1]["film"]
    before = {name: module for name, module in net.named_modules()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    served = serve_kernels(net, client, "film")
    layer = net.blocks[0].mixer.global_conv
    assert isinstance(layer.kernel, RemoteKernel) and isinstance(layer.mask, nn.Identity)
    assert not any(k.startswith("blocks.0.mixer.global_conv.kernel.") for k in net.state_dict())
    served.restore()
    served.restore()  # again: nothing more
    after = {name: module for name, module in net.named_modules()}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_training_through_served_kernels_is_refused(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    net = networks[1]["film"]
    x, c = inputs()
    with serve_kernels(net, client, "film"):
        net.train()
        try:
            with pytest.raises(RuntimeError, match="served for inference"):
                net(x, c)
        finally:
            net.eval()
        with pytest.raises(RuntimeError, match="served for inference"):
            net(x, c.requires_grad_())


def test_a_network_whose_weights_changed_is_refused_naming_the_layer(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    net = copy.deepcopy(networks[1]["film"])
    with torch.no_grad():
        net.blocks[1].mixer.global_conv.kernel.out_linear.bias[0] += 1e-3
    with pytest.raises(
        LayerMismatch, match=r"layer 'blocks.1.mixer.global_conv' .* weights are not the ones"
    ):
        serve_kernels(net, client, "film")
    assert isinstance(net.blocks[0].mixer.global_conv.kernel, kernels_nd.SIRENKernelND)  # nothing replaced


def test_a_network_that_is_not_the_groups_is_refused(
    networks: tuple[Any, dict[str, Net]], client: KernelClient
) -> None:
    nets = networks[1]
    with pytest.raises(LayerMismatch, match="weights are not the ones"):
        serve_kernels(nets["film"], client, "plain")
    deeper = copy.deepcopy(nets["film"])
    deeper.blocks.append(Block(conv(True, 12.0)))  # a layer the group does not have
    with pytest.raises(LayerMismatch, match="no member in group 'film'"):
        serve_kernels(deeper, client, "film")
    with pytest.raises(ModelNotFound):
        serve_kernels(nets["film"], client, "no-such-group")


def test_a_failed_call_names_the_layer(networks: tuple[Any, dict[str, Net]], client: KernelClient) -> None:
    net = networks[1]["film"]
    x, _ = inputs()
    wrong = torch.ones(3, COND_DIM + 1)  # the width the layers' FiLM does not take
    from kernelgen_client import InvalidRequest

    with (
        serve_kernels(net, client, "film"),
        pytest.raises(InvalidRequest, match=r"layer 'blocks.0.mixer.global_conv'"),
    ):
        with torch.inference_mode():
            net(x, wrong)


def test_concurrent_forwards_from_threads(networks: tuple[Any, dict[str, Net]], client: KernelClient) -> None:
    net = networks[1]["film"]
    rows = [inputs(seed) for seed in range(6)]
    with torch.inference_mode():
        local = [net(x, c) for x, c in rows]
    results: dict[int, torch.Tensor] = {}
    with serve_kernels(net, client, "film", cache=KernelCache(1 << 20)) as served:

        def forward(i: int) -> None:
            x, c = rows[i]
            with torch.inference_mode(), served.prefetch(LENGTH, c) if i % 2 else _nothing():
                results[i] = net(x, c)

        threads = [threading.Thread(target=forward, args=(i,)) for i in range(len(rows))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert sorted(results) == list(range(len(rows)))
    for i, want in enumerate(local):
        torch.testing.assert_close(results[i], want, atol=ATOL, rtol=0)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_an_asyncio_client_serves_forwards_run_in_threads(networks: tuple[Any, dict[str, Net]]) -> None:
    server, nets = networks
    net = nets["film"]
    x, c = inputs()
    with torch.inference_mode():
        local = net(x, c)

    async def main() -> torch.Tensor:
        async with AsyncKernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            served = await serve_kernels_async(net, client, "film")
            try:
                with pytest.raises(RuntimeError, match="in a thread"):
                    with torch.inference_mode():
                        net(x, c)  # on the loop itself: refused, not deadlocked

                def forward() -> torch.Tensor:
                    with torch.inference_mode():
                        return net(x, c)

                return await asyncio.to_thread(forward)
            finally:
                served.restore()

    torch.testing.assert_close(asyncio.run(main()), local, atol=ATOL, rtol=0)


def test_without_torch_the_module_says_what_to_install() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import kernelgen_client.torch"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "pip install 'kernelgen[torch]'" in done.stderr
