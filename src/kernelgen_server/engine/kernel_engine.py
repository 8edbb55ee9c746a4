"""Fast kernel inference for one served model on one device.

Pure torch, no serving concerns; the service calls each engine from its one
device thread. The engine evaluates the reference function (``model``; see
docs/architecture.md, "The model, exactly"), reorganised for throughput:

* FiLM folds into the next linear. A modulated activation ``g * h + beta`` only
  ever feeds a linear ``W x + b``, and ``W (g * h + beta) + b = (W diag g) h +
  (W beta + b)``: per row, row i of ``W^T`` is scaled by ``g_i`` (one correctly
  rounded product per weight) and the bias becomes ``c = W beta + b``. A
  conditioned row then costs exactly the GEMMs of an unconditioned kernel.
* ``c`` is affine in the FiLM generator's hidden activation ``z``: with ``beta
  = A z + a``, ``c = (W A) z + (W a + b)``. These products are formed once, in
  float64, at load time and stacked with the gamma rows into one "FiLM head":
  a row's gammas and folded biases all come from one GEMV.
* The factored representation stops before the output linear: the factors are
  the last hidden activation, modulated by the last FiLM pair (``g * h +
  beta``), so that ``factors @ W^T + b`` is the kernel (``output_head``). The
  last pair's raw ``beta`` is therefore kept in the FiLM head beside its
  folded bias.
* Everything before the first FiLM (grid, positional embedding, and the first
  hidden layer unless ``film_after_pos_embed``) does not depend on the
  conditioning: it is computed once per grid shape and kept in a byte-bounded
  LRU (:class:`PrefixCache`), and so is a masked model's mask on that grid.
* A causal model's grid is its cropped one: the crop is never computed, and
  grid points are independent, so the values are those of the whole grid's.
* Results land in recycled host buffers (:class:`HostBufferPool` on CPU, torch's
  pinned caching allocator on CUDA): a fresh multi-MiB buffer is page-faulted
  on first write, which costs more than computing the kernel.

Batch invariance: by default every conditioned row is evaluated alone, by the
same sequence of calls on operands of the same shapes and alignment, so its
bits do not depend on the rest of the batch (on one device, library version and
thread count). Alignment matters: MKL rounds a GEMM whose output starts off a
64-byte boundary differently, so rows (and conditioning rows) start at
multiples of ``_ALIGN`` bytes, or go through an aligned scratch. BLAS batched
GEMMs promise nothing of the kind (MKL's batch GEMM rounds some shapes
differently for one matrix than for several): ``batched=True`` trades bitwise
invariance for fewer, larger calls; rows then agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernelgen_server.engine.memory import ALIGN as _ALIGN
from kernelgen_server.engine.memory import HostBufferPool, PrefixCache, PrefixCacheInfo
from kernelgen_server.errors import ConditioningNotSupported, InvalidRequest
from kernelgen_server.model.masks import Mask
from kernelgen_server.model.served import ServedModel, has_siren_forward, output_axes, output_grid
from kernelgen_server.model.siren import KernelGenerator, normalize_lengths
from kernelgen_wire.sizes import kernel_spatial

__all__ = [
    "OUTPUT_DTYPES",
    "HostBufferPool",
    "KernelEngine",
    "PrefixCache",
    "PrefixCacheInfo",
    "is_oom",
]

#: Output dtypes the engine produces; computation is always float32.
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_OOM_MARKERS = ("can't allocate memory", "not enough memory", "out of memory")


def is_oom(exc: BaseException) -> bool:
    """True for a device or host allocation failure (a smaller batch may succeed)."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


#: Shared by the engines that are given no pool of their own, so that the free
#: memory held stays bounded however many models a process serves.
_SHARED_POOL = HostBufferPool()


