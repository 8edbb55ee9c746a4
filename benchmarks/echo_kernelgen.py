"""The load tester's own ceiling: a bare grpc.aio server that speaks kernelgen but computes nothing.

    python benchmarks/echo_kernelgen.py --port 50999 [--model-repo DIR]

``GetModel``/``ListModels`` describe the repository's models from their
``config.json`` alone (no torch, no weights). ``GenerateKernel`` answers every
request with an all-zero kernel of the right shape and dtype, serialized once
per (model, seq_lens, rows, dtype) and then sent as the same bytes, with a
``kernelgen-report-bin`` trailer like the real server's. ``kernelgen loadtest``
against it measures what the client process and gRPC transport can do at a
given load, with no model, batcher or cache in the way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from kernelgen_wire.dtypes import itemsize
from kernelgen_wire.metadata import REPORT_TRAILER
from kernelgen_wire.model_config import config_message
from kernelgen_wire.rpc import SERVICE_NAME
from kernelgen_wire.v1 import kernelgen_pb2 as pb

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "kernelgen_server" / "models"


def model_infos(repo: Path) -> dict[str, pb.ModelInfo]:
    infos = {}
    for config_path in sorted(repo.glob("*/config.json")):
        name = config_path.parent.name
        config = config_message(json.loads(config_path.read_text()))
        infos[name] = pb.ModelInfo(name=name, ready=True, content_hash="echo", config=config)
    return infos


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-repo", type=Path, default=EMBEDDED)
    args = parser.parse_args()
    infos = model_infos(args.model_repo)
    responses: dict[tuple[Any, ...], bytes] = {}
    trailers: dict[int, tuple[tuple[str, bytes], ...]] = {}

    async def generate(request: pb.GenerateKernelRequest, context: aio.ServicerContext[Any, Any]) -> bytes:
        info = infos.get(request.model)
        if info is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
            raise AssertionError("unreachable")
        rows = request.conditioning.shape[0] if request.HasField("conditioning") else 1
        dtype = request.dtype or pb.DTYPE_FLOAT32
        key = (request.model, tuple(request.seq_lens), rows, dtype)
        body = responses.get(key)
        if body is None:
            shape = [rows, *(2 * n - 1 for n in request.seq_lens), info.config.out_dim]
            data = bytes(math.prod(shape) * itemsize(dtype))
            body = pb.GenerateKernelResponse(
                kernel=pb.Tensor(shape=shape, dtype=dtype, data=data)
            ).SerializeToString()
            responses[key] = body
        trailer = trailers.get(rows)
        if trailer is None:
            report = pb.ServerReport(batch_size=rows, batch_requests=1, content_hash="echo")
            trailer = trailers[rows] = ((REPORT_TRAILER, report.SerializeToString()),)
        context.set_trailing_metadata(trailer)
        return body

    async def get_model(request: pb.GetModelRequest, context: aio.ServicerContext[Any, Any]) -> pb.ModelInfo:
        if request.model not in infos:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
        return infos[request.model]

    async def list_models(request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=list(infos.values()))

    def raw(data: bytes) -> bytes:
        return data

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "GenerateKernel": grpc.unary_unary_rpc_method_handler(
                generate, pb.GenerateKernelRequest.FromString, raw
            ),
            "GetModel": grpc.unary_unary_rpc_method_handler(
                get_model, pb.GetModelRequest.FromString, pb.ModelInfo.SerializeToString
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                list_models, pb.ListModelsRequest.FromString, pb.ListModelsResponse.SerializeToString
            ),
        },
    )
    server = aio.server(options=[("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"echo-kernelgen listening on {args.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
