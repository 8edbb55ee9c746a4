"""Plain, immutable result types of the client (no protobuf in the public API)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kernelgen_wire.model_config import config_values
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = [
    "FiLMConfig",
    "FlopReport",
    "GroupInfo",
    "HealthStatus",
    "KernelResult",
    "ModelConfig",
    "ModelInfo",
    "ServerReport",
]

ArrayT = TypeVar("ArrayT")


class HealthStatus(enum.Enum):
    """A ``grpc.health.v1`` serving status.

    >>> HealthStatus.SERVING.value
    1
    """

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    #: The server does not know the service (or model) that was asked about.
    SERVICE_UNKNOWN = 3


@dataclass(frozen=True)
class FlopReport:
    """What ``FlopCount`` says about one model and grid.

    Attributes:
        flops: the reference model's ``flop_count(seq_lens, inference)``, exactly.
        grid_points: ``prod(2 * s - 1 for s in seq_lens)``.
        kernel_bytes: bytes of one float32 kernel sample (``grid_points * out_dim * 4``).
        film: the model has a FiLM generator: its conditioned kernels are computed per request.
            Every model's unconditioned kernel is cached by the server, with FiLM or without;
            ``flops`` with ``inference=True`` counts 0 for a model without FiLM.

    Example::

        report = client.flop_count("hyena-2d", [29, 29])
        print(f"{report.flops:,} FLOPs, {report.kernel_bytes / 1e6:.1f} MB")
    """

    flops: int
    grid_points: int
    kernel_bytes: int
    film: bool

    @classmethod
    def from_pb(cls, message: pb.FlopCountResponse) -> FlopReport:
        return cls(
            flops=int(message.flops),
            grid_points=int(message.grid_points),
            kernel_bytes=int(message.kernel_bytes),
            film=not message.cacheable,  # the wire's name: every kernel of the model is cacheable
        )


@dataclass(frozen=True)
class FiLMConfig:
    """Shape of a model's FiLM generator: ``Linear(cond_dim, film_hidden_dim) -> GELU -> Linear``.

    >>> FiLMConfig(cond_dim=384, film_hidden_dim=64).cond_dim
    384
    """

    cond_dim: int
    film_hidden_dim: int


@dataclass(frozen=True)
class ModelConfig:
    """A served model's generator arguments, and what its layer does with the kernel.

    Example::

        config = client.get_model("hyena-2d").config
        rows = np.zeros((8, config.cond_dim))  # FiLM conditioning of the right width
    """

    out_dim: int
    data_dim: int
    mlp_hidden_dim: int
    num_layers: int
    embedding_dim: int
    omega_0: float
    L_cache: tuple[int, ...]
    use_bias: bool
    hidden_omega_0: float
    film_after_pos_embed: bool
    #: ``None`` when the model takes no conditioning.
    film: FiLMConfig | None
    #: The generator's class (``"SIRENKernelND"`` or a variant); its own arguments are in config.json.
    kernel: str = "SIRENKernelND"
    #: The class of the mask the kernel is multiplied by, or ``None`` without one.
    mask: str | None = None
    #: A causal 1-D kernel: ``s`` points from the centre on instead of ``2*s - 1``.
    causal: bool = False

    @property
    def cond_dim(self) -> int | None:
        """Width of the conditioning the model takes, or ``None`` without FiLM."""
        return None if self.film is None else self.film.cond_dim

    @classmethod
    def from_pb(cls, message: pb.ModelConfig) -> ModelConfig:
        values = config_values(message)
        film = values.pop("film")
        return cls(**values, film=None if film is None else FiLMConfig(**film))


@dataclass(frozen=True)
class ModelInfo:
    """One model of the server's repository.

    Example::

        for info in client.list_models():
            print(info.name, "ready" if info.ready else f"failed: {info.reason}")
    """

    name: str
    #: Loaded and able to serve.
    ready: bool
    #: Why the model is not ready (empty when ready).
    reason: str
    #: ``None`` when the model failed to load before its config was read.
    config: ModelConfig | None
    #: Hash of config and weights; changes whenever the served kernel can.
    content_hash: str
    parameter_count: int
    #: Hash of the model's output head, which factored kernels name (empty when not ready).
    head_hash: str = ""
    #: The group (one network's generators) the model is a member of; empty for a model of its own.
    group: str = ""
    #: The member's place in its group (the order ``generate_group`` returns kernels in).
    group_index: int = 0
    #: The member's key prefix in the training checkpoint its group was imported from.
    source: str = ""
    #: Hashes of the layer the member came from (``kernelgen_wire.layers``); empty when unknown.
    layer_hashes: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, message: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=message.name,
            ready=bool(message.ready),
            reason=message.reason,
            config=ModelConfig.from_pb(message.config) if message.HasField("config") else None,
            content_hash=message.content_hash,
            parameter_count=int(message.parameter_count),
            head_hash=message.head_hash,
            group=message.group,
            group_index=int(message.group_index),
            source=message.source,
            layer_hashes=tuple(message.layer_hashes),
        )


@dataclass(frozen=True)
class GroupInfo:
    """A group of the server's repository: the kernel generators of one network, in order.

    Example::

        group = client.get_group("vision-net")
        print(group.name, len(group.members), group.ready, [m.source for m in group.members])
    """

    name: str
    #: The members (models named ``<group>/<member>``), in the group's order.
    members: tuple[ModelInfo, ...]

    @property
    def ready(self) -> bool:
        """Every member loaded and can serve."""
        return all(member.ready for member in self.members)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(member.name for member in self.members)

    @classmethod
    def collect(cls, infos: Sequence[ModelInfo]) -> list[GroupInfo]:
        """The groups the models of ``ListModels`` form, by name."""
        members: dict[str, list[ModelInfo]] = {}
        for info in infos:
            if info.group:
                members.setdefault(info.group, []).append(info)
        return [
            cls(name, tuple(sorted(found, key=lambda m: m.group_index)))
            for name, found in sorted(members.items())
        ]


@dataclass(frozen=True)
class ServerReport:
    """How the server produced one kernel. Times are wall-clock milliseconds.

    Example::

        report = client.generate("hyena-2d", [29, 29], rows, with_report=True).report
        print(report.cache_hit, report.batch_size, f"{report.queue_ms:.2f} + {report.compute_ms:.2f} ms")
    """

    #: The kernel came from the server's unconditioned-kernel cache.
    cache_hit: bool
    #: Conditioning rows in the batch the request ran in (0 for a cache hit).
    batch_size: int
    #: Requests in that batch.
    batch_requests: int
    #: From the request being accepted to its batch starting.
    queue_ms: float
    #: Device time of the batch (or the single request).
    compute_ms: float
    #: Content hash of the model that produced the kernel (``ModelInfo.content_hash``).
    content_hash: str
    #: Index of the server worker process that answered (0 for a one-process server).
    worker: int = 0
    #: ``"dense"`` or ``"factored"``: what the server sent.
    representation: str = "dense"

    @classmethod
    def from_pb(cls, message: pb.ServerReport) -> ServerReport:
        return cls(
            cache_hit=bool(message.cache_hit),
            batch_size=int(message.batch_size),
            batch_requests=int(message.batch_requests),
            queue_ms=float(message.queue_ms),
            compute_ms=float(message.compute_ms),
            content_hash=message.content_hash,
            worker=int(message.worker),
            representation="factored" if message.representation == pb.REPRESENTATION_FACTORED else "dense",
        )


@dataclass(frozen=True)
class KernelResult(Generic[ArrayT]):
    """A generated kernel with everything known about how it was made.

    ``kernel`` (and ``grid``) are numpy arrays, or torch tensors when
    ``as_torch=True`` was asked; a factored kernel is a ``FactoredKernel``.
    ``raw`` is the kernel (or its factors) exactly as it travelled:
    little-endian bytes of ``wire_dtype`` (for bfloat16, the 16-bit patterns).

    Example::

        result = client.generate("hyena-2d", [29, 29], with_report=True)
        print(result.kernel.shape, result.report.cache_hit, f"{result.elapsed_ms:.1f} ms")
    """

    kernel: ArrayT
    #: The ``[1, *spatial, data_dim]`` float32 grid, when ``return_grid=True``.
    grid: ArrayT | None
    report: ServerReport
    #: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the dtype on the wire.
    wire_dtype: str
    #: The kernel's bytes as received (a read-only view; no copy).
    raw: memoryview
    #: The kernel came as a ``StreamKernel`` stream rather than one message.
    streamed: bool
    #: Client-side time of the call, including any model lookup.
    elapsed_ms: float
    #: ``"dense"`` or ``"factored"``.
    representation: str = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        shape: Any = self.kernel.shape  # type: ignore[attr-defined]
        return tuple(int(n) for n in shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the kernel (or its factors) on the wire."""
        return self.raw.nbytes
