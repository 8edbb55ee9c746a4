"""The contract's names and maps agree with the .proto, and config values round-trip its message."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kernelgen_wire import dtypes, metadata, model_config, rpc
from kernelgen_wire.v1 import kernelgen_pb2 as pb

EMBEDDED = Path(__file__).resolve().parents[2] / "src" / "kernelgen_server" / "models"


def test_method_paths_are_the_protos() -> None:
    service = pb.DESCRIPTOR.services_by_name["KernelGenerator"]
    assert rpc.SERVICE_NAME == "kernelgen.v1.KernelGenerator"
    assert rpc.METHOD_NAMES == (
        "GenerateKernel", "StreamKernel", "FlopCount", "ListModels", "GetModel", "GetOutputHead",
        "GenerateGroup", "RegisterSharedMemory", "UnregisterSharedMemory",
    )  # fmt: skip
    for method in service.methods:
        assert rpc.method_path(method.name) == f"/kernelgen.v1.KernelGenerator/{method.name}"


def test_every_wire_dtype_has_a_name_size_and_layout() -> None:
    known = [v for v in pb.DType.values() if v != pb.DTYPE_UNSPECIFIED]
    for table in (dtypes.DTYPE_NAMES, dtypes.ITEMSIZE, dtypes.NUMPY_LAYOUTS):
        assert sorted(table) == sorted(known)
    assert dtypes.dtype_name(pb.DTYPE_UNSPECIFIED) == "float32"
    assert dtypes.itemsize(pb.DTYPE_BFLOAT16) == 2
    assert dtypes.known(0) and not dtypes.known(99)


def test_reasons_are_the_documented_strings() -> None:
    assert {r.value for r in metadata.Reason} == {
        "invalid-argument", "group-not-model", "model-not-group",
        "model-not-found", "model-not-ready", "no-film", "queue-full", "memory-full",
        "too-large", "message-too-large", "deadline-exceeded", "slow-reader", "cancelled", "draining",
        "internal",
        "shared-memory-off", "region-not-found", "region-exists", "not-supported",
    }  # fmt: skip
    assert metadata.REPORT_TRAILER.endswith("-bin")  # binary metadata: gRPC carries it base64


def test_the_embedded_configs_fill_every_field_of_the_message() -> None:
    fields = {f.name for f in pb.ModelConfig.DESCRIPTOR.fields}
    for path in EMBEDDED.glob("*/config.json"):
        values = json.loads(path.read_text())
        message = model_config.config_message(values)
        back = model_config.config_values(message)
        assert set(back) == fields
        assert len(back["L_cache"]) == values["data_dim"]  # one entry per axis, always


@given(
    data_dim=st.integers(1, 3),
    cache=st.one_of(st.integers(2, 9999), st.lists(st.integers(2, 9999), min_size=1, max_size=3)),
    film=st.one_of(st.none(), st.fixed_dictionaries({"cond_dim": st.integers(1, 4096)})),
    omega=st.floats(0.1, 100.0),
)
def test_values_round_trip_through_the_message(
    data_dim: int, cache: int | list[int], film: dict[str, int] | None, omega: float
) -> None:
    values = {
        "out_dim": 8, "data_dim": data_dim, "mlp_hidden_dim": 16, "num_layers": 3, "embedding_dim": 16,
        "omega_0": omega, "L_cache": cache, "use_bias": True, "film": film,
    }  # fmt: skip
    back = model_config.config_values(model_config.config_message(values))
    assert back["L_cache"] == (tuple(cache) if isinstance(cache, list) else (cache,) * data_dim)
    assert back["omega_0"] == omega
    assert back["hidden_omega_0"] == model_config.OPTIONAL_DEFAULTS["hidden_omega_0"]
    expected_film = None if film is None else {**model_config.FILM_DEFAULTS, **film}
    assert back["film"] == expected_film


def test_one_content_hash_on_the_wire_keeps_its_field_numbers() -> None:
    # ServerReport's hash of the producing model shares ModelInfo's name; its field
    # number and type are those it always had, so older peers read the same bytes.
    report = pb.ServerReport.DESCRIPTOR.fields_by_name["content_hash"]
    info = pb.ModelInfo.DESCRIPTOR.fields_by_name["content_hash"]
    assert (report.number, report.type) == (6, report.TYPE_STRING)
    assert (info.number, info.type) == (5, info.TYPE_STRING)
    assert pb.ServerReport(content_hash="abc").SerializeToString() == b"\x32\x03abc"
