"""``config.json``: the constructor arguments of one served ``SIRENKernelND``.

The schema is strict: unknown keys are refused, no bool stands in for an int,
no string is coerced into a number. Architectural rules (minimum sizes,
``L_cache`` per axis, ``film_after_pos_embed`` needing ``embedding_dim ==
mlp_hidden_dim``, ...) are not restated here: a valid config is one for which
``SIRENKernelND.__init__`` succeeds, checked by building the module on the
meta device, which allocates no weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from kernelgen_server.model import FiLMConfig, SIRENKernelND, normalize_lengths
from kernelgen_wire.model_config import FILM_DEFAULTS, OPTIONAL_DEFAULTS

__all__ = ["ConfigError", "FiLMSection", "ModelConfig", "describe_errors"]


class ConfigError(ValueError):
    """A ``config.json`` that cannot be read or is invalid; the message names the file."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class FiLMSection(BaseModel):
    """The ``film`` entry: the shape of the FiLM generator."""

    model_config = _STRICT

    cond_dim: int
    film_hidden_dim: int = FILM_DEFAULTS["film_hidden_dim"]


class ModelConfig(BaseModel):
    """A validated ``config.json``; ``build()`` makes the module it describes."""

    model_config = _STRICT

    out_dim: int
    data_dim: int
    mlp_hidden_dim: int
    num_layers: int
    embedding_dim: int
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
            return handler(tuple(value) if isinstance(value, list) else value)
        except ValidationError:
            raise ValueError(f"must be an int or a list of ints (one per axis), got {value!r}") from None

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelConfig:
        # The model's own constructor is the one definition of a valid architecture.
        self.build(device="meta")
        return self

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
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise ConfigError(path, f"cannot read config: {exc.strerror or exc}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(path, f"invalid config: {describe_errors(exc)}") from None

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike[str] = "<config>") -> ModelConfig:
        """Validate an already parsed config; errors are ``ConfigError`` naming ``source``."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(Path(source), f"invalid config: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """One line per pydantic error, joined by '; ', each naming its key."""
    parts = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        elif err["type"] == "missing":
            parts.append(f"missing key {key!r}")
        elif err["type"].endswith("_type"):
            parts.append(f"{key}: {msg}, got {err['input']!r}")
        else:
            parts.append(f"{key}: {msg}" if key else msg)
    return "; ".join(parts)
