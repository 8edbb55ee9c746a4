"""What the load tester sends: a ``Workload`` from flags or a file, resolved against the server.

A workload file (YAML or JSON) holds the same settings as the flags; flags
given on the command line win over the file::

    models:                      # names, or mappings with a weight and own seq_lens
      - name: hyena-2d
        weight: 3
      - name: volume-3d
        seq_lens: [[4, 8, 8]]
      - name: vision-net         # a group: one GenerateGroup call fetches all its members' kernels
    seq_lens: [[15, 15], "8,8"]  # a uniform mix; each model takes those of its data_dim
    rows: 1-4                    # conditioning rows per request: N, "A-B" or [A, B]
    unconditioned: 0.1           # share of requests sent without conditioning (cache traffic)
    dtype: float32               # float32 | float16 | bfloat16
    representation: dense        # dense | factored | auto, or a mix: {dense: 1, factored: 3}
    seed: 0

``resolve`` checks the workload against the server's ``ModelInfo`` (ready,
data_dim, FiLM), and ``RequestSource`` draws seeded requests from the result.
A name may be a group's (``ModelInfo.group`` of its members): its requests
are ``generate_group`` calls, and its members must share their axes; they
are conditioned only when every member takes conditioning of one width.
This module imports numpy only when requests are drawn.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernelgen_client.commands import seq_lens_from_text
from kernelgen_client.results import GroupInfo, ModelInfo

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DTYPES",
    "REPRESENTATIONS",
    "ModelMix",
    "ModelTarget",
    "Request",
    "RequestSource",
    "ResolvedWorkload",
    "RowRange",
    "Workload",
    "WorkloadError",
    "load_file",
    "parse_model",
    "parse_representation",
    "parse_rows",
    "parse_seq_lens",
    "resolve",
]

DTYPES = ("float32", "float16", "bfloat16")
REPRESENTATIONS = ("dense", "factored", "auto")


class WorkloadError(ValueError):
    """A workload that cannot be run, with a message naming the setting at fault."""


# --- parsing of single settings ----------------------------------------------------------------------
def parse_seq_lens(value: object) -> tuple[int, ...]:
    """``"15,15"``, ``15`` or ``[15, 15]`` as a tuple of ints >= 1 (never ``"29x29"``: a kernel shape)."""
    if isinstance(value, str):
        try:
            return seq_lens_from_text(value)
        except ValueError as exc:
            raise WorkloadError(str(exc)) from None
    parts: list[object] = list(value) if isinstance(value, Sequence) else [value]
    try:
        lens = tuple(_int(p) for p in parts)
    except (TypeError, ValueError):
        raise WorkloadError(f"seq_lens must be integers like [15, 15], got {value!r}") from None
    if not lens or min(lens) < 1:
        raise WorkloadError(f"seq_lens must be integers >= 1 like [15, 15], got {value!r}")
    return lens


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not a length")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value.strip())
    raise TypeError(f"not an integer: {value!r}")


@dataclass(frozen=True)
class RowRange:
    """Conditioning rows per conditioned request, drawn uniformly from ``low..high``."""

    low: int = 1
    high: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise WorkloadError(f"rows must satisfy 1 <= low <= high, got {self.low}-{self.high}")

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


def parse_rows(value: object) -> RowRange:
    """``1``, ``"1-4"``, ``"1..4"`` or ``[1, 4]`` as a ``RowRange``."""
    try:
        if isinstance(value, str):
            text = value.replace("..", "-").strip()
            low, sep, high = text.partition("-")
            return RowRange(int(low), int(high) if sep else int(low))
        if isinstance(value, Sequence) and len(value) == 2:
            return RowRange(_int(value[0]), _int(value[1]))
        return RowRange(_int(value), _int(value))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, WorkloadError):
            raise
        raise WorkloadError(f"rows must be N or A-B with 1 <= A <= B, got {value!r}") from None


@dataclass(frozen=True)
class ModelMix:
    """One model of the mix; ``seq_lens`` empty means the workload's own list."""

    name: str
    weight: float = 1.0
    seq_lens: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise WorkloadError("a model name is empty")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise WorkloadError(f"model {self.name!r}: weight must be a positive number, got {self.weight}")


