"""Load-test workloads: parsing, validation, resolution against the server, seeded requests."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kernelgen_client.results import FiLMConfig, ModelConfig, ModelInfo
from kernelgen_loadtest.workload import (
    ModelMix,
    Request,
    RequestSource,
    RowRange,
    Workload,
    WorkloadError,
    load_file,
    parse_model,
    parse_representation,
    parse_rows,
    parse_seq_lens,
    resolve,
)


def info(
    name: str, data_dim: int, cond_dim: int | None, l_cache: tuple[int, ...] = (15,), ready: bool = True
) -> ModelInfo:
    config = ModelConfig(
        out_dim=8, data_dim=data_dim, mlp_hidden_dim=16, num_layers=3, embedding_dim=16, omega_0=10.0,
        L_cache=l_cache, use_bias=True, hidden_omega_0=1.0, film_after_pos_embed=False,
        film=None if cond_dim is None else FiLMConfig(cond_dim, 32),
    )  # fmt: skip
    return ModelInfo(name, ready, "" if ready else "broken weights", config, "hash", 100)


INFOS = {
    "two": info("two", 2, 6),
    "one": info("one", 1, None, (64,)),
    "three": info("three", 3, 4, (4, 8, 8)),
    "broken": info("broken", 2, 6, ready=False),
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("29,29", (29, 29)), (" 4, 8 ,8 ", (4, 8, 8)), (7, (7,)), ([3, "5"], (3, 5))],
)
def test_seq_lens_parse(text: object, expected: tuple[int, ...]) -> None:
    assert parse_seq_lens(text) == expected


@pytest.mark.parametrize("text", ["", "0,3", "a,b", [True, 2], "-1", [2.5]])
def test_seq_lens_refused(text: object) -> None:
    with pytest.raises(WorkloadError, match="seq_lens"):
        parse_seq_lens(text)


def test_a_kernel_shape_is_not_read_as_seq_lens() -> None:
    # 15,15 gives a 29x29 kernel: "29x29" names a shape, so it is refused with the seq_lens it means.
    with pytest.raises(WorkloadError, match="29x29 is a kernel's shape; for a 29x29 kernel give 15,15"):
        parse_seq_lens("29x29")


def test_rows_and_models_parse() -> None:
    assert parse_rows("1-4") == RowRange(1, 4)
    assert parse_rows("2..3") == RowRange(2, 3)
    assert parse_rows(3) == RowRange(3, 3)
    assert parse_rows([1, 8]) == RowRange(1, 8)
    assert str(RowRange(2, 2)) == "2" and str(RowRange(1, 4)) == "1-4"
    for bad in ("0", "4-1", "x", [1, 2, 3]):
        with pytest.raises(WorkloadError, match="rows"):
            parse_rows(bad)
    assert parse_model("hyena-2d") == ModelMix("hyena-2d", 1.0)
    assert parse_model("hyena-2d:3") == ModelMix("hyena-2d", 3.0)
    assert parse_model({"name": "v", "weight": 2, "seq_lens": ["4,8,8"]}) == ModelMix("v", 2.0, ((4, 8, 8),))
    for bad in ("m:zero", "m:-1", {"name": "m", "colour": 1}, {"weight": 1}, 3):
        with pytest.raises(WorkloadError):
            parse_model(bad)


def test_workload_validates_its_fields() -> None:
    with pytest.raises(WorkloadError, match="no model"):
        Workload(models=())
    with pytest.raises(WorkloadError, match="named twice"):
        Workload(models=(ModelMix("a"), ModelMix("a")))
    with pytest.raises(WorkloadError, match="unconditioned"):
        Workload(models=(ModelMix("a"),), unconditioned=1.5)
    with pytest.raises(WorkloadError, match="dtype"):
        Workload(models=(ModelMix("a"),), dtype="float64")


def test_from_mapping_refuses_unknown_keys_and_names_the_source() -> None:
    with pytest.raises(WorkloadError, match=r"mix\.yaml: unknown keys \['concurency'\]"):
        Workload.from_mapping({"models": ["a"], "concurency": 4}, source="mix.yaml")
    with pytest.raises(WorkloadError, match=r"mix\.yaml: .*rows"):
        Workload.from_mapping({"models": ["a"], "rows": "5-1"}, source="mix.yaml")
    with pytest.raises(WorkloadError, match="stream"):
        Workload.from_mapping({"models": ["a"], "stream": "yes"})


def test_files_json_and_yaml(tmp_path: Path) -> None:
    data = {
        "models": [{"name": "two", "weight": 3}, "three"],
        "seq_lens": ["15,15"],
        "rows": "1-2",
        "seed": 5,
    }
    (tmp_path / "w.json").write_text(json.dumps(data))
    (tmp_path / "w.yaml").write_text(
        "models:\n  - name: two\n    weight: 3\n  - three\nseq_lens: ['15,15']\nrows: 1-2\nseed: 5\n"
    )
    from_json = Workload.from_mapping(load_file(tmp_path / "w.json"))
    assert from_json == Workload.from_mapping(load_file(tmp_path / "w.yaml"))
    assert from_json.models == (ModelMix("two", 3.0), ModelMix("three"))
    assert from_json.rows == RowRange(1, 2) and from_json.seed == 5
    assert from_json.override(seed=None, dtype="float16").dtype == "float16"
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(WorkloadError, match="holds a mapping"):
        load_file(tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(WorkloadError, match="invalid JSON"):
        load_file(tmp_path / "bad.json")
    with pytest.raises(WorkloadError, match="cannot read"):
        load_file(tmp_path / "missing.json")


def test_resolve_gives_each_model_the_grids_of_its_axes() -> None:
    workload = Workload(
        models=(ModelMix("two", 3.0), ModelMix("one"), ModelMix("three", seq_lens=((2, 3, 4),))),
        seq_lens=((15, 15), (29, 29), (100,)),
    )
    resolved = resolve(workload, INFOS)
    by_name = {t.name: t for t in resolved.targets}
    assert by_name["two"].seq_lens == ((15, 15), (29, 29))
    assert by_name["one"].seq_lens == ((100,),) and by_name["one"].cond_dim is None
    assert by_name["three"].seq_lens == ((2, 3, 4),) and by_name["three"].cond_dim == 4
    shares = {r["name"]: r["share"] for r in resolved.to_dict()["resolved"]}
    assert shares == {"two": 0.6, "one": 0.2, "three": 0.2}
    # No seq_lens anywhere: each model's L_cache, broadcast over its axes.
    defaults = resolve(Workload(models=(ModelMix("two"), ModelMix("three"))), INFOS)
    assert [t.seq_lens for t in defaults.targets] == [((15, 15),), ((4, 8, 8),)]


def test_the_json_names_the_seq_lens_each_model_is_sent() -> None:
    # Top-level seq_lens, a model's own, and none at all (L_cache): each model's entry says which it got.
    shared = resolve(
        Workload(models=(ModelMix("two"), ModelMix("three", seq_lens=((2, 3, 4),))), seq_lens=((15, 15),)),
        INFOS,
    )
    document = shared.to_dict()
    assert document["seq_lens"] == [[15, 15]]
    assert [(m["name"], m["seq_lens"]) for m in document["models"]] == [
        ("two", [[15, 15]]),
        ("three", [[2, 3, 4]]),
    ]
    defaults = resolve(Workload(models=(ModelMix("three"),)), INFOS).to_dict()
    assert defaults["models"][0]["seq_lens"] == [[4, 8, 8]] and defaults["seq_lens"] == []


def test_the_description_tells_seq_lens_from_the_kernel_shape() -> None:
    from kernelgen_loadtest.session import seq_lens_and_shape

    assert seq_lens_and_shape((15, 15)) == "seq_lens 15,15 (kernel 29x29)"
    assert seq_lens_and_shape((64,)) == "seq_lens 64 (kernel 127)"
    assert seq_lens_and_shape((64,), causal=True) == "seq_lens 64 (kernel 64)"


def test_a_causal_model_s_target_says_so() -> None:
    import dataclasses

    assert INFOS["one"].config is not None
    causal = dataclasses.replace(INFOS["one"], config=dataclasses.replace(INFOS["one"].config, causal=True))
    resolved = resolve(Workload(models=(ModelMix("one"), ModelMix("two"))), {**INFOS, "one": causal})
    assert [(t.name, t.causal) for t in resolved.targets] == [("one", True), ("two", False)]


def test_resolve_refuses_what_cannot_run() -> None:
    with pytest.raises(WorkloadError, match="'three' has 3 axes"):
        resolve(Workload(models=(ModelMix("three"),), seq_lens=((15, 15),)), INFOS)
    with pytest.raises(WorkloadError, match="'two' has 2 axes"):
        resolve(Workload(models=(ModelMix("two", seq_lens=((1, 2, 3),)),)), INFOS)
    with pytest.raises(WorkloadError, match="fit none"):
        resolve(Workload(models=(ModelMix("two"),), seq_lens=((15, 15), (5,))), INFOS)
    with pytest.raises(WorkloadError, match=r"not ready.*broken weights"):
        resolve(Workload(models=(ModelMix("broken"),)), INFOS)


def draws(workload: Workload, n: int, stream: tuple[int, ...] = ()) -> list[Request]:
    source = RequestSource(resolve(workload, INFOS), stream_id=stream)
    return [source.next() for _ in range(n)]


def test_requests_are_seeded_and_follow_the_mix() -> None:
    workload = Workload(
        models=(ModelMix("two", 3.0), ModelMix("one")),
        seq_lens=((15, 15), (29, 29), (100,)),
        rows=RowRange(1, 3),
        unconditioned=0.25,
        seed=11,
    )
    first, again, other = draws(workload, 4000), draws(workload, 4000), draws(workload, 50, (1, 0))
    assert [(r.model, r.seq_lens) for r in first] == [(r.model, r.seq_lens) for r in again]
    for a, b in zip(first, again, strict=True):
        assert (a.conditioning is None) == (b.conditioning is None)
        if a.conditioning is not None:
            np.testing.assert_array_equal(a.conditioning, b.conditioning)
    assert [r.seq_lens for r in first[:50]] != [r.seq_lens for r in other]

    models = Counter(r.model for r in first)
    assert 0.72 < models["two"] / 4000 < 0.78
    two = [r for r in first if r.model == "two"]
    grids = Counter(r.seq_lens for r in two)
    assert set(grids) == {(15, 15), (29, 29)} and 0.45 < grids[(15, 15)] / len(two) < 0.55
    conditioned = [r for r in two if r.conditioning is not None]
    assert 0.71 < len(conditioned) / len(two) < 0.79
    rows = Counter(r.conditioning.shape[0] for r in conditioned)
    assert set(rows) == {1, 2, 3}
    assert all(r.conditioning.shape[1] == 6 and r.conditioning.dtype == np.float32 for r in conditioned)
    assert all(r.kernels == r.conditioning.shape[0] for r in conditioned)
    # A model without FiLM is always sent unconditioned.
    assert all(r.conditioning is None and r.kernels == 1 for r in first if r.model == "one")


def test_representation_parses_a_name_or_a_mix() -> None:
    assert parse_representation("factored") == (("factored", 1.0),)
    assert parse_representation("dense:1, factored:3") == (("dense", 1.0), ("factored", 3.0))
    assert parse_representation({"auto": 2}) == (("auto", 2.0),)
    for bad in ("sparse", "dense:0", "dense:x", "dense,dense", 3, ""):
        with pytest.raises(WorkloadError, match="representation"):
            parse_representation(bad)
    workload = Workload.from_mapping({"models": ["one"], "representation": {"dense": 1, "factored": 1}})
    assert workload.to_dict()["representation"] == {"dense": 1.0, "factored": 1.0}
    with pytest.raises(WorkloadError, match="representation"):
        Workload.from_mapping({"models": ["one"], "representation": "dense:-1"})


def test_a_representation_mix_is_drawn_by_weight_and_a_single_one_draws_nothing() -> None:
    base = Workload(models=(ModelMix("two"),), seq_lens=((15, 15),), seed=4)
    mixed = Workload(**{**base.__dict__, "representation": (("dense", 1.0), ("factored", 3.0))})
    counts = Counter(r.representation for r in draws(mixed, 4000))
    assert 0.72 < counts["factored"] / 4000 < 0.78
    # One representation takes no draw: the same seed sends the same requests as before.
    only = Workload(**{**base.__dict__, "representation": (("factored", 1.0),)})
    plain, factored = draws(base, 200), draws(only, 200)
    assert {r.representation for r in plain} == {"dense"}
    assert {r.representation for r in factored} == {"factored"}
    for a, b in zip(plain, factored, strict=True):
        assert a.seq_lens == b.seq_lens
        np.testing.assert_array_equal(a.conditioning, b.conditioning)
