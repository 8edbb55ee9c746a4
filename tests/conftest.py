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


@pytest.fixture
def embedded_repo() -> Path:
    from kernelgen_server.repository import embedded_repository

    return embedded_repository()