def parse_model(value: object) -> ModelMix:
    """``"hyena-2d"``, ``"hyena-2d:3"`` (weight 3) or a mapping ``{name, weight, seq_lens}``."""
    if isinstance(value, str):
        name, sep, weight = value.partition(":")
        try:
            return ModelMix(name.strip(), float(weight) if sep else 1.0)
        except ValueError:
            raise WorkloadError(f"model must be NAME or NAME:WEIGHT, got {value!r}") from None
    if isinstance(value, Mapping):
        unknown = set(value) - {"name", "weight", "seq_lens"}
        if unknown:
            raise WorkloadError(f"model entry: unknown keys {sorted(unknown)} (name, weight, seq_lens)")
        if not isinstance(value.get("name"), str):
            raise WorkloadError(f"model entry needs a name: {dict(value)!r}")
        seq_lens = tuple(parse_seq_lens(s) for s in _list(value.get("seq_lens") or [], "seq_lens"))
        try:
            share = float(value.get("weight", 1.0))
        except (TypeError, ValueError):
            raise WorkloadError(f"model {value['name']!r}: weight must be a number") from None
        return ModelMix(value["name"], share, seq_lens)
    raise WorkloadError(f"model must be a name or a mapping, got {value!r}")


def parse_representation(value: object) -> tuple[tuple[str, float], ...]:
    """``"factored"``, ``"dense:1,factored:3"`` or ``{dense: 1, factored: 3}`` as (name, weight) pairs."""
    pairs: list[tuple[object, object]]
    if isinstance(value, str):
        pairs = []
        for part in (p.strip() for p in value.split(",") if p.strip()):
            label, sep, number = part.partition(":")
            pairs.append((label.strip(), number if sep else 1.0))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise WorkloadError(f"representation must be a name or a mix like dense:1,factored:3, got {value!r}")
    mix = []
    for key, weight in pairs:
        name = str(key)
        if name not in REPRESENTATIONS:
            raise WorkloadError(f"representation must be {', '.join(REPRESENTATIONS)}, got {name!r}")
        try:
            share = float(weight)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            share = math.nan
        if not (share > 0 and math.isfinite(share)):
            raise WorkloadError(f"representation {name!r}: weight must be a positive number, got {weight!r}")
        mix.append((name, share))
    if not mix or len({name for name, _ in mix}) != len(mix):
        raise WorkloadError(f"representation: name each of {', '.join(REPRESENTATIONS)} at most once")
    return tuple(mix)


def _list(value: object, key: str) -> list[Any]:
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise WorkloadError(f"{key} must be a list, got {value!r}")
    return list(value)


# --- the workload ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The request mix of a load test; every field is validated on construction."""

    models: tuple[ModelMix, ...]
    #: Shared seq_lens options; a model takes those with one entry per axis of its own.
    seq_lens: tuple[tuple[int, ...], ...] = ()
    rows: RowRange = field(default_factory=RowRange)
    #: Share of requests sent without conditioning, in [0, 1] (cache traffic).
    unconditioned: float = 0.0
    dtype: str = "float32"
    seed: int = 0
    #: Force (True) or forbid (False) streaming; None: the client decides by size.
    stream: bool | None = None
    #: What the server sends, with weights: ``(("dense", 1.0),)`` unless asked otherwise.
    representation: tuple[tuple[str, float], ...] = (("dense", 1.0),)

    def __post_init__(self) -> None:
        if not self.models:
            raise WorkloadError("no model given: name one or more (e.g. hyena-2d)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise WorkloadError(f"a model is named twice: {names}")
        if not 0.0 <= self.unconditioned <= 1.0:
            raise WorkloadError(f"unconditioned must be a share in [0, 1], got {self.unconditioned}")
        if self.dtype not in DTYPES:
            raise WorkloadError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_representation(dict(self.representation))  # checks names and weights

    _KEYS = frozenset(
        {"models", "seq_lens", "rows", "unconditioned", "dtype", "seed", "stream", "representation"}
    )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "workload") -> Workload:
        """A workload from a file's mapping; unknown keys are refused (typos must not pass)."""
        unknown = set(data) - cls._KEYS
        if unknown:
            raise WorkloadError(f"{source}: unknown keys {sorted(unknown)}; known: {sorted(cls._KEYS)}")
        try:
            models = tuple(parse_model(m) for m in _list(data.get("models", []), "models"))
            seq_lens = tuple(parse_seq_lens(s) for s in _list(data.get("seq_lens", []), "seq_lens"))
            stream = data.get("stream")
            if stream is not None and not isinstance(stream, bool):
                raise WorkloadError(f"stream must be true, false or null, got {stream!r}")
            return cls(
                models=models,
                seq_lens=seq_lens,
                rows=parse_rows(data.get("rows", 1)),
                unconditioned=float(data.get("unconditioned", 0.0)),
                dtype=str(data.get("dtype", "float32")),
                seed=_int(data.get("seed", 0)),
                stream=stream,
                representation=parse_representation(data.get("representation", "dense")),
            )
        except WorkloadError as exc:
            raise WorkloadError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise WorkloadError(f"{source}: {exc}") from None

    def override(self, **changes: Any) -> Workload:
        """A copy with the settings that are not ``None`` replaced (flags over a file)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = str(self.rows)
        out["representation"] = dict(self.representation)
        out["seq_lens"] = [list(s) for s in self.seq_lens]
        out["models"] = [
            {"name": m.name, "weight": m.weight, "seq_lens": [list(s) for s in m.seq_lens]}
            for m in self.models
        ]
        return out


def load_file(path: Path) -> dict[str, Any]:
    """A workload file's mapping: JSON by ``.json``, else YAML (needs pyyaml)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkloadError(f"cannot read workload file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}: invalid JSON: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise WorkloadError(
                f"{path}: YAML workload files need pyyaml: pip install 'kernelgen[loadtest]' "
                "(or write the workload as .json)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise WorkloadError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise WorkloadError(f"{path}: a workload file holds a mapping (models, seq_lens, rows, ...)")
    return dict(data)


