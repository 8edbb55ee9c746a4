"""The malloc tuning applies on glibc and is a no-op report elsewhere."""

from __future__ import annotations

import platform

import pytest

from kernelgen_client.malloc import tune_malloc


def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_the_client_package_exports_it() -> None:
    import kernelgen_client

    assert kernelgen_client.tune_malloc is tune_malloc


async def test_each_load_tester_process_tunes_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    import kernelgen_client.malloc as malloc
    from kernelgen_client.loadtest import workers

    calls: list[int] = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(1) or True)
    client = await workers._client({"target": "127.0.0.1:1"})
    await client.close()
    assert calls == [1]
