"""Open Inference Protocol tensors and messages to kernelgen's values and back.

A model speaks the protocol with these tensors:

- input ``seq_lens``: INT64, one value per axis (``[D]``, or ``[B, D]`` with
  equal rows for clients that give every input a batch dimension);
- input ``conditioning`` (FiLM models only, optional): FP32 ``[rows, cond_dim]``;
- output ``kernel``: the dense kernel ``[rows | 1, *spatial, out_dim]``, or
  output ``factors``: its factors ``[rows | 1, *spatial, hidden]`` (the
  factored representation; its ``head_hash`` parameter names the output head,
  served by kernelgen.v1's GetOutputHead). A request asks for one of the two;
  none asked means ``kernel``;
- request parameter ``dtype``: ``FP32`` (default), ``FP16`` or ``BF16``, the
  datatype of the output.

Inputs come as raw contents (``raw_input_contents``, for every input not in
shared memory, or for none), typed contents, or a registered shared-memory
region (parameters ``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``); an output may name a region the same way.

A response is written by hand around the kernel's bytes: the protobuf-serialized
header fields, then ``raw_output_contents``, exactly what protobuf itself would
write. A computed kernel is written so where the batch encodes it
(``infer_encoder``: its one copy, as kernelgen.v1's responses get); a cached
one, held as kernelgen.v1's message, is copied once more here. A unary call's
report travels in the ``kernelgen-report-bin`` trailer, as for kernelgen.v1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np

from kernelgen_server.core.results import Encoder, GeneratedKernel
from kernelgen_server.errors import InvalidRequest
from kernelgen_server.repository.store import LoadedModel
from kernelgen_server.settings import ServerSettings
from kernelgen_wire.kernel_messages import EncodedKernel, Payload
from kernelgen_wire.oip import grpc_service_pb2 as oip
from kernelgen_wire.oip import model_config_pb2 as oip_config
from kernelgen_wire.protowire import length_delimited
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "CONDITIONING",
    "FACTORS",
    "KERNEL",
    "SEQ_LENS",
    "InferCall",
    "SharedMemoryRef",
    "decode_infer",
    "encode_infer",
    "encode_stream_error",
    "encode_stream_response",
    "infer_encoder",
    "model_config",
    "model_metadata",
]

SEQ_LENS = "seq_lens"
CONDITIONING = "conditioning"
KERNEL = "kernel"
FACTORS = "factors"
#: The one version of every model, as the protocol names versions.
VERSION = "1"

_DATATYPES: dict[str, int] = {"FP32": pb.DTYPE_FLOAT32, "FP16": pb.DTYPE_FLOAT16, "BF16": pb.DTYPE_BFLOAT16}
_DTYPE_ALIASES = {"FLOAT32": "FP32", "FLOAT16": "FP16", "BFLOAT16": "BF16", "TYPE_FP32": "FP32",
                  "TYPE_FP16": "FP16", "TYPE_BF16": "BF16"}  # fmt: skip
_WIRE_DATATYPES: dict[int, str] = {int(v): k for k, v in _DATATYPES.items()}
_SHM_REGION = "shared_memory_region"
_SHM_SIZE = "shared_memory_byte_size"
_SHM_OFFSET = "shared_memory_offset"


@dataclass(frozen=True)
class SharedMemoryRef:
    """A tensor's place in a registered region, as a request names it."""

    region: str
    offset: int
    byte_size: int


@dataclass
class InferCall:
    """One inference request in kernelgen's terms, before any work."""

    model: str
    id: str
    seq_lens: list[int]
    seq_rows: int
    #: The conditioning's shape and its bytes (or where they lie in shared memory).
    conditioning_shape: tuple[int, int] | None
    conditioning: bytes | None
    conditioning_shm: SharedMemoryRef | None
    dtype: int
    factored: bool
    output_shm: SharedMemoryRef | None

    @property
    def output_name(self) -> str:
        return FACTORS if self.factored else KERNEL

    @property
    def rows(self) -> int:
        return self.conditioning_shape[0] if self.conditioning_shape is not None else 1


# --- requests -----------------------------------------------------------------------------------
def _param(params: Mapping[str, oip.InferParameter], name: str) -> oip.InferParameter | None:
    return params.get(name)


def _int_param(params: Mapping[str, oip.InferParameter], name: str, what: str) -> int | None:
    value = _param(params, name)
    if value is None:
        return None
    choice = value.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidRequest(f"{what}: parameter {name} must be an integer")
    number = int(getattr(value, choice))
    if number < 0:
        raise InvalidRequest(f"{what}: parameter {name} cannot be negative")
    return number


