"""ServerSettings: precedence (flags > environment > file > defaults) and validation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kernelgen_server.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("KERNELGEN_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert s.port == 50051
    assert s.cache_bytes == 1 << 30
    assert s.model_repo is None
    assert s.device == "auto"
    assert s.max_message_bytes == 4 << 20


def test_precedence_flag_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "kernelgen.json"
    config.write_text(json.dumps({"port": 1111, "max_batch_size": 8, "grace_s": 3, "cache_bytes": "2MiB"}))
    monkeypatch.setenv("KERNELGEN_CONFIG", str(config))
    monkeypatch.setenv("KERNELGEN_PORT", "2222")
    monkeypatch.setenv("KERNELGEN_MAX_BATCH_SIZE", "16")
    s = load_settings({"port": "3333"})
    assert s.port == 3333  # flag beats environment
    assert s.max_batch_size == 16  # environment beats file
    assert s.grace_s == 3.0  # file beats default
    assert s.cache_bytes == 2 << 20


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_formats(tmp_path: Path, suffix: str) -> None:
    config = tmp_path / f"settings{suffix}"
    config.write_text("max-queue-size = 7\n" if suffix == ".toml" else "max-queue-size: 7\n")
    assert load_settings({"config": str(config)}).max_queue_size == 7


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"port": "70000"},
            "--port / KERNELGEN_PORT: Input should be less than or equal to 65535, got '70000'",
        ),
        ({"port": "http"}, "--port / KERNELGEN_PORT: Input should be a valid integer"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        (
            {"max_batch_size": "0"},
            "--max-batch-size / KERNELGEN_MAX_BATCH_SIZE: Input should be greater than",
        ),
        ({"max_queue_delay_ms": "500"}, r"Input should be less than or equal to 1000|above 100 ms"),
        ({"max_queue_delay_ms": "250"}, "above 100 ms"),
        ({"cache_bytes": "lots"}, "--cache-bytes / KERNELGEN_CACHE_BYTES: .*got 'lots'"),
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, "does not exist"),
        (
            {"model_repo": "/nonexistent/models"},
            "--model-repo / KERNELGEN_MODEL_REPO: /nonexistent/models does not exist",
        ),
        (
            {"no_such_setting": "1"},
            "unknown setting 'no_such_setting' \\(kernelgen serve --help lists them\\)",
        ),
        (
            {"max_message_bytes": "1MiB", "max_kernel_bytes": "512KiB"},
            "--max-kernel-bytes \\(512KiB\\) must be at least --max-message-bytes \\(1MiB\\)",
        ),
    ],
)
def test_invalid_settings_have_clear_messages(values: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(values)


def test_tls_needs_cert_and_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="--tls-cert and --tls-key go together"):
        load_settings({"tls_cert": str(cert)})


def test_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "broken.json"
    config.write_text("{not json")
    with pytest.raises(SettingsError, match=r"broken\.json: not valid"):
        load_settings({"config": str(config)})
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"config": str(tmp_path / "missing.json")})


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELGEN_LOG_LEVEL", "debug")
    monkeypatch.setenv("KERNELGEN_STRICT", "true")
    s = load_settings()
    assert s.log_level == "DEBUG"
    assert s.strict is True


@pytest.mark.parametrize(
    ("argv", "batched_gemm", "pipeline_batches"),
    [
        ([], None, None),  # unset: the device picks
        (["--batched-gemm"], True, None),
        (["--no-batched-gemm", "--pipeline-batches"], False, True),
        (["--no-pipeline-batches"], None, False),
    ],
)
def test_tri_state_switches_take_the_flag_form(
    argv: list[str], batched_gemm: bool | None, pipeline_batches: bool | None
) -> None:
    from kernelgen_client.cli import build_parser
    from kernelgen_server.settings import ServerSettings

    args = build_parser().parse_args(["serve", *argv])
    values = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields}
    settings = load_settings(values)
    assert settings.batched_gemm is batched_gemm
    assert settings.pipeline_batches is pipeline_batches


def test_metrics_address_defaults_to_loopback_when_secured(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    assert load_settings({"host": "0.0.0.0"}).metrics_address() == "0.0.0.0"
    assert load_settings({"host": "0.0.0.0", "auth_token_file": str(tokens)}).metrics_address() == "127.0.0.1"
    chosen = {"host": "0.0.0.0", "auth_token_file": str(tokens), "metrics_host": "10.1.2.3"}
    assert load_settings(chosen).metrics_address() == "10.1.2.3"  # the operator's choice stands


@pytest.mark.parametrize(
    ("soft", "memory", "workers", "expected"),
    [
        (1024, 64 << 30, 1, 768),  # the descriptors bound it
        (1 << 20, 8 << 30, 1, 8192),  # once raised, memory does: one connection per MiB
        (1 << 20, 8 << 30, 4, 2048),  # ... of a worker's share
        (-1, 2 << 30, 1, 2048),  # RLIM_INFINITY
        (200, 64 << 30, 1, 16),  # never fewer than 16
        (1 << 20, 4 << 20, 1, 16),
    ],
)
def test_default_connection_limit_rule(
    soft: int, memory: int, workers: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resource

    import kernelgen_server.settings as settings_module

    soft = resource.RLIM_INFINITY if soft == -1 else soft
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, resource.RLIM_INFINITY))
    monkeypatch.setattr(settings_module, "usable_memory", lambda: memory)
    assert load_settings({"workers": workers}).connection_limit() == expected
    assert load_settings({"workers": workers, "max_connections": 5}).connection_limit() == 5


def test_memory_and_connection_budgets() -> None:
    import resource

    from kernelgen_server.settings import usable_memory

    defaults = load_settings({})
    assert defaults.inflight_budget() == max(64 << 20, usable_memory() // 4)
    assert load_settings({"workers": 4}).inflight_budget() == max(64 << 20, usable_memory() // 16)
    assert 0 < usable_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        assert defaults.connection_limit() == max(16, min(soft - 256, usable_memory() >> 20))
    given = load_settings({"max_inflight_bytes": "1GiB", "max_connections": 7})
    assert (given.inflight_budget(), given.connection_limit()) == (1 << 30, 7)
    with pytest.raises(SettingsError, match="two stream tiles"):
        load_settings({"max_inflight_bytes": "4MiB", "stream_tile_bytes": "4MiB"})
    with pytest.raises(SettingsError, match="--stream-tile-bytes must be at least --stream-chunk-bytes"):
        load_settings({"stream_tile_bytes": "64KiB"})


def test_serve_help_shows_every_default_once_as_the_readme_writes_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import re

    from kernelgen_client.cli import main
    from kernelgen_server.settings import ServerSettings, flag

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    options = text.split(" options: ", 1)[1]
    entries = re.split(r" (?=--[a-z-]+(?: [A-Z_]+|, --no-[a-z-]+) )", options)
    described = {entry.split()[0].rstrip(","): entry for entry in entries if entry.startswith("--")}
    for name in ServerSettings.model_fields:
        entry = described[flag(name)]
        assert entry.count("(default: ") == 1, entry  # exactly one default, never "(default: unset)" twice
        assert "(default: unset)" not in entry, entry
    assert described["--cache-bytes"].endswith("(default: 1GiB)")
    assert described["--max-batch-bytes"].endswith("(default: 512MiB)")
    assert described["--model-repo"].endswith("(default: the embedded models)")
    for switch, default in (("--strict", "off"), ("--warmup", "on"), ("--tune-malloc", "on")):
        assert described[switch].endswith(f"(default: {default})"), described[switch]
    assert described["--cache-slicing"].endswith("(default: on)")
    assert described["--allow-empty"].endswith("(default: off)")
    assert "at most 100" in described["--max-queue-delay-ms"]
    assert "exit codes: 0 drained after SIGTERM or SIGINT" in text
