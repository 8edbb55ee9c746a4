"""``config.json``: the constructor arguments of one served model.

A served model is a kernel generator (``kernel``: ``SIRENKernelND``, the default,
or one of ``KERNELS``), an optional attenuation ``mask`` and the ``causal`` crop
(``served``). Every key is a constructor argument by its reference name; a
generator's own arguments (``KERNEL_ARGUMENTS``) are refused for another, and
take the reference's defaults where it has them. A config without ``kernel``,
``mask`` and ``causal`` is a plain ``SIRENKernelND``, and its canonical form
(hence its content hash) is what it was before these keys existed.

The schema is strict: unknown keys are refused, no bool stands in for an int,
no string is coerced into a number. Every size has an upper bound (``LIMITS``),
checked before anything is built, so a hostile or mistaken config is refused
in milliseconds with a short message naming its key. Architectural rules (minimum sizes,
``L_cache`` per axis, ``film_after_pos_embed`` needing ``embedding_dim ==
mlp_hidden_dim``, a mask's channels matching ``out_dim``, clamps in order, ...)
are not restated here: a valid config is one for which the modules'
constructors succeed, checked by building them on the meta device, which
allocates no weights.

A Gaussian mask is stored with the clamp bounds its forward uses (``min_std``,
``max_std``); it may be written instead with the reference constructor's
``grid_size`` (default ``2 * max(L_cache) - 1``, what a layer sets),
``min_attenuation_at_step`` and ``max_attenuation_at_limit``, from which the
bounds are computed as the reference computes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from kernelgen_server.model.fourier import NONLINEARITIES, RandomFourierKernelND
from kernelgen_server.model.masks import (
    GAUSSIAN_MASKS,
    MASKS,
    ExponentialModulationND,
    GaussianModulationND,
    Mask,
    gaussian_std_bounds,
)
from kernelgen_server.model.served import ServedModel
from kernelgen_server.model.siren import FiLMConfig, KernelGenerator, SIRENKernelND, normalize_lengths
from kernelgen_server.model.variants import (
    SCHEDULES,
    BlockDiagonalLearnableOmegaSIRENKernelND,
    BlockDiagonalMultiOmegaSIRENKernelND,
    LearnableOmegaSIRENKernelND,
    MultiOmegaSIRENKernelND,
)
from kernelgen_wire.model_config import FILM_DEFAULTS, OPTIONAL_DEFAULTS

__all__ = [
    "KERNELS",
    "KERNEL_ARGUMENTS",
    "ConfigError",
    "ExponentialMaskSection",
    "FiLMSection",
    "GaussianMaskSection",
    "MaskSection",
    "ModelConfig",
    "describe_errors",
    "normalize_mask",
    "read_json_file",
]


class ConfigError(ValueError):
    """A ``config.json`` that cannot be read or is invalid; the message names the file."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)

#: Upper bounds of a served model's sizes: far above any SIREN kernel generator in use,
#: far below what would take the server's memory or seconds of its time to refuse.
LIMITS = {
    "data_dim": 8,
    "width": 16384,  # out_dim, mlp_hidden_dim, embedding_dim, cond_dim, film_hidden_dim
    "num_layers": 256,
    "L_cache": 1 << 24,
    "parameters": 1 << 30,
}
_Width = Annotated[int, Field(le=LIMITS["width"])]


class FiLMSection(BaseModel):
    """The ``film`` entry: the shape of the FiLM generator."""

    model_config = _STRICT

    cond_dim: _Width
    film_hidden_dim: _Width = FILM_DEFAULTS["film_hidden_dim"]


