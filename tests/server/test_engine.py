"""KernelEngine against the reference model, batch invariance, dtypes, caches, errors.

Models are tiny and grids small so the whole module runs in a few seconds.
"""

from __future__ import annotations

import gc
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_server.engine.kernel_engine import HostBufferPool, KernelEngine, is_oom
from kernelgen_server.errors import ConditioningNotSupported, InvalidRequest
from kernelgen_server.model.siren import SIRENKernelND
from kernelgen_wire.sizes import tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

COND_DIM = 6


def make_model(
    data_dim: int = 2,
    num_layers: int = 3,
    use_bias: bool = True,
    film: bool = True,
    film_after_pos_embed: bool = False,
    L_cache: Any = 5,
    out_dim: int = 5,
    hidden: int = 8,
    omega_0: float = 10.0,
    seed: int = 0,
) -> SIRENKernelND:
    torch.manual_seed(seed)
    return SIRENKernelND(
        out_dim=out_dim,
        data_dim=data_dim,
        mlp_hidden_dim=hidden,
        num_layers=num_layers,
        embedding_dim=hidden,
        omega_0=omega_0,
        L_cache=L_cache,
        use_bias=use_bias,
        film_cfg={"cond_dim": COND_DIM, "film_hidden_dim": 7} if film else None,
        film_after_pos_embed=film_after_pos_embed,
    ).eval()


