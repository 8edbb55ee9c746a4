"""Every load tester process tunes its own malloc: batched responses arrive together."""

from __future__ import annotations

import pytest

from kernelgen_loadtest import processes


async def test_each_load_tester_process_tunes_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    import kernelgen_client

    calls: list[int] = []
    monkeypatch.setattr(kernelgen_client, "tune_malloc", lambda: calls.append(1) or True)
    client = await processes._client({"target": "127.0.0.1:1"})
    await client.close()
    assert calls == [1]
