"""Training-style networks holding several kernel generators, their checkpoints in every format,
and groups imported from them, for the tests of ``kernelgen import --all`` and group fetching.

``MixedNetwork`` is what a research repository leaves: generators of several kinds (1-D, 2-D
anisotropic, 3-D; with and without FiLM and biases; one with the legacy ``kernel_network``
names) inside blocks beside other layers, weights moved off their initialisation.
``stack`` is a network whose generators share one grid and conditioning width (a vision-Hyena
stack), the kind a client fetches as one group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kernelgen_server.model.siren import SIRENKernelND, SIRENPositionalEmbeddingND, kernel_grid

FORMATS = ("pt", "ckpt", "safetensors", "sharded")


class Sine(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


class LegacyKernel(nn.Module):
    """An older generator: its hidden layers and activations in one ``kernel_network`` Sequential."""

    def __init__(self, out_dim: int, hidden: int, layers: int, L_cache: int) -> None:
        super().__init__()
        self.L_cache = (L_cache,)
        self.positional_embedding = SIRENPositionalEmbeddingND(1, hidden, 30.0, True)
        modules: list[nn.Module] = []
        for _ in range(layers - 1):
            modules += [nn.Linear(hidden, hidden), Sine()]
        self.kernel_network = nn.Sequential(*modules)
        self.out_linear = nn.Linear(hidden, out_dim)

    def forward(self, seq_lens: Sequence[int]) -> tuple[Tensor, Tensor]:
        grid = kernel_grid(tuple(seq_lens), self.L_cache)
        return self.out_linear(self.kernel_network(self.positional_embedding(grid))), grid


class Filter(nn.Module):
    def __init__(self, kernel: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel


class Block(nn.Module):
    def __init__(self, kernel: nn.Module, width: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mixer = nn.Linear(width, width)
        self.filter = Filter(kernel)


class Network(nn.Module):
    def __init__(self, kernels: Sequence[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.blocks = nn.ModuleList(Block(k) for k in kernels)
        self.head = nn.Linear(6, 10)

    def generators(self) -> list[nn.Module]:
        return [block.filter.kernel for block in self.blocks]  # type: ignore[union-attr]


#: The mixed network's generators: (prefix in its state_dict, config.json values, L_cache override).
MIXED: list[tuple[str, dict[str, Any]]] = [
    (
        "blocks.0.filter.kernel",
        {"out_dim": 6, "data_dim": 1, "mlp_hidden_dim": 16, "num_layers": 3, "embedding_dim": 12,
         "omega_0": 30.0, "L_cache": 16, "use_bias": True, "hidden_omega_0": 1.0,
         "film_after_pos_embed": False, "film": {"cond_dim": 5, "film_hidden_dim": 7}},
    ),
    (
        "blocks.1.filter.kernel",
        {"out_dim": 4, "data_dim": 2, "mlp_hidden_dim": 8, "num_layers": 4, "embedding_dim": 10,
         "omega_0": 30.0, "L_cache": [6, 9], "use_bias": False, "hidden_omega_0": 1.0,
         "film_after_pos_embed": False, "film": None},
    ),
    (
        "blocks.2.filter.kernel",
        {"out_dim": 3, "data_dim": 3, "mlp_hidden_dim": 8, "num_layers": 2, "embedding_dim": 8,
         "omega_0": 30.0, "L_cache": [4, 5, 3], "use_bias": True, "hidden_omega_0": 1.0,
         "film_after_pos_embed": True, "film": {"cond_dim": 5, "film_hidden_dim": 4}},
    ),
    (
        "blocks.3.filter.kernel",
        {"out_dim": 5, "data_dim": 1, "mlp_hidden_dim": 12, "num_layers": 3, "embedding_dim": 12,
         "omega_0": 30.0, "L_cache": 16, "use_bias": True, "hidden_omega_0": 1.0,
         "film_after_pos_embed": False, "film": None},
    ),
]  # fmt: skip
#: Index of the legacy-named generator in ``MIXED``.
LEGACY = 3
#: The base config ``import --all`` takes for the mixed network (prefixes relative to ``root``).
MIXED_BASE: dict[str, Any] = {
    "omega_0": 30.0,
    "L_cache": 16,
    "causal": False,  # the weights cannot tell; the 1-D layers say it
    "overrides": {
        "blocks.1.filter.kernel": {"L_cache": [6, 9]},
        "blocks.2.filter.kernel": {"L_cache": [4, 5, 3]},
    },
}


def _kernel(config: dict[str, Any]) -> SIRENKernelND:
    kwargs = {k: v for k, v in config.items() if k != "film"}
    return SIRENKernelND(**kwargs, film_cfg=config["film"])


def trained(network: nn.Module, seed: int) -> nn.Module:
    """``network`` with every weight moved off its initialisation, as training leaves it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return network.eval()