# --- resolved against the server -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelTarget:
    """One model (or group) as the load tester sends to it: its share, grids and conditioning width."""

    name: str
    weight: float
    seq_lens: tuple[tuple[int, ...], ...]
    #: ``None``: the model has no FiLM generator and every request is unconditioned.
    cond_dim: int | None
    #: A group's members, in order; empty for a model.
    members: tuple[str, ...] = ()
    #: Its kernels are causal (``s`` points on the axis, not ``2*s - 1``); a group's when all members' are.
    causal: bool = False


@dataclass(frozen=True)
class ResolvedWorkload:
    """A workload checked against the server; picklable, so client processes get it as is."""

    workload: Workload
    targets: tuple[ModelTarget, ...]

    def to_dict(self) -> dict[str, Any]:
        """The workload as given, each model's ``seq_lens`` being those it is sent (its own, or its
        axes' share of the top-level list, or its ``L_cache``), and ``resolved``: each target's share."""
        given = self.workload.to_dict()
        sent = {t.name: [list(s) for s in t.seq_lens] for t in self.targets}
        for model in given["models"]:
            model["seq_lens"] = sent.get(model["name"], model["seq_lens"])
        return {
            **given,
            "resolved": [
                {
                    "name": t.name,
                    "share": t.weight / sum(u.weight for u in self.targets),
                    "seq_lens": [list(s) for s in t.seq_lens],
                    "cond_dim": t.cond_dim,
                    **({"members": list(t.members)} if t.members else {}),
                }
                for t in self.targets
            ],
        }


def resolve(workload: Workload, infos: Mapping[str, ModelInfo]) -> ResolvedWorkload:
    """Check every model is ready and give each its seq_lens; ``WorkloadError`` says what is wrong.

    A model without its own seq_lens takes the shared entries of its data_dim;
    with no seq_lens at all, its ``L_cache`` (the grid it was trained on).
    """
    targets = []
    used: set[tuple[int, ...]] = set()
    groups = {group.name: group for group in GroupInfo.collect(list(infos.values()))}
    for mix in workload.models:
        if mix.name not in infos and mix.name in groups:
            info, cond_dim, members = _group_target(groups[mix.name])
        else:
            info = infos[mix.name]
            if not info.ready or info.config is None:
                raise WorkloadError(
                    f"model {mix.name!r} is not ready on the server: {info.reason or 'unknown'}"
                )
            cond_dim, members = info.config.cond_dim, ()
        assert info.config is not None
        causal = info.config.causal if not members else _all_causal(groups[mix.name])
        dims = info.config.data_dim
        if mix.seq_lens:
            options = mix.seq_lens
        elif workload.seq_lens:
            options = tuple(s for s in workload.seq_lens if len(s) == dims)
            used.update(options)
        else:
            cache = info.config.L_cache  # one value for every axis, or one per axis
            options = (cache if len(cache) == dims else cache[:1] * dims,)
        bad = [s for s in options if len(s) != dims]
        if bad or not options:
            given = "; ".join(",".join(map(str, s)) for s in (bad or workload.seq_lens))
            raise WorkloadError(
                f"model {mix.name!r} has {dims} axes: give seq_lens with {dims} values"
                f" (got {given or 'none'})"
            )
        targets.append(ModelTarget(mix.name, mix.weight, tuple(options), cond_dim, members, causal))
    unused = [s for s in workload.seq_lens if s not in used]
    if unused:
        raise WorkloadError(
            f"seq_lens {'; '.join(','.join(map(str, s)) for s in unused)} fit none of the models' axes"
        )
    return ResolvedWorkload(workload, tuple(targets))


