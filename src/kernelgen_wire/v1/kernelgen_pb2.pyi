from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class Representation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPRESENTATION_UNSPECIFIED: _ClassVar[Representation]
    REPRESENTATION_DENSE: _ClassVar[Representation]
    REPRESENTATION_FACTORED: _ClassVar[Representation]

class MaskForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_FORM_UNSPECIFIED: _ClassVar[MaskForm]
    MASK_FORM_GAUSSIAN: _ClassVar[MaskForm]
    MASK_FORM_EXPONENTIAL: _ClassVar[MaskForm]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
REPRESENTATION_UNSPECIFIED: Representation
REPRESENTATION_DENSE: Representation
REPRESENTATION_FACTORED: Representation
MASK_FORM_UNSPECIFIED: MaskForm
MASK_FORM_GAUSSIAN: MaskForm
MASK_FORM_EXPONENTIAL: MaskForm

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ServerReport(_message.Message):
    __slots__ = ("cache_hit", "batch_size", "batch_requests", "queue_ms", "compute_ms", "content_hash", "worker", "representation")
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    cache_hit: bool
    batch_size: int
    batch_requests: int
    queue_ms: float
    compute_ms: float
    content_hash: str
    worker: int
    representation: Representation
    def __init__(self, cache_hit: bool = ..., batch_size: _Optional[int] = ..., batch_requests: _Optional[int] = ..., queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., content_hash: _Optional[str] = ..., worker: _Optional[int] = ..., representation: _Optional[_Union[Representation, str]] = ...) -> None: ...

class GenerateKernelRequest(_message.Message):
    __slots__ = ("model", "seq_lens", "conditioning", "dtype", "return_grid", "representation", "output_region")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRID_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    model: str
    seq_lens: _containers.RepeatedScalarFieldContainer[int]
    conditioning: Tensor
    dtype: DType
    return_grid: bool
    representation: Representation
    output_region: SharedMemoryOutput
    def __init__(self, model: _Optional[str] = ..., seq_lens: _Optional[_Iterable[int]] = ..., conditioning: _Optional[_Union[Tensor, _Mapping]] = ..., dtype: _Optional[_Union[DType, str]] = ..., return_grid: bool = ..., representation: _Optional[_Union[Representation, str]] = ..., output_region: _Optional[_Union[SharedMemoryOutput, _Mapping]] = ...) -> None: ...

