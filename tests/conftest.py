"""Shared fixtures, and the one allowed skip; the helpers behind them live in tests/support.py.

A test that needs a CUDA device is marked ``cuda``; where torch sees none it is skipped
with ``CUDA_SKIP_REASON`` (scripts/ci_report.py, which lets CI pass only skips with that
reason). No other test skips: a missing dependency or facility is a failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ci_report import CUDA_SKIP_REASON
from support import run_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_tests = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_tests:
        return  # torch is imported only for a run that holds CUDA tests
    import torch

    if not torch.cuda.is_available():
        for item in cuda_tests:
            item.add_marker(pytest.mark.skip(reason=CUDA_SKIP_REASON))


@pytest.fixture
async def server() -> AsyncIterator[Any]:
    """The embedded models served in-process with default settings."""
    async with run_server() as running:
        yield running


@pytest.fixture(scope="session")
def embedded_models() -> Any:
    """The embedded model repository, loaded once (read only: tests must not change it)."""
    from kernelgen_server.repository.store import ModelRepository, embedded_repository

    return ModelRepository.load(embedded_repository())


@pytest.fixture
def embedded_repo() -> Path:
    from kernelgen_server.repository.store import embedded_repository

    return embedded_repository()
