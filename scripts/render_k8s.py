"""Render a kustomization to plain manifests, for the subset of kustomize that docker/k8s uses.

    python scripts/render_k8s.py docker/k8s                 # multi-document YAML on stdout
    python scripts/render_k8s.py docker/k8s -o out.yaml     # ... into a file
    python scripts/render_k8s.py docker/k8s --split DIR     # one file per object

No kustomize or kubectl is installable from the package indexes CI may use,
so CI validates the manifests this renders. It follows kustomize v5 where the
subset reaches and refuses everything else, so the kustomization cannot drift
outside what is checked:

- ``resources``: YAML files (no directories, no URLs);
- ``namespace``: set on namespaced objects; a Namespace object is renamed to it;
- ``labels``: ``pairs`` added to every object's metadata, and with
  ``includeTemplates`` to pod templates; ``includeSelectors`` must be false;
- ``configMapGenerator``: ``literals`` and ``files`` (UTF-8 text, the key the
  file's name or ``key=path``), the name suffixed with kustomize's content hash
  unless ``options.disableNameSuffixHash``, and references to it from pod
  templates rewritten;
- ``images``: ``newName``, ``newTag`` and ``digest`` for containers and init
  containers of pod templates;
- output order: kustomize's legacy kind order, then group/version/kind, namespace, name.

Where a real ``kubectl`` or ``kustomize`` is on PATH, tests/deploy/test_deploy.py
checks that both give the same objects.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RenderError", "dump", "kustomize_hash", "render"]

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images"}

# Kinds this renderer knows where pod templates live; any other kind is refused
# so that a new resource cannot silently miss a transformation.
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
PLAIN_KINDS = {
    "ConfigMap",
    "HorizontalPodAutoscaler",
    "Namespace",
    "PersistentVolumeClaim",
    "PodDisruptionBudget",
    "Secret",
    "Service",
    "ServiceAccount",
}
CLUSTER_SCOPED_KINDS = {"Namespace"}

# kustomize's legacy output order (api/resid/gvk.go): these kinds first, in
# this order; unlisted kinds after them; webhook configurations last.
_ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
_ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class RenderError(ValueError):
    """The kustomization is invalid or outside the supported subset."""


def kustomize_hash(data: dict[str, str]) -> str:
    """The name suffix kustomize v5 gives a generated ConfigMap with ``data``.

    kustomize hashes the Go JSON encoding of ``{"data", "kind", "name"}``; its
    name lookup uses the path "metadata/name" as one key and so always finds
    "", which makes the suffix depend on the data only. The first ten hex
    digits are kept with 0, 1, 3, a, e replaced by g, h, k, m, t. A ConfigMap
    without data has no data field, which the lookup also reads as "".
    """
    encoded = json.dumps(
        {"data": data or "", "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's encoding/json escapes these where Python's json does not.
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escaped)
    encoded = encoded.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(encoded.encode()).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _load_kustomization(directory: Path) -> Obj:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            doc = yaml.safe_load(path.read_text())
            if not isinstance(doc, dict):
                raise RenderError(f"{path}: not a mapping")
            unsupported = sorted(set(doc) - SUPPORTED_KEYS)
            if unsupported:
                raise RenderError(f"{path}: unsupported kustomize fields {unsupported}")
            if doc.get("kind", "Kustomization") != "Kustomization":
                raise RenderError(f"{path}: kind must be Kustomization")
            return doc
    raise RenderError(f"{directory}: no kustomization file")


def _load_resources(directory: Path, entries: list[Any]) -> list[Obj]:
    objects: list[Obj] = []
    for entry in entries:
        if not isinstance(entry, str) or "://" in entry:
            raise RenderError(f"resource {entry!r}: only local files are supported")
        path = (directory / entry).resolve()
        if not path.is_file():
            raise RenderError(f"resource {entry!r}: not a file (directories are not supported)")
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                raise RenderError(f"{path}: every document needs apiVersion and kind")
            if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
                raise RenderError(f"{path}: {doc['kind']} without metadata.name")
            objects.append(doc)
    return objects


def _check_kinds(objects: list[Obj]) -> None:
    for obj in objects:
        if obj["kind"] not in POD_TEMPLATE_KINDS | PLAIN_KINDS:
            raise RenderError(f"{obj['kind']} {obj['metadata']['name']}: kind not supported by the renderer")


def _file_entries(directory: Path, name: str, files: list[Any]) -> Iterator[tuple[str, str]]:
    """(key, text) of each ``files`` entry of generator ``name``: ``path`` or ``key=path``."""
    for entry in files:
        if not isinstance(entry, str) or not entry:
            raise RenderError(f"configMapGenerator {name!r}: file entry {entry!r} is not a path")
        key, sep, relative = entry.partition("=")
        if not sep:
            key, relative = Path(entry).name, entry
        path = (directory / relative).resolve()
        if "://" in relative or not path.is_file():
            raise RenderError(f"configMapGenerator {name!r}: {relative!r} is not a local file")
        if not path.is_relative_to(directory.resolve()):  # kustomize's load restrictor, by default
            raise RenderError(f"configMapGenerator {name!r}: {relative!r} is outside the kustomization")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # kustomize would write binaryData
            raise RenderError(f"configMapGenerator {name!r}: {relative!r} is not UTF-8 text") from exc
        yield key, text


def _generate_config_maps(directory: Path, generators: list[Any]) -> tuple[list[Obj], dict[str, str]]:
    """ConfigMaps from ``configMapGenerator``, and the map of generated names."""
    maps: list[Obj] = []
    renames: dict[str, str] = {}
    for gen in generators:
        if not isinstance(gen, dict):
            raise RenderError(f"configMapGenerator entry {gen!r}: not a mapping")
        extra = sorted(set(gen) - {"name", "literals", "files", "options", "behavior"})
        if extra:
            raise RenderError(f"configMapGenerator {gen.get('name')!r}: unsupported fields {extra}")
        if gen.get("behavior", "create") != "create":
            raise RenderError(f"configMapGenerator {gen.get('name')!r}: only behavior create")
        options = gen.get("options") or {}
        if set(options) - {"disableNameSuffixHash"}:
            raise RenderError(f"configMapGenerator {gen.get('name')!r}: unsupported options {options}")
        name = gen.get("name")
        if not isinstance(name, str) or not name:
            raise RenderError("configMapGenerator entry without a name")
        entries: list[tuple[str, str]] = []
        for literal in gen.get("literals") or []:
            if not isinstance(literal, str) or "=" not in literal:
                raise RenderError(f"configMapGenerator {name!r}: literal {literal!r} is not KEY=VALUE")
            key, value = literal.split("=", 1)
            # kustomize strips one pair of surrounding quotes; keep values unquoted.
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                raise RenderError(f"configMapGenerator {name!r}: write {key}'s value without quotes")
            entries.append((key, value))
        entries += _file_entries(directory, name, gen.get("files") or [])
        data: dict[str, str] = {}
        for key, value in entries:
            if key in data:
                raise RenderError(f"configMapGenerator {name!r}: {key} given twice")
            data[key] = value
        full = name if options.get("disableNameSuffixHash") else f"{name}-{kustomize_hash(data)}"
        renames[name] = full
        config_map: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": full}}
        if data:
            config_map["data"] = data
        maps.append(config_map)
    return maps, renames


def _pod_specs(obj: Obj) -> Iterator[Obj]:
    if obj["kind"] in POD_TEMPLATE_KINDS:
        spec = obj.get("spec", {}).get("template", {}).get("spec")
        if isinstance(spec, dict):
            yield spec


def _containers(pod: Obj) -> Iterator[Obj]:
    for key in ("initContainers", "containers"):
        yield from pod.get(key) or []


def _rename_config_map_refs(obj: Obj, renames: dict[str, str]) -> None:
    def fix(ref: Any) -> None:
        if isinstance(ref, dict) and ref.get("name") in renames:
            ref["name"] = renames[ref["name"]]

    for pod in _pod_specs(obj):
        for container in _containers(pod):
            for source in container.get("envFrom") or []:
                fix(source.get("configMapRef"))
            for var in container.get("env") or []:
                fix((var.get("valueFrom") or {}).get("configMapKeyRef"))
        for volume in pod.get("volumes") or []:
            fix(volume.get("configMap"))
            for source in (volume.get("projected") or {}).get("sources") or []:
                fix(source.get("configMap"))


def _split_image(image: str) -> tuple[str, str, str]:
    """``name[:tag][@digest]`` into its three parts (a registry port is part of the name)."""
    name, _, digest = image.partition("@")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _apply_images(obj: Obj, images: list[Any]) -> None:
    for rule in images:
        if not isinstance(rule, dict) or not rule.get("name"):
            raise RenderError(f"images entry {rule!r}: needs a name")
        extra = sorted(set(rule) - {"name", "newName", "newTag", "digest"})
        if extra:
            raise RenderError(f"images {rule['name']!r}: unsupported fields {extra}")
        for pod in _pod_specs(obj):
            for container in _containers(pod):
                name, tag, digest = _split_image(str(container.get("image", "")))
                if name != rule["name"]:
                    continue
                name = rule.get("newName", name)
                if "digest" in rule:
                    tag, digest = "", rule["digest"]
                elif "newTag" in rule:
                    tag, digest = str(rule["newTag"]), ""
                image = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                container["image"] = image


def _apply_labels(obj: Obj, label_sets: list[Any]) -> None:
    for entry in label_sets:
        if not isinstance(entry, dict) or not isinstance(entry.get("pairs"), dict):
            raise RenderError(f"labels entry {entry!r}: needs pairs")
        extra = sorted(set(entry) - {"pairs", "includeSelectors", "includeTemplates"})
        if extra:
            raise RenderError(f"labels: unsupported fields {extra}")
        if entry.get("includeSelectors", False):
            raise RenderError("labels: includeSelectors is not supported; write selectors out")
        pairs = {str(k): str(v) for k, v in entry["pairs"].items()}
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if entry.get("includeTemplates", False) and obj["kind"] in POD_TEMPLATE_KINDS:
            template = obj.setdefault("spec", {}).setdefault("template", {})
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _sort_key(obj: Obj) -> tuple[int, str, str, str]:
    kind = obj["kind"]
    if kind in _ORDER_FIRST:
        rank = _ORDER_FIRST.index(kind) - len(_ORDER_FIRST)
    elif kind in _ORDER_LAST:
        rank = 1 + _ORDER_LAST.index(kind)
    else:
        rank = 0
    group, _, version = obj["apiVersion"].rpartition("/")
    gvk = "_".join([group or "~G", version or "~V", kind])
    meta = obj["metadata"]
    return rank, gvk, str(meta.get("namespace", "")), str(meta["name"])


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` would print, in its order."""
    directory = Path(directory)
    kust = _load_kustomization(directory)
    objects = [copy.deepcopy(o) for o in _load_resources(directory, kust.get("resources") or [])]
    generated, renames = _generate_config_maps(directory, kust.get("configMapGenerator") or [])
    objects += generated
    _check_kinds(objects)

    seen: set[tuple[str, str]] = set()
    for obj in objects:
        ident = (obj["kind"], obj["metadata"]["name"])
        if ident in seen:
            raise RenderError(f"{ident[0]} {ident[1]} defined twice")
        seen.add(ident)

    namespace = kust.get("namespace")
    for obj in objects:
        if namespace:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = namespace
            elif obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = namespace
        _apply_labels(obj, kust.get("labels") or [])
        _apply_images(obj, kust.get("images") or [])
        _rename_config_map_refs(obj, renames)
    return sorted(objects, key=_sort_key)


def dump(objects: list[Obj]) -> str:
    return str(yaml.safe_dump_all(objects, sort_keys=True, default_flow_style=False))


def _file_name(obj: Obj) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="folder with a kustomization.yaml")
    parser.add_argument("-o", "--output", type=Path, help="write the manifests here instead of stdout")
    parser.add_argument("--split", type=Path, metavar="DIR", help="write one file per object into DIR")
    args = parser.parse_args(argv)
    try:
        objects = render(args.directory)
    except (RenderError, OSError, yaml.YAMLError) as exc:
        print(f"render_k8s: {exc}", file=sys.stderr)
        return 1
    if args.split:
        args.split.mkdir(parents=True, exist_ok=True)
        for obj in objects:
            (args.split / _file_name(obj)).write_text(yaml.safe_dump(obj, sort_keys=True))
    if args.output:
        args.output.write_text(dump(objects))
    elif not args.split:
        sys.stdout.write(dump(objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
