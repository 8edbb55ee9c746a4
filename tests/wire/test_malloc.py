"""The malloc tuning applies on glibc and is a no-op report elsewhere."""

from __future__ import annotations

import platform

from kernelgen_wire.malloc import tune_malloc


def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_the_client_package_exports_it() -> None:
    import kernelgen_client

    assert kernelgen_client.tune_malloc is tune_malloc
