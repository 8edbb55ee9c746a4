"""Served kernels inside a PyTorch network: ``RemoteKernel`` and ``serve_kernels``.

A network of ``CKConvND``-like layers (each holding a kernel generator and,
optionally, a mask) is pointed at a kernelgen server in one call; its forward
stays its own, but every layer's kernel comes from the group the network was
exported or imported as::

    from kernelgen_client import KernelClient
    from kernelgen_client.torch import serve_kernels

    with KernelClient() as client, serve_kernels(network.eval(), client, "net") as served:
        with torch.inference_mode(), served.prefetch((64,), conditioning):
            y = network(x, conditioning=conditioning)  # one GenerateGroup call for every layer

Invariants:
- a layer is served only after it was matched to its group member (by its
  module path against the member's source) and its tensors hash to what the
  member recorded (``kernelgen_wire.layers``): a network changed since its
  export is refused, naming the layer;
- a served layer returns what its own generator and mask return, within the
  served dtype's bound: the server applies the mask, so the layer's mask is
  replaced by an identity while served, and a causal layer's kernel is laid
  out as its generator's (the half the layer crops away is zeros);
- kernels are served for inference only: a forward that would need their
  gradient raises, and ``restore()`` brings back the network's own modules;
- an unconditioned kernel is fetched once per (model content, seq_lens, dtype,
  representation, device) and then answered from a byte-bounded cache, so a
  repeated forward makes no call for it; a conditioned layer makes at most
  one call per forward, none under a ``prefetch`` that covers it;
- forwards may run concurrently in several threads (the cache and the counts
  are locked; prefetched kernels are per thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

try:
    import torch
    from torch import Tensor, nn
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "kernelgen_client.torch needs PyTorch: pip install 'kernelgen[torch]' (or install torch)"
    ) from exc

from kernelgen_client.aio import AsyncKernelClient
from kernelgen_client.client import KernelClient
from kernelgen_client.errors import KernelServiceError
from kernelgen_client.factored import FactoredKernel
from kernelgen_client.results import GroupInfo, KernelResult, ModelInfo
from kernelgen_wire.grids import kernel_grid
from kernelgen_wire.layers import CAUSAL, MASK, LayerTensor, covered, layer_hash, layer_of, plain_path

__all__ = [
    "CallCounts",
    "KernelCache",
    "LayerMismatch",
    "RemoteKernel",
    "ServedNetwork",
    "serve_kernels",
    "serve_kernels_async",
]

T = TypeVar("T")
AnyClient = KernelClient | AsyncKernelClient
#: A cache key: (model content hash, seq_lens, dtype, representation, device).
CacheKey = tuple[str, tuple[int, ...], str, str, str]

_WIRE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
#: How a training wrapper renames a module's path: ``torch.compile`` puts its module under this.


class LayerMismatch(ValueError):
    """A network's layer does not agree with the group member it would be served from."""


# --- the calls -----------------------------------------------------------------------------------
class _Calls:
    """One way to call the server from a forward, whatever the client: a blocking client is called;
    an asyncio client's coroutines run on its event loop, from the forward's thread."""

    def __init__(self, client: AnyClient, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.client = client
        self._loop = loop
        if isinstance(client, AsyncKernelClient) and loop is None:
            raise TypeError("an AsyncKernelClient needs its event loop (serve_kernels_async gives it)")

    def run(self, call: Callable[[Any], Any]) -> Any:
        """``call(client)``: its result, or the awaited result of the coroutine it returns."""
        if self._loop is None:
            return call(self.client)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError(
                "a network served through an AsyncKernelClient cannot run its forward on the client's "
                "event loop (it would wait for itself); run it in a thread: "
                "await asyncio.to_thread(network, x)"
            )
        coroutine: Coroutine[Any, Any, Any] = call(self.client)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


@dataclass
class CallCounts:
    """Calls a served network made, and what they brought (for the caller to watch; locked)."""

    calls: int = 0
    group_calls: int = 0
    kernels: int = 0
    #: Bytes of what travelled: kernels, or factors and the output heads they need.
    nbytes: int = 0
    #: Seconds the forwards spent waiting for kernels: the calls, and materialising what they brought.
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, *, group: bool, kernels: int, nbytes: int, seconds: float) -> None:
        with self._lock:
            if group:
                self.group_calls += 1
            else:
                self.calls += 1
            self.kernels += kernels
            self.nbytes += nbytes
            self.seconds += seconds

    def snapshot(self) -> CallCounts:
        with self._lock:
            return CallCounts(self.calls, self.group_calls, self.kernels, self.nbytes, self.seconds)


