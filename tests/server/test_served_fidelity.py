"""kernelgen's served models against the reference package's layers (the test oracle).

For every generator class with every mask, with and without FiLM, 1-D causal,
2-D and 3-D (``kernel_oracle.cases``), on weights moved off their initialisation
with clamped values saved out of range, a served model built from its
``config.json`` and loaded strictly from the layer's tensors gives what the
layer's ``CKConvND`` convolves with, ``mask(kernel)`` cropped when causal, for
``seq_lens`` below, at and above ``L_cache``:

* on the same coordinates, bit for bit: kernelgen evaluates the same float32
  operations in the same order (the package with its grid cache replaced by
  kernelgen's grid);
* on each one's own coordinates, within the float32 bound: the two grids differ
  by float32 rounding, at most one float32 ulp of the largest coordinate
  (``2^-23 * max(1, max|x|)``; the package's ``linspace`` is not the correctly
  rounded ``k / (L - 1)``), and the kernels by at most that displacement times
  the kernel's Lipschitz bound (``kernel_oracle.grid_sensitivity``).

Above ``L_cache`` the comparison is with a freshly loaded layer: the package
grows its grid in place and a second growth changes its step (its kernels then
depend on earlier calls); kernelgen's grid is stateless, ``k / (L_cache - 1)``
at every size, which is what the package computes on a layer's first growth.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import kernel_oracle as oracle
import pytest
import torch

from kernelgen_server.model.config import ModelConfig
from kernelgen_server.model.served import ServedModel
from kernelgen_server.repository.checkpoint import load_module

CASES = oracle.cases()


def served(trained: oracle.Trained) -> ServedModel:
    config = ModelConfig.from_dict(trained.config)
    return load_module(config, trained.state, Path("model.safetensors"))


def _conditionings(trained: oracle.Trained) -> list[torch.Tensor | None]:
    return [None] if trained.conditioning is None else [None, trained.conditioning]


def test_the_cases_cover_every_class_mask_and_geometry() -> None:
    assert {c.kernel for c in CASES} == set(oracle.GENERATORS)
    assert {c.mask for c in CASES} == set(oracle.MASKS)
    assert {c.geometry for c in CASES} == {"1d-causal", "2d", "3d"}
    assert {c.film for c in CASES if c.kernel != "RandomFourierKernelND"} == {False, True}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_served_kernel_is_what_the_layer_convolves_with(case: oracle.Case) -> None:
    trained = oracle.trained(case)
    assert trained.moved > 1e-3, "training must move every tensor off its initialisation"
    if oracle._clamped(trained.conv):
        assert oracle.out_of_range(trained.conv) > 0, "the saved clamped values must lie out of range"
    model = served(trained)
    for where, lens in oracle.seq_lens_around_cache(trained.conv).items():
        for conditioning in _conditionings(trained):
            with torch.no_grad():
                got = model(lens, conditioning)[0]
                unmasked = model.generator(lens, conditioning)[0]
            label = f"{where} {lens} {'conditioned' if conditioning is not None else 'plain'}"

            same_grid = oracle.layer_kernel_on_grid(trained.conv, lens, conditioning)
            assert got.shape == same_grid.shape, label
            assert torch.equal(got, same_grid), f"{label}: max |diff| {float((got - same_grid).abs().max())}"

            ours, theirs = model.generator.grid(lens), oracle.package_grid(trained.conv, lens)
            ulp = 2.0**-23 * max(1.0, float(ours.abs().max()))
            assert float((ours - theirs).abs().max()) <= ulp, label

            reference = oracle.layer_kernel(trained.conv, lens, conditioning)
            sensitivity = oracle.grid_sensitivity(model, conditioning, float(unmasked.abs().max()))
            bound = sensitivity * math.sqrt(case.data_dim) * ulp
            assert float((got - reference).abs().max()) <= bound, label
            if case.causal:
                assert got.shape[1] == lens[0], label


def test_a_wrong_clamp_would_be_caught() -> None:
    """The bound is tight enough to see a mask served without its clamp (the oracle can fail)."""
    case = oracle.Case("SIRENKernelND", "gaussian-direct", False, "2d")
    trained = oracle.trained(case)
    model = served(trained)
    mask = model.mask
    assert mask is not None
    lens = trained.conv.kernel.L_cache_per_axis
    reference = oracle.layer_kernel(trained.conv, lens)
    unclamped = model.generator(lens)[0] * torch.exp(
        -0.5
        * torch.einsum(
            "b...d,dc->b...c", model.generator.grid(lens).square(), mask.std_param.square().reciprocal()
        )
    )
    assert float((unclamped - reference).abs().max()) > 1e-3


def test_the_package_grid_depends_on_its_history_and_kernelgen_s_does_not() -> None:
    """A second growth past L_cache changes the package's step; kernelgen matches a fresh layer."""
    trained = oracle.trained(oracle.Case("SIRENKernelND", "none", False, "1d-causal"))
    model = served(trained)
    (cache,) = trained.conv.kernel.L_cache_per_axis
    grown = copy.deepcopy(trained.conv)
    with torch.no_grad():
        grown.kernel((cache + 2,))
        history, _ = grown.kernel((cache + 5,))
        fresh, _ = copy.deepcopy(trained.conv).kernel((cache + 5,))
        ours = model.generator((cache + 5,))[0]
    step = float(
        grown.kernel.positional_embedding.grid_cache[0, 1, 0]
        - grown.kernel.positional_embedding.grid_cache[0, 0, 0]
    )
    assert not math.isclose(step, 1.0 / (cache - 1), rel_tol=1e-4)  # the package's step changed
    assert float((history - ours).abs().max()) > 1e-2
    assert float((fresh - ours).abs().max()) < 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if c.mask != "none"], ids=lambda c: c.id)