def mixed_network(seed: int = 0) -> Network:
    """The mixed network, trained."""
    torch.manual_seed(seed)
    kernels: list[nn.Module] = [_kernel(config) for _, config in MIXED[:LEGACY]]
    kernels.append(LegacyKernel(out_dim=5, hidden=12, layers=3, L_cache=16))
    network = Network(kernels)
    trained(network, seed + 1)
    return network


def stack(depth: int = 3, seed: int = 0, cond_dim: int = 5, L_cache: int = 7, out_dim: int = 6) -> Network:
    """A trained stack of 2-D FiLM generators sharing one grid and conditioning width (hidden 8)."""
    torch.manual_seed(seed)
    config = {
        "out_dim": out_dim, "data_dim": 2, "mlp_hidden_dim": 8, "num_layers": 3, "embedding_dim": 8,
        "omega_0": 10.0, "L_cache": L_cache, "use_bias": True, "hidden_omega_0": 1.0,
        "film_after_pos_embed": False, "film": {"cond_dim": cond_dim, "film_hidden_dim": 6},
    }  # fmt: skip
    network = Network([_kernel(config) for _ in range(depth)])
    trained(network, seed + 1)
    return network


def reference_kernel(generator: nn.Module, seq_lens: Sequence[int], conditioning: Tensor | None) -> Tensor:
    """The network's own forward of one generator (float32)."""
    with torch.no_grad():
        if isinstance(generator, LegacyKernel):
            return generator(seq_lens)[0]
        kernel: Tensor = generator(tuple(seq_lens), conditioning)[0]
        return kernel


def assert_close(got: Tensor, want: Tensor) -> None:
    """Equal to float32 rounding: max abs difference <= 1e-5 x max |kernel|."""
    assert got.shape == want.shape
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-5 * scale, (got - want).abs().max()


def save(network: nn.Module, form: str, folder: Path, root: str = "") -> Path:
    """Write ``network``'s state as a training run would in ``form``; return what to import.

    ``pt``: a plain state_dict; ``ckpt``: Lightning's wrapping (keys under ``root`` inside
    ``state_dict``, with the trainer's other entries); ``safetensors``: one file;
    ``sharded``: two safetensors shards and their index JSON.
    """
    head = f"{root}." if root else ""
    state = {f"{head}{k}": v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    if form == "pt":
        path = folder / "network.pt"
        torch.save(state, path)
    elif form == "ckpt":
        path = folder / "network.ckpt"
        optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": []}
        torch.save(
            {
                "epoch": 4,
                "global_step": 1200,
                "pytorch-lightning_version": "2.4.0",
                "state_dict": state,
                "optimizer_states": [optimizer],
                "lr_schedulers": [{"last_epoch": 4}],
                "hyper_parameters": {"lr": 1e-3, "width": 6},
            },
            path,
        )
    elif form == "safetensors":
        path = folder / "network.safetensors"
        save_file(state, path)
    elif form == "sharded":
        keys = sorted(state)
        half = math.ceil(len(keys) / 2)
        shards = {
            "model-00001-of-00002.safetensors": keys[:half],
            "model-00002-of-00002.safetensors": keys[half:],
        }
        weight_map = {}
        for shard, names in shards.items():
            save_file({k: state[k] for k in names}, folder / shard)
            weight_map.update(dict.fromkeys(names, shard))
        path = folder / "model.safetensors.index.json"
        total = sum(v.numel() * v.element_size() for v in state.values())
        path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    else:
        raise ValueError(form)
    return path


def import_group(network: nn.Module, repo: Path, name: str, base: dict[str, Any], folder: Path) -> None:
    """``kernelgen import --all`` of ``network`` (saved as a ``.pt``) into ``repo`` as group ``name``."""
    from kernelgen_client.cli import main

    checkpoint = save(network, "pt", folder)
    base_file = folder / f"{name}-base.json"
    base_file.write_text(json.dumps(base))
    args = ["import", str(checkpoint), "--all", "--config", str(base_file), "--name", name]
    assert main([*args, "--repo", str(repo)]) == 0