class GaussianMaskSection(BaseModel):
    """The ``mask`` entry of a Gaussian mask: its parametrisation and the clamp bounds of its stds."""

    model_config = _STRICT

    type: Literal["GaussianModulationND", "BlockAlignedGaussianModulationND"]
    data_dim: int
    num_channels: _Width
    parametrization: Literal["direct", "log", "softplus"] = "direct"
    min_std: float
    max_std: float
    #: Initialisation only (one per axis, or one for all).
    init_extent: float | tuple[float, ...] = 1.0

    @model_validator(mode="after")
    def _clamps_in_order(self) -> GaussianMaskSection:
        if not self.max_std >= self.min_std:  # also refuses NaN
            raise ValueError(
                f"max_std ({self.max_std}) is below min_std ({self.min_std}): the clamps are out of order"
            )
        return self


class ExponentialMaskSection(BaseModel):
    """The ``mask`` entry of an exponential mask (its decay settings only shape the initialisation)."""

    model_config = _STRICT

    type: Literal["ExponentialModulationND"]
    data_dim: int
    num_channels: _Width
    fast_decay_pct: float = 13.81
    slow_decay_pct: float = 2.3


MaskSection = Annotated[GaussianMaskSection | ExponentialMaskSection, Field(discriminator="type")]

#: The generators a config may name.
KERNELS = (
    "SIRENKernelND",
    "MultiOmegaSIRENKernelND",
    "BlockDiagonalMultiOmegaSIRENKernelND",
    "LearnableOmegaSIRENKernelND",
    "BlockDiagonalLearnableOmegaSIRENKernelND",
    "RandomFourierKernelND",
)
#: Every generator's arguments.
COMMON_ARGUMENTS = (
    "out_dim",
    "data_dim",
    "mlp_hidden_dim",
    "num_layers",
    "embedding_dim",
    "L_cache",
    "use_bias",
)
_SIREN: dict[str, Any] = {k: OPTIONAL_DEFAULTS[k] for k in ("hidden_omega_0", "film_after_pos_embed", "film")}
_BLOCKS: dict[str, Any] = {
    "num_blocks": 8, "omega_0_min": 1.0, "omega_0_max": 12.0, "schedule": "linear", "off_block_scale": 0.1,
    "omega_0_per_block": None,
}  # fmt: skip
_SCALES: dict[str, Any] = {"omega_0_scale_min": 1e-2, "omega_0_scale_max": 2.0}
#: Each generator's own arguments beyond ``COMMON_ARGUMENTS``: those it needs, and the others
#: with their defaults.
KERNEL_ARGUMENTS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "SIRENKernelND": (("omega_0",), _SIREN),
    "MultiOmegaSIRENKernelND": (("omega_0_per_row",), _SIREN),
    "BlockDiagonalMultiOmegaSIRENKernelND": ((), {**_BLOCKS, **_SIREN}),
    "LearnableOmegaSIRENKernelND": (("omega_0",), {"omega_0_scale_init": 1.0, **_SCALES, **_SIREN}),
    "BlockDiagonalLearnableOmegaSIRENKernelND": ((), {**_BLOCKS, **_SCALES, **_SIREN}),
    "RandomFourierKernelND": (("omega_0", "nonlinearity"), {}),
}
_GENERATORS: dict[str, type[KernelGenerator]] = {
    "SIRENKernelND": SIRENKernelND,
    "MultiOmegaSIRENKernelND": MultiOmegaSIRENKernelND,
    "BlockDiagonalMultiOmegaSIRENKernelND": BlockDiagonalMultiOmegaSIRENKernelND,
    "LearnableOmegaSIRENKernelND": LearnableOmegaSIRENKernelND,
    "BlockDiagonalLearnableOmegaSIRENKernelND": BlockDiagonalLearnableOmegaSIRENKernelND,
    "RandomFourierKernelND": RandomFourierKernelND,
}
_OWN_ARGUMENTS = {name for required, optional in KERNEL_ARGUMENTS.values() for name in (*required, *optional)}
_SEQUENCES = ("omega_0_per_row", "omega_0_per_block", "omega_0_scale_init")
#: Keys whose absence is the plain model's value (left out of the canonical form then).
_SERVING_DEFAULTS: dict[str, Any] = {k: OPTIONAL_DEFAULTS[k] for k in ("kernel", "mask", "causal")}


