"""A cache miss whose kernel is the centre of a cached larger one is cut from it, not computed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_server.core.cache import ByteLRUCache
from kernelgen_server.core.payloads import to_payload
from kernelgen_server.core.service import KernelService
from kernelgen_server.core.slicing import centre
from kernelgen_server.repository.store import ModelRepository
from kernelgen_wire.kernel_messages import Payload
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import assert_same_kernel, kernel_service

F32, F16, BF16 = pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16


# --- codec.centre -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_centre_is_the_middle_block(dtype: torch.dtype) -> None:
    kernel = torch.arange(2 * 7 * 9 * 3, dtype=torch.float32).reshape(2, 7, 9, 3).to(dtype)
    cut = centre(to_payload(kernel), (3, 5))
    assert cut.shape == (2, 3, 5, 3)
    assert cut.dtype == to_payload(kernel).dtype
    want = to_payload(kernel[:, 2:5, 2:7, :].contiguous())
    assert bytes(cut.data) == bytes(want.data)


def test_centre_of_the_same_shape_is_a_copy() -> None:
    kernel = to_payload(torch.randn(1, 5, 4))
    cut = centre(kernel, (5,))
    assert bytes(cut.data) == bytes(kernel.data)
    assert cut.data.obj is not kernel.data.obj


@pytest.mark.parametrize("spatial", [(4, 5), (9, 5), (3,), (3, 5, 1)])
def test_centre_refuses_blocks_that_are_not_centred(spatial: tuple[int, ...]) -> None:
    kernel = to_payload(torch.zeros(1, 7, 9, 2))
    with pytest.raises(ValueError, match="no centred"):
        centre(kernel, spatial)


# --- ByteLRUCache.smallest_stored ----------------------------------------------------------------
@dataclass(frozen=True)
class Blob:
    nbytes: int


async def test_smallest_stored_picks_the_lightest_match_and_marks_it_used() -> None:
    cache: ByteLRUCache[str, Blob] = ByteLRUCache(100)
    for key, size in (("a-big", 40), ("a-small", 20), ("b", 10)):
        await cache.get_or_compute(key, lambda s=size: asyncio.sleep(0, Blob(s)))
    assert cache.smallest_stored(lambda k: k.startswith("a")) == Blob(20)
    assert cache.smallest_stored(lambda k: k == "none") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 3)  # neither a hit nor a miss
    # "a-small" is now the most recently used: filling the cache evicts "a-big" and "b" first.
    await cache.get_or_compute("c", lambda: asyncio.sleep(0, Blob(75)))
    assert "a-small" in cache
    assert "a-big" not in cache
    assert "b" not in cache


# --- through the service ----------------------------------------------------------------------
@pytest.fixture
async def service(embedded_models: ModelRepository) -> AsyncIterator[KernelService]:
    service = kernel_service(embedded_models)
    yield service
    await service.close()


def slices(service: KernelService) -> float:
    value = service.metrics.registry.get_sample_value("kernelgen_cache_slices_total")
    return value or 0.0


def array(result: Any, dtype: str = "<f4") -> np.ndarray:
    payload: Payload = result.kernel.payload
    return np.frombuffer(payload.data, dtype).reshape(payload.shape)


@pytest.mark.parametrize(
    ("model", "larger", "smaller"),
    [
        ("hyena-2d", (29, 29), (15, 15)),
        ("hyena-2d", (12, 30), (3, 30)),
        ("long-1d", (9000,), (4097,)),
        ("volume-3d", (6, 7, 8), (2, 7, 5)),
    ],
)
async def test_a_smaller_grid_is_cut_from_a_cached_larger_kernel(
    service: KernelService, model: str, larger: tuple[int, ...], smaller: tuple[int, ...]
) -> None:
    await service.generate(model, larger, None, F32, False)
    result = await service.generate(model, smaller, None, F32, False)
    assert slices(service) == 1
    assert not result.report.cache_hit
    engine = service._engines[model]
    # What computing it gives: the smaller grid is the larger grid's centre, bit for bit, and
    # on CPU the GEMMs round each grid point alike whatever the grid's size.
    bitwise = service.device.type == "cpu"
    assert_same_kernel(array(result), engine.unconditioned(smaller).numpy(), bitwise=bitwise)
    with torch.no_grad():
        want = service.repository.ready[model].module(smaller)[0].numpy()
    assert np.abs(array(result)[0] - want).max() <= 1e-5 * np.abs(want).max()
    # The cut kernel is cached under its own key: asking again is a hit.
    assert (await service.generate(model, smaller, None, F32, False)).report.cache_hit


async def test_only_the_same_model_and_dtype_and_a_covering_grid_are_cut(service: KernelService) -> None:
    await service.generate("hyena-2d", (20, 10), None, F16, False)
    await service.generate("hyena-2d", (10, 12), None, F32, False)  # float16 is no source for float32
    await service.generate("hyena-2d", (21, 5), None, F32, False)  # (10, 12) does not cover it
    await service.generate("volume-3d", (2, 2, 2), None, F32, False)  # another model
    assert slices(service) == 0
    bf = await service.generate("hyena-2d", (5, 5), None, F16, False)  # inside (20, 10) float16
    assert slices(service) == 1
    engine = service._engines["hyena-2d"]
    want = engine.unconditioned((5, 5), torch.float16).numpy()
    assert_same_kernel(array(bf, "<f2"), want, bitwise=service.device.type == "cpu")


async def test_the_smallest_covering_kernel_is_the_source(
    service: KernelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kernelgen_server.core.service as core

    for lens in ((29, 29), (8, 9)):
        await service.generate("hyena-2d", lens, None, F32, False)
    sources: list[tuple[int, ...]] = []
    cut = core.centre

    def spy(kernel: Payload, spatial: Any, *, causal: bool = False) -> Payload:
        sources.append(kernel.shape)
        return cut(kernel, spatial, causal=causal)

    monkeypatch.setattr(core, "centre", spy)
    await service.generate("hyena-2d", (4, 9), None, F32, False)
    assert sources == [(1, 15, 17, 384)]


async def test_slicing_can_be_turned_off(embedded_models: ModelRepository) -> None:
    service = kernel_service(embedded_models, cache_slicing=False)
    try:
        await service.generate("hyena-2d", (9, 9), None, F32, False)
        result = await service.generate("hyena-2d", (5, 5), None, F32, False)
        assert slices(service) == 0
        assert result.report.compute_ms > 0
    finally:
        await service.close()
