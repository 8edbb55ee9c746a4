"""Groups in the model repository: layout, loading, failures, lookups, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kernelgen_server.errors import InvalidRequest, ModelNotFound, ModelNotReady
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository.store import (
    FailedModel,
    LoadedModel,
    ModelRepository,
    NewMember,
    group_holds,
    write_group,
    write_model,
)

CONFIG_DICT: dict[str, Any] = {
    "out_dim": 3,
    "data_dim": 1,
    "mlp_hidden_dim": 8,
    "num_layers": 3,
    "embedding_dim": 8,
    "omega_0": 10.0,
    "L_cache": 9,
    "use_bias": True,
}
CONFIG = ModelConfig.from_dict(CONFIG_DICT)


def members(count: int, seed: int = 0) -> list[NewMember]:
    return [
        NewMember(str(i), f"blocks.{i}.filter.kernel", CONFIG, CONFIG.build(seed=seed + i).state_dict())
        for i in range(count)
    ]


def test_a_group_loads_as_models_in_the_groups_order(tmp_path: Path) -> None:
    write_model(tmp_path, "alone", CONFIG, CONFIG.build(seed=99).state_dict())
    path = write_group(tmp_path, "net", members(12), checkpoint="run.ckpt")
    assert path == tmp_path / "net"
    repo = ModelRepository.load(tmp_path)
    group = repo.groups["net"]
    assert group.members == tuple(f"net/{i}" for i in range(12))
    assert group.sources == tuple(f"blocks.{i}.filter.kernel" for i in range(12))
    assert (group.path, group.checkpoint) == (tmp_path / "net", "run.ckpt")
    assert repo.names() == ["alone", *group.members]  # net/2 before net/10
    assert [e.name for e in repo.entries()] == repo.names()
    assert repo.group_ready("net")
    assert repo.group_of("net/10") == (group, 10)
    assert repo.group_of("alone") is None
    model = repo.get("net/3")
    assert (model.name, model.path) == ("net/3", tmp_path / "net" / "3")
    assert model.content_hash != repo.get("net/4").content_hash


def test_lookups_tell_groups_and_models_apart(tmp_path: Path) -> None:
    write_model(tmp_path, "alone", CONFIG, CONFIG.build(seed=0).state_dict())
    write_group(tmp_path, "net", members(2))
    repo = ModelRepository.load(tmp_path)
    with pytest.raises(
        InvalidRequest, match=r"'net' is a group of 2 models \(net/0 .. net/1\), not a model"
    ) as as_model:
        repo.get("net")
    with pytest.raises(InvalidRequest, match="'alone' is a model, not a group") as as_group:
        repo.group("alone")
    # Each its own reason, from which the client names its own call; the message is protocol-neutral:
    # the caller may be kernelgen's client, its CLI or another protocol's client.
    assert (as_model.value.reason, as_group.value.reason) == ("group-not-model", "model-not-group")
    for caught in (as_model, as_group):
        assert "Generate" not in caught.value.message
    with pytest.raises(ModelNotFound, match="unknown group 'other'"):
        repo.group("other")
    with pytest.raises(ModelNotFound, match="unknown model 'net/2'"):
        repo.get("net/2")
    assert "net/1" in repo and "net" not in repo
    assert len(repo) == 3


def test_a_member_that_fails_leaves_the_group_not_ready(tmp_path: Path) -> None:
    write_group(tmp_path, "net", members(3))
    (tmp_path / "net" / "1" / "config.json").write_text(json.dumps({**CONFIG_DICT, "out_dim": 0}))
    repo = ModelRepository.load(tmp_path)
    assert list(repo.failed) == ["net/1"]
    assert "out_dim must be >= 1" in repo.failed["net/1"].reason
    assert not repo.group_ready("net")
    assert repo.group("net").members == ("net/0", "net/1", "net/2")
    with pytest.raises(ModelNotReady):
        repo.get("net/1")
    assert [type(e) for e in repo.entries()] == [LoadedModel, FailedModel, LoadedModel]


def test_a_folder_the_group_does_not_list_is_a_failed_member(tmp_path: Path) -> None:
    write_group(tmp_path, "net", members(2))
    write_model(tmp_path / "net", "extra", CONFIG, CONFIG.build(seed=7).state_dict())
    (tmp_path / "net" / ".staging").mkdir()
    repo = ModelRepository.load(tmp_path)
    assert list(repo.failed) == ["net/extra"]
    assert "that group.json does not list as a member" in repo.failed["net/extra"].reason
    assert repo.names() == ["net/0", "net/1", "net/extra"]
    assert repo.group_ready("net")  # its members all serve; the stray is reported, not served


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("{", "invalid group"),
        ({"members": []}, "a group has at least one member"),
        ({"members": [{"name": "0"}, {"name": "0"}]}, "member '0' is listed twice"),
        ({"members": [{"name": "../x"}]}, "invalid model name '../x'"),
        ({"members": [{"name": "0"}], "format": "kernelgen-group/9"}, "format"),
        ({"members": [{"name": "0"}], "owner": "me"}, "unknown key 'owner'"),
    ],
)
def test_an_invalid_group_file_fails_the_group_alone(tmp_path: Path, document: object, reason: str) -> None:
    write_model(tmp_path, "alone", CONFIG, CONFIG.build(seed=0).state_dict())
    write_group(tmp_path, "net", members(1))
    text = document if isinstance(document, str) else json.dumps(document)
    (tmp_path / "net" / "group.json").write_text(text)
    repo = ModelRepository.load(tmp_path)
    assert list(repo.ready) == ["alone"]
    assert list(repo.failed) == ["net"] and not repo.groups
    assert str(tmp_path / "net" / "group.json") in repo.failed["net"].reason
    assert reason in repo.failed["net"].reason
    with pytest.raises(ModelNotReady, match="'net' is not ready"):
        repo.group("net")


def test_writing_refuses_to_replace_without_force_and_replaces_whole_with_it(tmp_path: Path) -> None:
    write_model(tmp_path, "taken", CONFIG, CONFIG.build(seed=0).state_dict())
    with pytest.raises(FileExistsError, match="already holds a model; pass --force"):
        write_group(tmp_path, "taken", members(2))
    write_group(tmp_path, "net", members(3, seed=0))
    with pytest.raises(FileExistsError, match="already holds a group; pass --force"):
        write_group(tmp_path, "net", members(2, seed=5))
    assert group_holds(tmp_path, "net", members(3, seed=0))
    write_group(tmp_path, "net", members(2, seed=5), force=True)
    assert not group_holds(tmp_path, "net", members(3, seed=0))
    assert group_holds(tmp_path, "net", members(2, seed=5))
    assert sorted(p.name for p in (tmp_path / "net").iterdir()) == ["0", "1", "group.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net", "taken"]
    write_group(tmp_path, "taken", members(1), force=True)
    assert ModelRepository.load(tmp_path).groups["taken"].members == ("taken/0",)


def test_group_holds_compares_names_sources_and_hashes(tmp_path: Path) -> None:
    assert not group_holds(tmp_path, "net", members(2))
    write_group(tmp_path, "net", members(2))
    assert group_holds(tmp_path, "net", members(2))
    moved = [NewMember(m.name, "other." + m.source, m.config, m.tensors) for m in members(2)]
    assert not group_holds(tmp_path, "net", moved)
    assert not group_holds(tmp_path, "net", members(2, seed=1))
    assert not group_holds(tmp_path, "net", members(3))
    renamed = ModelConfig.from_dict({**CONFIG_DICT, "omega_0": 20.0})
    other = [NewMember(m.name, m.source, renamed, m.tensors) for m in members(2)]
    assert not group_holds(tmp_path, "net", other)


def test_a_group_that_does_not_load_back_is_not_moved_into_place(tmp_path: Path) -> None:
    bad = members(2)
    tensors = dict(bad[1].tensors)
    del tensors["out_linear.bias"]
    bad[1] = NewMember("1", bad[1].source, bad[1].config, tensors)
    with pytest.raises(ValueError, match=r"the written group does not load back: .*'out_linear.bias'"):
        write_group(tmp_path, "net", bad)
    assert list(tmp_path.iterdir()) == []


def test_a_members_name_is_group_slash_member_and_nothing_else() -> None:
    from kernelgen_server.core.plan import check_name
    from kernelgen_server.repository.store import is_served_name

    for good in ("net", "net/0", "vision-net.v2/block_3"):
        assert is_served_name(good)
        assert check_name(good) == good
    for bad in ("net/", "/0", "a/b/c", "net/../x", "net/.hidden", "n" * 129 + "/0", "net/" + "m" * 129):
        assert not is_served_name(bad)
        with pytest.raises(InvalidRequest, match="is not a model name"):
            check_name(bad)
    with pytest.raises(InvalidRequest, match="group name is empty"):
        check_name("", "group")
