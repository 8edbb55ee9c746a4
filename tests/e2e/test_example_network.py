"""The example network README.md serves (examples/example_checkpoint.py) computes what it says: each
filter convolves its input with its generator's kernel, "same" size, every channel on its own."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "example_checkpoint", ROOT / "examples" / "example_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_filter_is_the_direct_convolution_with_its_kernel() -> None:
    ex = example()
    torch.manual_seed(0)
    layer = ex.Filter(0).eval()
    height, width, channels = 3, 4, ex.CHANNELS[0]
    x = torch.randn(2, height, width, channels, dtype=torch.float64)
    conditioning = torch.randn(2, ex.COND_DIM)
    with torch.no_grad():
        kernel, _ = layer.kernel((height, width), conditioning)  # [2, 5, 7, C]: offsets -2..2, -3..3
        got = layer(x.float(), conditioning).double()
    want = torch.zeros_like(x)
    for i in range(height):
        for j in range(width):
            for p in range(height):
                for q in range(width):
                    want[:, i, j] += x[:, p, q] * kernel[:, i - p + height - 1, j - q + width - 1].double()
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_network_maps_images_to_logits_and_its_weights_are_the_checkpoints() -> None:
    ex = example()
    network = ex.TrainingModule().model.eval()
    with torch.no_grad():
        logits = network(torch.randn(2, 3, 16, 16), torch.randn(2, ex.COND_DIM))
        unconditioned = network(torch.randn(1, 3, 16, 16))
    assert logits.shape == (2, 10) and unconditioned.shape == (1, 10)
    assert torch.isfinite(logits).all()
    # Filters hold only their generators: the checkpoint's keys under a filter are the generator's.
    filters = {k for k in network.state_dict() if ".filter." in k}
    assert filters and all(".filter.kernel." in k for k in filters)
