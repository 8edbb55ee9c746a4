"""The server's one settings model, validated at start-up.

Precedence, highest first: command-line flags, ``KERNELGEN_*`` environment
variables, the optional config file (``--config`` / ``KERNELGEN_CONFIG``;
JSON, TOML or YAML by suffix), then the defaults below.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = [
    "ServerSettings",
    "SettingsError",
    "env_of",
    "flag",
    "help_default",
    "load_settings",
    "shown_bytes",
]

MiB = 1 << 20
GiB = 1 << 30
#: The default connection limit (``ServerSettings.connection_limit``): memory set aside for each
#: connection, descriptors kept for the server's own files, the fewest connections allowed, and
#: what an unlimited open-files limit counts as.
_MEMORY_PER_CONNECTION = MiB
_OWN_FILES = 256
_FEWEST_CONNECTIONS = 16
_FILES_UNLIMITED = 1 << 20

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("kernelgen_config", default=None)


class SettingsError(ValueError):
    """Invalid settings; the message lists every problem, one per line."""


def flag(field: str) -> str:
    """The ``kernelgen serve`` flag that sets ``field`` (``max_grid_points``: ``--max-grid-points``).

    Messages about a limit or a setting name it, so that whoever meets the limit can tell the operator
    what to change (the caller may not be the operator).
    """
    if field not in ServerSettings.model_fields:
        raise KeyError(f"{field!r} is no setting")
    return "--" + field.replace("_", "-")


def env_of(field: str) -> str:
    """The environment variable that sets ``field``: ``KERNELGEN_MAX_BATCH_SIZE``."""
    if field not in ServerSettings.model_fields:
        raise KeyError(f"{field!r} is no setting")
    return f"KERNELGEN_{field.upper()}"


def shown_bytes(value: int) -> str:
    """A byte count as the flags take it: ``1GiB``, ``4MiB``, ``1000`` (exact, never rounded)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if value and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


def _default_text(text: str) -> dict[str, Any]:
    """A field's ``json_schema_extra``: what its unset default means, for ``--help``."""
    return {"default_text": text}


