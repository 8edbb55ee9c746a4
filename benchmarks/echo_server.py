"""The transport ceiling: a bare grpc.aio server that returns N bytes per call.

``/bench.Echo/Unary`` answers one message of ``--bytes`` bytes;
``/bench.Echo/Stream`` answers the same bytes in ``--chunk``-byte messages.
No protobuf, no work: what any gRPC server in Python pays to ship the bytes.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--chunk", type=int, default=1 << 20)
    args = parser.parse_args()
    payload = bytes(args.bytes)
    chunks = [payload[i : i + args.chunk] for i in range(0, len(payload), args.chunk)]

    async def unary(request: bytes, context: Any) -> bytes:
        return payload

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def raw(data: bytes) -> bytes:
        return data

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, raw, raw),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, raw, raw),
        },
    )
    limit = args.bytes + (1 << 16)
    server = aio.server(options=[("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"echo listening on {args.port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
