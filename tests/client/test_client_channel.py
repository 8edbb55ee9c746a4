"""Targets, service config, options, TLS and metadata of the client channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernelgen_client._channel import (
    DEFAULT_TARGET,
    RetryPolicy,
    TLSConfig,
    _pem,
    bearer,
    channel_options,
    default_target,
    merge_metadata,
    resolve_target,
    service_config,
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:5001", "127.0.0.1:5001"),
        ("kernelgen.internal:443", "kernelgen.internal:443"),
        ("localhost", "localhost:50051"),
        ("[::1]:5001", "[::1]:5001"),
        ("::1", "[::1]:50051"),
        ("dns:///kernelgen.default.svc:50051", "dns:///kernelgen.default.svc:50051"),
        ("unix:/tmp/kernelgen.sock", "unix:/tmp/kernelgen.sock"),
        (["127.0.0.1:5001", "127.0.0.2:5002"], "ipv4:127.0.0.1:5001,127.0.0.2:5002"),
        ("127.0.0.1:5001,127.0.0.2:5002,127.0.0.3:5003", "ipv4:127.0.0.1:5001,127.0.0.2:5002,127.0.0.3:5003"),
        (["[::1]:5001", "::1"], "ipv6:[::1]:5001,[::1]:50051"),
        (["localhost:5001", "127.0.0.2:5002"], "ipv4:127.0.0.1:5001,127.0.0.2:5002"),
    ],
)
def test_targets(target: str | list[str], expected: str) -> None:
    assert resolve_target(target) == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "no target"),
        ("host:0", "port"),
        ("host:http", "port"),
        ("[::1:5001", "unclosed"),
        (["127.0.0.1:1", "[::1]:2"], "mix"),
        (["127.0.0.1:1", "nowhere.invalid:2"], "does not resolve"),
    ],
)
def test_bad_targets(target: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_target(target)


def test_default_target_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERNELGEN_TARGET", raising=False)
    assert default_target() == DEFAULT_TARGET == "127.0.0.1:50051"
    monkeypatch.setenv("KERNELGEN_TARGET", "10.0.0.1:7000")
    assert default_target() == "10.0.0.1:7000"


def test_service_config_retries_and_balances() -> None:
    config = json.loads(service_config(RetryPolicy(max_attempts=4, initial_backoff=0.05)))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {"service": "kernelgen.v1.KernelGenerator"} in method["name"]
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 4
    assert policy["initialBackoff"] == "0.050s"
    # RESOURCE_EXHAUSTED is retried only as the server's pushback allows: -1 (too large) never.
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert "methodConfig" not in json.loads(service_config(RetryPolicy.coerce(None)))
    assert json.loads(service_config(RetryPolicy(), "pick_first"))["loadBalancingConfig"] == [
        {"pick_first": {}}
    ]


def test_retry_policy_values() -> None:
    assert RetryPolicy.coerce(3).max_attempts == 3
    assert RetryPolicy.coerce(0).max_attempts == 1
    policy = RetryPolicy(wait_for_ready=True)
    assert RetryPolicy.coerce(policy) is policy
    for bad, message in (
        ({"max_attempts": 6}, "1 to 5"),
        ({"max_attempts": 0}, "1 to 5"),
        ({"initial_backoff": 3.0}, "backoff"),
        ({"backoff_multiplier": 0.5}, "multiplier"),
    ):
        with pytest.raises(ValueError, match=message):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_options_keep_keepalive_within_the_servers_policy() -> None:
    options = dict(channel_options(RetryPolicy()))
    assert options["grpc.keepalive_time_ms"] >= 10_000  # the server permits a ping every 10 s
    assert options["grpc.max_receive_message_length"] == -1
    overridden = dict(channel_options(RetryPolicy(), extra=[("grpc.keepalive_time_ms", 60_000)]))
    assert overridden["grpc.keepalive_time_ms"] == 60_000
    tls = dict(channel_options(RetryPolicy(), server_name_override="kernelgen.test"))
    assert tls["grpc.ssl_target_name_override"] == "kernelgen.test"


def test_pem_from_bytes_text_or_path(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    path = tmp_path / "ca.pem"
    path.write_text(pem)
    assert _pem(pem.encode()) == _pem(pem) == _pem(path) == _pem(str(path)) == pem.encode()
    assert _pem(None) is None
    with pytest.raises(ValueError, match="go together"):
        TLSConfig(certificate_chain=path)


def test_metadata_and_bearer_token() -> None:
    assert bearer("s3cret") == (("authorization", "Bearer s3cret"),)
    assert bearer(None) == ()
    merged = merge_metadata(bearer("t"), {"X-Team": "vision"}, [("trace", "1")], None)
    assert merged == (("authorization", "Bearer t"), ("x-team", "vision"), ("trace", "1"))


@pytest.mark.parametrize(
    "module",
    [
        "kernelgen_client._channel",
        "kernelgen_client.tensors",
        "kernelgen_client.results",
        "kernelgen_client._responses",
    ],
)
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    failures, _tried = doctest.testmod(importlib.import_module(module))
    assert failures == 0


# --- several connections ----------------------------------------------------------------------
class _FakeChannel:
    def __init__(self, number: int, options: list[tuple[str, object]]) -> None:
        self.number, self.options = number, options

    def unary_unary(self, path: str, **_: object) -> tuple[int, str]:
        return self.number, path

    def unary_stream(self, path: str, **_: object) -> tuple[int, str]:
        return self.number, path


class _FakeApi:
    def __init__(self) -> None:
        self.opened: list[_FakeChannel] = []

    def insecure_channel(self, target: str, options: list[tuple[str, object]]) -> _FakeChannel:
        self.opened.append(_FakeChannel(len(self.opened), options))
        return self.opened[-1]


def _config() -> object:
    from kernelgen_client._base import ClientConfig

    return ClientConfig.build(
        "127.0.0.1:1", timeout=None, tls=None, token=None, metadata=None, retries=None,
        load_balancing="round_robin", options=(),
    )  # fmt: skip


def test_one_connection_shares_grpcs_subchannel_pool() -> None:
    from kernelgen_client._base import Channels

    api = _FakeApi()
    channels = Channels(_config(), api)  # type: ignore[arg-type]
    assert len(channels.channels) == 1
    assert ("grpc.use_local_subchannel_pool", 1) not in api.opened[0].options
    assert channels.unary("GenerateKernel") == (0, "/kernelgen.v1.KernelGenerator/GenerateKernel")


def test_calls_take_the_connections_in_turn() -> None:
    from kernelgen_client._base import Channels

    api = _FakeApi()
    channels = Channels(_config(), api, connections=3)  # type: ignore[arg-type]
    # Each channel has a subchannel pool of its own: a TCP connection of its own.
    assert all(("grpc.use_local_subchannel_pool", 1) in c.options for c in api.opened)
    used = [channels.unary("GenerateKernel")[0] for _ in range(4)] + [channels.stream()[0]]
    assert used == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("connections", [0, -1])
def test_connections_below_one_are_refused(connections: int) -> None:
    from kernelgen_client import KernelClient

    with pytest.raises(ValueError, match="connections must be at least 1"):
        KernelClient("127.0.0.1:1", connections=connections)
