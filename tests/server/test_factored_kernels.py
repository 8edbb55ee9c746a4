"""Factored kernels in the service core: exact, batched with dense ones, cached apart, sliced.

Every factored kernel is materialised the way a client does it
(``kernelgen_client.FactoredKernel.dense()`` over the output head as it
travels) and compared with the service's dense kernel of the same request:
within 1e-5 x max|kernel| in float32.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelgen_client.factored import FactoredKernel, OutputHead
from kernelgen_client.tensors import decode_numpy
from kernelgen_server.core.results import GeneratedKernel
from kernelgen_server.core.service import KernelService
from kernelgen_server.engine.kernel_engine import KernelEngine
from kernelgen_server.errors import InvalidRequest, KernelTooLarge, MessageTooLarge
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.model.output_head import OutputHead as ServerHead
from kernelgen_server.repository.store import ModelRepository, write_model
from kernelgen_server.transport.native_codec import head_message
from kernelgen_wire.kernel_messages import parse_response
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import kernel_service

FACTORED = pb.REPRESENTATION_FACTORED


def client_head(head: ServerHead) -> OutputHead:
    """The head as a client holds it: through its wire message."""
    return OutputHead.from_pb(pb.OutputHead.FromString(head_message(head).SerializeToString()))


def materialised(generated: GeneratedKernel, head: OutputHead) -> np.ndarray:
    """What a client's ``FactoredKernel.dense()`` makes of a factored response."""
    view = parse_response(generated.kernel.message)
    assert view.factored and view.head_hash == head.head_hash
    factors = decode_numpy(view.kernel.data, view.kernel.shape, view.kernel.dtype)
    return FactoredKernel(factors, head, view.kernel.data.nbytes).dense()


def dense_of(generated: GeneratedKernel) -> np.ndarray:
    view = parse_response(generated.kernel.message)
    assert not view.factored
    return decode_numpy(view.kernel.data, view.kernel.shape, view.kernel.dtype)


def assert_within(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got.astype(np.float64) - want).max())
    scale = float(np.abs(want).max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} x {scale:.3g}"


def config(**overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "out_dim": 24, "data_dim": 2, "mlp_hidden_dim": 8, "num_layers": 3, "embedding_dim": 8,
        "omega_0": 10.0, "L_cache": 6, "use_bias": True, "film": {"cond_dim": 5, "film_hidden_dim": 7},
    }  # fmt: skip
    values.update(overrides)
    return ModelConfig.from_dict(values)


def repository(root: Path, configs: dict[str, ModelConfig], seed: int = 0) -> ModelRepository:
    for i, (name, cfg) in enumerate(configs.items()):
        module = cfg.build(seed=seed + i)
        write_model(root, name, cfg, module.state_dict())
    return ModelRepository.load(root)


def lens_of(cfg: ModelConfig) -> list[int]:
    return [min(4, n) for n in cfg.cache_lens]


def conditioning(cfg: ModelConfig, rows: int, seed: int) -> np.ndarray | None:
    if cfg.film is None:
        return None
    return np.random.default_rng(seed).standard_normal((rows, cfg.film.cond_dim)).astype(np.float32)


async def make(
    service: KernelService,
    name: str,
    lens: list[int],
    cond: np.ndarray | None = None,
    *,
    factored: bool = False,
    dtype: int = pb.DTYPE_FLOAT32,
    **kwargs: Any,
) -> GeneratedKernel:
    representation = FACTORED if factored else pb.REPRESENTATION_DENSE
    return await service.generate(name, lens, cond, dtype, False, representation=representation, **kwargs)


async def both(
    service: KernelService, name: str, lens: list[int], cond: np.ndarray | None
) -> tuple[Any, Any]:
    return await make(service, name, lens, cond), await make(service, name, lens, cond, factored=True)


# -- exactness, one test per kind of model -----------------------------------------------------


async def test_every_embedded_model(embedded_models: Any) -> None:
    service = kernel_service(embedded_models)
    try:
        for name, model in embedded_models.ready.items():
            lens = [min(9, n) for n in model.module.L_cache]
            for cond in (None, conditioning(model.config, 3, 1)):
                dense, factored = await both(service, name, lens, cond)
                head = client_head(model.output_head)
                assert_within(materialised(factored, head), dense_of(dense))
                assert factored.report.representation == FACTORED
                assert factored.kernel.payload.shape[-1] == model.config.mlp_hidden_dim
    finally:
        await service.close()