def reference(model: SIRENKernelND, seq_lens: Any, cond: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(seq_lens, cond)[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """max |actual - expected| <= rel * max |expected| (docs/architecture.md's measure, "Exactness")."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def conditionings(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, COND_DIM, generator=torch.Generator().manual_seed(seed))


# -- equality with the reference model ------------------------------------------------------

VARIANTS = list(itertools.product([False, True], [2, 3, 5], [True, False], [1, 2, 3]))


@pytest.mark.parametrize(("after", "layers", "bias", "dim"), VARIANTS)
def test_conditioned_matches_reference(after: bool, layers: int, bias: bool, dim: int) -> None:
    # Anisotropic cache; seq_lens below, equal to and above it on the three axes.
    cache, lens = (4, 6, 3)[:dim], (2, 6, 5)[:dim]
    model = make_model(dim, layers, bias, film_after_pos_embed=after, L_cache=cache)
    engine = KernelEngine(model)
    cond = conditionings(5)
    out = engine.conditioned(lens, [cond[:2], cond[2:3], cond[3:]])
    assert_close(out, reference(model, lens, cond))
    assert_close(engine.unconditioned(lens), reference(model, lens))
    assert torch.equal(engine.grid(lens), model.grid(lens))


@pytest.mark.parametrize("seq_len", [1, 2, 5, 6, 9])
def test_seq_lens_below_equal_above_cache(seq_len: int) -> None:
    model = make_model(data_dim=1, L_cache=6)
    engine = KernelEngine(model)
    cond = conditionings(3)
    assert_close(engine.conditioned(seq_len, [cond]), reference(model, seq_len, cond))
    assert_close(engine.unconditioned([seq_len]), reference(model, seq_len))
    assert torch.equal(engine.grid([seq_len]), model.grid(seq_len))


def float64_kernel(model: SIRENKernelND, seq_lens: tuple[int, ...], cond: np.ndarray) -> np.ndarray:
    """The conditioned kernel evaluated in float64 with numpy, straight from the definition."""
    p = {k: v.double().numpy() for k, v in model.state_dict().items()}

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ p[f"{name}.weight"].T
        return y + p[f"{name}.bias"] if f"{name}.bias" in p else y

    axes = [np.arange(1 - s, s) / (c - 1) for s, c in zip(seq_lens, model.L_cache, strict=True)]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)[None]  # [1, *spatial, D]
    z = linear(cond, "film_generator.mlp.0")
    z = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    film = linear(z, "film_generator.mlp.2").reshape(len(cond), -1, 2, model.mlp_hidden_dim)
    expand = (slice(None), *([None] * len(seq_lens)))  # [B, H] -> [B, 1, ..., 1, H]
    pairs = iter((film[:, k, 0][expand], film[:, k, 1][expand]) for k in range(film.shape[1]))
    h = np.sin(linear(x, "positional_embedding.linear"))
    if model.film_after_pos_embed:
        g, b = next(pairs)
        h = g * h + b
    for i in range(model.num_layers - 1):
        g, b = next(pairs)
        h = g * np.sin(linear(h, f"hidden_linears.{i}")) + b
    return linear(h, "out_linear")


@pytest.mark.parametrize("after", [False, True])
def test_matches_float64_evaluation(after: bool) -> None:
    model = make_model(2, 4, film_after_pos_embed=after, L_cache=(7, 5), out_dim=9, hidden=16, omega_0=30.0)
    cond = conditionings(4)
    expected = float64_kernel(model, (7, 8), cond.double().numpy())
    assert_close(KernelEngine(model).conditioned((7, 8), [cond]), torch.from_numpy(expected), 1e-4)


def test_model_without_film() -> None:
    model = make_model(film=False, num_layers=4)
    engine = KernelEngine(model)
    assert_close(engine.unconditioned((3, 4)), reference(model, (3, 4)))
    with pytest.raises(ConditioningNotSupported):
        engine.conditioned((3, 4), [conditionings(1)])


def test_batched_mode_matches_reference() -> None:
    model = make_model(num_layers=4, film_after_pos_embed=True)
    cond = conditionings(9)
    # A tiny chunk budget forces several chunks.
    engine = KernelEngine(model, batched=True, chunk_bytes=1)
    assert_close(engine.conditioned((4, 3), [cond[:4], cond[4:]]), reference(model, (4, 3), cond))


# -- output dtypes and layout ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_is_the_float32_result_cast(dtype: torch.dtype) -> None:
    model = make_model()
    engine = KernelEngine(model)
    cond = conditionings(3)
    low = engine.conditioned((3, 4), [cond], dtype)
    assert low.dtype == dtype
    assert torch.equal(low, engine.conditioned((3, 4), [cond]).to(dtype))
    assert torch.equal(engine.unconditioned((3, 4), dtype), engine.unconditioned((3, 4)).to(dtype))


def test_result_layout() -> None:
    model = make_model(out_dim=7)
    engine = KernelEngine(model)
    out = engine.conditioned((2, 3), [conditionings(2), conditionings(1, seed=2)])
    assert out.shape == (3, 3, 5, 7)
    assert out.device.type == "cpu"
    assert out.is_contiguous()
    assert not out.is_inference()  # callers may use it freely outside inference mode
    assert engine.unconditioned((2, 3)).shape == (1, 3, 5, 7)
    assert engine.conditioned((2, 3), []).shape == (0, 3, 5, 7)
    assert tensor_bytes((3, *engine.spatial_shape((2, 3)), engine.out_dim), pb.DTYPE_FLOAT32) == out.nbytes


def test_rows_follow_request_order() -> None:
    model = make_model()
    engine = KernelEngine(model)
    a, b = conditioned_pair = conditionings(2), conditionings(3, seed=5)
    out = engine.conditioned((3, 3), list(conditioned_pair))
    assert torch.equal(out[:2], engine.conditioned((3, 3), [a]))
    assert torch.equal(out[2:], engine.conditioned((3, 3), [b]))


# -- batch invariance -----------------------------------------------------------------------


# points * out_dim * 4 bytes per row: 45 * 5 * 4 = 900 (rows misaligned, computed in a
# scratch) and 64 * 32 * 4 = 8192 (rows aligned, written in place).
@pytest.mark.parametrize(("seq_lens", "out_dim"), [((3, 5), 5), ((4, 4), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_bitwise_independent_of_the_batch(
    seq_lens: tuple[int, int], out_dim: int, dtype: torch.dtype
) -> None:
    model = make_model(num_layers=4, out_dim=out_dim, hidden=16)
    engine = KernelEngine(model)
    cond = conditionings(11)
    alone = torch.cat([engine.conditioned(seq_lens, [cond[i : i + 1]], dtype) for i in range(11)])
    for parts in ([11], [1, 10], [4, 3, 4], [2] * 5 + [1]):
        splits = list(torch.split(cond, parts))
        assert torch.equal(engine.conditioned(seq_lens, splits, dtype), alone), parts
    # A row's bits do not depend on its neighbours either.
    mixed = torch.cat([cond[5:6], conditionings(3, seed=9), cond[5:6]])
    out = engine.conditioned(seq_lens, [mixed], dtype)
    assert torch.equal(out[0], alone[5])
    assert torch.equal(out[-1], alone[5])


def test_batched_mode_rows_agree_with_rows_alone() -> None:
    model = make_model(num_layers=4, out_dim=32, hidden=16)
    engine = KernelEngine(model, batched=True)
    cond = conditionings(12)
    alone = torch.cat([engine.conditioned((4, 4), [cond[i : i + 1]]) for i in range(12)])
    assert_close(engine.conditioned((4, 4), [cond]), alone, 1e-5)


# -- caches ---------------------------------------------------------------------------------


def test_prefix_is_computed_once_per_grid_shape() -> None:
    model = make_model()
    engine = KernelEngine(model)
    engine.conditioned((3, 4), [conditionings(2)])
    first = engine.prefix_cache_info()
    assert (first.hits, first.misses, first.entries) == (0, 1, 1)
    engine.conditioned((3, 4), [conditionings(1)])
    engine.unconditioned((3, 4))
    second = engine.prefix_cache_info()
    assert (second.hits, second.misses, second.entries) == (2, 1, 1)
    engine.conditioned((2, 2), [conditionings(1)])
    assert engine.prefix_cache_info().misses == 2


def test_prefix_cache_respects_its_byte_bound() -> None:
    model = make_model(hidden=8)
    sizes = {(3, 3): 25 * 8 * 4, (1, 3): 5 * 8 * 4, (3, 1): 5 * 8 * 4}  # [G, 8] float32
    engine = KernelEngine(model, prefix_cache_bytes=1000)
    for lens in sizes:
        engine.unconditioned(lens)
        info = engine.prefix_cache_info()
        assert info.bytes <= info.max_bytes == 1000
    assert (info.entries, info.bytes) == (2, 320)  # the least recently used (3, 3) went
    engine.unconditioned((1, 3))
    assert engine.prefix_cache_info().hits == 1
    small = KernelEngine(model, prefix_cache_bytes=sizes[3, 3] - 1)
    small.unconditioned((3, 3))  # larger than the whole bound: computed, not kept
    assert small.prefix_cache_info().entries == 0


def test_host_pool_recycles_only_released_buffers() -> None:
    pool = HostBufferPool(max_bytes=1 << 20, min_bytes=1)
    model = make_model(out_dim=16)
    engine = KernelEngine(model, host_pool=pool)
    cond = conditionings(4)
    first = engine.conditioned((4, 4), [cond])
    kept = first[2].clone()
    view = first[2]
    del first
    gc.collect()
    second = engine.conditioned((4, 4), [cond.flip(0)])  # the first buffer is still in use
    assert torch.equal(view, kept)
    assert (pool.hits, pool.misses) == (0, 2)
    del view, second
    gc.collect()
    third = engine.conditioned((4, 4), [cond])
    assert pool.hits == 1
    assert torch.equal(third[2], kept)
    assert third.data_ptr() % 512 == 0


# -- errors ---------------------------------------------------------------------------------


def test_invalid_requests() -> None:
    engine = KernelEngine(make_model())
    with pytest.raises(InvalidRequest, match="must be a float"):
        engine.conditioned((3, 3), [torch.zeros(1, COND_DIM + 1)])
    with pytest.raises(InvalidRequest, match="must be a float"):
        engine.conditioned((3, 3), [torch.zeros(COND_DIM)])
    with pytest.raises(InvalidRequest, match="dtype"):
        engine.unconditioned((3, 3), torch.float64)
    with pytest.raises(InvalidRequest, match="seq_lens"):
        engine.unconditioned((3, 0))
    with pytest.raises(InvalidRequest, match="seq_lens"):
        engine.unconditioned((3, 3, 3))


def test_is_oom() -> None:
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 4503599627370496 bytes."
        )
    )
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def test_cpu_allocation_failure_is_recognised() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 60, dtype=torch.uint8)
    assert is_oom(info.value)


# -- CUDA (deployment hosts) ----------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    model = make_model(num_layers=4, out_dim=32, hidden=16)
    cpu, cuda = KernelEngine(model), KernelEngine(model, "cuda")
    cond = conditionings(6)
    out = cuda.conditioned((5, 4), [cond[:2], cond[2:]], dtype)
    assert out.device.type == "cpu"
    assert out.is_pinned()
    expected = cpu.conditioned((5, 4), [cond])
    assert_close(out.float(), expected, 1e-5 if dtype == torch.float32 else 1e-3)
    alone = torch.cat([cuda.conditioned((5, 4), [cond[i : i + 1]], dtype) for i in range(6)])
    assert torch.equal(out, alone)
    assert_close(cuda.unconditioned((5, 4)), cpu.unconditioned((5, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_factors_match_cpu() -> None:
    model = make_model(num_layers=4, out_dim=32, hidden=16)
    cpu, cuda = KernelEngine(model), KernelEngine(model, "cuda", batched=True)
    cond = conditionings(5)
    factors = cuda.conditioned((5, 4), [cond[:2], cond[2:]], factored=True)
    assert factors.device.type == "cpu" and factors.shape == (5, 9, 7, 16)
    assert_close(factors, cpu.conditioned((5, 4), [cond], factored=True))
    assert_close(cuda.unconditioned((5, 4), factored=True), cpu.unconditioned((5, 4), factored=True))
