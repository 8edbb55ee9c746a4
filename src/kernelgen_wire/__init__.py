"""The wire contract of kernelgen, shared by the client and the server.

Everything both ends must agree on lives here and only here:

- ``kernelgen_wire.v1``: the generated protobuf messages and gRPC stubs of
  ``proto/kernelgen/v1/kernelgen.proto`` (the source of truth);
- ``rpc``: the service's name and its method paths;
- ``metadata``: the metadata keys (the per-call report trailer, the reason
  trailer, gRPC's retry pushback, the cache-key header a proxy routes by) and
  the reason strings;
- ``dtypes``: the wire dtypes' names, sizes and numpy layouts;
- ``sizes``: a kernel's shape from its seq_lens and a tensor's bytes, the one definition of both;
- ``grids``: a kernel's coordinate grid, bit for bit as the server computes it;
- ``layers``: a trained network's layer as both ends identify it (its hash over its tensors);
- ``protowire``: proto3 wire-format primitives (varints, field keys, a field
  reader) for the messages that are encoded and read by hand;
- ``kernel_messages``: ``GenerateKernelResponse`` and ``KernelChunk``
  serialized straight from tensor memory and read back as views, without
  copying the kernel bytes;
- ``group_messages``: ``GenerateGroup``'s stream, each member's ``KernelChunk``
  messages wrapped with the member's index, written and read the same way;
- ``model_config``: ``config.json`` values to and from ``ModelConfig``;
- ``malloc``: the allocator tuning every process that moves large kernel
  buffers applies.

This package depends on protobuf, grpcio's stubs and numpy only; it imports
neither ``kernelgen_client`` nor ``kernelgen_server``.
"""
