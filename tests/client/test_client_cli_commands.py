"""The client commands of ``kernelgen`` against a real in-process server."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kernelgen_client.cli import main


async def run(server: Any, *argv: str) -> int:
    """``kernelgen ARGV --target <server>`` on a worker thread (the server runs on this loop)."""
    return await asyncio.to_thread(main, [*argv, "--target", f"127.0.0.1:{server.port}"])


async def test_generate_prints_a_one_line_summary(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run(server, "generate", "hyena-2d", "--seq-lens", "29,29") == 0
    assert await run(server, "generate", "hyena-2d", "--seq-lens", "29,29") == 0
    first, second = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"hyena-2d: kernel \[1, 57, 57, 384\] float32, 4\.99 MB \(streamed\), cache hit no, "
        r"batch 1 rows/1 requests, queue [\d.]+ ms, compute [\d.]+ ms, total [\d.]+ ms",
        first,
    ), first
    assert "cache hit yes" in second


async def test_generate_saves_conditioned_kernels(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kernel.npy"
    argv = ["generate", "volume-3d", "--seq-lens", "3,4,2", "--random-conditioning", "3", "--out", str(out)]
    assert await run(server, *argv, "--seed", "7") == 0
    assert "kernel [3, 5, 7, 3, 32] float32" in capsys.readouterr().out
    kernel = np.load(out)
    assert kernel.shape == (3, 5, 7, 3, 32)
    rows = np.random.default_rng(7).standard_normal((3, 16), dtype=np.float32)
    cond = tmp_path / "cond.npy"
    np.save(cond, rows)
    again = tmp_path / "again.safetensors"
    argv = ["generate", "volume-3d", "--seq-lens", "3,4,2", "--conditioning", str(cond), "--out", str(again)]
    assert await run(server, *argv, "--dtype", "bfloat16", "--grid", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [3, 5, 7, 3, 32]
    assert summary["dtype"] == "bfloat16"
    assert summary["bytes"] == 3 * 5 * 7 * 3 * 32 * 2
    assert summary["batch_size"] == 3
    assert not summary["streamed"]
    from safetensors.torch import load_file

    saved = load_file(again)
    assert saved["kernel"].dtype == torch.bfloat16
    assert saved["grid"].shape == (1, 5, 7, 3, 3)


async def test_flops_models_health(server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run(server, "flops", "hyena-2d", "--seq-lens", "29,29", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flops"] == server.repository.ready["hyena-2d"].module.flop_count([29, 29])
    assert report["kernel_bytes"] == 57 * 57 * 384 * 4
    assert await run(server, "flops", "long-1d", "--seq-lens", "100", "--inference") == 0
    assert "0 FLOPs (inference)" in capsys.readouterr().out
    # seq_lens and the kernel's shape are told apart; FiLM is named for what it is.
    assert await run(server, "flops", "hyena-2d", "--seq-lens", "15,15") == 0
    flops = server.repository.ready["hyena-2d"].module.flop_count([15, 15])
    assert capsys.readouterr().out.strip() == (
        f"hyena-2d seq_lens 15,15: {flops} FLOPs, kernel 29x29 (841 points), {29 * 29 * 384 * 4} kernel "
        "bytes (float32), FiLM yes"
    )
    assert await run(server, "flops", "long-1d", "--seq-lens", "100", "--json") == 0
    assert json.loads(capsys.readouterr().out)["film"] is False
    assert await run(server, "models") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "READY", "DIMS", "OUT", "COND", "KERNEL", "PARAMS", "HASH", "REASON"]
    assert table[1].split()[:6] == ["hyena-2d", "yes", "2", "384", "384", "SIREN"]
    assert await run(server, "models", "--json") == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["hyena-2d", "long-1d", "volume-3d"]
    assert await run(server, "health") == 0
    assert await run(server, "health", "long-1d") == 0
    assert capsys.readouterr().out.splitlines() == ["SERVING", "long-1d: SERVING"]
    assert await run(server, "health", "nope") == 4


async def test_health_is_not_serving_while_draining(capsys: pytest.CaptureFixture[str]) -> None:
    from support import run_server

    async with run_server() as server:
        await server.health.enter_graceful_shutdown()
        assert await run(server, "health") == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"


async def test_clear_errors_and_exit_codes(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(server, "generate", "nope", "--seq-lens", "3") == 4
    err = capsys.readouterr().err
    assert "kernelgen generate: unknown model 'nope'" in err
    assert "(the server has: hyena-2d, long-1d, volume-3d)" in err
    assert await run(server, "generate", "hyena-2d", "--seq-lens", "3") == 2
    assert "invalid request: model 'hyena-2d' is 2-D" in capsys.readouterr().err
    assert await run(server, "generate", "long-1d", "--seq-lens", "3", "--random-conditioning", "2") == 2
    assert "takes no conditioning" in capsys.readouterr().err
    assert await run(server, "generate", "long-1d", "--seq-lens", "10000000", "--no-stream") == 1
    assert "over the server's limit" in capsys.readouterr().err
    # Over the one-message limit only because of --no-stream: the flag to drop is named.
    assert await run(server, "generate", "long-1d", "--seq-lens", "40000", "--no-stream") == 1
    assert capsys.readouterr().err.rstrip().endswith("(drop --no-stream: it is then streamed)")
    # A file that is not .npy: what is expected, never numpy's word on pickles.
    not_npy = tmp_path / "rows.csv"
    not_npy.write_text("1,2,3\n")
    argv = ["generate", "hyena-2d", "--seq-lens", "3,3", "--conditioning", str(not_npy)]
    assert await run(server, *argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"kernelgen generate: --conditioning {not_npy}: not a .npy array; expected a .npy file holding one "
        "[rows, cond_dim] float32 array (numpy.save)"
    )
    assert "pickle" not in err
    archive = tmp_path / "rows.npz"
    np.savez(archive, rows=np.ones((1, 384), np.float32))
    assert await run(server, "generate", "hyena-2d", "--seq-lens", "3,3", "--conditioning", str(archive)) == 2
    assert f"--conditioning {archive}: an .npz archive; expected a .npy file" in capsys.readouterr().err


async def test_generate_factored_writes_the_dense_kernel_or_asked_factors(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dense_out, factored_out, factors_out = (tmp_path / n for n in ("d.npy", "f.npy", "factors.safetensors"))
    base = ["generate", "hyena-2d", "--seq-lens", "9,9", "--random-conditioning", "2"]
    assert await run(server, *base, "--out", str(dense_out)) == 0
    assert await run(server, *base, "--representation", "factored", "--out", str(factored_out), "--json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["representation"] == "factored"
    assert summary["bytes"] == 2 * 17 * 17 * 32 * 4  # the factors travelled, not the kernel
    dense, from_factors = np.load(dense_out), np.load(factored_out)
    assert from_factors.shape == dense.shape == (2, 17, 17, 384)
    assert np.abs(from_factors - dense).max() <= 1e-5 * np.abs(dense).max()
    argv = [*base, "--representation", "factored", "--out", str(factors_out), "--save-factors"]
    assert await run(server, *argv) == 0
    # What travelled is said as such: the factors' shape, and the dense kernel's they give.
    assert "factored kernel: factors [2, 17, 17, 32] float32 (dense kernel [2, 17, 17, 384])" in (
        capsys.readouterr().out
    )
    from safetensors import safe_open

    with safe_open(str(factors_out), "np") as saved:
        factors, weight_t = saved.get_tensor("factors"), saved.get_tensor("head.weight_t")
        kernel = factors @ weight_t + saved.get_tensor("head.bias")
        assert len(saved.metadata()["head_hash"]) == 64
    assert factors.shape == (2, 17, 17, 32)
    assert np.abs(kernel - dense).max() <= 1e-5 * np.abs(dense).max()


@pytest.mark.parametrize(
    "extra",
    [["--save-factors"], ["--save-factors", "--out", "k.npy"]],
    ids=["no-out", "npy"],
)
async def test_save_factors_needs_a_safetensors_file(
    server: Any, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "hyena-2d", "--seq-lens", "3,3", "--representation", "factored", *extra]
    assert await run(server, *argv) == 2
    assert "--save-factors writes .safetensors" in capsys.readouterr().err


async def test_save_factors_of_a_dense_kernel_is_refused(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k.safetensors"
    argv = ["generate", "volume-3d", "--seq-lens", "3,3,3", "--representation", "auto", "--out", str(out)]
    assert await run(server, *argv, "--save-factors") == 2  # auto chose dense: hidden == out_dim
    assert "needs a factored kernel" in capsys.readouterr().err
