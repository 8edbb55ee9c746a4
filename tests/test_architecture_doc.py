"""docs/architecture.md's module tables list the modules there are, and the client's torch row its
public names: a module added, removed or renamed without its row fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
#: Each package's table starts after this line of the document.
TABLES = {
    "kernelgen_client": "`kernelgen_client`:\n",
    "kernelgen_wire": "lives in `kernelgen_wire` and only there:",
}


def table(marker: str) -> dict[str, str]:
    """The table after ``marker``: every name in a row's first cell, mapped to the row's second."""
    lines = DOC[DOC.index(marker) :].splitlines()[1:]
    rows: dict[str, str] = {}
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = line.split("|")
        for name in re.findall(r"`([\w.]+)`", cells[1]):
            rows[name.rpartition(".")[2] if name.startswith("kernelgen_") else name] = cells[2]
    return rows


def modules(package: str) -> set[str]:
    """A package's modules and sub-packages, by name (``__init__`` aside)."""
    folder = ROOT / "src" / package
    found = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return found | {p.parent.name for p in folder.glob("*/__init__.py")}


@pytest.mark.parametrize("package", sorted(TABLES))
def test_every_module_has_a_row_and_every_row_a_module(package: str) -> None:
    listed = set(table(TABLES[package]))
    assert listed == modules(package), (
        f"docs/architecture.md's {package} table: missing {sorted(modules(package) - listed)}, "
        f"not modules {sorted(listed - modules(package))}"
    )


def test_the_torch_row_names_every_public_name_of_the_module() -> None:
    import kernelgen_client.torch as served

    row = table(TABLES["kernelgen_client"])["torch"]
    named = set(re.findall(r"`(\w+)`", row))
    assert set(served.__all__) <= named, sorted(set(served.__all__) - named)
    # The served network's members it names are its own: methods, properties, attributes __init__ sets.
    members = set(vars(served.ServedNetwork)) | set(served.ServedNetwork.__init__.__code__.co_names)
    for attribute in ("layers", "counts", "prefetch", "restore"):
        assert attribute in named and attribute in members, attribute


def test_every_server_module_has_a_row_under_its_layer() -> None:
    """The server's table names each module by its layer's folder (``core/plan``), the roots alone."""
    rows = DOC[DOC.index("`kernelgen_server`, layer by layer:\n") :].split("\n\n")[1]
    listed = {
        name for line in rows.splitlines()[2:] for name in re.findall(r"`([\w/]+)`", line.split("|")[1])
    }
    folder = ROOT / "src" / "kernelgen_server"
    present = {
        p.relative_to(folder).with_suffix("").as_posix()
        for p in folder.rglob("*.py")
        if p.stem != "__init__" and p.parent.name != "__pycache__"
    }
    assert listed == present, f"missing {sorted(present - listed)}, not modules {sorted(listed - present)}"
