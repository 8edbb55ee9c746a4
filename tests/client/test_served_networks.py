"""Masked, causal and variant models served end to end, against the reference package's layers.

A repository of layers built from the real package (``kernel_oracle``: every
generator class, masks of each family, 1-D causal, 2-D and 3-D, with and
without FiLM, weights moved off their initialisation) is served by an
in-process server; the blocking client fetches each kernel, dense and
factored, in every dtype, for seq_lens below, at and above L_cache, and gets
what the layer's ``CKConvND`` convolves with (on kernelgen's coordinates)
within the served float32 measure (``1e-5 x max|kernel|``) and float16 /
bfloat16's one extra rounding. The core's cache cuts a smaller masked or
causal kernel from a cached larger one, exactly as it computes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kernel_oracle as oracle
import numpy as np
import pytest
import torch

from kernelgen_client import FactoredKernel, KernelClient
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository.store import ModelRepository, write_model
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import kernel_service, threaded_server

#: One layer of each generator class, between them every mask family, both FiLM states and geometry.
CASES = {
    "siren-gauss-2d": oracle.Case("SIRENKernelND", "gaussian-log", True, "2d"),
    "multi-exp-3d": oracle.Case("MultiOmegaSIRENKernelND", "exponential", True, "3d"),
    "blocks-aligned-causal": oracle.Case(
        "BlockDiagonalMultiOmegaSIRENKernelND", "blockaligned-softplus", False, "1d-causal"
    ),
    "learnable-direct-causal": oracle.Case(
        "LearnableOmegaSIRENKernelND", "gaussian-direct", True, "1d-causal"
    ),
    "blocks-learnable-2d": oracle.Case("BlockDiagonalLearnableOmegaSIRENKernelND", "none", True, "2d"),
    "fourier-softplus-3d": oracle.Case("RandomFourierKernelND", "gaussian-softplus", False, "3d"),
}
REL = 1e-5
#: float16 / bfloat16: the float32 kernel rounded once more (relative 2**-11, 2**-8 of each value).
LOW = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served-networks")
    for name, case in CASES.items():
        trained = oracle.trained(case)
        write_model(root, name, ModelConfig.from_dict(trained.config), trained.state)
    return root


@pytest.fixture(scope="module")
def client(repository: Path) -> Iterator[KernelClient]:
    with threaded_server(model_repo=str(repository)) as server, KernelClient(f"127.0.0.1:{server.port}") as c:
        yield c


def assert_close(got: np.ndarray, want: torch.Tensor, label: str, rel: float = REL) -> None:
    expected = want.double().numpy()
    assert got.shape == expected.shape, label
    err = float(np.abs(got.astype(np.float64) - expected).max())
    assert err <= rel * float(np.abs(expected).max()), f"{label}: max |diff| {err:.3g}"


def test_model_info_says_what_each_layer_does_with_its_kernel(client: KernelClient) -> None:
    for name, case in CASES.items():
        config = client.get_model(name).config
        assert config is not None
        assert config.kernel == case.kernel
        mask = oracle.MASKS[case.mask][0]
        assert config.mask == (None if mask == "Identity" else mask), name
        assert config.causal == case.causal


@pytest.mark.parametrize("name", list(CASES))
def test_served_kernels_are_what_the_layer_convolves_with(client: KernelClient, name: str) -> None:
    trained = oracle.trained(CASES[name])
    rows = None if trained.conditioning is None else trained.conditioning.numpy()
    for where, lens in oracle.seq_lens_around_cache(trained.conv).items():
        for conditioning in [None] if rows is None else [None, rows]:
            cond = None if conditioning is None else torch.from_numpy(conditioning)
            want = oracle.layer_kernel_on_grid(trained.conv, lens, cond)
            label = f"{name} {where} {lens} {'conditioned' if cond is not None else 'plain'}"
            dense = client.generate(name, list(lens), conditioning)
            assert_close(dense, want, label)
            factored = client.generate(name, list(lens), conditioning, representation="factored")
            assert isinstance(factored, FactoredKernel)
            assert factored.shape == tuple(want.shape)
            assert_close(factored.dense(), want, f"{label}, factored")
            torch_dense = factored.dense() if cond is None else None
            if torch_dense is not None:
                as_torch = client.generate(name, list(lens), representation="factored", as_torch=True)
                assert_close(as_torch.dense().numpy(), want, f"{label}, factored torch")
    lens = oracle.seq_lens_around_cache(trained.conv)["above"]
    want = oracle.layer_kernel_on_grid(trained.conv, lens)
    for dtype, bound in LOW.items():
        got = np.asarray(client.generate(name, list(lens), dtype=dtype), dtype=np.float32)
        assert_close(got, want, f"{name} {dtype}", rel=REL + bound)


def test_a_causal_kernel_has_s_points_and_its_grid_starts_at_the_centre(client: KernelClient) -> None:
    name = "learnable-direct-causal"
    result = client.generate(name, [5], with_report=True, return_grid=True)
    assert result.kernel.shape == (1, 5, oracle.CHANNELS)
    grid = np.asarray(result.grid)
    assert grid.shape == (1, 5, 1)
    assert grid[0, 0, 0] == 0.0 and np.all(np.diff(grid[0, :, 0]) > 0)


async def test_the_cache_cuts_masked_and_causal_kernels_exactly(repository: Path) -> None:
    service = kernel_service(ModelRepository.load(repository))
    try:
        for name in ("siren-gauss-2d", "learnable-direct-causal", "fourier-softplus-3d"):
            before = service.metrics.registry.get_sample_value("kernelgen_cache_slices_total") or 0.0
            conv = oracle.trained(CASES[name]).conv
            around = oracle.seq_lens_around_cache(conv)
            await service.generate(name, around["above"], None, pb.DTYPE_FLOAT32, False)
            result = await service.generate(name, around["below"], None, pb.DTYPE_FLOAT32, False)
            after = service.metrics.registry.get_sample_value("kernelgen_cache_slices_total")
            assert after == before + 1, name
            payload = result.kernel.payload
            cut = np.frombuffer(payload.data, "<f4").reshape(payload.shape)
            computed = service._engines[name].unconditioned(around["below"]).numpy()
            assert np.array_equal(cut, computed), name  # on CPU each grid point rounds alike
            assert_close(cut, oracle.layer_kernel_on_grid(conv, around["below"]), name)
    finally:
        await service.close()


def test_the_flops_command_shows_a_causal_kernel_s_shape(
    client: KernelClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from kernelgen_client.cli import main

    target = client.target
    assert main(["flops", "learnable-direct-causal", "--seq-lens", "5", "--target", target]) == 0
    assert "kernel 5 (5 points)" in capsys.readouterr().out
    assert main(["flops", "siren-gauss-2d", "--seq-lens", "3,4", "--target", target]) == 0
    assert "kernel 5x7 (35 points)" in capsys.readouterr().out


def test_the_models_command_says_what_each_model_serves(
    client: KernelClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from kernelgen_client.cli import main

    assert main(["models", "--target", client.target]) == 0
    rows = {line.split()[0]: line.split()[5] for line in capsys.readouterr().out.splitlines()[1:] if line}
    assert rows["learnable-direct-causal"] == "LearnableOmegaSIREN+Gaussian,causal"
    assert rows["multi-exp-3d"] == "MultiOmegaSIREN+Exponential"
    assert rows["blocks-learnable-2d"] == "BlockDiagonalLearnableOmegaSIREN"
