"""The malloc tuning applies on glibc and is a no-op report elsewhere."""

from __future__ import annotations

import platform

from kernelgen_server.malloc import tune_malloc


def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
