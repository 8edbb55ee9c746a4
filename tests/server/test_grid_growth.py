"""Grids past L_cache: the reference package grows its grid in place, kernelgen's is stateless.

The package's positional embedding caches a grid of ``2 * L - 1`` points per axis over
``[-1, 1]`` (``L`` the constructor's ``L_cache``, step ``1 / (L - 1)``). A request past the
current extent ``L_cur`` rebuilds the cache for ``L_new`` points per axis over ``[-m, m]`` with
``m = 1 + step * (L_new - L_cur)`` on a grown axis and ``m = 1`` on every other one, from the
*current* extent. So:

* the first growth keeps the step (``L_cur = L``): the package's grid is kernelgen's;
* a second growth on an axis makes its step ``(L - 1 + L_new - L_cur) / ((L - 1) (L_new - 1))``,
  smaller than ``1 / (L - 1)``, and every later request (even below L_cache) is evaluated on it;
* a growth on another axis rebuilds an axis that grew before over ``[-1, 1]`` with its grown
  number of points: its step becomes ``1 / (L_cur - 1)``.

kernelgen's grid is ``k / (L_cache - 1)`` at every size and after any history: the package's
on a layer whose cache never grew or grew once (within one float32 ulp of its ``linspace``),
which is what a freshly loaded layer computes.
"""

from __future__ import annotations

import warnings

import torch

from kernelgen_server.model.siren import kernel_grid

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nvsubquadratic.modules.kernels_nd import SIRENPositionalEmbeddingND

ULP = 2.0**-23


def package_grid(embedding: SIRENPositionalEmbeddingND, lens: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        grid: torch.Tensor = embedding(lens)[1]
    return grid


def axis_step(grid: torch.Tensor, axis: int) -> float:
    line = grid[(0, *(slice(None) if i == axis else 0 for i in range(grid.shape[-1])), axis)]
    return float(line[-1] - line[0]) / (line.numel() - 1)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= ULP * max(1.0, float(b.abs().max()))


def test_without_growth_and_after_one_the_package_s_grid_is_kernelgen_s() -> None:
    cache = (5, 8)
    embedding = SIRENPositionalEmbeddingND(data_dim=2, embedding_dim=4, L_cache=list(cache), omega_0=1.0)
    for lens in [(1, 1), (3, 8), cache]:
        assert close(package_grid(embedding, lens), kernel_grid(lens, cache)), lens
    for lens in [(9, 8), (4, 6), (9, 8)]:  # one growth, then requests inside the grown extent
        assert close(package_grid(embedding, lens), kernel_grid(lens, cache)), lens
    assert embedding.L_cache_per_axis == (9, 8)  # grown in place


def test_a_second_growth_changes_the_step_for_every_later_request() -> None:
    length, first, second = 5, 7, 10
    embedding = SIRENPositionalEmbeddingND(data_dim=1, embedding_dim=4, L_cache=length, omega_0=1.0)
    package_grid(embedding, (first,))
    grown = package_grid(embedding, (second,))
    expected = (length - 1 + second - first) / ((length - 1) * (second - 1))
    assert abs(axis_step(grown, 0) - expected) <= 1e-6
    assert expected < 1.0 / (length - 1)
    # Even a request below L_cache is now on the changed step: the package's kernels depend on its history.
    small = package_grid(embedding, (3,))
    assert abs(axis_step(small, 0) - expected) <= 1e-6
    assert not close(small, kernel_grid((3,), (length,)))
    # A fresh embedding (a reloaded layer) and kernelgen agree at every size.
    fresh = SIRENPositionalEmbeddingND(data_dim=1, embedding_dim=4, L_cache=length, omega_0=1.0)
    assert close(package_grid(fresh, (second,)), kernel_grid((second,), (length,)))


def test_growing_another_axis_rebuilds_a_grown_one_on_another_step() -> None:
    cache = (5, 5)
    embedding = SIRENPositionalEmbeddingND(data_dim=2, embedding_dim=4, L_cache=list(cache), omega_0=1.0)
    package_grid(embedding, (8, 5))  # axis 0 grows once: still kernelgen's
    assert close(package_grid(embedding, (8, 5)), kernel_grid((8, 5), cache))
    after = package_grid(embedding, (8, 7))  # axis 1 grows: axis 0 is rebuilt over [-1, 1] with 15 points
    assert abs(axis_step(after, 0) - 1.0 / (8 - 1)) <= 1e-6
    assert abs(axis_step(after, 1) - 1.0 / (5 - 1)) <= 1e-6  # axis 1's first growth keeps its step
    assert not close(after, kernel_grid((8, 7), cache))
