"""``FactoredKernel``, ``OutputHead`` and ``representation=`` in both clients.

The unit tests build factored kernels by hand; the served ones run real
in-process servers and compare every factored kernel with the dense kernel
of the same request, within 1e-5 x max|kernel| (float32).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_client import (
    AsyncKernelClient,
    FactoredKernel,
    InvalidRequest,
    KernelClient,
    MalformedResponse,
    OutputHead,
)
from kernelgen_client._generate import prepare
from kernelgen_client.results import FiLMConfig, ModelConfig, ModelInfo
from kernelgen_wire.v1 import kernelgen_pb2 as pb

from support import threaded_server

RNG = np.random.default_rng(5)


def head(hidden: int = 4, out: int = 6, bias: bool = True, name: str = "h1") -> OutputHead:
    weight_t = RNG.standard_normal((hidden, out)).astype(np.float32)
    return OutputHead(name, weight_t, RNG.standard_normal(out).astype(np.float32) if bias else None)


def assert_within(got: Any, want: Any, rel: float = 1e-5) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rel * np.abs(want).max()


# -- FactoredKernel and OutputHead, no server ----------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_dense_is_factors_times_head(bias: bool) -> None:
    h = head(bias=bias)
    factors = RNG.standard_normal((2, 3, 5, 4)).astype(np.float32)
    kernel = FactoredKernel(factors, h, factors.nbytes)
    want = factors.astype(np.float64) @ h.weight_t + (0 if h.bias is None else h.bias)
    assert kernel.shape == (2, 3, 5, 6) and kernel.dtype == np.float32 and kernel.nbytes == factors.nbytes
    assert_within(kernel.dense(), want)
    assert_within(np.asarray(kernel), want)  # code that expects an array keeps working
    assert np.asarray(kernel, dtype=np.float64).dtype == np.float64
    out = np.empty((2, 3, 5, 6), np.float32)
    assert kernel.dense(out) is out
    assert_within(out, want)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        kernel.dense(np.empty((2, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="torch factors"):
        kernel.dense(device="cpu")
    assert "FactoredKernel(shape=[2, 3, 5, 6]" in repr(kernel)


def test_torch_factors_materialise_on_the_callers_device() -> None:
    h = head()
    factors = torch.randn(1, 7, 4, dtype=torch.float64).to(torch.bfloat16)
    kernel = FactoredKernel(factors, h, factors.numel() * 2)
    dense = kernel.dense(device="cpu")
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.float32 and dense.shape == (1, 7, 6)
    want = factors.double().numpy() @ h.weight_t + h.bias
    assert_within(dense, want)
    out = torch.empty(1, 7, 6)
    assert kernel.dense(out) is out
    weight_t, _ = h.torch("cpu")
    assert h.torch("cpu")[0] is weight_t  # copied to a device once


def test_factors_must_fit_the_head() -> None:
    with pytest.raises(MalformedResponse, match="do not fit"):
        FactoredKernel(np.zeros((1, 3, 5), np.float32), head(hidden=4), 60)


def test_output_head_from_its_message() -> None:
    weight_t = np.arange(12, dtype=np.float32).reshape(3, 4)
    message = pb.OutputHead(
        head_hash="abc",
        weight_t=pb.Tensor(shape=[3, 4], dtype=pb.DTYPE_FLOAT32, data=weight_t.tobytes()),
        bias=pb.Tensor(shape=[4], dtype=pb.DTYPE_FLOAT32, data=np.ones(4, np.float32).tobytes()),
    )
    h = OutputHead.from_pb(message)
    assert (h.hidden, h.out_dim, h.nbytes, h.head_hash) == (3, 4, 64, "abc")
    np.testing.assert_array_equal(h.weight_t, weight_t)
    bad = [
        pb.OutputHead(weight_t=message.weight_t),  # no hash
        pb.OutputHead(head_hash="a", weight_t=pb.Tensor(shape=[12], data=weight_t.tobytes())),
        pb.OutputHead(head_hash="a", weight_t=pb.Tensor(shape=[3, 4], data=b"\0" * 8)),
        pb.OutputHead(
            head_hash="a", weight_t=pb.Tensor(shape=[3, 4], dtype=pb.DTYPE_FLOAT16, data=b"\0" * 24)
        ),
        pb.OutputHead(head_hash="a", weight_t=message.weight_t, bias=pb.Tensor(shape=[3], data=b"\0" * 12)),
    ]
    for message in bad:
        with pytest.raises(MalformedResponse):
            OutputHead.from_pb(message)


def info(hidden: int, out: int, bias: bool = True) -> ModelInfo:
    config = ModelConfig(out, 2, hidden, 3, hidden, 30.0, (64, 64), bias, 1.0, False, FiLMConfig(384, 64))
    return ModelInfo("m", True, "", config, "hash", 0, "head")


def chosen(model_info: ModelInfo | None, seq_lens: list[int], head_held: bool, rows: int = 1) -> int:
    cond = np.zeros((rows, 384), np.float32)
    call = prepare(
        "m", seq_lens, cond, dtype="float32", return_grid=False, as_torch=False, copy=False,
        with_report=False, stream=None, representation="auto",
    )  # fmt: skip
    call.choose_representation(model_info, head_held)
    return int(call.request.representation)


def test_auto_picks_factored_when_it_moves_fewer_bytes() -> None:
    factored, dense = pb.REPRESENTATION_FACTORED, pb.REPRESENTATION_DENSE
    assert chosen(info(32, 384), [29, 29], head_held=False) == factored
    assert chosen(info(32, 32), [29, 29], head_held=True) == dense  # no smaller: hidden == out_dim
    # A tiny kernel: the head (49 kB) outweighs it until the client holds the head.
    assert chosen(info(32, 384), [2, 2], head_held=False) == dense
    assert chosen(info(32, 384), [2, 2], head_held=True) == factored
    assert chosen(None, [29, 29], head_held=False) == dense  # unknown model: the safe choice


def test_an_unknown_representation_is_refused_before_sending() -> None:
    with pytest.raises(InvalidRequest, match="representation must be one of"):
        prepare(
            "m", [3], None, dtype="float32", return_grid=False, as_torch=False, copy=False,
            with_report=False, stream=None, representation="sparse",
        )  # fmt: skip


# -- served ---------------------------------------------------------------------------------------


def head_fetches(server: Any) -> float:
    labels = {"model": "hyena-2d", "method": "GetOutputHead", "code": "OK"}
    return server.service.metrics.registry.get_sample_value("kernelgen_requests_total", labels) or 0.0


async def test_async_factored_equals_dense_and_fetches_the_head_once(server: Any) -> None:
    rows = RNG.standard_normal((16, 384)).astype(np.float32)
    async with AsyncKernelClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        results = await asyncio.gather(
            *(client.generate("hyena-2d", [15, 15], row, representation="factored") for row in rows)
        )
        assert head_fetches(server) == 1  # sixteen calls at once, one fetch
        dense = await client.generate("hyena-2d", [15, 15], rows)
        for i, kernel in enumerate(results):
            assert isinstance(kernel, FactoredKernel)
            assert kernel.factors.shape == (1, 29, 29, 32)
            assert_within(kernel.dense(), dense[i : i + 1])
        held = await client.output_head("hyena-2d")
        assert held is results[0].output_head and head_fetches(server) == 1
    async with AsyncKernelClient(f"127.0.0.1:{server.port}") as other:
        await other.generate("hyena-2d", [3, 3], representation="factored")
    assert head_fetches(server) == 2  # per client


@pytest.fixture(scope="module")
def threaded() -> Iterator[Any]:
    """A server on a thread of its own, for the blocking client."""
    with threaded_server() as running:
        yield running


def test_sync_factored_from_threads_fetches_the_head_once(threaded: Any) -> None:
    rows = RNG.standard_normal((12, 384)).astype(np.float32)
    before = head_fetches(threaded)
    with KernelClient(f"127.0.0.1:{threaded.port}", timeout=60) as client:

        def factored(row: np.ndarray) -> Any:
            return client.generate("hyena-2d", [9, 9], row, representation="factored")

        with ThreadPoolExecutor(6) as pool:
            kernels = list(pool.map(factored, rows))
        assert head_fetches(threaded) == before + 1
        dense = client.generate("hyena-2d", [9, 9], rows)
        for i, kernel in enumerate(kernels):
            assert_within(np.asarray(kernel), dense[i : i + 1])


def test_every_embedded_model_streams_and_reports_factored(threaded: Any) -> None:
    with KernelClient(f"127.0.0.1:{threaded.port}", timeout=60) as client:
        result = client.generate("long-1d", [40000], representation="factored", with_report=True)
        assert result.streamed  # 10 MB of factors: above the one-message threshold
        assert result.representation == result.report.representation == "factored"
        assert result.nbytes == 79999 * 32 * 4 and result.shape == (1, 79999, 256)
        dense = client.generate("long-1d", [40000])
        assert_within(result.kernel.dense(), dense)
        for model, lens in (("hyena-2d", [7, 7]), ("volume-3d", [3, 4, 4])):
            kernel, grid = client.generate(model, lens, representation="factored", return_grid=True)
            assert grid.shape[-1] == len(lens)
            assert_within(kernel.dense(), client.generate(model, lens))


async def test_auto_and_torch_through_the_server(server: Any) -> None:
    async with AsyncKernelClient(f"127.0.0.1:{server.port}") as client:
        auto = await client.generate("hyena-2d", [29, 29], representation="auto")
        assert isinstance(auto, FactoredKernel)  # 12x smaller
        same_size = await client.generate("volume-3d", [3, 4, 4], representation="auto")
        assert isinstance(same_size, np.ndarray)  # volume-3d: hidden == out_dim, nothing to gain
        tensors = await client.generate(
            "hyena-2d", [9, 9], RNG.standard_normal((2, 384)), representation="factored", as_torch=True,
            dtype="bfloat16",
        )  # fmt: skip
        assert tensors.factors.dtype == torch.bfloat16
        dense = tensors.dense()
        assert isinstance(dense, torch.Tensor) and dense.shape == (2, 17, 17, 384)


async def test_a_head_that_does_not_match_its_factors_is_refused(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncKernelClient(f"127.0.0.1:{server.port}") as client:
        real = client._call

        async def other_weights(name: str, request: Any, *args: Any) -> Any:
            reply = await real(name, request, *args)
            if name == "GetOutputHead":
                reply.head_hash = "0" * 64  # a replica serving other weights
            return reply

        monkeypatch.setattr(client, "_call", other_weights)
        with pytest.raises(MalformedResponse, match="replicas serving different weights"):
            await client.generate("hyena-2d", [3, 3], representation="factored")


# --- a masked model's output head ---------------------------------------------------------------
def masked_head(form: int = pb.MASK_FORM_GAUSSIAN, causal: bool = False) -> OutputHead:
    from kernelgen_client import KernelMask

    plain = head(hidden=4, out=3)
    parameter = (np.abs(RNG.standard_normal((1 if causal else 2, 3))) + 0.2).astype(np.float32)
    mask = KernelMask(form, parameter, (5,) if causal else (5, 4), causal)
    return OutputHead("masked", plain.weight_t, plain.bias, mask)


@pytest.mark.parametrize(
    ("form", "causal"), [(pb.MASK_FORM_GAUSSIAN, False), (pb.MASK_FORM_EXPONENTIAL, True)]
)
def test_a_masked_head_multiplies_the_kernel_by_its_mask_on_the_kernel_s_grid(
    form: int, causal: bool
) -> None:
    from kernelgen_wire.grids import axis_coordinates

    output_head = masked_head(form, causal)
    assert output_head.mask is not None
    spatial = (6,) if causal else (7, 5)  # seq_lens (6,) causal; (4, 3)
    factors = RNG.standard_normal((2, *spatial, 4)).astype(np.float32)
    got = FactoredKernel(factors, output_head, factors.nbytes).dense()
    plain = factors @ output_head.weight_t + output_head.bias
    p = output_head.mask.parameter.astype(np.float64)
    lens = (6,) if causal else (4, 3)
    axes = [
        axis_coordinates(s, c, causal=causal) for s, c in zip(lens, output_head.mask.L_cache, strict=True)
    ]
    if form == pb.MASK_FORM_GAUSSIAN:
        factors_by_axis = [np.exp(-0.5 * (t[:, None] / p[d]) ** 2) for d, t in enumerate(axes)]
    else:
        factors_by_axis = [np.exp(-np.abs(t)[:, None] * p[d]) for d, t in enumerate(axes)]
    mask = factors_by_axis[0] if causal else factors_by_axis[0][:, None, :] * factors_by_axis[1][None, :, :]
    np.testing.assert_allclose(got, plain * mask, rtol=1e-5, atol=1e-6 * np.abs(plain).max())
    as_torch = FactoredKernel(torch.from_numpy(factors), output_head, factors.nbytes).dense()
    np.testing.assert_allclose(as_torch.numpy(), got, rtol=1e-6, atol=1e-7)


def test_a_mask_is_computed_once_per_grid_and_a_few_grids_are_kept() -> None:
    from kernelgen_client.factored import MASKS_KEPT

    mask = masked_head().mask
    assert mask is not None
    first = mask.values((7, 5))
    assert mask.values((7, 5)) is first and not first.flags.writeable
    for n in range(MASKS_KEPT):
        mask.values((9 + 2 * n, 5))
    assert mask.values((7, 5)) is not first  # evicted by newer grids, computed again
    np.testing.assert_array_equal(mask.values((7, 5)), first)
    assert mask.torch((7, 5), torch.device("cpu")) is mask.torch((7, 5), torch.device("cpu"))


def test_a_malformed_mask_is_refused() -> None:
    message = pb.OutputHead(
        head_hash="h",
        weight_t=pb.Tensor(shape=[2, 3], dtype=pb.DTYPE_FLOAT32, data=np.zeros((2, 3), np.float32).tobytes()),
    )
    message.mask.form = pb.MASK_FORM_GAUSSIAN
    message.mask.parameter.CopyFrom(
        pb.Tensor(shape=[2, 4], dtype=pb.DTYPE_FLOAT32, data=np.ones((2, 4), np.float32).tobytes())
    )
    message.mask.L_cache.extend([5, 5])
    with pytest.raises(MalformedResponse, match="does not fit"):
        OutputHead.from_pb(message)  # 4 mask channels for 3 outputs
    message.mask.form = 7
    with pytest.raises(MalformedResponse, match="unknown form"):
        OutputHead.from_pb(message)