class KernelCache:
    """A byte-bounded LRU of materialised unconditioned kernels (and their grids); thread-safe.

    Entries are shared by every forward that hits them: treat returned tensors as read-only.
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, tuple[Tensor, Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> tuple[Tensor, Tensor] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: CacheKey, kernel: Tensor, grid: Tensor) -> None:
        size = _nbytes(kernel) + _nbytes(grid)
        if size > self.max_bytes:
            return  # never held: it would evict everything and still not fit
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= _nbytes(old[0]) + _nbytes(old[1])
            while self._entries and self.nbytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= _nbytes(evicted[0]) + _nbytes(evicted[1])
            self._entries[key] = (kernel, grid)
            self.nbytes += size


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --- one layer's kernel --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prefetched:
    member: str
    seq_lens: tuple[int, ...]
    conditioning: Tensor | None
    kernel: Tensor


class _Prefetch(threading.local):
    """The kernels fetched for the coming forward of this thread, by member."""

    def __init__(self) -> None:
        self.kernels: dict[str, _Prefetched] = {}


class RemoteKernel(nn.Module):
    """A kernel generator whose kernels come from a kernelgen server: ``(seq_lens, conditioning) ->
    (kernel, grid)``, as a generator's forward, on this module's device and in its dtype.

    It holds no parameter. ``.to(device)``, ``.half()`` and the like move and cast
    what it returns (a non-persistent buffer records them); its dtype is also the
    dtype kernels travel in (float64 travels as float32). ``representation``:
    ``"auto"`` (factored where it moves fewer bytes), ``"dense"`` or
    ``"factored"``; factored kernels are materialised on this module's device.

    ``layer`` names the network's layer in error messages. ``full_causal``: the
    server's kernel is a causal layer's (its centre and positive half); it is laid
    out as the layer's generator returns it, the negative half zeros, for the
    layer's own crop to keep exactly the served values.
    """

    def __init__(
        self,
        client: AnyClient,
        model: str,
        *,
        info: ModelInfo | None = None,
        cache: KernelCache | None = None,
        representation: str = "auto",
        layer: str = "",
        full_causal: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        counts: CallCounts | None = None,
        _calls: _Calls | None = None,
        _prefetch: _Prefetch | None = None,
    ) -> None:
        super().__init__()
        if representation not in ("auto", "dense", "factored"):
            raise ValueError(f"representation must be 'auto', 'dense' or 'factored', got {representation!r}")
        self.model = model
        self.layer = layer
        self.representation = representation
        self.full_causal = full_causal
        self.cache = cache if cache is not None else KernelCache()
        self.counts = counts if counts is not None else CallCounts()
        self._calls = _calls if _calls is not None else _Calls(client)
        self._prefetch = _prefetch if _prefetch is not None else _Prefetch()
        self.info = info if info is not None else self._calls.run(lambda c: c.get_model(model))
        config = self.info.config
        if config is None or not self.info.ready:
            raise LayerMismatch(
                f"{self._where()}model {model!r} is not ready: {self.info.reason or 'no config'}"
            )
        self.data_dim = config.data_dim
        self.L_cache = tuple(config.L_cache)
        self.cond_dim = config.cond_dim
        self.register_buffer("_like", torch.empty(0, device=device, dtype=dtype), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._buffer().device

    @property
    def dtype(self) -> torch.dtype:
        return self._buffer().dtype

    def _buffer(self) -> Tensor:
        like = self._like
        assert isinstance(like, Tensor)
        return like

    def extra_repr(self) -> str:
        return f"model={self.model!r}, representation={self.representation!r}"

    def forward(
        self, seq_lens: int | Sequence[int], conditioning: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and (
            self.training or (conditioning is not None and conditioning.requires_grad)
        ):
            raise RuntimeError(
                f"{self._where()}kernels are served for inference and carry no gradient; run the network "
                "in eval mode (under torch.no_grad() or torch.inference_mode() when its inputs need "
                "gradients), or train with the local modules (ServedNetwork.restore())"
            )
        lens = (int(seq_lens),) if isinstance(seq_lens, int) else tuple(int(s) for s in seq_lens)
        grid = self.grid(lens)
        prefetched = self._prefetched(lens, conditioning)
        if prefetched is not None:
            return prefetched, grid
        if conditioning is None:
            key: CacheKey = (
                self.info.content_hash,
                lens,
                self._wire_dtype,
                self.representation,
                str(self.device),
            )
            found = self.cache.get(key)
            if found is not None:
                return found
            kernel = self._fetch(lens, None)
            self.cache.put(key, kernel, grid)
            return kernel, grid
        return self._fetch(lens, conditioning), grid

    def grid(self, seq_lens: Sequence[int]) -> Tensor:
        """The float32 ``[1, *spatial, D]`` grid of the kernel ``forward`` returns (the generator's)."""
        causal = False if self.full_causal else self._causal
        return torch.from_numpy(kernel_grid(seq_lens, self.L_cache, causal=causal)).to(self.device)

    # -- internals ---------------------------------------------------------------------------------
    @property
    def _causal(self) -> bool:
        config = self.info.config
        return config is not None and config.causal

    @property
    def _wire_dtype(self) -> str:
        return _WIRE_DTYPES.get(self.dtype, "float32")

    def _where(self) -> str:
        return f"layer {self.layer!r}: " if self.layer else ""

    def _prefetched(self, lens: tuple[int, ...], conditioning: Tensor | None) -> Tensor | None:
        found = self._prefetch.kernels.get(self.model)
        if found is None or found.seq_lens != lens:
            return None
        if (found.conditioning is None) != (conditioning is None):
            return None
        if conditioning is not None and found.conditioning is not None:
            same = found.conditioning is conditioning or (
                found.conditioning.shape == conditioning.shape
                and torch.equal(found.conditioning, conditioning.to(found.conditioning.device))
            )
            if not same:
                return None
        return found.kernel

    def _fetch(self, lens: tuple[int, ...], conditioning: Tensor | None) -> Tensor:
        rows = None if conditioning is None else _rows(conditioning)
        start = time.perf_counter()
        try:
            result: KernelResult[Any] = self._calls.run(
                lambda c: c.generate(
                    self.model,
                    list(lens),
                    rows,
                    dtype=self._wire_dtype,
                    as_torch=True,
                    with_report=True,
                    copy=True,
                    representation=self.representation,
                )
            )
        except KernelServiceError as exc:
            raise _naming(exc, self._where()) from exc
        kernel = self.materialise(result.kernel)
        self.counts.count(
            group=False, kernels=1, nbytes=result.raw.nbytes, seconds=time.perf_counter() - start
        )
        return kernel

    def materialise(self, served: Tensor | FactoredKernel[Tensor]) -> Tensor:
        """A served kernel (or its factors) as this module returns it: its device, dtype and layout."""
        if isinstance(served, FactoredKernel):
            kernel = served.dense(device=self.device)
        else:
            kernel = served.to(self.device)
        kernel = kernel.to(self.dtype)
        if self.full_causal and self._causal:
            # The layer keeps kernel[..., n // 2:, :] of n = 2 s - 1 points: exactly the served s.
            s = kernel.shape[-2]
            full = kernel.new_zeros((*kernel.shape[:-2], 2 * s - 1, kernel.shape[-1]))
            full[..., s - 1 :, :] = kernel
            kernel = full
        return kernel


def _rows(conditioning: Tensor) -> Any:
    """Conditioning as the server takes it: float32 ``[rows, C]`` on the host."""
    rows = conditioning.detach().to("cpu", torch.float32)
    return rows.reshape(1, -1).numpy() if rows.dim() == 1 else rows.numpy()


def _naming(error: KernelServiceError, where: str) -> KernelServiceError:
    """The same error (class, status, reason), its message naming the layer."""
    return type(error)(
        f"{where}{error.message}",
        code=error.code,
        reason=error.reason,
        retry_pushback_ms=error.retry_pushback_ms,
    )


# --- a whole network -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Served:
    """One layer pointed at the server, and what it held before."""

    path: str
    layer: nn.Module
    member: ModelInfo
    generator_attribute: str
    generator: nn.Module
    mask: nn.Module | None
    remote: RemoteKernel


class ServedNetwork:
    """A network whose layers' kernels come from a server; ``restore()`` (or leaving the ``with``
    block) puts back the network's own generators and masks, the very same modules."""

    def __init__(self, group: GroupInfo, served: Sequence[_Served], calls: _Calls, cache: KernelCache,
                 counts: CallCounts, prefetch: _Prefetch, representation: str) -> None:  # fmt: skip
        self.group = group
        self.cache = cache
        self.counts = counts
        self._served = list(served)
        self._calls = calls
        self._prefetch = prefetch
        self._representation = representation
        self.restored = False

    @property
    def layers(self) -> dict[str, str]:
        """The served layers' module paths and the members they come from."""
        return {s.path: s.member.name for s in self._served}

    def __enter__(self) -> ServedNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the network's own generators and masks back in place (again: nothing more happens)."""
        if self.restored:
            return
        for s in self._served:
            setattr(s.layer, s.generator_attribute, s.generator)
            if s.mask is not None:
                setattr(s.layer, MASK, s.mask)
        self.restored = True

    @contextlib.contextmanager
    def prefetch(self, seq_lens: int | Sequence[int], conditioning: Tensor | None = None) -> Iterator[None]:
        """Fetch every layer's kernel for the coming forward in one ``GenerateGroup`` call.

        The layers must share ``seq_lens`` (and, with ``conditioning``, take it all); a
        layer whose forward asks for other ``seq_lens`` or conditioning fetches its own.
        The prefetched kernels are this thread's, for the ``with`` block.
        """
        lens = (int(seq_lens),) if isinstance(seq_lens, int) else tuple(int(s) for s in seq_lens)
        for s in self._served:
            config = s.member.config
            if config is None or config.data_dim != len(lens):
                raise ValueError(
                    f"prefetch needs one grid for every layer, but layer {s.path!r} is "
                    f"{config.data_dim if config else '?'}-D and seq_lens {list(lens)} has {len(lens)} axes"
                )
            if conditioning is not None and config.cond_dim is None:
                raise ValueError(
                    f"prefetch with conditioning needs every layer to take it, but layer {s.path!r} has no "
                    "FiLM generator; prefetch without it, or let the layers fetch their own"
                )
        rows = None if conditioning is None else _rows(conditioning)
        dtype = _WIRE_DTYPES.get(self._served[0].remote.dtype, "float32") if self._served else "float32"
        start = time.perf_counter()
        try:
            results: dict[str, KernelResult[Any]] = self._calls.run(
                lambda c: c.generate_group(
                    self.group.name, list(lens), rows, dtype=dtype, as_torch=True, with_report=True,
                    copy=True, representation=self._representation,
                )
            )  # fmt: skip
        except KernelServiceError as exc:
            raise _naming(exc, f"group {self.group.name!r}: ") from exc
        fetched = {
            s.member.name: _Prefetched(
                s.member.name, lens, conditioning, s.remote.materialise(results[s.member.name].kernel)
            )
            for s in self._served
        }
        # Waiting includes making the kernels usable, as a layer's own fetch counts it.
        nbytes = sum(result.raw.nbytes for result in results.values())
        self.counts.count(
            group=True, kernels=len(results), nbytes=nbytes, seconds=time.perf_counter() - start
        )
        previous = self._prefetch.kernels
        self._prefetch.kernels = fetched
        try:
            yield
        finally:
            self._prefetch.kernels = previous


def serve_kernels(
    network: nn.Module,
    client: KernelClient,
    group: str,
    *,
    representation: str = "auto",
    cache: KernelCache | None = None,
) -> ServedNetwork:
    """Point every kernel layer of ``network`` at group ``group`` of the server ``client`` talks to.

    Each layer (a module holding a kernel generator, e.g. nvSubquadratic's
    ``CKConvND``) is found by its module path among the group's members'
    sources, checked against the member (its tensors' hash, its shape, its mask
    and causality), and its generator replaced by a ``RemoteKernel`` (its mask by
    an identity: the server applies it). Every layer is checked before any is
    replaced; a mismatch raises ``LayerMismatch`` naming the layer. The network's
    forward is otherwise untouched. Returns the ``ServedNetwork``; its
    ``restore()`` puts the originals back.
    """
    if not isinstance(client, KernelClient):
        raise TypeError(
            "serve_kernels takes a KernelClient; for an AsyncKernelClient use serve_kernels_async"
        )
    calls = _Calls(client)
    info = client.get_group(group)
    return _serve(network, calls, info, representation, cache)


async def serve_kernels_async(
    network: nn.Module,
    client: AsyncKernelClient,
    group: str,
    *,
    representation: str = "auto",
    cache: KernelCache | None = None,
) -> ServedNetwork:
    """``serve_kernels`` with an ``AsyncKernelClient``, on its running event loop.

    The network's forwards must then run off the loop, in threads
    (``await asyncio.to_thread(network, x)``): each waits for its kernels while
    the loop serves the calls.
    """
    calls = _Calls(client, asyncio.get_running_loop())
    info = await client.get_group(group)
    return await asyncio.to_thread(_serve, network, calls, info, representation, cache)


def _serve(
    network: nn.Module, calls: _Calls, group: GroupInfo, representation: str, cache: KernelCache | None
) -> ServedNetwork:
    cache = cache if cache is not None else KernelCache()
    counts = CallCounts()
    prefetch = _Prefetch()
    modules = {plain_path(path): module for path, module in network.named_modules()}
    plans: list[tuple[str, nn.Module, ModelInfo, str]] = []
    taken: set[str] = set()
    for member in group.members:
        path, layer, attribute = _layer_of(member, modules, group)
        if path in taken:
            raise LayerMismatch(f"layer {path!r} matches two members of group {group.name!r}")
        taken.add(path)
        _check(path, layer, attribute, member)
        plans.append((path, layer, member, attribute))
    unserved = [path for path, module in modules.items() if path not in taken and _holds_generator(module)]
    if unserved:
        raise LayerMismatch(
            f"layer {unserved[0]!r} of the network has no member in group {group.name!r} "
            f"({len(unserved)} such layer(s)); export or import the whole network as the group"
        )
    served = []
    for path, layer, member, attribute in plans:
        generator = getattr(layer, attribute)
        like = next(iter(generator.parameters()), None)
        remote = RemoteKernel(
            calls.client,
            member.name,
            info=member,
            cache=cache,
            representation=representation,
            layer=path,
            full_causal=bool(getattr(layer, CAUSAL, False)),
            device=None if like is None else like.device,
            dtype=torch.float32 if like is None else like.dtype,
            counts=counts,
            _calls=calls,
            _prefetch=prefetch,
        )
        mask = getattr(layer, MASK, None)
        served.append(_Served(path, layer, member, attribute, generator, mask, remote))
    for s in served:
        setattr(s.layer, s.generator_attribute, s.remote)
        if s.mask is not None:
            setattr(s.layer, MASK, nn.Identity())
    return ServedNetwork(group, served, calls, cache, counts, prefetch, representation)


def _layer_of(
    member: ModelInfo, modules: Mapping[str, nn.Module], group: GroupInfo
) -> tuple[str, nn.Module, str]:
    """The network's layer a member came from: its path, the module, the generator's attribute."""
    found = layer_of(plain_path(member.source))
    if found is None:
        raise LayerMismatch(
            f"member {member.name!r} of group {group.name!r} names no layer (source {member.source!r}); "
            "serve_kernels needs a group exported or imported from a whole network"
        )
    source_layer, attribute = found
    # The checkpoint's keys may carry a wrapper's prefix (``network.``): match by whole path parts.
    matches = [
        path
        for path, module in modules.items()
        if path
        and (source_layer == path or source_layer.endswith(f".{path}"))
        and isinstance(getattr(module, attribute, None), nn.Module)
    ]
    if not matches:
        raise LayerMismatch(
            f"member {member.name!r} of group {group.name!r} came from layer {source_layer!r}, which this "
            "network does not have"
        )
    longest = max(matches, key=len)
    return longest, modules[longest], attribute


def _holds_generator(module: nn.Module) -> bool:
    """A layer convolving with a generated kernel: a ``kernel`` child beside a ``mask`` or a causal flag."""
    kernel = getattr(module, "kernel", None)
    return (
        isinstance(kernel, nn.Module)
        and not isinstance(kernel, RemoteKernel)
        and (hasattr(module, MASK) or hasattr(module, CAUSAL))
    )


def _check(path: str, layer: nn.Module, attribute: str, member: ModelInfo) -> None:
    """Refuse a layer that does not agree with its member, naming both."""
    where = f"layer {path!r} (member {member.name!r})"
    generator = getattr(layer, attribute)
    if isinstance(generator, RemoteKernel):
        raise LayerMismatch(f"{where} is served already; restore() it first")
    if not member.ready or member.config is None:
        raise LayerMismatch(f"{where}: the member is not ready on the server: {member.reason}")
    if not member.layer_hashes:
        raise LayerMismatch(
            f"{where}: the member records no hash of its layer's tensors; export or import the network again"
        )
    tensors = [
        _layer_tensor(key, value) for key, value in layer.state_dict().items() if covered(key, attribute)
    ]
    if layer_hash(tensors) not in member.layer_hashes:
        raise LayerMismatch(
            f"{where}: the layer's weights are not the ones the member was made from (changed since the "
            "export or import?); export or import the network again, or restore the weights"
        )
    config = member.config
    for name, want in (("out_dim", config.out_dim), ("data_dim", config.data_dim)):
        have = getattr(generator, name, None)
        if have is not None and int(have) != want:
            raise LayerMismatch(f"{where}: the layer's {name} is {have}, the member's {want}")
    causal = bool(getattr(layer, CAUSAL, False))
    if causal != config.causal:
        raise LayerMismatch(
            f"{where}: the layer is {'' if causal else 'not '}causal, the member is "
            f"{'' if config.causal else 'not '}"
        )
    mask = getattr(layer, MASK, None)
    layer_mask = None if mask is None or isinstance(mask, nn.Identity) else type(mask).__name__
    if layer_mask != config.mask:
        if layer_mask is None:
            raise LayerMismatch(
                f"{where}: the member applies a {config.mask} mask the layer does not have; "
                "export or import the network again"
            )
        raise LayerMismatch(
            f"{where}: the layer masks its kernel ({layer_mask}) but the member "
            f"{'has no mask' if config.mask is None else f'applies a {config.mask}'}; "
            "serving it would not give the layer's kernel"
        )


def _layer_tensor(key: str, tensor: Tensor) -> LayerTensor:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return LayerTensor(key, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), data)
