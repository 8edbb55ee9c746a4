"""The Open Inference Protocol's contract: wire-compatible with Triton's messages, in a descriptor
pool of its own; and the generated modules' protobuf range, tested at both of its ends by `make test`."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from google.protobuf import __version__ as protobuf_version
from google.protobuf import descriptor_pool
from tritonclient.grpc import service_pb2 as triton

from kernelgen_wire.oip import grpc_service_pb2 as oip
from kernelgen_wire.oip import model_config_pb2 as oip_config
from kernelgen_wire.oip import pool

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    *(ROOT / "src" / "kernelgen_wire" / "v1").glob("*_pb2.py"),
    *(ROOT / "src" / "kernelgen_wire" / "oip").glob("*_pb2.py"),
]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_runtime_is_the_end_of_the_range_this_run_tests() -> None:
    # `make test` names the end each of its two runs is for; a run outside it (a plain
    # `pytest`) still holds the runtime to the supported range.
    expected = os.environ.get("KERNELGEN_EXPECT_PROTOBUF")
    if expected:
        assert protobuf_version.startswith(expected), f"protobuf {protobuf_version}, expected {expected}"
    low, high = _supported_range()
    assert low <= _version(protobuf_version)[: len(low)] and _version(protobuf_version)[0] < high


def _supported_range() -> tuple[tuple[int, ...], int]:
    """pyproject's protobuf range: the lowest version, and the major it stays below."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [spec] = [d for d in dependencies if d.startswith("protobuf")]
    low = _version(re.search(r">=([\d.]+)", spec).group(1))  # type: ignore[union-attr]
    high = int(re.search(r"<(\d+)", spec).group(1))  # type: ignore[union-attr]
    return low, high


def test_the_generated_code_runs_on_the_oldest_supported_runtime() -> None:
    low, high = _supported_range()
    assert high == low[0] + 2, "the range spans two majors: its low end and the next"
    assert GENERATED
    for path in GENERATED:
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)",
            path.read_text(),
        )
        assert found, path
        gencode = tuple(int(g) for g in found.groups())
        assert gencode <= low, f"{path.name} needs protobuf {gencode}, above the supported minimum {low}"


def _messages(file: Any) -> list[Any]:
    out: list[Any] = []

    def walk(message: Any) -> None:
        out.append(message)
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return out


def test_the_messages_live_in_a_pool_of_their_own() -> None:
    assert oip.ModelInferRequest.DESCRIPTOR.file.pool is pool.POOL
    assert oip_config.ModelConfig.DESCRIPTOR.file.pool is pool.POOL
    try:
        found = descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
    except KeyError:
        return  # nobody registered the protocol in the default pool
    assert found is not oip.ModelInferRequest.DESCRIPTOR  # it is Triton's client's, not ours


def test_every_field_matches_tritons_messages() -> None:
    theirs = triton.DESCRIPTOR.pool
    checked = 0
    for file in (oip.DESCRIPTOR, oip_config.DESCRIPTOR):
        for message in _messages(file):
            other = theirs.FindMessageTypeByName(message.full_name)
            for field in message.fields:
                match = other.fields_by_number.get(field.number)
                assert match is not None, (
                    f"{message.full_name}.{field.name}: Triton has no field {field.number}"
                )
                assert (match.name, match.type, match.is_repeated) == (
                    field.name,
                    field.type,
                    field.is_repeated,
                ), f"{message.full_name}.{field.name}"
                if field.message_type is not None:
                    assert match.message_type.full_name == field.message_type.full_name
                if field.enum_type is not None:
                    assert match.enum_type.full_name == field.enum_type.full_name
                    for value in field.enum_type.values:
                        assert match.enum_type.values_by_name[value.name].number == value.number
                checked += 1
    assert checked > 150
    service = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    other_service = theirs.FindServiceByName(service.full_name)
    for method in service.methods:
        match = other_service.methods_by_name[method.name]
        assert match.input_type.full_name == method.input_type.full_name
        assert match.output_type.full_name == method.output_type.full_name
        assert (match.client_streaming, match.server_streaming) == (
            method.client_streaming,
            method.server_streaming,
        )
