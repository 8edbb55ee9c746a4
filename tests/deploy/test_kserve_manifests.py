"""The KServe manifests (docker/kserve): valid against the InferenceService and ServingRuntime schemas
(strict, with the Kubernetes core types from kubernetes-validate's schema), and consistent with each
other and with `kernelgen serve`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

import kernelgen_server.ops.serve_command  # noqa: F401  (the settings the runtime's args name)
from kernelgen_server.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "docker" / "kserve"
K8S_VERSION = "1.34.0"


def _kubernetes_definitions() -> Resource[Any]:
    import kubernetes_validate

    folder = (
        Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    )
    return Resource.from_contents(json.loads((folder / "_definitions.json").read_text()))


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.protocols.Validator]:
    definitions = _kubernetes_definitions()
    registry: Registry[Any] = Registry().with_resource(
        "https://kubernetes.io/api/_definitions.json", definitions
    )
    out = {}
    for kind, name in (
        ("InferenceService", "inferenceservice-v1beta1"),
        ("ServingRuntime", "servingruntime-v1alpha1"),
    ):
        schema = json.loads((KSERVE / "schemas" / f"{name}.json").read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        out[kind] = jsonschema.Draft202012Validator(schema, registry=registry)
    return out


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((KSERVE / name).read_text())
    return document


def errors(validators: dict[str, Any], document: dict[str, Any]) -> list[str]:
    return sorted(e.message for e in validators[document["kind"]].iter_errors(document))


@pytest.mark.parametrize("name", ["inferenceservice.yaml", "servingruntime.yaml"])
def test_the_manifests_are_valid(validators: dict[str, Any], name: str) -> None:
    assert errors(validators, load(name)) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("spec", "predictor", "model", "storageURI"), "pvc://x/y", "'storageURI' was unexpected"),
        (("spec", "predictor", "model", "protocolVersion"), "v3", "'v3' is not one of"),
        (
            ("spec", "predictor", "model", "ports", 0, "containerPort"),
            "8081",
            "'8081' is not of type 'integer'",
        ),
        (("spec", "predictor", "scaleMetric"), "latency", "'latency' is not one of"),
        (("spec", "predictor", "tolerations", 0, "effekt"), "NoSchedule", "'effekt' was unexpected"),
        (("spec", "predictor", "minReplica"), 1, "'minReplica' was unexpected"),
        (("apiVersion",), "serving.kserve.io/v1alpha1", "was expected"),
    ],
)
def test_schema_validation_catches_mistakes(
    validators: dict[str, Any], path: tuple[Any, ...], value: Any, message: str
) -> None:
    """The negative controls: each mistake a cluster would refuse is refused here."""
    document = copy.deepcopy(load("inferenceservice.yaml"))
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    found = errors(validators, document)
    assert any(message in e for e in found), found


def test_runtime_mistakes_are_caught(validators: dict[str, Any]) -> None:
    runtime = copy.deepcopy(load("servingruntime.yaml"))
    runtime["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] = 7
    runtime["spec"]["supportedModelFormats"][0]["autoselect"] = True
    found = errors(validators, runtime)
    assert any("7 is not of type 'string'" in e for e in found)
    assert any("'autoselect' was unexpected" in e for e in found)


def test_the_service_selects_the_runtime_on_its_grpc_port() -> None:
    service, runtime = load("inferenceservice.yaml"), load("servingruntime.yaml")
    model = service["spec"]["predictor"]["model"]
    spec = runtime["spec"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert service["metadata"]["namespace"] == runtime["metadata"]["namespace"]
    assert model["modelFormat"] in [
        {"name": f["name"], "version": f["version"]} for f in spec["supportedModelFormats"]
    ]
    assert model["protocolVersion"] == "v2" and "v2" in spec["protocolVersions"]
    [container] = spec["containers"]
    [port] = container["ports"]
    assert port["name"] == "h2c"  # KServe's name for a gRPC port
    assert model["ports"] == container["ports"]
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--port") + 1] == str(port["containerPort"])
    assert args[args.index("--model-repo") + 1] == "/mnt/models"  # where KServe puts storageUri
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"]  # grpc.health.v1, open under tokens


def test_the_runtime_args_and_env_are_real_settings() -> None:
    [container] = load("servingruntime.yaml")["spec"]["containers"]
    flags = [a[2:].replace("-", "_") for a in container["args"] if a.startswith("--")]
    assert flags and set(flags) <= set(ServerSettings.model_fields)
    for variable in container["env"]:
        assert variable["name"].startswith("KERNELGEN_")
        assert variable["name"][len("KERNELGEN_") :].lower() in ServerSettings.model_fields