KINDS = {
    "1d": config(data_dim=1, L_cache=9),
    "2d": config(),
    "3d": config(data_dim=3, L_cache=[3, 4, 4]),
    "no-bias": config(use_bias=False),
    "no-film": config(film=None),
    "film-after-pos-embed": config(film_after_pos_embed=True),
    "two-layers": config(num_layers=2),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_factored_equals_dense(kind: str, tmp_path: Path) -> None:
    cfg = KINDS[kind]
    service = kernel_service(repository(tmp_path, {kind: cfg}))
    try:
        for cond in (None, conditioning(cfg, 2, 7)):
            dense, factored = await both(service, kind, lens_of(cfg), cond)
            head = client_head(service.output_head(kind))
            assert (head.bias is None) == (not cfg.use_bias)
            assert_within(materialised(factored, head), dense_of(dense))
    finally:
        await service.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data_dim=st.integers(1, 3),
    layers=st.integers(2, 4),
    hidden=st.integers(2, 12),
    out=st.integers(1, 20),
    bias=st.booleans(),
    film=st.sampled_from(["none", "film", "after"]),
    omega=st.floats(1.0, 30.0),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    batched=st.booleans(),
)
def test_property_factors_times_head_is_the_kernel(
    data_dim: int, layers: int, hidden: int, out: int, bias: bool, film: str, omega: float,
    rows: int, seed: int, batched: bool,
) -> None:  # fmt: skip
    cfg = config(
        data_dim=data_dim, num_layers=layers, mlp_hidden_dim=hidden, embedding_dim=hidden, out_dim=out,
        use_bias=bias, omega_0=omega, L_cache=4, film=None if film == "none" else {"cond_dim": 3},
        film_after_pos_embed=film == "after",
    )  # fmt: skip
    module = cfg.build(seed=seed).eval()
    engine = KernelEngine(module, batched=batched)
    head = client_head(ServerHead.of(module))
    lens = (3,) * data_dim
    cases: list[tuple[torch.Tensor, torch.Tensor]] = [
        (engine.unconditioned(lens), engine.unconditioned(lens, factored=True))
    ]
    if film != "none":
        conds = [torch.randn(rows, 3, generator=torch.Generator().manual_seed(seed)), torch.randn(1, 3)]
        cases.append((engine.conditioned(lens, conds), engine.conditioned(lens, conds, factored=True)))
    for dense, factors in cases:
        kernel = FactoredKernel(factors.numpy(), head, factors.nbytes).dense()
        assert_within(kernel, dense.numpy())


async def test_low_precision_factors_stay_within_their_rounding(embedded_models: Any) -> None:
    """bfloat16 / float16 factors: each kernel element within u * sum_i |f_i W_ij| (u = 2^-8, 2^-11)."""
    service = kernel_service(embedded_models)
    model = embedded_models.ready["hyena-2d"]
    head = client_head(model.output_head)
    try:
        cond = conditioning(model.config, 2, 3)
        exact = await make(service, "hyena-2d", [9, 9], cond, factored=True)
        exact_factors = decode_numpy(exact.kernel.payload.data, exact.kernel.payload.shape, pb.DTYPE_FLOAT32)
        for dtype, unit in ((pb.DTYPE_BFLOAT16, 2.0**-8), (pb.DTYPE_FLOAT16, 2.0**-11)):
            low = await make(service, "hyena-2d", [9, 9], cond, factored=True, dtype=dtype)
            got = materialised(low, head)
            want = materialised(exact, head)
            bound = unit * (np.abs(exact_factors) @ np.abs(head.weight_t)) + 1e-5 * np.abs(want).max()
            assert (np.abs(got - want) <= bound).all()
            assert low.kernel.payload.nbytes == exact.kernel.payload.nbytes // 2
    finally:
        await service.close()


# -- serving: batches, cache, slicing, limits --------------------------------------------------


async def test_dense_and_factored_requests_share_one_batch(embedded_models: Any) -> None:
    service = kernel_service(embedded_models, max_queue_delay_ms=50)
    try:
        rows = [conditioning(embedded_models.ready["hyena-2d"].config, 1, seed) for seed in range(6)]
        results = await asyncio.gather(
            *(make(service, "hyena-2d", [7, 7], row, factored=bool(i % 2)) for i, row in enumerate(rows))
        )
        assert {r.report.batch_requests for r in results} == {6}  # one batch for all six
        head = client_head(embedded_models.ready["hyena-2d"].output_head)
        for i, result in enumerate(results):
            assert result.kernel.representation == (FACTORED if i % 2 else pb.REPRESENTATION_DENSE)
            alone = await service.generate("hyena-2d", [7, 7], rows[i], pb.DTYPE_FLOAT32, False)
            got = materialised(result, head) if i % 2 else dense_of(result)
            assert_within(got, dense_of(alone))
    finally:
        await service.close()


