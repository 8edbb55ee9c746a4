"""A kernel request, validated and sized before any work: ``KernelPlan`` and the ``Planner``.

Every refusal of a request happens here, in one pass, before anything is
queued (so a refused request costs the others nothing): the name, the model,
``seq_lens``, the dtype, the representation, the conditioning's width and
rows, and every size limit. A limit's message names the setting that raises
it, since the caller may not be the operator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernelgen_server.core.payloads import output_dtype
from kernelgen_server.errors import (
    ConditioningNotSupported,
    InvalidRequest,
    KernelTooLarge,
    MessageTooLarge,
    shorten,
)
from kernelgen_server.repository.store import LoadedModel, ModelRepository, is_served_name
from kernelgen_server.settings import ServerSettings, flag
from kernelgen_wire.sizes import GRID_DTYPE, kernel_spatial, tensor_bytes
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["KernelPlan", "Planner", "check_name", "decode_representation"]


@dataclass(frozen=True)
class KernelPlan:
    """A validated kernel request: what to compute and how many bytes it will take."""

    model: LoadedModel
    lens: tuple[int, ...]
    #: What travels: the kernel's (or its factors') dtype, as torch and as the wire names it.
    out_dtype: torch.dtype
    wire_dtype: int
    factored: bool
    #: ``[rows, C]`` float32, or None for the plain kernel.
    conditioning: np.ndarray | None
    #: ``[rows, *spatial, width]``: width is ``out_dim``, or the hidden width for factors.
    kernel_shape: tuple[int, ...]
    kernel_bytes: int
    #: The grid's bytes when the request asks for it, else 0.
    grid_bytes: int

    @property
    def rows(self) -> int:
        return self.kernel_shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.kernel_shape[1:-1]

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """``[1, *spatial, data_dim]`` when the grid is asked for."""
        return (1, *self.spatial, self.model.module.data_dim) if self.grid_bytes else None

    @property
    def total_bytes(self) -> int:
        return self.kernel_bytes + self.grid_bytes

    @property
    def head_hash(self) -> str:
        """The output head's hash for a factored kernel, else empty."""
        return self.model.output_head.head_hash if self.factored else ""


def check_name(name: str, what: str = "model") -> str:
    """``name`` if it could name a model (or a group's member, ``GROUP/MEMBER``); else
    ``InvalidRequest``, the name cut short in the message."""
    if not name:
        raise InvalidRequest(f"{what} name is empty")
    if not is_served_name(name):
        raise InvalidRequest(
            f"{shorten(name)} is not a {what} name: letters, digits, '.', '_' or '-', at most 128 "
            "characters (a group's member: GROUP/MEMBER)"
        )
    return name


def decode_representation(value: int) -> bool:
    """Whether a request asks for the factored representation (unset means dense)."""
    if value in (pb.REPRESENTATION_UNSPECIFIED, pb.REPRESENTATION_DENSE):
        return False
    if value == pb.REPRESENTATION_FACTORED:
        return True
    raise InvalidRequest(f"representation {value} is not supported; use DENSE or FACTORED")


def _over(what: str, size: int, unit: str, setting: str, limit: int) -> KernelTooLarge:
    return KernelTooLarge(
        f"{what} would be {size} {unit}, over the server's limit of {limit} {unit} (set by {flag(setting)})"
    )