def _shared_memory(params: Mapping[str, oip.InferParameter], what: str) -> SharedMemoryRef | None:
    region = _param(params, _SHM_REGION)
    if region is None:
        for name in (_SHM_SIZE, _SHM_OFFSET):
            if name in params:
                raise InvalidRequest(f"{what}: {name} is given without {_SHM_REGION}")
        return None
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidRequest(f"{what}: {_SHM_REGION} must name a region")
    size = _int_param(params, _SHM_SIZE, what)
    if size is None:
        raise InvalidRequest(f"{what}: {_SHM_SIZE} must go with {_SHM_REGION}")
    return SharedMemoryRef(region.string_param, _int_param(params, _SHM_OFFSET, what) or 0, size)


def _dtype(params: Mapping[str, oip.InferParameter]) -> int:
    value = _param(params, "dtype")
    if value is None:
        return pb.DTYPE_FLOAT32
    if value.WhichOneof("parameter_choice") != "string_param":
        raise InvalidRequest("parameter dtype must be a string: FP32, FP16 or BF16")
    name = value.string_param.upper()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in _DATATYPES:
        raise InvalidRequest(
            f"parameter dtype {value.string_param!r} is not supported; use FP32, FP16 or BF16"
        )
    return _DATATYPES[name]


def _shape(tensor: oip.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    shape = tuple(int(n) for n in tensor.shape)
    if any(n < 0 for n in shape):
        raise InvalidRequest(f"input {tensor.name}: shape {list(shape)} has a negative dimension")
    return shape


def _seq_lens(tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> tuple[list[int], int]:
    if tensor.datatype != "INT64":
        raise InvalidRequest(f"input {SEQ_LENS} must be INT64, got {tensor.datatype or 'no datatype'}")
    shape = _shape(tensor)
    if len(shape) not in (1, 2) or 0 in shape:
        raise InvalidRequest(f"input {SEQ_LENS} must have shape [D] or [B, D], got {list(shape)}")
    count = int(np.prod(shape))
    if raw is not None:
        if len(raw) != count * 8:
            raise InvalidRequest(
                f"input {SEQ_LENS} of shape {list(shape)} needs {count * 8} bytes of INT64, got {len(raw)}"
            )
        values = np.frombuffer(raw, dtype="<i8").reshape(shape)
    else:
        contents = tensor.contents.int64_contents
        if len(contents) != count:
            raise InvalidRequest(
                f"input {SEQ_LENS} of shape {list(shape)} needs {count} int64_contents, got {len(contents)}"
            )
        values = np.asarray(contents, dtype=np.int64).reshape(shape)
    rows = values.reshape(-1, shape[-1])
    if (rows != rows[0]).any():
        raise InvalidRequest(f"every row of input {SEQ_LENS} must be the same: one request computes one grid")
    return [int(v) for v in rows[0]], rows.shape[0]


def _conditioning(
    tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> tuple[tuple[int, int], bytes | None]:
    if tensor.datatype != "FP32":
        raise InvalidRequest(f"input {CONDITIONING} must be FP32, got {tensor.datatype or 'no datatype'}")
    shape = _shape(tensor)
    if len(shape) != 2 or 0 in shape:
        raise InvalidRequest(f"input {CONDITIONING} must have shape [rows, cond_dim], got {list(shape)}")
    if raw is None and tensor.HasField("contents"):
        contents = tensor.contents.fp32_contents
        if len(contents) != shape[0] * shape[1]:
            raise InvalidRequest(
                f"input {CONDITIONING} of shape {list(shape)} needs {shape[0] * shape[1]} fp32_contents, "
                f"got {len(contents)}"
            )
        raw = np.asarray(contents, dtype="<f4").tobytes()
    return (shape[0], shape[1]), raw


def decode_infer(request: oip.ModelInferRequest, model: LoadedModel) -> InferCall:
    """Check a ``ModelInferRequest`` against the model's tensors; nothing is read from shared memory yet."""
    inputs = list(request.inputs)
    names = [t.name for t in inputs]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"inputs {names} name one input twice")
    allowed = [SEQ_LENS] + ([CONDITIONING] if model.module.cond_dim is not None else [])
    for name in names:
        if name not in allowed:
            raise InvalidRequest(
                f"unexpected input {name!r} for model {model.name!r}; it takes {', '.join(allowed)}"
            )
    if SEQ_LENS not in names:
        raise InvalidRequest(f"input {SEQ_LENS} is missing (INT64, one value per axis)")
    shm = {t.name: _shared_memory(t.parameters, f"input {t.name}") for t in inputs}
    in_request = [t for t in inputs if shm[t.name] is None]
    raw_contents = list(request.raw_input_contents)
    if raw_contents and len(raw_contents) != len(in_request):
        raise InvalidRequest(
            f"raw_input_contents holds {len(raw_contents)} entries for {len(in_request)} inputs not in "
            "shared memory: give one for each, or none"
        )
    raw = {t.name: raw_contents[i] for i, t in enumerate(in_request)} if raw_contents else {}
    seq_tensor = inputs[names.index(SEQ_LENS)]
    if shm[SEQ_LENS] is not None:
        raise InvalidRequest(f"input {SEQ_LENS} cannot come from shared memory; send it in the request")
    seq_lens, seq_rows = _seq_lens(seq_tensor, raw.get(SEQ_LENS))
    cond_shape: tuple[int, int] | None = None
    cond: bytes | None = None
    if CONDITIONING in names:
        tensor = inputs[names.index(CONDITIONING)]
        if shm[CONDITIONING] is None and CONDITIONING not in raw and not tensor.HasField("contents"):
            raise InvalidRequest(f"input {CONDITIONING} has no data: no raw contents, contents or region")
        cond_shape, cond = _conditioning(tensor, raw.get(CONDITIONING))
        if seq_rows not in (1, cond_shape[0]):
            raise InvalidRequest(
                f"input {SEQ_LENS} has {seq_rows} rows for {cond_shape[0]} conditioning rows; give 1 or "
                f"{cond_shape[0]}"
            )
    elif seq_rows != 1:
        raise InvalidRequest(
            f"input {SEQ_LENS} has {seq_rows} rows but no conditioning: an unconditioned kernel is one "
            "kernel; give one row"
        )
    factored, output_shm = _outputs(request)
    return InferCall(
        model=model.name,
        id=request.id,
        seq_lens=seq_lens,
        seq_rows=seq_rows,
        conditioning_shape=cond_shape,
        conditioning=cond,
        conditioning_shm=shm.get(CONDITIONING),
        dtype=_dtype(request.parameters),
        factored=factored,
        output_shm=output_shm,
    )


def _outputs(request: oip.ModelInferRequest) -> tuple[bool, SharedMemoryRef | None]:
    outputs = list(request.outputs)
    if not outputs:
        return False, None
    names = [o.name for o in outputs]
    for name in names:
        if name not in (KERNEL, FACTORS):
            raise InvalidRequest(f"unexpected output {name!r}; the outputs are {KERNEL} and {FACTORS}")
    if len(outputs) != 1:
        raise InvalidRequest(
            f"outputs {names}: {KERNEL} and {FACTORS} are two representations of one result; ask for one"
        )
    output = outputs[0]
    if "classification" in output.parameters:
        raise InvalidRequest("classification outputs are not supported: a kernel is not a class score")
    return output.name == FACTORS, _shared_memory(output.parameters, f"output {output.name}")


# --- responses ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferEncoded(EncodedKernel):
    """A kernel whose ``message`` is already the Open Inference Protocol's response (written where
    the batch encodes it, by ``infer_encoder``)."""


def _header(call: InferCall, payload: Payload, head_hash: str, in_shared_memory: bool) -> bytes:
    """``ModelInferResponse`` fields 1-5: the model, the request's id and the output's metadata."""
    output = oip.ModelInferResponse.InferOutputTensor(
        name=call.output_name, datatype=_WIRE_DATATYPES[payload.dtype], shape=payload.shape
    )
    if head_hash:
        output.parameters["head_hash"].string_param = head_hash
    if in_shared_memory and call.output_shm is not None:
        output.parameters[_SHM_REGION].string_param = call.output_shm.region
        output.parameters[_SHM_SIZE].int64_param = payload.nbytes
        if call.output_shm.offset:
            output.parameters[_SHM_OFFSET].int64_param = call.output_shm.offset
    header = oip.ModelInferResponse(
        model_name=call.model, model_version=VERSION, id=call.id, outputs=[output]
    )
    return cast(bytes, header.SerializeToString(deterministic=True))  # map entries in key order


def encode_infer(call: InferCall, result: GeneratedKernel, *, in_shared_memory: bool) -> bytes:
    """A serialized ``ModelInferResponse``: the output's bytes follow the header unless in shared memory.

    A kernel the batch already wrote as this response (``infer_encoder``) is sent as it is.
    """
    kernel = result.kernel
    if isinstance(kernel, InferEncoded) and not in_shared_memory:
        return kernel.message
    header = _header(call, kernel.payload, kernel.head_hash, in_shared_memory)
    if in_shared_memory:
        return header
    # Field 6 (raw_output_contents) follows fields 1-5, as protobuf orders them.
    return b"".join([header, length_delimited(6, kernel.payload.nbytes), kernel.payload.data])


def infer_encoder(call: InferCall) -> Encoder:
    """An encoder that writes the whole response around the kernel where the batch encodes it:
    the kernel's one copy, as kernelgen.v1's responses get, instead of a second one here."""

    def encode(payload: Payload, head_hash: str) -> EncodedKernel:
        parts = [_header(call, payload, head_hash, False), length_delimited(6, payload.nbytes)]
        start = sum(len(part) for part in parts)
        message = b"".join([*parts, payload.data])
        view = memoryview(message)[start : start + payload.nbytes]
        return InferEncoded(message, Payload(payload.shape, payload.dtype, view), head_hash)

    return encode


def encode_stream_response(infer_response: bytes) -> bytes:
    """A serialized ``ModelStreamInferResponse`` carrying one serialized ``ModelInferResponse``."""
    return b"".join([length_delimited(2, len(infer_response)), infer_response])


def encode_stream_error(message: str) -> bytes:
    return cast(bytes, oip.ModelStreamInferResponse(error_message=message).SerializeToString())


# --- model metadata and configuration -----------------------------------------------------------
def _batching(model: LoadedModel) -> bool:
    """FiLM models take rows of conditioning, which the batcher batches; the others are cached."""
    return model.module.cond_dim is not None


def _tensors(model: LoadedModel) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, datatype, dims without the batch dimension) of every input and output."""
    module = model.module
    spatial = [-1] * module.data_dim
    inputs = [(SEQ_LENS, "INT64", [module.data_dim])]
    if _batching(model):
        inputs.append((CONDITIONING, "FP32", [int(module.cond_dim or 0)]))
        outputs = [
            (KERNEL, "FP32", [*spatial, module.out_dim]),
            (FACTORS, "FP32", [*spatial, module.mlp_hidden_dim]),
        ]
    else:
        outputs = [
            (KERNEL, "FP32", [1, *spatial, module.out_dim]),
            (FACTORS, "FP32", [1, *spatial, module.mlp_hidden_dim]),
        ]
    return inputs, outputs


def model_metadata(model: LoadedModel) -> oip.ModelMetadataResponse:
    """Inputs and outputs with full shapes (a batching model's first dimension is -1)."""
    inputs, outputs = _tensors(model)
    batch = [-1] if _batching(model) else []

    def tensors(specs: list[tuple[str, str, list[int]]]) -> list[oip.ModelMetadataResponse.TensorMetadata]:
        return [
            oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=[*batch, *dims])
            for name, datatype, dims in specs
        ]

    return oip.ModelMetadataResponse(
        name=model.name,
        versions=[VERSION],
        platform="kernelgen_siren",
        inputs=tensors(inputs),
        outputs=tensors(outputs),
    )


def model_config(model: LoadedModel, settings: ServerSettings, device: str) -> oip_config.ModelConfig:
    """The configuration Triton's clients read: the same tensors as the metadata, the real batching policy."""
    inputs, outputs = _tensors(model)
    config = oip_config.ModelConfig(name=model.name, platform="kernelgen_siren", backend="kernelgen")
    batching = _batching(model) and settings.max_batch_size > 1
    config.max_batch_size = settings.max_batch_size if _batching(model) else 0
    for name, _datatype, dims in inputs:
        config.input.add(
            name=name,
            data_type=oip_config.TYPE_INT64 if name == SEQ_LENS else oip_config.TYPE_FP32,
            dims=dims,
            optional=name == CONDITIONING,
        )
    for name, _datatype, dims in outputs:
        config.output.add(name=name, data_type=oip_config.TYPE_FP32, dims=dims)
    gpu = device.startswith("cuda")
    group = config.instance_group.add(
        name=model.name,
        count=1,
        kind=oip_config.ModelInstanceGroup.KIND_GPU if gpu else oip_config.ModelInstanceGroup.KIND_CPU,
    )
    if gpu:
        group.gpus.append(int(device.partition(":")[2] or 0))
    if batching:
        config.dynamic_batching.preferred_batch_size.append(settings.max_batch_size)
        config.dynamic_batching.max_queue_delay_microseconds = round(settings.max_queue_delay_ms * 1000)
        config.dynamic_batching.default_queue_policy.max_queue_size = settings.max_queue_size
    config.response_cache.enable = settings.cache_bytes > 0  # unconditioned kernels are cached
    values = {
        "content_hash": model.content_hash,
        "head_hash": model.output_head.head_hash,
        "data_dim": str(model.module.data_dim),
        "out_dim": str(model.module.out_dim),
        "mlp_hidden_dim": str(model.module.mlp_hidden_dim),
        "output_dtypes": "FP32,FP16,BF16 (request parameter dtype)",
        "max_conditioning_rows": str(settings.max_conditioning_rows),
    }
    for key, value in values.items():
        config.parameters[key].string_value = value
    return config
