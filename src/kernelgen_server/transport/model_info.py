"""``ModelInfo`` messages for the models of a repository."""

from __future__ import annotations

from kernelgen_server.repository.store import LoadedModel, ModelRepository
from kernelgen_wire.model_config import config_message
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["model_info"]


def model_info(repository: ModelRepository) -> list[pb.ModelInfo]:
    """One message per model, ready or not, in name order (a group's members in the group's order)."""
    infos = []
    for entry in repository.entries():
        if isinstance(entry, LoadedModel):
            info = pb.ModelInfo(
                name=entry.name,
                ready=True,
                config=config_message(entry.config.to_json_dict()),
                content_hash=entry.content_hash,
                parameter_count=entry.parameter_count,
                head_hash=entry.output_head.head_hash,
            )
        else:
            info = pb.ModelInfo(name=entry.name, ready=False, reason=_cut(entry.reason))
        place = repository.group_of(entry.name)
        if place is not None:
            group, index = place
            info.group, info.group_index, info.source = group.name, index, group.sources[index]
            if group.layer_hashes:
                info.layer_hashes.extend(group.layer_hashes[index])
        infos.append(info)
    return infos


#: Longest reason a listing carries: one bad model never makes ``ListModels`` too large to send.
MAX_REASON_CHARS = 1000


def _cut(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "... (cut)"