async def test_factored_kernels_are_cached_apart_and_cost_less(embedded_models: Any) -> None:
    service = kernel_service(embedded_models)
    try:
        dense = await make(service, "long-1d", [2000], None)
        factored = await make(service, "long-1d", [2000], None, factored=True)
        assert not factored.report.cache_hit  # not served from the dense entry
        again = await make(service, "long-1d", [2000], None, factored=True)
        assert again.report.cache_hit
        assert again.kernel is factored.kernel  # the entry itself, no copy
        stats = service._cache.stats()
        assert stats.entries == 2
        ratio = dense.kernel.nbytes / factored.kernel.nbytes
        assert 7.5 < ratio < 8.5  # long-1d: out_dim 256 / hidden 32
    finally:
        await service.close()


async def test_a_factored_miss_is_cut_from_a_larger_cached_one(embedded_models: Any) -> None:
    service = kernel_service(embedded_models)
    head = client_head(embedded_models.ready["hyena-2d"].output_head)

    def slices() -> float:
        return float(service.metrics.cache_slices._value.get())

    try:
        await make(service, "hyena-2d", [15, 15], factored=True)
        before = slices()
        cut = await make(service, "hyena-2d", [9, 9], factored=True)
        assert slices() == before + 1
        # A dense miss is never cut from factors: dense [9, 9] is computed.
        dense = await make(service, "hyena-2d", [9, 9])
        assert slices() == before + 1
        assert_within(materialised(cut, head), dense_of(dense))
    finally:
        await service.close()


async def test_limits_count_the_factors_bytes(embedded_models: Any) -> None:
    # long-1d [2000]: the kernel is 3999 * 256 * 4 bytes, its factors 3999 * 32 * 4.
    service = kernel_service(
        embedded_models, max_kernel_bytes=1_000_000, max_message_bytes=1_000_000, stream_chunk_bytes=65536
    )
    try:
        with pytest.raises(KernelTooLarge, match="kernel would be"):
            await make(service, "long-1d", [2000], None)
        result = await make(service, "long-1d", [2000], None, factored=True)
        assert result.kernel.payload.nbytes == 3999 * 32 * 4
        with pytest.raises(MessageTooLarge, match=r"for one message \(set by --max-message-bytes\)"):
            await make(service, "long-1d", [2000], factored=True, max_bytes=300_000)
    finally:
        await service.close()


@pytest.mark.parametrize("value", [3, 7, -1])
async def test_an_unknown_representation_is_invalid(embedded_models: Any, value: int) -> None:
    service = kernel_service(embedded_models)
    try:
        with pytest.raises(InvalidRequest, match="representation"):
            await service.generate("hyena-2d", [3, 3], None, pb.DTYPE_FLOAT32, False, representation=value)
    finally:
        await service.close()


async def test_metrics_count_each_representation(embedded_models: Any) -> None:
    service = kernel_service(embedded_models)
    try:
        await make(service, "long-1d", [100], None)
        await make(service, "long-1d", [100], None, factored=True)
        await make(service, "long-1d", [100], None, factored=True)
        served = service.metrics.kernels_served
        assert served.labels("long-1d", "dense")._value.get() == 1
        assert served.labels("long-1d", "factored")._value.get() == 2
        sent = service.metrics.payload_bytes
        assert sent.labels("long-1d", "factored")._value.get() == 2 * 199 * 32 * 4
    finally:
        await service.close()


def test_the_head_and_its_hash(embedded_models: Any, tmp_path: Path) -> None:
    model = embedded_models.ready["hyena-2d"]
    head = model.output_head
    assert head.weight_t.shape == (32, 384) and head.weight_t.is_contiguous()
    torch.testing.assert_close(head.weight_t, model.module.out_linear.weight.t().float(), rtol=0, atol=0)
    assert len(head.head_hash) == 64
    # The same weights give the same hash; other weights another.
    again = ModelRepository.load(Path(model.path).parent).ready["hyena-2d"].output_head
    assert again.head_hash == head.head_hash
    other = repository(tmp_path, {"x": config(out_dim=384, mlp_hidden_dim=32, embedding_dim=32)}, seed=5)
    assert other.ready["x"].output_head.head_hash != head.head_hash


def test_the_output_head_has_the_message_field_order_on_both_ends() -> None:
    message = [f.name for f in sorted(pb.OutputHead.DESCRIPTOR.fields, key=lambda f: f.number)]
    assert message == ["head_hash", "weight_t", "bias", "mask"]
    for head_type in (OutputHead, ServerHead):
        assert [f.name for f in dataclasses.fields(head_type) if not f.name.startswith("_")] == message