def _kernel_arguments(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the named generator's defaults filled in; its foreign arguments refused by name."""
    kind = data.get("kernel", "SIRENKernelND")
    if kind not in KERNEL_ARGUMENTS:
        raise ValueError(f"kernel: unknown generator {_short(kind)}; kernelgen serves {', '.join(KERNELS)}")
    required, optional = KERNEL_ARGUMENTS[kind]
    foreign = sorted(k for k in data if k in _OWN_ARGUMENTS and k not in required and k not in optional)
    if foreign:
        takes = ", ".join([*required, *optional]) or "nothing else"
        raise ValueError(f"key {foreign[0]!r} is no argument of {kind} (it takes {takes} beyond the sizes)")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} ({kind} needs it)")
    data = {**optional, **data}
    for key in _SEQUENCES:
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    return data


def normalize_mask(section: Any, cache_lens: Any) -> Any:
    """A Gaussian ``mask`` entry in the reference constructor's terms turned into ``min_std``/``max_std``.

    ``grid_size`` defaults to what a layer sets, ``2 * max(L_cache) - 1``; the
    attenuations to the reference's defaults. Anything else is returned as it
    is, for the schema to check.
    """
    terms = ("grid_size", "min_attenuation_at_step", "max_attenuation_at_limit")
    if not isinstance(section, Mapping) or section.get("type") not in GAUSSIAN_MASKS:
        return section
    section = dict(section)
    if isinstance(section.get("init_extent"), list):
        section["init_extent"] = tuple(section["init_extent"])
    given = [k for k in terms if k in section]
    bounds = [k for k in ("min_std", "max_std") if k in section]
    if given and bounds:
        raise ValueError(
            f"mask: give the clamps as min_std and max_std or as {', '.join(terms)}, not both "
            f"({bounds[0]!r} and {given[0]!r})"
        )
    if bounds:
        return section
    arguments = {k: section.pop(k) for k in given}
    if "grid_size" not in arguments:
        lengths = cache_lens if isinstance(cache_lens, list | tuple) else [cache_lens]
        if not lengths or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
            return section  # the L_cache error says what is wrong
        arguments["grid_size"] = 2 * max(lengths) - 1
    try:
        section["min_std"], section["max_std"] = gaussian_std_bounds(**arguments)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"mask: {exc}") from None
    return section