def usable_memory() -> int:
    """Bytes of memory this process may use: the host's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


class ServerSettings(BaseSettings):
    """Everything ``kernelgen serve`` can be told. Each field is also ``KERNELGEN_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="KERNELGEN_", extra="forbid", frozen=True)

    # --- where and what ---------------------------------------------------------------------
    model_repo: Path | None = Field(
        None, description="model repository folder", json_schema_extra=_default_text("the embedded models")
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Prometheus /metrics port (0 disables)")
    metrics_host: str | None = Field(
        None,
        description="address of /metrics; with tokens /metrics wants one of them too, with TLS it is "
        "served over HTTPS",
        json_schema_extra=_default_text("127.0.0.1 when TLS or bearer tokens are on, else --host"),
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes sharing the port (Linux SO_REUSEPORT spreads connections over "
        "them); each has its own device context, batcher and cache of --cache-bytes",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per worker for CPU compute",
        json_schema_extra=_default_text("the CPUs left after one per worker for gRPC, shared by the workers"),
    )
    batched_gemm: bool | None = Field(
        None,
        description="one batched GEMM per layer instead of one per row: fewer launches, rows equal to "
        "float32 rounding instead of bitwise",
        json_schema_extra=_default_text("on for CUDA, off for CPU"),
    )
    pipeline_batches: bool | None = Field(
        None,
        description="encode a batch's responses on a host thread while the device runs the next batch "
        "(on a CPU the encoding is cheaper than the thread hop)",
        json_schema_extra=_default_text("on for CUDA, off for CPU"),
    )
    tune_malloc: bool = Field(True, description="keep freed response buffers for reuse (glibc only)")
    strict: bool = Field(False, description="refuse to start when any model fails to load")
    allow_empty: bool = Field(
        False,
        description="start even when no model of the repository loads (otherwise the server refuses to "
        "start and says what it found and why each model failed)",
    )
    warmup: bool = Field(True, description="run each model once before reporting SERVING")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level: DEBUG, INFO, WARNING or ERROR"
    )
    config: Path | None = Field(
        None, description="settings file (JSON, TOML or YAML)", json_schema_extra=_default_text("none")
    )

    # --- limits -----------------------------------------------------------------------------
    cache_bytes: ByteSize = Field(ByteSize(GiB), description="unconditioned-kernel cache budget in bytes")
    cache_slicing: bool = Field(
        True,
        description="serve a smaller grid by cutting the centre out of a cached larger kernel of the same "
        "model and dtype (its grid's centre is the smaller grid, bit for bit)",
    )
    max_grid_points: int = Field(
        1 << 24,
        ge=1,
        description="most kernel points one request may ask: the product of 2*s-1 over its seq_lens",
    )
    max_kernel_bytes: ByteSize = Field(ByteSize(2 * GiB), description="largest kernel response in bytes")
    max_message_bytes: ByteSize = Field(
        ByteSize(4 * MiB), description="largest unary response; larger kernels are streamed"
    )
    max_conditioning_rows: int = Field(1024, ge=1, description="most conditioning rows in one request")
    stream_chunk_bytes: ByteSize = Field(ByteSize(MiB), description="payload bytes per StreamKernel message")
    max_concurrent_rpcs: int | None = Field(
        None,
        ge=1,
        description="calls in progress before refusing more",
        json_schema_extra=_default_text("no limit"),
    )
    max_inflight_bytes: ByteSize | None = Field(
        None,
        description="response bytes one server process may hold at once (computed, encoded, or waiting to be "
        "sent); a call over it gets RESOURCE_EXHAUSTED with pushback",
        json_schema_extra=_default_text(
            "a quarter of the memory the server may use, shared by its --workers"
        ),
    )
    stream_tile_bytes: ByteSize = Field(
        ByteSize(4 * MiB),
        description="streamed kernels over this size (and over a quarter of --cache-bytes when "
        "unconditioned) are computed in tiles of about this many bytes as the client reads them, each "
        "tile a slice of device time behind any waiting small request",
    )
    stream_send_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a stream whose client takes nothing for this long is cancelled"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="client connections at once, per worker; more are refused",
        json_schema_extra=_default_text(
            "one per MiB of the memory a worker may use, at most the open-files limit less 256 for the "
            "server's own files"
        ),
    )
    max_connection_idle_s: float = Field(
        300.0, gt=0, description="a connection with no call in progress for this long is closed"
    )

    # --- batching of conditioned requests ---------------------------------------------------
    max_batch_size: int = Field(64, ge=1, description="conditioning rows per batch (1 turns batching off)")
    # 0: a batch starts as soon as the device is free, with whatever has queued while it was
    # busy, so batches grow with load and a lone request never waits (measured: a 2 ms delay
    # halved throughput at concurrency 1 and gained nothing at 32 on CPU).
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="longest wait for a batch to fill once the device is free, in ms, at most 100 (0: a "
        "batch takes whatever queued while the device was busy)",
    )
    max_queue_size: int = Field(1024, ge=1, description="requests waiting before RESOURCE_EXHAUSTED")
    max_batch_bytes: ByteSize = Field(ByteSize(512 * MiB), description="output bytes of one batch")

    # --- lifecycle and security -------------------------------------------------------------
    grace_s: float = Field(10.0, ge=0, le=3600, description="time to finish in-flight calls on SIGTERM")
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain; enables TLS with --tls-key",
        json_schema_extra=_default_text("none: no TLS"),
    )
    tls_key: Path | None = Field(
        None, description="PEM private key of --tls-cert", json_schema_extra=_default_text("none")
    )
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle; clients must present a cert it signed",
        json_schema_extra=_default_text("none: no client certificates"),
    )
    auth_token_file: Path | None = Field(
        None,
        description="file of accepted bearer tokens, one per line",
        json_schema_extra=_default_text("none: no tokens"),
    )

    # --- same-host shared memory (both protocols) --------------------------------------------
    shared_memory: bool = Field(
        False,
        description="let clients on this host register POSIX shared-memory regions that kernels are "
        "written into and conditioning is read from (Open Inference Protocol system shared memory, "
        "kernelgen.v1 output regions)",
    )
    shared_memory_max_regions: int = Field(
        256, ge=1, le=65536, description="most shared-memory regions registered at once"
    )

    def url(self, port: int) -> str:
        """Where clients reach this server once bound to ``port``: ``grpc[s]://host:port``."""
        return f"{'grpcs' if self.tls_cert else 'grpc'}://{self.host}:{port}"

    def metrics_url(self, port: int) -> str:
        """Where Prometheus scrapes once /metrics is bound to ``port``: ``http[s]://host:port/metrics``."""
        host = self.metrics_address()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 address
        return f"{'https' if self.tls_cert else 'http'}://{host}:{port}/metrics"

    @property
    def secured(self) -> bool:
        """TLS or bearer tokens are on."""
        return self.tls_cert is not None or self.auth_token_file is not None

    def metrics_address(self) -> str:
        """Where /metrics listens: ``metrics_host``, else loopback for a secured server, else ``host``.

        A secured server's metrics name its models and traffic; they stay on the host unless the
        operator says otherwise.
        """
        if self.metrics_host is not None:
            return self.metrics_host
        return "127.0.0.1" if self.secured else self.host

    def inflight_budget(self) -> int:
        """``max_inflight_bytes``, else a quarter of the memory the server may use, shared by its workers."""
        if self.max_inflight_bytes is not None:
            return int(self.max_inflight_bytes)
        return max(64 * MiB, usable_memory() // 4 // self.workers)

    def connection_limit(self) -> int:
        """``max_connections``, else one connection per MiB of the memory a worker may use, and
        never more than the descriptors left once 256 are kept for the server's own files.

        Read after ``kernelgen serve`` raised the soft open-files limit to the hard one: from
        there the descriptors rarely bound anything (hard limits of a million are common), so
        memory does. An idle connection costs the server about 22 KiB (measured), a busy one its
        HTTP/2 windows and buffers too: at one per MiB, connections alone cannot take more than
        a small share of memory, and an 8 GiB replica takes 8,192 of them.
        """
        if self.max_connections is not None:
            return self.max_connections
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        descriptors = _FILES_UNLIMITED if soft == resource.RLIM_INFINITY else int(soft)
        by_memory = usable_memory() // self.workers // _MEMORY_PER_CONNECTION
        return max(_FEWEST_CONNECTIONS, min(descriptors - _OWN_FILES, by_memory))

    def torch_threads(self, cpus: int | None = None) -> int:
        """Torch intra-op threads for one worker: ``cpu_threads``, else its share of the spare CPUs.

        Each worker's event loop needs a core of its own: with every core in torch's pool, its
        threads stall at barriers whenever gRPC takes one, and compute slows many-fold.
        """
        if self.cpu_threads is not None:
            return self.cpu_threads
        cpus = cpus or os.cpu_count() or 2
        return max(1, (cpus - self.workers) // self.workers)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "model_repo")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.exists():
            raise ValueError(f"{path} does not exist")
        return path

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        f = flag
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"{f('tls_cert')} and {f('tls_key')} go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(f"{f('tls_client_ca')} (mutual TLS) needs {f('tls_cert')} and {f('tls_key')}")
        if self.stream_chunk_bytes < 1024 or self.stream_chunk_bytes > self.max_message_bytes:
            raise ValueError(
                f"{f('stream_chunk_bytes')} must be between 1KiB and {f('max_message_bytes')} "
                f"({shown_bytes(self.max_message_bytes)}), got {shown_bytes(self.stream_chunk_bytes)}"
            )
        # A queue delay must stay well below typical client deadlines (100 ms and up).
        if self.max_queue_delay_ms > 100:
            raise ValueError(
                f"{f('max_queue_delay_ms')} {self.max_queue_delay_ms:g} is above 100 ms, longer than typical "
                "deadlines; requests would expire while waiting for a batch"
            )
        if self.max_kernel_bytes < self.max_message_bytes:
            raise ValueError(
                f"{f('max_kernel_bytes')} ({shown_bytes(self.max_kernel_bytes)}) must be at least "
                f"{f('max_message_bytes')} ({shown_bytes(self.max_message_bytes)})"
            )
        if self.stream_tile_bytes < self.stream_chunk_bytes:
            raise ValueError(f"{f('stream_tile_bytes')} must be at least {f('stream_chunk_bytes')}")
        if self.max_inflight_bytes is not None and self.max_inflight_bytes < 2 * self.stream_tile_bytes:
            raise ValueError(
                f"{f('max_inflight_bytes')} must hold at least two stream tiles "
                f"(2 x {f('stream_tile_bytes')} = {shown_bytes(2 * self.stream_tile_bytes)})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)


class _FileSource(PydanticBaseSettingsSource):
    """Values from the settings file named by ``--config`` or ``KERNELGEN_CONFIG``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        if path is None:
            return {}
        try:
            text = path.read_text()
        except OSError as exc:
            raise SettingsError(f"config file {path}: cannot read it ({exc.strerror})") from exc
        try:
            if path.suffix == ".toml":
                data: Any = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml  # optional: only needed for YAML files

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise SettingsError(f"config file {path}: not valid {path.suffix or 'JSON'}: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"config file {path}: expected a mapping of setting names to values")
        return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_settings(cli: dict[str, Any] | None = None) -> ServerSettings:
    """Validate settings from flags (only those given), environment and config file.

    Raises SettingsError with one readable line per problem.
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    config = cli.get("config") or os.environ.get("KERNELGEN_CONFIG")
    token = _config_file.set(Path(config) if config else None)
    try:
        return ServerSettings(**cli)
    except ValidationError as exc:
        lines = [_problem(err) for err in exc.errors()]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    finally:
        _config_file.reset(token)


def _problem(err: Any) -> str:
    """One validation error as the operator can act on it: named by flag and environment variable."""
    loc = err["loc"]
    context = err.get("ctx") or {}
    message = str(context["error"]) if err["type"] == "value_error" and "error" in context else err["msg"]
    if not loc:
        return message
    name = str(loc[0])
    if err["type"] == "extra_forbidden":
        return f"unknown setting {name!r} (kernelgen serve --help lists them)"
    where = f"{flag(name)} / {env_of(name)}" if name in ServerSettings.model_fields else name
    value = err.get("input")
    got = "" if err["type"] == "value_error" or isinstance(value, dict) else f", got {value!r}"
    return f"{where}: {message}{got}"


def help_default(name: str) -> str:
    """What ``--help`` shows as the default of setting ``name``: ``1GiB``, ``on``, ``the embedded models``."""
    field = ServerSettings.model_fields[name]
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("default_text"), str):
        return str(extra["default_text"])
    value = field.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, ByteSize):
        return shown_bytes(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return "unset" if value is None else str(value)