class Planner:
    """Validates requests against a repository's ready models and the server's limits."""

    def __init__(self, repository: ModelRepository, settings: ServerSettings) -> None:
        self._repository = repository
        self._settings = settings

    def model(self, name: str) -> LoadedModel:
        """The ready model ``name``; refuses a name that could name no model, an unknown or failed one."""
        return self._repository.get(check_name(name))

    def seq_lens(self, model: LoadedModel, values: Sequence[int]) -> tuple[int, ...]:
        """``values`` as a model's ``seq_lens``: one length >= 1 per axis, within the grid limit."""
        return self._grid(model, values)[0]

    def _grid(self, model: LoadedModel, values: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``seq_lens`` checked, and the kernel's spatial shape."""
        data_dim = model.module.data_dim
        if len(values) != data_dim:
            raise InvalidRequest(
                f"model {model.name!r} is {data_dim}-D: seq_lens needs {data_dim} entries, got {len(values)}"
            )
        if any(v < 1 for v in values):
            raise InvalidRequest(f"seq_lens must all be >= 1, got {list(values)}")
        lens = tuple(int(v) for v in values)
        spatial = kernel_spatial(lens, model.module.causal)
        points = math.prod(spatial)
        limit = self._settings.max_grid_points
        if points > limit:
            raise _over(f"a grid for seq_lens {list(lens)}", points, "points", "max_grid_points", limit)
        return lens, spatial

    def conditioning_shape(self, model: LoadedModel, rows: int, width: int) -> None:
        """Refuse conditioning of ``[rows, width]`` that ``model`` cannot take (before reading it)."""
        film = model.module.film_generator
        if film is None:
            raise ConditioningNotSupported(
                f"model {model.name!r} has no FiLM generator and takes no conditioning; omit it"
            )
        if width != film.cond_dim:
            raise InvalidRequest(
                f"model {model.name!r} takes conditioning of width {film.cond_dim}, got {width}"
            )
        limit = self._settings.max_conditioning_rows
        if rows > limit:
            raise _over(f"{rows} conditioning rows", rows, "rows", "max_conditioning_rows", limit)

    def plan(
        self,
        name: str,
        seq_lens: Sequence[int],
        conditioning: np.ndarray | None,
        dtype: int,
        return_grid: bool,
        representation: int = pb.REPRESENTATION_DENSE,
    ) -> KernelPlan:
        """Validate a kernel request and size it; every refusal happens here, before any work."""
        model = self.model(name)
        lens, spatial = self._grid(model, seq_lens)
        out_dtype = output_dtype(dtype)
        wire_dtype = int(dtype) or pb.DTYPE_FLOAT32
        factored = decode_representation(representation)
        module = model.module
        rows = 1
        if conditioning is not None:
            rows, width = (int(n) for n in conditioning.shape)
            self.conditioning_shape(model, rows, width)
        width = module.mlp_hidden_dim if factored else module.out_dim
        kernel_shape = (rows, *spatial, width)
        kernel_bytes = tensor_bytes(kernel_shape, wire_dtype)
        grid_bytes = tensor_bytes((1, *spatial, module.data_dim), GRID_DTYPE) if return_grid else 0
        limit = int(self._settings.max_kernel_bytes)
        if kernel_bytes > limit:
            what = "the factors" if factored else "the kernel"
            raise _over(what, kernel_bytes, "bytes", "max_kernel_bytes", limit)
        return KernelPlan(
            model, lens, out_dtype, wire_dtype, factored, conditioning, kernel_shape, kernel_bytes, grid_bytes
        )

    def check_response(self, plan: KernelPlan, max_bytes: int, *, kernel_elsewhere: bool = False) -> None:
        """Refuse a plan whose one-message response is over ``max_bytes`` (``max_message_bytes``).

        ``kernel_elsewhere``: the kernel goes into a shared-memory region; only the grid is in
        the message.
        """
        size = plan.grid_bytes if kernel_elsewhere else plan.total_bytes
        if size > max_bytes:
            raise MessageTooLarge(
                f"the response would be {size} bytes, over the server's limit of {max_bytes} "
                f"bytes for one message (set by {flag('max_message_bytes')}); a kernel this large is "
                "streamed in chunks"
            )

    def check_group(self, name: str, plans: Sequence[KernelPlan]) -> int:
        """The bytes of a group's kernels together; refused over ``max_kernel_bytes``."""
        total = sum(plan.total_bytes for plan in plans)
        limit = int(self._settings.max_kernel_bytes)
        if total > limit:
            what = f"the {len(plans)} kernels of group {name!r} together"
            raise _over(what, total, "bytes", "max_kernel_bytes", limit)
        return total