class ModelConfig(BaseModel):
    """A validated ``config.json``; ``build()`` makes the ``ServedModel`` it describes."""

    model_config = _STRICT

    kernel: Literal[KERNELS] = OPTIONAL_DEFAULTS["kernel"]  # type: ignore[valid-type]
    out_dim: _Width
    data_dim: Annotated[int, Field(le=LIMITS["data_dim"])]
    mlp_hidden_dim: _Width
    num_layers: Annotated[int, Field(le=LIMITS["num_layers"])]
    embedding_dim: _Width
    omega_0: float | None = None
    L_cache: int | tuple[int, ...]
    use_bias: bool
    hidden_omega_0: float = OPTIONAL_DEFAULTS["hidden_omega_0"]
    film_after_pos_embed: bool = OPTIONAL_DEFAULTS["film_after_pos_embed"]
    film: FiLMSection | None = OPTIONAL_DEFAULTS["film"]
    # The variants' own arguments (``KERNEL_ARGUMENTS``): None where the generator takes none.
    omega_0_per_row: tuple[float, ...] | None = None
    num_blocks: Annotated[int, Field(le=LIMITS["width"])] | None = None
    omega_0_min: float | None = None
    omega_0_max: float | None = None
    schedule: Literal[SCHEDULES] | None = None  # type: ignore[valid-type]
    off_block_scale: float | None = None
    omega_0_per_block: tuple[float, ...] | None = None
    omega_0_scale_init: float | tuple[float, ...] | None = None
    omega_0_scale_min: float | None = None
    omega_0_scale_max: float | None = None
    nonlinearity: Literal[tuple(NONLINEARITIES)] | None = None  # type: ignore[valid-type]
    # What the layer does with the generator's kernel.
    mask: MaskSection | None = OPTIONAL_DEFAULTS["mask"]
    causal: bool = OPTIONAL_DEFAULTS["causal"]

    @model_validator(mode="before")
    @classmethod
    def _generator_and_mask_arguments(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data  # the schema says what is wrong
        data = _kernel_arguments(dict(data))
        if "mask" in data:
            data["mask"] = normalize_mask(data["mask"], data.get("L_cache"))
        return data

    @field_validator("L_cache", mode="wrap")
    @classmethod
    def _one_message_for_l_cache(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # JSON arrays and Python lists become tuples: the config stays immutable and hashable.
        # The union's per-member errors ("L_cache.int: ...", "L_cache.tuple[int, ...]: ...")
        # would be noise; one sentence says what is expected.
        try:
            lens = handler(tuple(value) if isinstance(value, list) else value)
        except ValidationError:
            raise ValueError(
                f"must be an int or a list of ints (one per axis), got {_short(value)}"
            ) from None
        values = lens if isinstance(lens, tuple) else (lens,)
        if len(values) > LIMITS["data_dim"] or any(n > LIMITS["L_cache"] for n in values):
            raise ValueError(
                f"at most {LIMITS['data_dim']} axes of at most {LIMITS['L_cache']} each, got {_short(value)}"
            )
        return lens

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelConfig:
        if self.film_after_pos_embed and self.film is None:
            # The reference accepts this and modulates nothing; a config that says so is a mistake.
            raise ValueError(
                "film_after_pos_embed is true but there is no film section: without FiLM there is "
                "nothing to modulate the embedding with (the reference package ignores the flag); "
                "set film_after_pos_embed to false or add film"
            )
        if self.mask is not None:
            for key, want in (("data_dim", self.data_dim), ("num_channels", self.out_dim)):
                have = getattr(self.mask, key)
                if have != want:
                    what = "data_dim" if key == "data_dim" else "out_dim"
                    raise ValueError(f"mask.{key} is {have}, but the kernel's {what} is {want}")
        # Counted before anything is built: a huge model is refused without building it.
        parameters = self.parameter_bound()
        if parameters > LIMITS["parameters"]:
            raise ValueError(
                f"the model would have about {parameters} parameters, over {LIMITS['parameters']}"
            )
        # The model's own constructor is the one definition of a valid architecture.
        try:
            self.build(device="meta")
        except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
            raise ValueError(_short(str(exc), 300)) from None
        return self

    def parameter_bound(self) -> int:
        """An upper bound of the model's parameter count, from the sizes alone."""
        hidden, embed = self.mlp_hidden_dim, self.embedding_dim
        count = (self.data_dim + 1) * embed + (embed + 1) * hidden
        count += max(self.num_layers - 2, 0) * (hidden + 1) * hidden + (hidden + 1) * self.out_dim
        if self.film is not None:
            n_film = self.num_layers + 1
            count += (self.film.cond_dim + 1) * self.film.film_hidden_dim
            count += (self.film.film_hidden_dim + 1) * n_film * 2 * hidden
        count += embed  # a learnable omega's scales
        if self.mask is not None:
            count += self.data_dim * self.out_dim
        return count

    # -- construction --------------------------------------------------------

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the generator class ``kernel`` names."""
        required, optional = KERNEL_ARGUMENTS[self.kernel]
        kwargs = {name: getattr(self, name) for name in (*COMMON_ARGUMENTS, *required, *optional)}
        if "film" in kwargs:
            film = kwargs.pop("film")
            kwargs["film_cfg"] = None if film is None else FiLMConfig(film.cond_dim, film.film_hidden_dim)
        return kwargs

    def build_mask(self) -> Mask | None:
        """The mask ``mask`` describes, or None."""
        section = self.mask
        if section is None:
            return None
        if isinstance(section, GaussianMaskSection):
            mask_class = MASKS[section.type]
            assert issubclass(mask_class, GaussianModulationND)
            return mask_class(
                section.data_dim, section.num_channels, section.min_std, section.max_std,
                section.parametrization, section.init_extent,
            )  # fmt: skip
        return ExponentialModulationND(
            section.data_dim, section.num_channels, section.fast_decay_pct, section.slow_decay_pct
        )

    def build(self, *, seed: int | None = None, device: torch.device | str | None = None) -> ServedModel:
        """A freshly initialised model (float32, train mode, as the constructors leave it).

        With ``seed`` the initialisation is reproducible and the global RNG is
        left as it was. ``device="meta"`` gives the shapes without any storage.
        """
        with torch.device(device or "cpu"), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            generator = _GENERATORS[self.kernel](**self.generator_kwargs())
            return ServedModel(generator, self.build_mask(), self.causal)

    # -- derived facts -------------------------------------------------------

    @property
    def cache_lens(self) -> tuple[int, ...]:
        """``L_cache`` per axis (an int is broadcast to ``data_dim`` axes)."""
        return normalize_lengths("L_cache", self.L_cache, self.data_dim, 2)

    @property
    def cond_dim(self) -> int | None:
        """Width of the conditioning vector, or None for a model without FiLM."""
        return None if self.film is None else self.film.cond_dim

    # -- files ---------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """Every argument of the model, defaults included, as plain JSON values.

        The generator's foreign arguments are left out, and so are ``kernel``,
        ``mask`` and ``causal`` where they are the plain model's: a plain SIREN's
        canonical form is the one it always had.
        """
        required, optional = KERNEL_ARGUMENTS[self.kernel]
        keep = {*COMMON_ARGUMENTS, *required, *optional}
        keep |= {k for k, default in _SERVING_DEFAULTS.items() if getattr(self, k) != default}
        return self.model_dump(mode="json", include=keep)

    def canonical_json(self) -> str:
        """A byte-stable JSON text of ``to_json_dict()`` (sorted keys, no spaces)."""
        return json.dumps(self.to_json_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ModelConfig:
        """Read and validate a ``config.json``; any failure is a ``ConfigError`` naming the file."""
        return read_json_file(cls, Path(path), "config")

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike[str] = "<config>") -> ModelConfig:
        """Validate an already parsed config; errors are ``ConfigError`` naming ``source``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(Path(source), f"invalid config: {describe_errors(exc)}") from None


SchemaT = TypeVar("SchemaT", bound=BaseModel)


def read_json_file(schema: type[SchemaT], path: Path, what: str) -> SchemaT:
    """A JSON file validated by ``schema``; any failure is a ``ConfigError`` naming the file and ``what``."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        return schema.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(path, f"invalid {what}: {describe_errors(exc)}") from None


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters (a config's values are not ours to print whole)."""
    text = value if isinstance(value, str) and limit > 60 else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def describe_errors(exc: ValidationError) -> str:
    """One short line per pydantic error (at most 8), joined by '; ', each naming its key."""
    parts = []
    for err in exc.errors(include_url=False):
        # A mask's errors are located under its type's tag (``mask.GaussianModulationND.x``): ``mask.x``.
        key = ".".join(str(p) for p in err["loc"] if p not in MASKS)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            parts.append(
                f"{key}.type: unknown type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
            )
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        elif err["type"] == "missing":
            parts.append(f"missing key {key!r}")
        elif err["type"].endswith("_type"):
            parts.append(f"{key}: {msg}, got {_short(err['input'])}")
        else:
            parts.append(f"{key}: {_short(msg, 300)}" if key else _short(msg, 300))
    if len(parts) > 8:
        parts = [*parts[:8], f"and {len(parts) - 8} more"]
    return "; ".join(parts)
