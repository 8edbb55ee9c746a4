"""The serving engine on every served model against the reference package's layers (the test oracle).

For every generator class with every mask, with and without FiLM, 1-D causal,
2-D and 3-D (``kernel_oracle.cases``; weights moved off their initialisation,
clamped values saved out of range), ``KernelEngine`` gives what the layer's
``CKConvND`` convolves with on the same coordinates (the package evaluated on
kernelgen's grid, ``layer_kernel_on_grid``), for seq_lens below, at and above
L_cache, within the engine's float32 measure (docs/architecture.md,
"Exactness": the engine folds FiLM into the next linear and so rounds
differently):

* dense kernels, plain and conditioned, and their float16 / bfloat16 casts;
* factored kernels, materialised by the client's ``FactoredKernel`` with the
  output head (and mask) the server sends;
* tiles of grid points, as a stream computes a kernel too large to hold.

How each served model's own forward relates to the package's, bit for bit and
on each one's own grid, is ``test_served_fidelity``'s subject.
"""

from __future__ import annotations

import math
from pathlib import Path

import kernel_oracle as oracle
import numpy as np
import pytest
import torch

from kernelgen_client.factored import FactoredKernel
from kernelgen_client.factored import OutputHead as ClientHead
from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.model.output_head import OutputHead
from kernelgen_server.model.served import ServedModel
from kernelgen_server.repository.checkpoint import load_module
from kernelgen_server.transport.native_codec import head_message

CASES = oracle.cases()
#: The engine's float32 measure: max |got - want| <= REL * max |want|.
REL = 1e-5


def served(trained: oracle.Trained) -> ServedModel:
    return load_module(ModelConfig.from_dict(trained.config), trained.state, Path("model.safetensors"))


def assert_close(got: torch.Tensor, want: torch.Tensor, label: str, rel: float = REL) -> None:
    assert tuple(got.shape) == tuple(want.shape), label
    scale = float(want.abs().max())
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * max(scale, 1e-30), f"{label}: max |diff| {err:.3g} over max |want| {scale:.3g}"


def client_head(model: ServedModel) -> ClientHead:
    """The output head as a client holds it: the server's, through its message."""
    return ClientHead.from_pb(head_message(OutputHead.of(model)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_engine_serves_what_the_layer_convolves_with(case: oracle.Case) -> None:
    trained = oracle.trained(case)
    model = served(trained)
    engine = KernelEngine(model)
    head = client_head(model)
    assert (head.mask is not None) == (model.mask is not None)
    rows = [] if trained.conditioning is None else [trained.conditioning]
    for where, lens in oracle.seq_lens_around_cache(trained.conv).items():
        assert engine.spatial_shape(lens) == model.spatial_shape(lens)
        assert torch.equal(engine.grid(lens), model.grid(lens)), where
        want = oracle.layer_kernel_on_grid(trained.conv, lens)
        got = engine.unconditioned(lens)
        assert_close(got, want, f"{where} {lens} plain")
        factors = engine.unconditioned(lens, factored=True)
        dense = FactoredKernel(factors.numpy(), head, factors.nbytes).dense()
        assert_close(torch.from_numpy(dense), want, f"{where} {lens} plain, factored")
        for conditioning in rows:
            want = oracle.layer_kernel_on_grid(trained.conv, lens, conditioning)
            got = engine.conditioned(lens, [conditioning])
            assert_close(got, want, f"{where} {lens} conditioned")
            factors = engine.conditioned(lens, [conditioning], factored=True)
            dense = FactoredKernel(factors.numpy(), head, factors.nbytes).dense()
            assert_close(torch.from_numpy(dense), want, f"{where} {lens} conditioned, factored")
    # Low precision is the float32 kernel (mask applied) cast once.
    lens = oracle.seq_lens_around_cache(trained.conv)["at"]
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(engine.unconditioned(lens, dtype), engine.unconditioned(lens).to(dtype))
        if rows:
            cast = engine.conditioned(lens, rows).to(dtype)
            assert torch.equal(engine.conditioned(lens, rows, dtype), cast)


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in CASES
        if c.mask != "none" or c.kernel in ("LearnableOmegaSIRENKernelND", "RandomFourierKernelND")
    ],
    ids=lambda c: c.id,
)
def test_tiles_of_grid_points_are_the_whole_kernel(case: oracle.Case) -> None:
    trained = oracle.trained(case)
    engine = KernelEngine(served(trained))
    lens = oracle.seq_lens_around_cache(trained.conv)["above"]
    points = math.prod(engine.spatial_shape(lens))
    cut = points // 3
    rows = [] if trained.conditioning is None else [trained.conditioning[:1]]  # a tile is of one row
    for conditioning in [None, *rows]:
        whole = (
            engine.unconditioned(lens) if conditioning is None else engine.conditioned(lens, [conditioning])
        ).reshape(points, -1)
        tiles = [
            engine.points(lens, start, stop, conditioning=conditioning)
            for start, stop in ((0, cut), (cut, points))
        ]
        assert_close(torch.cat(tiles), whole, f"tiles of {lens}")


def test_every_case_family_is_covered() -> None:
    kinds = {(c.kernel, c.mask != "none", c.causal) for c in CASES}
    assert len(kinds) == len(oracle.GENERATORS) * 2 * 2


def test_a_masked_kernel_is_the_unmasked_kernel_times_the_mask_the_client_computes() -> None:
    """The client's mask (from the head's parameters) is the server's, to float32 rounding."""
    for case in CASES:
        if case.mask == "none" or case.kernel != "SIRENKernelND" or case.film:
            continue
        trained = oracle.trained(case)
        model = served(trained)
        head = client_head(model)
        assert head.mask is not None
        for lens in oracle.seq_lens_around_cache(trained.conv).values():
            spatial = model.spatial_shape(lens)
            ours = head.mask.values(spatial)
            with torch.no_grad():
                theirs = model.mask.mask(model.grid(lens))[0] if model.mask is not None else None
            assert theirs is not None
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6, err_msg=case.id)  # m <= 1


# -- CUDA (deployment hosts) ----------------------------------------------------------------
#: One case of each generator class, masked, causal and not, with FiLM where the class takes it.
CUDA_CASES = [
    oracle.Case(kernel, mask, kernel != "RandomFourierKernelND", geometry)
    for kernel in oracle.GENERATORS
    for mask, geometry in (("gaussian-softplus", "1d-causal"), ("exponential", "2d"))
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: c.id)
def test_cuda_serves_what_cpu_serves(case: oracle.Case) -> None:
    trained = oracle.trained(case)
    model = served(trained)
    cpu, cuda = KernelEngine(model), KernelEngine(model, "cuda")
    rows = [] if trained.conditioning is None else [trained.conditioning]
    for lens in oracle.seq_lens_around_cache(trained.conv).values():
        assert_close(cuda.unconditioned(lens), cpu.unconditioned(lens), f"{lens} plain")
        factors = cuda.unconditioned(lens, factored=True)
        assert_close(factors, cpu.unconditioned(lens, factored=True), f"{lens} plain factors")
        if rows:
            got = cuda.conditioned(lens, rows)
            assert got.device.type == "cpu" and got.is_pinned()
            assert_close(got, cpu.conditioned(lens, rows), f"{lens} conditioned")
            assert_close(got, oracle.layer_kernel_on_grid(trained.conv, lens, rows[0]), f"{lens} package")
