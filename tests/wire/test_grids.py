"""The client's grid is the server's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernelgen_server.model.siren import kernel_grid as server_grid
from kernelgen_wire.grids import kernel_grid


@pytest.mark.parametrize(
    ("seq_lens", "cache_lens"),
    [
        ((1,), (2,)),
        ((5,), (16,)),
        ((40,), (16,)),
        ((7, 9), (6, 9)),
        ((3, 4, 5), (4, 5, 3)),
        ((15, 15), (15, 15)),
    ],
)
def test_every_coordinate_is_the_servers(seq_lens: tuple[int, ...], cache_lens: tuple[int, ...]) -> None:
    ours = kernel_grid(seq_lens, cache_lens)
    theirs = server_grid(seq_lens, cache_lens).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert ours.tobytes() == theirs.tobytes()


def test_a_causal_grid_keeps_the_centre_and_the_positive_half() -> None:
    full = kernel_grid((6,), (16,))
    causal = kernel_grid((6,), (16,), causal=True)
    assert causal.shape == (1, 6, 1)
    np.testing.assert_array_equal(causal, full[:, 5:])
    assert torch.from_numpy(causal)[0, 0, 0].item() == 0.0
