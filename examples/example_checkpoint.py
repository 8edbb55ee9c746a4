"""Write the example training checkpoint that README.md's repository commands import.

    python examples/example_checkpoint.py          # into the current folder
    python examples/example_checkpoint.py DIR      # into DIR

It writes three files (needs ``pip install 'kernelgen[server]'``):

``run.ckpt``
    A Lightning-style checkpoint (``{"state_dict": ..., "epoch": ...}``) of a small 2D vision
    network: six blocks, each with its own FiLM-conditioned ``SIRENKernelND`` kernel generator
    at ``model.blocks.{i}.filter.kernel`` beside weights that are not generators (a norm and a
    projection per block, a stem and a head). ``kernelgen import --all`` finds the six.
``cfg.json``
    The ``config.json`` of block 0's generator, for ``kernelgen init --config`` and
    ``kernelgen import --prefix model.blocks.0.filter.kernel --config``.
``base.json``
    What the weights cannot tell (``omega_0``, ``L_cache``, per-block overrides), for
    ``kernelgen import --all --config``.

The constructor and config.json name FiLM differently: ``SIRENKernelND(film_cfg=...)`` takes what
config.json holds as ``"film"`` (``{"cond_dim": C, "film_hidden_dim": F}``, or null).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kernelgen_server.model import SIRENKernelND

#: Width of the conditioning vector every block's FiLM generator takes.
COND_DIM = 384
#: Each block's channels: the out_dim of its kernel generator.
CHANNELS = (64, 64, 128, 128, 256, 256)
#: What every generator shares; omega_0 and L_cache are not in the weights, so base.json says them.
OMEGA_0, L_CACHE = 30.0, 64
#: Block 5's generator was trained on a 64 x 32 grid: an override in base.json.
L_CACHE_OVERRIDES = {5: (64, 32)}
FILM = {"cond_dim": COND_DIM, "film_hidden_dim": 64}


def generator_config(block: int) -> dict[str, Any]:
    """Block ``block``'s generator as config.json writes it (FiLM under ``film``)."""
    return {
        "out_dim": CHANNELS[block],
        "data_dim": 2,
        "mlp_hidden_dim": 32,
        "num_layers": 3,
        "embedding_dim": 32,
        "omega_0": OMEGA_0,
        "L_cache": list(L_CACHE_OVERRIDES.get(block, (L_CACHE, L_CACHE))),
        "use_bias": True,
        "hidden_omega_0": 1.0,
        "film_after_pos_embed": False,
        "film": FILM,
    }


class Filter(nn.Module):
    """A long convolution whose kernel a SIREN generates (the weights here: the generator's only).

    ``forward(x [B, H, W, C], conditioning [B, COND_DIM] or None)``: ``x`` convolved ("same" size,
    through FFTs) with the ``[B, 2H-1, 2W-1, C]`` kernel its generator makes for seq_lens ``(H, W)``,
    each channel with its own kernel. The layer's path is where ``kernelgen_client.torch`` finds it.
    """

    def __init__(self, block: int) -> None:
        super().__init__()
        config = generator_config(block)
        film = config.pop("film")
        self.kernel = SIRENKernelND(**config, film_cfg=film)  # config.json's "film" is film_cfg here

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        kernel, _grid = self.kernel((height, width), conditioning)
        size = (3 * height - 2, 3 * width - 2)  # a linear (not circular) convolution
        signal = torch.fft.rfft2(x.permute(0, 3, 1, 2), s=size)
        spectrum = torch.fft.rfft2(kernel.permute(0, 3, 1, 2), s=size)
        full = torch.fft.irfft2(signal * spectrum, s=size)
        # The kernel's centre is at (H-1, W-1): the output aligned with x starts there.
        return full[..., height - 1 : 2 * height - 1, width - 1 : 2 * width - 1].permute(0, 2, 3, 1)


class Block(nn.Module):
    def __init__(self, block: int) -> None:
        super().__init__()
        channels = CHANNELS[block]
        self.norm = nn.LayerNorm(channels)
        self.filter = Filter(block)
        self.proj = nn.Linear(channels, CHANNELS[min(block + 1, len(CHANNELS) - 1)])

    def forward(self, x: torch.Tensor, conditioning: torch.Tensor | None) -> torch.Tensor:
        return self.proj(x + self.filter(self.norm(x), conditioning))


class VisionNet(nn.Module):
    """``forward(images [B, 3, 4H, 4W], conditioning [B, COND_DIM] or None) -> logits [B, 10]``;
    its filters convolve an ``H x W`` grid (64 x 64 images: seq_lens 16,16)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, CHANNELS[0], kernel_size=4, stride=4)
        self.blocks = nn.ModuleList(Block(i) for i in range(len(CHANNELS)))
        self.head = nn.Linear(CHANNELS[-1], 10)

    def forward(self, images: torch.Tensor, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stem(images).permute(0, 2, 3, 1)  # [B, H, W, C]: channels last, as the kernels are
        for block in self.blocks:
            x = block(x, conditioning)
        return self.head(x.mean(dim=(1, 2)))


class TrainingModule(nn.Module):
    """What a Lightning module holds: the network as ``model`` (so its keys start ``model.``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = VisionNet()


def write(folder: Path, seed: int = 0) -> list[Path]:
    """Write run.ckpt, cfg.json and base.json into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = TrainingModule()
    checkpoint, config, base = folder / "run.ckpt", folder / "cfg.json", folder / "base.json"
    torch.save({"state_dict": module.state_dict(), "epoch": 12, "global_step": 4800}, checkpoint)
    config.write_text(json.dumps(generator_config(0), indent=2) + "\n")
    overrides = {
        f"model.blocks.{i}.filter.kernel": {"L_cache": list(lens)} for i, lens in L_CACHE_OVERRIDES.items()
    }
    base.write_text(json.dumps({"omega_0": OMEGA_0, "L_cache": L_CACHE, "overrides": overrides}) + "\n")
    return [checkpoint, config, base]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path("."), help="where to write (default: .)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default: 0)")
    args = parser.parse_args(argv)
    for path in write(args.folder, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
