"""A model's constructor arguments between ``config.json`` values and the ``ModelConfig`` message.

``config.json`` and ``ModelConfig`` name the same ten ``SIRENKernelND``
arguments (every generator class has them) plus the FiLM section, the
generator's class (``kernel``), the mask's class (``mask``: ``config.json``'s
``mask.type``) and ``causal``; a variant's own arguments and the mask's
settings stay in ``config.json``. This module is the one place that maps
between them. ``config.json`` may give ``L_cache`` as one int for every axis;
the message always holds one entry per axis.

The defaults alone need no protobuf: the server's config schema reads them
where only the model, not the wire, is wanted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["FILM_DEFAULTS", "OPTIONAL_DEFAULTS", "PLAIN_KERNEL", "config_message", "config_values"]

#: The generator class of a config that names none.
PLAIN_KERNEL = "SIRENKernelND"
#: Keys ``config.json`` may leave out, with the value they then take.
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "hidden_omega_0": 1.0,
    "film_after_pos_embed": False,
    "film": None,
    "kernel": PLAIN_KERNEL,
    "mask": None,
    "causal": False,
}
#: The same for the keys of its ``film`` section.
FILM_DEFAULTS: dict[str, Any] = {"film_hidden_dim": 64}


def config_message(values: Mapping[str, Any]) -> pb.ModelConfig:
    """The ``ModelConfig`` of ``config.json`` values (missing optional keys take their defaults)."""
    from kernelgen_wire.v1 import kernelgen_pb2 as pb

    values = {**OPTIONAL_DEFAULTS, **values}
    data_dim = int(values["data_dim"])
    cache = values["L_cache"]
    lens = [int(n) for n in cache] if isinstance(cache, (list, tuple)) else [int(cache)] * data_dim
    message = pb.ModelConfig(
        out_dim=values["out_dim"],
        data_dim=data_dim,
        mlp_hidden_dim=values["mlp_hidden_dim"],
        num_layers=values["num_layers"],
        embedding_dim=values["embedding_dim"],
        omega_0=values.get("omega_0") or 0.0,
        L_cache=lens,
        use_bias=values["use_bias"],
        hidden_omega_0=values["hidden_omega_0"],
        film_after_pos_embed=values["film_after_pos_embed"],
        kernel="" if values["kernel"] == PLAIN_KERNEL else values["kernel"],
        mask="" if values["mask"] is None else values["mask"]["type"],
        causal=values["causal"],
    )
    film = values["film"]
    if film is not None:
        film = {**FILM_DEFAULTS, **film}
        section = pb.FiLMConfig(cond_dim=film["cond_dim"], film_hidden_dim=film["film_hidden_dim"])
        message.film.CopyFrom(section)
    return message


def config_values(message: pb.ModelConfig) -> dict[str, Any]:
    """Plain values of a ``ModelConfig``; ``L_cache`` is a tuple, ``film`` a dict or None.

    ``mask`` is the mask's class name or None (the message carries no settings).
    """
    return {
        "out_dim": int(message.out_dim),
        "data_dim": int(message.data_dim),
        "mlp_hidden_dim": int(message.mlp_hidden_dim),
        "num_layers": int(message.num_layers),
        "embedding_dim": int(message.embedding_dim),
        "omega_0": float(message.omega_0),
        "L_cache": tuple(int(n) for n in message.L_cache),
        "use_bias": bool(message.use_bias),
        "hidden_omega_0": float(message.hidden_omega_0),
        "film_after_pos_embed": bool(message.film_after_pos_embed),
        "film": (
            {"cond_dim": int(message.film.cond_dim), "film_hidden_dim": int(message.film.film_hidden_dim)}
            if message.HasField("film")
            else None
        ),
        "kernel": message.kernel or PLAIN_KERNEL,
        "mask": message.mask or None,
        "causal": bool(message.causal),
    }
