"""A network exported live (``kernelgen_server.export``), served, and pointed at its group with
``serve_kernels``: it computes what it computes locally, every layer (masks, causal crops, every
generator variant, FiLM) with its kernel from the server, dense and factored.

The network is ``reference_network``'s (the reference package's ``CKConvND`` layers), its inputs
above every layer's L_cache: the local forward grows each layer's grid once, which keeps the
package's step, so the local kernels are the stateless ones kernelgen serves.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import reference_network as R
import torch

from kernelgen_client import KernelClient
from kernelgen_client.torch import LayerMismatch, serve_kernels
from kernelgen_server import export

from support import threaded_server

#: The served network's outputs against its local ones (float32, kernels within their bound).
ATOL = 2e-5


def test_an_exported_network_served_computes_what_it_computes_locally(tmp_path: Path) -> None:
    network, conditioning = R.shared_trained_network()
    export(network, tmp_path / "repo", "net")
    rng = torch.Generator().manual_seed(3)
    inputs = [
        torch.randn(2, *[n + 3 for n in conv.kernel.L_cache_per_axis], R.CHANNELS, generator=rng)
        for conv in network.convs()
    ]

    def forward(net: R.Network) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [
                block(x, conditioning if layer.film else None)
                for block, layer, x in zip(net.blocks, R.LAYERS, inputs, strict=True)
            ]

    local = forward(copy.deepcopy(network))
    with threaded_server(model_repo=str(tmp_path / "repo")) as server:
        with KernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            for representation in ("dense", "factored"):
                served_network = copy.deepcopy(network)
                with serve_kernels(served_network, client, "net", representation=representation) as served:
                    assert sorted(served.layers) == sorted(R.conv_path(i) for i in range(len(R.LAYERS)))
                    remote = forward(served_network)
                for layer, want, got in zip(R.LAYERS, local, remote, strict=True):
                    torch.testing.assert_close(
                        got, want, atol=ATOL, rtol=0, msg=f"{representation} {layer.name}"
                    )


def test_a_changed_layer_of_an_exported_network_is_refused(tmp_path: Path) -> None:
    network, _ = R.shared_trained_network()
    export(network, tmp_path / "repo", "net")
    changed = copy.deepcopy(network)
    with torch.no_grad():
        changed.convs()[1].mask.weight.add_(0.25)  # its mask, which the layer hash covers
    with threaded_server(model_repo=str(tmp_path / "repo")) as server:
        with KernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            with pytest.raises(LayerMismatch, match=r"blocks\.1\.mixer\.global_conv.*not the ones"):
                serve_kernels(changed, client, "net")


#: float16 / bfloat16: the float32 kernel rounded once more (relative 2**-11, 2**-8 of each value).
DTYPES = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def test_every_exported_member_is_served_as_its_layer_convolves(tmp_path: Path) -> None:
    """Each member through the client, dense and factored, every dtype, below, at and above L_cache:
    within the served float32 measure (``1e-5 x max|kernel|``, plus the dtype's one rounding) of the
    member's own model, which ``assert_serves_layer`` holds to the package's layer (``test_export``
    shows ``import --all`` writes the same members, byte for byte)."""
    import numpy as np

    network, conditioning = R.shared_trained_network()
    export(network, tmp_path / "repo", "net")
    with threaded_server(model_repo=str(tmp_path / "repo")) as server:
        with KernelClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            members = client.get_group("net").members
            for index, (member, layer, conv) in enumerate(
                zip(members, R.LAYERS, network.convs(), strict=True)
            ):
                model = R.load_member(tmp_path / "repo" / "net" / str(index))
                rows = conditioning if layer.film else None
                R.assert_serves_layer(model, conv, rows, layer.name)
                for where, lens in R.seq_lens_around_cache(conv).items():
                    with torch.no_grad():
                        want = model(lens, rows)[0].double().numpy()
                    scale = float(np.abs(want).max())
                    cond = None if rows is None else rows.numpy()
                    for dtype, rounding in DTYPES.items():
                        for representation in ("dense", "factored"):
                            kernel = client.generate(
                                member.name, list(lens), cond, dtype=dtype, representation=representation
                            )
                            got = np.asarray(kernel, dtype=np.float64)
                            label = f"{layer.name} {where} {lens} {dtype} {representation}"
                            assert got.shape == want.shape, label
                            err = float(np.abs(got - want).max())
                            assert err <= (1e-5 + 2 * rounding) * scale, f"{label}: {err:.3g}"