def _all_causal(group: GroupInfo) -> bool:
    return all(m.config is not None and m.config.causal for m in group.members)


def _group_target(group: GroupInfo) -> tuple[ModelInfo, int | None, tuple[str, ...]]:
    """A group's first member (for its axes and L_cache), the conditioning width, and the members."""
    for member in group.members:
        if not member.ready or member.config is None:
            raise WorkloadError(
                f"group {group.name!r} is not ready on the server: member {member.name!r}: "
                f"{member.reason or 'unknown'}"
            )
    configs = [m.config for m in group.members if m.config is not None]
    axes = sorted({c.data_dim for c in configs})
    if len(axes) > 1:
        raise WorkloadError(
            f"group {group.name!r} has members of {' and '.join(map(str, axes))} axes: one seq_lens "
            "cannot fit them all"
        )
    widths = {c.cond_dim for c in configs}
    cond_dim = widths.pop() if len(widths) == 1 else None  # conditioned only when every member takes it
    return group.members[0], cond_dim, group.names


# --- requests ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One GenerateKernel call to make (or GenerateGroup, for a group)."""

    model: str
    seq_lens: tuple[int, ...]
    #: ``[rows, cond_dim]`` float32, or ``None`` for an unconditioned (cacheable) kernel.
    conditioning: npt.NDArray[np.float32] | None
    dtype: str
    #: "dense", "factored" or "auto".
    representation: str = "dense"
    #: ``model`` names a group: one call fetches every member's kernel.
    group: bool = False

    @property
    def kernels(self) -> int:
        """Kernels the response carries (its batch dimension)."""
        return 1 if self.conditioning is None else int(self.conditioning.shape[0])


class RequestSource:
    """Draws the workload's requests; the sequence depends only on the workload and ``stream_id``.

    Each process (and each step) draws from its own stream, so ``--workers`` and
    a rerun with the same seed send the same requests.
    """

    def __init__(self, resolved: ResolvedWorkload, stream_id: Sequence[int] = ()) -> None:
        import numpy as np

        workload = resolved.workload
        self._targets = resolved.targets
        total = sum(t.weight for t in self._targets)
        running, cumulative = 0.0, []
        for target in self._targets:
            running += target.weight / total
            cumulative.append(running)
        cumulative[-1] = 1.0  # invariant: a draw in [0, 1) always lands on a model
        self._cumulative = cumulative
        self._rows = workload.rows
        self._unconditioned = workload.unconditioned
        self._dtype = workload.dtype
        names = [name for name, _ in workload.representation]
        weights = [weight for _, weight in workload.representation]
        self._representations = names
        self._representation_cumulative = [sum(weights[: i + 1]) / sum(weights) for i in range(len(weights))]
        self._rng = np.random.default_rng([workload.seed, *stream_id])

    def next(self) -> Request:
        rng = self._rng
        target = self._targets[bisect.bisect_right(self._cumulative, rng.random())]
        options = target.seq_lens
        seq_lens = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        conditioning = None
        if target.cond_dim is not None and rng.random() >= self._unconditioned:
            rows = self._rows.low
            if self._rows.high > rows:
                rows = int(rng.integers(rows, self._rows.high + 1))
            conditioning = rng.standard_normal((rows, target.cond_dim), dtype="float32")
        representation = self._representations[0]
        if len(self._representations) > 1:  # one draw more only for a mix: seeded runs stay as they were
            index = bisect.bisect_right(self._representation_cumulative, rng.random())
            representation = self._representations[min(index, len(self._representations) - 1)]
        return Request(target.name, seq_lens, conditioning, self._dtype, representation, bool(target.members))