def test_mask_factors_multiply_to_the_served_mask(case: oracle.Case) -> None:
    """Every mask is a product over axes per channel of its form's factor with its parameter (what a
    masked model's output head sends, ``kernelgen_wire.masks``), on the served (cropped) axes."""
    from kernelgen_server.transport.native_codec import MASK_FORMS
    from kernelgen_wire.masks import axis_factors

    model = served(oracle.trained(case))
    mask = model.mask
    assert mask is not None
    for lens in oracle.seq_lens_around_cache(oracle.trained(case).conv).values():
        axes = [axis.numpy() for axis in model.axes(lens)]
        factors = [
            torch.from_numpy(f) for f in axis_factors(MASK_FORMS[mask.form], mask.parameter().numpy(), axes)
        ]
        assert len(factors) == case.data_dim
        assert [f.shape[0] for f in factors] == list(model.spatial_shape(lens))
        if model.causal:  # the crop keeps the centre and the positive coordinates
            assert float(model.axes(lens)[0][0]) == 0.0
        dense = mask.mask(model.generator.grid(lens))[0]
        if model.causal:
            dense = dense[lens[0] - 1 :]
        # The float32 mask against the float64 product: a few roundings of values in [0, 1].
        assert float((dense.double() - _product(factors)).abs().max()) <= 8 * 2.0**-24, lens


def _product(factors: list[torch.Tensor]) -> torch.Tensor:
    total = factors[0]
    for factor in factors[1:]:
        total = total.unsqueeze(-2) * factor.view(*([1] * (total.dim() - 1)), *factor.shape)
    return total


GENERATOR_CASES = [
    oracle.Case(kernel, "none", film, "2d")
    for kernel in oracle.GENERATORS
    for film in ((False, True) if kernel != "RandomFourierKernelND" else (False,))
]


@pytest.mark.parametrize("case", GENERATOR_CASES, ids=lambda c: c.id)
def test_flop_count_is_the_class_s_own(case: oracle.Case) -> None:
    trained = oracle.trained(case)
    model = served(trained)
    generator = trained.conv.kernel
    for lens in oracle.seq_lens_around_cache(trained.conv).values():
        for inference in (False, True):
            ours = model.flop_count(lens, inference)
            if case.kernel != "RandomFourierKernelND":
                assert ours == generator.flop_count(tuple(lens), inference=inference)
                continue
            # The package defines none; kernelgen counts as for a SIREN (see its docstring).
            assert not hasattr(generator, "flop_count")
            g = math.prod(2 * n - 1 for n in lens)
            e, h, c, d = oracle.HIDDEN, oracle.HIDDEN, oracle.CHANNELS, case.data_dim
            want = (
                2 * g * d * (e // 2)
                + g * e
                + (2 * g * e * h + g * h)
                + (2 * g * h * h + g * h)
                + 2 * g * h * c
            )
            assert ours == (0 if inference else want)


@pytest.mark.parametrize("case", GENERATOR_CASES, ids=lambda c: c.id)
def test_constants_outside_the_weights_are_the_package_s(case: oracle.Case) -> None:
    """What the package keeps in non-persistent buffers and attributes is rebuilt from the config, exactly."""
    trained = oracle.trained(case)
    model = served(trained)
    theirs, ours = trained.conv.kernel.positional_embedding, model.generator.positional_embedding
    assert set(trained.conv.kernel.state_dict()) == set(model.state_dict())
    if hasattr(theirs, "omega_0_const"):
        assert ours.omega_0 == theirs.omega_0
        assert torch.tensor(ours.omega_0_const, dtype=torch.float32).item() == theirs.omega_0_const.item()
        assert (ours.omega_0_scale_min, ours.omega_0_scale_max) == (
            theirs.omega_0_scale_min,
            theirs.omega_0_scale_max,
        )
    if hasattr(trained.conv.kernel, "omega_0_per_block"):
        blocks = torch.tensor(model.generator.omega_0_per_block, dtype=torch.float32)
        assert torch.equal(blocks, trained.conv.kernel.omega_0_per_block)


@pytest.mark.parametrize("mask", [m for m in oracle.MASKS if m.startswith(("gaussian", "blockaligned"))])
def test_gaussian_clamp_bounds_are_the_package_s(mask: str) -> None:
    for geometry in oracle.GEOMETRIES:
        trained = oracle.trained(oracle.Case("SIRENKernelND", mask, False, geometry))
        ours, theirs = served(trained).mask, trained.conv.mask
        assert ours is not None
        assert (ours.min_std, ours.max_std) == (theirs.min_std, theirs.max_std)
        assert ours.parametrization == theirs.parametrization
