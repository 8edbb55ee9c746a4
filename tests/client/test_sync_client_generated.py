"""The blocking client is generated from the asyncio one: one definition of both APIs."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

from kernelgen_client import AsyncKernelClient, KernelClient

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_sync_client", REPO / "scripts" / "gen_sync_client.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_client_py_is_what_the_generator_makes_of_aio_py(generator: ModuleType) -> None:
    assert generator.render(generator.SOURCE.read_text()) == generator.TARGET.read_text()


def public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and (not name.startswith("_") or name in ("__init__",))
    }


def test_both_clients_have_the_same_methods_signatures_and_docstrings() -> None:
    sync, async_ = public(KernelClient), public(AsyncKernelClient)
    assert sync.keys() == async_.keys()
    for name in sync:
        assert str(sync[name]).replace("AsyncKernelClient", "KernelClient") == str(async_[name]), name
        sync_doc = inspect.getdoc(getattr(KernelClient, name)) or ""
        async_doc = inspect.getdoc(getattr(AsyncKernelClient, name)) or ""
        assert sync_doc == re.sub(r"\bawait |Async(?=KernelClient)", "", async_doc).replace(
            "Wait until", "Block until"
        ), name
    assert inspect.iscoroutinefunction(AsyncKernelClient.generate)
    assert not inspect.iscoroutinefunction(KernelClient.generate)


def test_a_passage_that_no_longer_matches_stops_the_generator(generator: ModuleType) -> None:
    source = generator.SOURCE.read_text().replace("for one event loop", "for any loop")
    with pytest.raises(SystemExit, match="expected one passage"):
        generator.render(source)


def test_an_asyncio_word_left_in_the_blocking_client_stops_the_generator(generator: ModuleType) -> None:
    source = generator.SOURCE.read_text().replace('"""Close the channels;', '"""asyncio: close the channels;')
    with pytest.raises(SystemExit, match="would still say"):
        generator.render(source)
