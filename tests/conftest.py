"""Shared fixtures; the helpers behind them live in tests/support.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from support import run_server


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
