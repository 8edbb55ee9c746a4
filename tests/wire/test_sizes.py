"""One definition of a kernel's shape and bytes, used alike by both ends."""

from __future__ import annotations

from typing import Any

import pytest

from kernelgen_wire.sizes import GRID_DTYPE, kernel_spatial, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb


def test_a_kernel_has_two_s_minus_one_points_per_axis() -> None:
    assert kernel_spatial([15, 15]) == (29, 29)
    assert kernel_spatial((1,)) == (1,)
    assert kernel_spatial([3, 4, 5]) == (5, 7, 9)


@pytest.mark.parametrize(
    ("dtype", "itemsize"),
    [(pb.DTYPE_UNSPECIFIED, 4), (pb.DTYPE_FLOAT32, 4), (pb.DTYPE_FLOAT16, 2), (pb.DTYPE_BFLOAT16, 2)],
)
def test_tensor_bytes(dtype: int, itemsize: int) -> None:
    assert tensor_bytes((2, 29, 29, 384), dtype) == 2 * 29 * 29 * 384 * itemsize
    assert tensor_bytes((), dtype) == itemsize


def test_grids_are_float32() -> None:
    assert GRID_DTYPE == pb.DTYPE_FLOAT32


async def test_the_server_plans_and_the_client_predicts_the_same_bytes(embedded_models: Any) -> None:
    from kernelgen_client import ModelInfo
    from kernelgen_client._generate import predict_bytes
    from kernelgen_server.transport.model_info import model_info

    from support import kernel_service

    service = kernel_service(embedded_models)
    await service.close()  # planning needs no thread
    infos = {info.name: ModelInfo.from_pb(info) for info in model_info(service.repository)}
    cases = [("hyena-2d", [15, 15]), ("long-1d", [100]), ("volume-3d", [3, 4, 5])]
    for name, lens in cases:
        for dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16):
            for factored in (False, True):
                plan = service.planner.plan(
                    name,
                    lens,
                    None,
                    dtype,
                    True,
                    pb.REPRESENTATION_FACTORED if factored else pb.REPRESENTATION_DENSE,
                )
                predicted = predict_bytes(infos[name], lens, 1, dtype, True, factored)
                assert predicted == plan.total_bytes, (name, dtype, factored)
