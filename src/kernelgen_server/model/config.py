"""``config.json``: the constructor arguments of one served ``SIRENKernelND``.

The schema is strict: unknown keys are refused, no bool stands in for an int,
no string is coerced into a number. Every size has an upper bound (``LIMITS``),
checked before anything is built, so a hostile or mistaken config is refused
in milliseconds with a short message naming its key. Architectural rules (minimum sizes,
``L_cache`` per axis, ``film_after_pos_embed`` needing ``embedding_dim ==
mlp_hidden_dim``, ...) are not restated here: a valid config is one for which
``SIRENKernelND.__init__`` succeeds, checked by building the module on the
meta device, which allocates no weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

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

from kernelgen_server.model.siren import FiLMConfig, SIRENKernelND, normalize_lengths
from kernelgen_wire.model_config import FILM_DEFAULTS, OPTIONAL_DEFAULTS

__all__ = ["ConfigError", "FiLMSection", "ModelConfig", "describe_errors", "read_json_file"]


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


class ModelConfig(BaseModel):
    """A validated ``config.json``; ``build()`` makes the module it describes."""

    model_config = _STRICT

    out_dim: _Width
    data_dim: Annotated[int, Field(le=LIMITS["data_dim"])]
    mlp_hidden_dim: _Width
    num_layers: Annotated[int, Field(le=LIMITS["num_layers"])]
    embedding_dim: _Width
    omega_0: float
    L_cache: int | tuple[int, ...]
    use_bias: bool
    hidden_omega_0: float = OPTIONAL_DEFAULTS["hidden_omega_0"]
    film_after_pos_embed: bool = OPTIONAL_DEFAULTS["film_after_pos_embed"]
    film: FiLMSection | None = OPTIONAL_DEFAULTS["film"]

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
        return count

    # -- construction --------------------------------------------------------

    def module_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``SIRENKernelND``."""
        film = None if self.film is None else FiLMConfig(self.film.cond_dim, self.film.film_hidden_dim)
        return {
            "out_dim": self.out_dim,
            "data_dim": self.data_dim,
            "mlp_hidden_dim": self.mlp_hidden_dim,
            "num_layers": self.num_layers,
            "embedding_dim": self.embedding_dim,
            "omega_0": self.omega_0,
            "L_cache": self.L_cache,
            "use_bias": self.use_bias,
            "hidden_omega_0": self.hidden_omega_0,
            "film_cfg": film,
            "film_after_pos_embed": self.film_after_pos_embed,
        }

    def build(self, *, seed: int | None = None, device: torch.device | str | None = None) -> SIRENKernelND:
        """A freshly initialised module (float32, train mode, as the constructor leaves it).

        With ``seed`` the initialisation is reproducible and the global RNG is
        left as it was. ``device="meta"`` gives the shapes without any storage.
        """
        with torch.device(device or "cpu"), torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return SIRENKernelND(**self.module_kwargs())

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
        """Every field, defaults included, as plain JSON values."""
        return self.model_dump(mode="json")

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
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
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
