"""``ModelInfo`` messages for the models of a repository."""

from __future__ import annotations

from kernelgen_client._proto.kernelgen.v1 import kernelgen_pb2 as pb
from kernelgen_server.config import ModelConfig
from kernelgen_server.repository import LoadedModel, ModelRepository

__all__ = ["config_message", "model_info"]


def config_message(config: ModelConfig) -> pb.ModelConfig:
    message = pb.ModelConfig(
        out_dim=config.out_dim,
        data_dim=config.data_dim,
        mlp_hidden_dim=config.mlp_hidden_dim,
        num_layers=config.num_layers,
        embedding_dim=config.embedding_dim,
        omega_0=config.omega_0,
        L_cache=config.cache_lens,
        use_bias=config.use_bias,
        hidden_omega_0=config.hidden_omega_0,
        film_after_pos_embed=config.film_after_pos_embed,
    )
    if config.film is not None:
        message.film.CopyFrom(
            pb.FiLMConfig(cond_dim=config.film.cond_dim, film_hidden_dim=config.film.film_hidden_dim)
        )
    return message


def model_info(repository: ModelRepository) -> list[pb.ModelInfo]:
    """One message per model, ready or not, in name order."""
    infos = []
    for entry in repository.entries():
        if isinstance(entry, LoadedModel):
            infos.append(
                pb.ModelInfo(
                    name=entry.name,
                    ready=True,
                    config=config_message(entry.config),
                    content_hash=entry.content_hash,
                    parameter_count=entry.parameter_count,
                )
            )
        else:
            infos.append(pb.ModelInfo(name=entry.name, ready=False, reason=entry.reason))
    return infos