@dataclass(frozen=True)
class _Affine:
    """``y = x @ weight_t + bias`` with ``weight_t = W^T`` contiguous ``[in, out]``, float32."""

    weight_t: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, linear: nn.Linear, device: torch.device) -> _Affine:
        bias = None if linear.bias is None else _f32(linear.bias, device)
        return cls(_f32(linear.weight.t(), device), bias)

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        if self.bias is None:
            return torch.mm(x, self.weight_t, out=out)
        return torch.addmm(self.bias, x, self.weight_t, out=out)


def _f32(t: Tensor, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def _linear(module: nn.Module) -> nn.Linear:
    assert isinstance(module, nn.Linear), type(module)
    return module


class KernelEngine:
    """Computes the kernels of one served model on one device, in float32.

    Any generator (``KernelGenerator``: an embedding, hidden linears each
    followed by the activation, FiLM on the activations, ``out_linear``), then
    the mask, on the served grid (``ServedModel.grid``: a causal model's is
    cropped, so the crop costs nothing). The embedding is the generator's own
    module unless it is a SIREN's plain ``sin(W_0 x + b_0)``, which is computed
    here; either way it is part of the shared prefix. The mask is evaluated by
    the model's own module on the flattened grid (every mask is pointwise), in
    float32 as the reference does, once per grid shape (cached with the
    prefixes), and multiplies each float32 kernel row before it is cast; the
    factors are never masked (the client applies the mask the output head
    describes).

    ``batched=False`` (default) evaluates conditioned rows one at a time, bitwise
    independent of the batch; ``True`` evaluates chunks of rows with batched GEMMs
    whose scratch fits ``chunk_bytes`` (results then agree to float32 rounding).
    ``prefix_cache_bytes`` bounds the per-grid cache of prefixes and masks (0 disables it);
    ``host_pool`` recycles CPU results (default: one pool shared by all engines).
    """

    def __init__(
        self,
        served: ServedModel | KernelGenerator,
        device: torch.device | str = "cpu",
        *,
        prefix_cache_bytes: int = 64 << 20,
        batched: bool = False,
        chunk_bytes: int = 32 << 20,
        host_pool: HostBufferPool | None = None,
    ) -> None:
        served = served if isinstance(served, ServedModel) else ServedModel(served)
        model = served.generator
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.out_dim = model.out_dim
        self.hidden_dim = model.mlp_hidden_dim
        self.data_dim = model.data_dim
        self.cond_dim = model.cond_dim
        self.causal = served.causal
        self.batched = batched
        self._cache_lens = model.L_cache
        self._chunk_bytes = chunk_bytes
        self._cache = PrefixCache(prefix_cache_bytes)
        self._pool = _SHARED_POOL if host_pool is None else host_pool
        self._stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

        with self._on_device():
            dev = self.device
            # A SIREN's embedding sin(W_0 x + b_0) is computed here; any other by its own
            # module, a float32 copy on the device (it only ever sees the grid).
            self._pos: _Affine | None = None
            self._embedding: nn.Module | None = None
            embedding = model.get_submodule("positional_embedding")
            if has_siren_forward(model):
                self._pos = _Affine.of(_linear(embedding.get_submodule("linear")), dev)
            else:
                embedding = copy.deepcopy(embedding).to(device=dev, dtype=torch.float32)
                self._embedding = embedding.eval().requires_grad_(False)
            self._activation = model.activation
            self._mask: Mask | None = None
            if served.mask is not None:
                mask = copy.deepcopy(served.mask)
                self._mask = mask.to(device=dev, dtype=torch.float32).eval().requires_grad_(False)
            # FiLM pair k modulates the input of per-row linear k. The linears before the
            # first modulated input (hidden layer 0 unless film_after_pos_embed) are shared.
            n_shared = 0 if model.film_after_pos_embed else 1
            hidden = model.hidden_layers()
            self._shared = [_Affine.of(lin, dev) for lin in hidden[:n_shared]]
            per_row = [*hidden[n_shared:], model.out_linear]
            self._per_row = [_Affine.of(lin, dev) for lin in per_row]
            self._film_in: _Affine | None = None
            self._film_head: _Affine | None = None
            self._film_slices: list[tuple[slice, slice]] = []
            self._last_beta = slice(0)
            if model.film_generator is not None:
                mlp = model.film_generator.mlp
                self._film_in = _Affine.of(_linear(mlp[0]), dev)
                self._film_head, self._film_slices, self._last_beta = self._fold_film_head(
                    _linear(mlp[2]), per_row, model.mlp_hidden_dim
                )
            if self._stream is not None:
                self._stream.synchronize()

    def _fold_film_head(
        self, last: nn.Linear, per_row: list[nn.Linear], hidden: int
    ) -> tuple[_Affine, list[tuple[slice, slice]], slice]:
        """The affine map ``z -> [gamma_0 | c_0 | gamma_1 | c_1 | ... | beta_last]`` and its slices.

        Row block k of the FiLM generator's last linear is ``[A_gamma_k; A_beta_k]``
        (its bias alike); ``c_k = W_k beta_k + b_k = (W_k A_beta_k) z + (W_k a_beta_k
        + b_k)``, products taken in float64 and rounded once to float32. The last
        pair's own ``beta`` follows, for factors (which stop before the last linear).
        """
        n_film = len(per_row)
        a = last.weight.detach().double().view(n_film, 2, hidden, -1)  # [k, gamma|beta, H, F]
        a_bias = last.bias.detach().double().view(n_film, 2, hidden)
        rows: list[Tensor] = []
        biases: list[Tensor] = []
        slices: list[tuple[slice, slice]] = []
        offset = 0
        for k, lin in enumerate(per_row):
            w = lin.weight.detach().double()
            width = w.shape[0]
            b = torch.zeros(width, dtype=torch.float64) if lin.bias is None else lin.bias.double()
            rows += [a[k, 0], w @ a[k, 1]]
            biases += [a_bias[k, 0], w @ a_bias[k, 1] + b]
            gamma = slice(offset, offset + hidden)
            slices.append((gamma, slice(gamma.stop, gamma.stop + width)))
            offset = gamma.stop + width
        rows.append(a[n_film - 1, 1])
        biases.append(a_bias[n_film - 1, 1])
        last_beta = slice(offset, offset + hidden)
        film_head = _Affine(_f32(torch.cat(rows).t(), self.device), _f32(torch.cat(biases), self.device))
        return film_head, slices, last_beta

    # -- public API ---------------------------------------------------------------------------

    def normalize_seq_lens(self, seq_lens: int | Sequence[int]) -> tuple[int, ...]:
        try:
            return normalize_lengths("seq_lens", seq_lens, self.data_dim, 1)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def spatial_shape(self, seq_lens: int | Sequence[int]) -> tuple[int, ...]:
        return kernel_spatial(self.normalize_seq_lens(seq_lens), self.causal)

    def width(self, factored: bool) -> int:
        """Last dimension of the output: ``out_dim`` for kernels, ``hidden_dim`` for factors."""
        return self.hidden_dim if factored else self.out_dim

    def grid(self, seq_lens: int | Sequence[int]) -> Tensor:
        """The float32 ``[1, *spatial, data_dim]`` coordinate grid, on CPU (as ``ServedModel.grid``)."""
        return output_grid(self.normalize_seq_lens(seq_lens), self._cache_lens, self.causal)

    def prefix_cache_info(self) -> PrefixCacheInfo:
        return self._cache.info()

    def unconditioned(
        self, seq_lens: int | Sequence[int], dtype: torch.dtype = torch.float32, *, factored: bool = False
    ) -> Tensor:
        """The plain kernel ``[1, *spatial, out_dim]`` (no FiLM), contiguous, on CPU.

        ``factored``: its factors ``[1, *spatial, hidden]`` instead (the last hidden activation).
        """
        lens = self.normalize_seq_lens(seq_lens)
        _check_dtype(dtype)
        spatial = self.spatial_shape(lens)
        width = self.width(factored)
        result = self._result((1, *spatial, width), dtype)
        with torch.inference_mode(), self._on_device():
            h = self._prefix(lens)
            for lin in self._per_row[:-1]:
                h = self._activation(lin(h))
            if factored:
                self._deliver(h, result)
            elif self._stream is None and dtype == torch.float32:
                kernel = self._per_row[-1](h, out=result.view(-1, width))
                if self._mask is not None:
                    kernel.mul_(self._mask_values(lens))
            else:
                kernel = self._per_row[-1](h)
                if self._mask is not None:
                    kernel.mul_(self._mask_values(lens))
                self._deliver(kernel, result)
        return result

    def conditioned(
        self,
        seq_lens: int | Sequence[int],
        conditionings: Sequence[Tensor],
        dtype: torch.dtype = torch.float32,
        *,
        factored: bool = False,
    ) -> Tensor:
        """Kernels for every row of every ``[B_i, C]`` conditioning, rows in request order.

        Returns one contiguous CPU tensor ``[sum B_i, *spatial, out_dim]``, written
        once; callers split it by rows with views. ``factored``: the rows' factors
        ``[sum B_i, *spatial, hidden]`` instead.
        """
        lens = self.normalize_seq_lens(seq_lens)
        _check_dtype(dtype)
        if self._film_head is None:
            raise ConditioningNotSupported("this model has no FiLM generator; send no conditioning")
        for i, c in enumerate(conditionings):
            if c.dim() != 2 or c.shape[1] != self.cond_dim or not c.is_floating_point():
                raise InvalidRequest(
                    f"conditioning {i} must be a float [B, {self.cond_dim}] tensor, "
                    f"got {c.dtype} {list(c.shape)}"
                )
        rows = sum(int(c.shape[0]) for c in conditionings)
        spatial = self.spatial_shape(lens)
        points = math.prod(spatial)
        width = self.width(factored)
        result = self._result((rows, *spatial, width), dtype)
        with torch.inference_mode(), self._on_device():
            cond, pinned = self._gather(conditionings, rows)
            cpu = self._stream is None
            target = (
                result.view(rows, points, width)
                if cpu
                else torch.empty((rows, points, width), dtype=dtype, device=self.device)
            )
            # The GEMMs write float32 rows straight into ``target`` when each row starts
            # on an ``_ALIGN`` boundary; otherwise through an aligned float32 scratch,
            # cast on the device as it is copied into ``target``.
            direct = dtype == torch.float32 and points * width * 4 % _ALIGN == 0
            if rows:
                prefix = self._prefix(lens)
                mask = None if factored or self._mask is None else self._mask_values(lens)
                chunk = self._chunk_rows(points, direct, width) if self.batched else 1
                scratch = (
                    None if direct else torch.empty((min(chunk, rows), points, width), device=self.device)
                )
                for r0 in range(0, rows, chunk):
                    r1 = min(rows, r0 + chunk)
                    dst = target[r0:r1] if scratch is None else scratch[: r1 - r0]
                    self._conditioned_rows(prefix, cond[r0:r1], dst, factored)
                    if mask is not None:
                        dst.mul_(mask)  # float32 rows times the float32 mask, before any cast
                    if scratch is not None:
                        target[r0:r1].copy_(dst)
            if not cpu:
                self._deliver(target, result)
            del pinned  # on CUDA, only now is its host -> device copy known to be done
        return result

    def points(
        self,
        seq_lens: int | Sequence[int],
        start: int,
        stop: int,
        dtype: torch.dtype = torch.float32,
        *,
        conditioning: Tensor | None = None,
        factored: bool = False,
    ) -> Tensor:
        """The kernel (or its factors) at flat grid points ``start:stop`` only, ``[stop - start, width]``.

        One tile of a kernel too large to hold whole: grid points are independent, so
        the tiles of a kernel, in order, are its rows in row-major order. ``conditioning``
        is one ``[1, C]`` row, or None for the plain kernel. The grid's coordinates are
        gathered for these points alone, and no shared prefix is cached; values equal the
        whole kernel's to float32 rounding. Contiguous, on CPU.
        """
        lens = self.normalize_seq_lens(seq_lens)
        _check_dtype(dtype)
        total = math.prod(self.spatial_shape(lens))
        if not 0 <= start < stop <= total:
            raise InvalidRequest(f"points {start}:{stop} are not within the grid's {total}")
        width = self.width(factored)
        result = self._result((stop - start, width), dtype)
        with torch.inference_mode(), self._on_device():
            coordinates = tile_coordinates(lens, self._cache_lens, start, stop, self.causal).to(self.device)
            h = self._embed(coordinates)
            for lin in self._shared:
                h = self._activation(lin(h))
            mask = None
            if self._mask is not None and not factored:
                mask = self._mask.mask(coordinates.unsqueeze(0))[0]
            if conditioning is None:
                for lin in self._per_row[:-1]:
                    h = self._activation(lin(h))
                if not factored:
                    h = self._per_row[-1](h)
                    if mask is not None:
                        h.mul_(mask)
                self._deliver(h, result)
                return result
            if self._film_head is None or self._film_in is None:
                raise ConditioningNotSupported("this model has no FiLM generator; send no conditioning")
            cond = conditioning.detach().to(self.device, torch.float32).reshape(1, -1)
            film = self._film_head(nn.functional.gelu(self._film_in(cond)))[0]
            last = len(self._per_row) - 1
            for k, (lin, (gamma, bias)) in enumerate(zip(self._per_row, self._film_slices, strict=True)):
                if k == last and factored:
                    h = torch.addcmul(film[self._last_beta], h, film[gamma])
                    break
                h = torch.addmm(film[bias], h, lin.weight_t * film[gamma, None])
                if k < last:
                    h = self._activation(h)
            if mask is not None:
                h.mul_(mask)
            self._deliver(h, result)
        return result

    # -- internals ----------------------------------------------------------------------------

    def _on_device(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self._stream is not None:
            stack.enter_context(torch.cuda.device(self.device))
            stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _result(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The CPU tensor handed back: pooled on CPU, pinned (and cached by torch) on CUDA.

        Allocated outside inference mode, so callers get an ordinary tensor.
        """
        if self._stream is None:
            return self._pool.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _deliver(self, value: Tensor, result: Tensor) -> None:
        """Cast ``value`` on its device, copy it into ``result`` once, and wait for the copy."""
        if self._stream is None:
            result.view_as(value).copy_(value)
            return
        result.view_as(value).copy_(value.to(result.dtype), non_blocking=True)
        self._stream.synchronize()

    def _grid_rows(self, lens: tuple[int, ...]) -> Tensor:
        """The served grid's ``[G, D]`` float32 coordinates, on the device."""
        grid = output_grid(lens, self._cache_lens, self.causal)
        return grid.to(self.device).view(-1, self.data_dim)

    def _embed(self, coordinates: Tensor) -> Tensor:
        """The generator's embedding of ``[P, D]`` float32 coordinates: ``[P, E]`` float32."""
        if self._pos is not None:
            return torch.sin(self._pos(coordinates))
        assert self._embedding is not None
        embedded: Tensor = self._embedding(coordinates)
        return embedded.float()

    def _prefix(self, lens: tuple[int, ...]) -> Tensor:
        """``[G, H]``: positional embedding, then the shared hidden layer; float32, cached."""

        def compute() -> Tensor:
            h = self._embed(self._grid_rows(lens))
            for lin in self._shared:
                h = self._activation(lin(h))
            return h

        return self._cache.get(("prefix", lens), compute)

    def _mask_values(self, lens: tuple[int, ...]) -> Tensor:
        """``[G, out_dim]``: the mask on the served grid, float32 as the reference computes it, cached."""
        assert self._mask is not None
        mask = self._mask

        def compute() -> Tensor:
            return mask.mask(self._grid_rows(lens).unsqueeze(0))[0].contiguous()

        return self._cache.get(("mask", lens), compute)

    def _chunk_rows(self, points: int, direct: bool, width: int) -> int:
        """Rows per batched chunk such that its activations, weights and scratch fit ``chunk_bytes``."""
        widths = [lin.weight_t.shape[1] for lin in self._per_row[:-1]]
        per_row = 4 * points * (2 * max(widths, default=0) + (0 if direct else width))
        per_row += 4 * sum(lin.weight_t.numel() for lin in self._per_row)
        return max(1, self._chunk_bytes // per_row)

    def _conditioned_rows(self, prefix: Tensor, cond: Tensor, dst: Tensor, factored: bool) -> None:
        """Write ``cond``'s n rows of float32 kernels ``[n, G, out_dim]`` (factors: ``[n, G, hidden]``)."""
        assert self._film_in is not None
        assert self._film_head is not None
        n = cond.shape[0]
        film = self._film_head(nn.functional.gelu(self._film_in(cond)))  # [n, sum_k (H + width_k) + H]
        h = prefix.expand(n, *prefix.shape)  # shared by all rows, read only
        last = len(self._per_row) - 1
        for k, (lin, (gamma, bias)) in enumerate(zip(self._per_row, self._film_slices, strict=True)):
            if k == last and factored:
                # The factors: the last FiLM pair applied, the output linear left to the client.
                torch.addcmul(film[:, None, self._last_beta], h, film[:, None, gamma], out=dst)
                return
            # (W diag g)^T = diag(g) W^T: row i of W^T scaled by g_i.
            w = lin.weight_t * film[:, gamma, None]
            c = film[:, None, bias]
            if k == last:
                torch.baddbmm(c, h, w, out=dst)
            else:
                h = self._activation(torch.baddbmm(c, h, w))

    def _gather(self, conditionings: Sequence[Tensor], rows: int) -> tuple[Tensor, Tensor]:
        """All rows as one float32 ``[rows, C]`` device tensor, and the host buffer behind it.

        Rows are padded to ``_ALIGN`` bytes so that each row's FiLM GEMV reads an
        input aligned as it would be alone. On CUDA the host buffer is pinned and the
        copy asynchronous: the caller keeps the buffer until the stream is synchronised.
        """
        assert self.cond_dim is not None
        cuda = self._stream is not None
        width = -(-self.cond_dim * 4 // _ALIGN) * _ALIGN // 4
        host = torch.zeros((rows, width), dtype=torch.float32, pin_memory=cuda)
        if conditionings:
            torch.cat(
                [c.detach().to("cpu", torch.float32) for c in conditionings], out=host[:, : self.cond_dim]
            )
        device = host.to(self.device, non_blocking=True) if cuda else host
        return device[:, : self.cond_dim], host


def tile_coordinates(
    seq_lens: Sequence[int], cache_lens: Sequence[int], start: int, stop: int, causal: bool = False
) -> Tensor:
    """Rows ``start:stop`` of the flattened ``[G, D]`` float32 served grid of ``seq_lens``, and only those.

    Each axis's coordinates are gathered by the points' indices along it, so every
    value is bit for bit the whole grid's (``served.output_axes``).
    """
    flat = torch.arange(start, stop, dtype=torch.int64)
    axes = output_axes(seq_lens, cache_lens, causal)
    columns = []
    stride = math.prod(len(axis) for axis in axes)
    for axis in axes:
        stride //= len(axis)
        columns.append(axis[(flat // stride) % len(axis)])
    return torch.stack(columns, dim=1)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in OUTPUT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in OUTPUT_DTYPES)
        raise InvalidRequest(f"output dtype must be one of {names}, got {dtype}")