class SharedMemoryOutput(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class GenerateKernelResponse(_message.Message):
    __slots__ = ("kernel", "grid", "factors", "head_hash", "shared_memory_bytes")
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    kernel: Tensor
    grid: Tensor
    factors: Tensor
    head_hash: str
    shared_memory_bytes: int
    def __init__(self, kernel: _Optional[_Union[Tensor, _Mapping]] = ..., grid: _Optional[_Union[Tensor, _Mapping]] = ..., factors: _Optional[_Union[Tensor, _Mapping]] = ..., head_hash: _Optional[str] = ..., shared_memory_bytes: _Optional[int] = ...) -> None: ...

class KernelHeader(_message.Message):
    __slots__ = ("kernel_shape", "kernel_dtype", "kernel_bytes", "grid_shape", "grid_bytes", "report", "representation", "head_hash")
    KERNEL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KERNEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRID_SHAPE_FIELD_NUMBER: _ClassVar[int]
    GRID_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    kernel_shape: _containers.RepeatedScalarFieldContainer[int]
    kernel_dtype: DType
    kernel_bytes: int
    grid_shape: _containers.RepeatedScalarFieldContainer[int]
    grid_bytes: int
    report: ServerReport
    representation: Representation
    head_hash: str
    def __init__(self, kernel_shape: _Optional[_Iterable[int]] = ..., kernel_dtype: _Optional[_Union[DType, str]] = ..., kernel_bytes: _Optional[int] = ..., grid_shape: _Optional[_Iterable[int]] = ..., grid_bytes: _Optional[int] = ..., report: _Optional[_Union[ServerReport, _Mapping]] = ..., representation: _Optional[_Union[Representation, str]] = ..., head_hash: _Optional[str] = ...) -> None: ...

class KernelChunk(_message.Message):
    __slots__ = ("header", "offset", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KernelHeader
    offset: int
    data: bytes
    def __init__(self, header: _Optional[_Union[KernelHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FlopCountRequest(_message.Message):
    __slots__ = ("model", "seq_lens", "inference")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    seq_lens: _containers.RepeatedScalarFieldContainer[int]
    inference: bool
    def __init__(self, model: _Optional[str] = ..., seq_lens: _Optional[_Iterable[int]] = ..., inference: bool = ...) -> None: ...

class FlopCountResponse(_message.Message):
    __slots__ = ("flops", "grid_points", "kernel_bytes", "cacheable")
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    GRID_POINTS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHEABLE_FIELD_NUMBER: _ClassVar[int]
    flops: int
    grid_points: int
    kernel_bytes: int
    cacheable: bool
    def __init__(self, flops: _Optional[int] = ..., grid_points: _Optional[int] = ..., kernel_bytes: _Optional[int] = ..., cacheable: bool = ...) -> None: ...

class FiLMConfig(_message.Message):
    __slots__ = ("cond_dim", "film_hidden_dim")
    COND_DIM_FIELD_NUMBER: _ClassVar[int]
    FILM_HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    cond_dim: int
    film_hidden_dim: int
    def __init__(self, cond_dim: _Optional[int] = ..., film_hidden_dim: _Optional[int] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("out_dim", "data_dim", "mlp_hidden_dim", "num_layers", "embedding_dim", "omega_0", "L_cache", "use_bias", "hidden_omega_0", "film_after_pos_embed", "film", "kernel", "mask", "causal")
    OUT_DIM_FIELD_NUMBER: _ClassVar[int]
    DATA_DIM_FIELD_NUMBER: _ClassVar[int]
    MLP_HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    OMEGA_0_FIELD_NUMBER: _ClassVar[int]
    L_CACHE_FIELD_NUMBER: _ClassVar[int]
    USE_BIAS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_OMEGA_0_FIELD_NUMBER: _ClassVar[int]
    FILM_AFTER_POS_EMBED_FIELD_NUMBER: _ClassVar[int]
    FILM_FIELD_NUMBER: _ClassVar[int]
    KERNEL_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_FIELD_NUMBER: _ClassVar[int]
    out_dim: int
    data_dim: int
    mlp_hidden_dim: int
    num_layers: int
    embedding_dim: int
    omega_0: float
    L_cache: _containers.RepeatedScalarFieldContainer[int]
    use_bias: bool
    hidden_omega_0: float
    film_after_pos_embed: bool
    film: FiLMConfig
    kernel: str
    mask: str
    causal: bool
    def __init__(self, out_dim: _Optional[int] = ..., data_dim: _Optional[int] = ..., mlp_hidden_dim: _Optional[int] = ..., num_layers: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., omega_0: _Optional[float] = ..., L_cache: _Optional[_Iterable[int]] = ..., use_bias: bool = ..., hidden_omega_0: _Optional[float] = ..., film_after_pos_embed: bool = ..., film: _Optional[_Union[FiLMConfig, _Mapping]] = ..., kernel: _Optional[str] = ..., mask: _Optional[str] = ..., causal: bool = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "ready", "reason", "config", "content_hash", "parameter_count", "head_hash", "group", "group_index", "source", "layer_hashes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GROUP_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_HASHES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ready: bool
    reason: str
    config: ModelConfig
    content_hash: str
    parameter_count: int
    head_hash: str
    group: str
    group_index: int
    source: str
    layer_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., ready: bool = ..., reason: _Optional[str] = ..., config: _Optional[_Union[ModelConfig, _Mapping]] = ..., content_hash: _Optional[str] = ..., parameter_count: _Optional[int] = ..., head_hash: _Optional[str] = ..., group: _Optional[str] = ..., group_index: _Optional[int] = ..., source: _Optional[str] = ..., layer_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetOutputHeadRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class OutputHead(_message.Message):
    __slots__ = ("head_hash", "weight_t", "bias", "mask")
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_T_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    head_hash: str
    weight_t: Tensor
    bias: Tensor
    mask: KernelMask
    def __init__(self, head_hash: _Optional[str] = ..., weight_t: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[_Union[KernelMask, _Mapping]] = ...) -> None: ...

class KernelMask(_message.Message):
    __slots__ = ("form", "parameter", "L_cache", "causal")
    FORM_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    L_CACHE_FIELD_NUMBER: _ClassVar[int]
    CAUSAL_FIELD_NUMBER: _ClassVar[int]
    form: MaskForm
    parameter: Tensor
    L_cache: _containers.RepeatedScalarFieldContainer[int]
    causal: bool
    def __init__(self, form: _Optional[_Union[MaskForm, str]] = ..., parameter: _Optional[_Union[Tensor, _Mapping]] = ..., L_cache: _Optional[_Iterable[int]] = ..., causal: bool = ...) -> None: ...

class GenerateGroupRequest(_message.Message):
    __slots__ = ("group", "seq_lens", "conditioning", "dtype", "representation")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    group: str
    seq_lens: _containers.RepeatedScalarFieldContainer[int]
    conditioning: Tensor
    dtype: DType
    representation: Representation
    def __init__(self, group: _Optional[str] = ..., seq_lens: _Optional[_Iterable[int]] = ..., conditioning: _Optional[_Union[Tensor, _Mapping]] = ..., dtype: _Optional[_Union[DType, str]] = ..., representation: _Optional[_Union[Representation, str]] = ...) -> None: ...

class GroupHeader(_message.Message):
    __slots__ = ("group", "members")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    group: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class GroupKernelChunk(_message.Message):
    __slots__ = ("group", "member", "chunk")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    group: GroupHeader
    member: int
    chunk: KernelChunk
    def __init__(self, group: _Optional[_Union[GroupHeader, _Mapping]] = ..., member: _Optional[int] = ..., chunk: _Optional[_Union[KernelChunk, _Mapping]] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name", "key", "offset", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    offset: int
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
