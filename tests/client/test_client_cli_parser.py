"""The client commands of ``kernelgen`` without a server: arguments, exit codes, file output."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelgen_client._save import save_kernel
from kernelgen_client.cli import build_parser, main
from kernelgen_client.commands import EXIT_CODES
from kernelgen_client.results import KernelResult, ServerReport
from kernelgen_client.tensors import decode_numpy
from kernelgen_wire.v1 import kernelgen_pb2 as pb


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_every_client_command_takes_a_target_and_the_environment_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = build_parser()
    for argv in (
        ["generate", "m", "--seq-lens", "3"],
        ["flops", "m", "--seq-lens", "3"],
        ["models"],
        ["health"],
    ):
        args = parser.parse_args([*argv, "--target", "10.0.0.1:7000"])
        assert args.target == "10.0.0.1:7000"
    args = parser.parse_args(["generate", "m", "--seq-lens", "15, 15", "--random-conditioning", "4"])
    assert args.seq_lens == [15, 15]
    assert args.random_conditioning == 4
    assert args.target is None  # resolved when run: KERNELGEN_TARGET, else 127.0.0.1:50051


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "m", "--seq-lens", "a,b"],
        ["generate", "m", "--seq-lens", "0,3"],
        ["generate", "m"],
        ["generate", "m", "--seq-lens", "3", "--dtype", "int8"],
        ["generate", "m", "--seq-lens", "3", "--conditioning", "c.npy", "--random-conditioning", "2"],
        ["flops", "m", "--seq-lens", "3", "--timeout", "-1"],
        ["health", "--bogus"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == EXIT_CODES["usage"] == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["health"], ["models"], ["flops", "m", "--seq-lens", "3"]])
def test_connection_refused_exits_3_with_a_clear_message(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = closed_port()
    monkeypatch.setenv("KERNELGEN_TARGET", f"127.0.0.1:{port}")
    assert main(command) == EXIT_CODES["unavailable"] == 3
    err = capsys.readouterr().err
    assert f"cannot reach a kernelgen server at 127.0.0.1:{port} (connection refused)" in err
    assert "KERNELGEN_TARGET" in err


def test_local_problems_exit_2_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", f"127.0.0.1:{closed_port()}"]
    assert main(["generate", "m", "--seq-lens", "3", "--out", str(tmp_path / "k.txt"), *target]) == 2
    assert ".npy or .safetensors" in capsys.readouterr().err
    assert (
        main(["generate", "m", "--seq-lens", "3", "--conditioning", str(tmp_path / "none.npy"), *target]) == 2
    )
    assert "none.npy" in capsys.readouterr().err
    assert main(["health", "--target", "host:notaport"]) == 2
    assert "port" in capsys.readouterr().err


def test_help_lists_the_client_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("generate", "flops", "models", "health", "serve"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["health", "--help"])
    assert "4 unknown model" in " ".join(capsys.readouterr().out.split())


def _result(wire: int, grid: bool) -> KernelResult[np.ndarray]:
    values = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4) / 7
    if wire == pb.DTYPE_BFLOAT16:
        raw = memoryview(torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    elif wire == pb.DTYPE_FLOAT16:
        raw = memoryview(values.astype(np.float16).tobytes())
    else:
        raw = memoryview(values.tobytes())
    kernel = decode_numpy(raw, values.shape, wire)
    grid_array = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 2, 3, 2) if grid else None
    report = ServerReport(False, 1, 1, 0.0, 0.0, "h")
    name = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16", pb.DTYPE_BFLOAT16: "bfloat16"}[wire]
    return KernelResult(kernel, grid_array, report, name, raw.toreadonly(), False, 1.0)


@pytest.mark.parametrize("wire", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16])
def test_safetensors_keep_the_wire_dtype(tmp_path: Path, wire: int) -> None:
    import safetensors.torch as safetensors_torch
    from safetensors import safe_open

    result = _result(wire, grid=True)
    path = tmp_path / "k.safetensors"
    save_kernel(path, result, {"model": "m", "seq_lens": "2,2"})
    loaded = safetensors_torch.load_file(path)
    expected_dtype = {pb.DTYPE_FLOAT32: torch.float32, pb.DTYPE_FLOAT16: torch.float16}.get(
        wire, torch.bfloat16
    )
    assert loaded["kernel"].dtype == expected_dtype
    assert loaded["kernel"].shape == (1, 2, 3, 4)
    assert np.array_equal(loaded["kernel"].float().numpy(), result.kernel.astype(np.float32))
    assert np.array_equal(loaded["grid"].numpy(), result.grid)
    with safe_open(path, "np") as f:
        assert f.metadata() == {"model": "m", "seq_lens": "2,2"}


def test_npy_output(tmp_path: Path) -> None:
    result = _result(pb.DTYPE_BFLOAT16, grid=False)
    save_kernel(tmp_path / "k.npy", result, {})
    loaded = np.load(tmp_path / "k.npy")
    assert loaded.dtype == np.float32  # numpy has no bfloat16
    assert np.array_equal(loaded, result.kernel)
    with pytest.raises(ValueError, match="must end in"):
        save_kernel(tmp_path / "k.bin", result, {})
    json.dumps(result.report.__dict__)  # the --json summary relies on plain values


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "29x29",
            "argument --seq-lens: seq_lens are comma-separated lengths, got '29x29': 29x29 is a kernel's "
            "shape; for a 29x29 kernel give 15,15 (2*s-1 points per axis)",
        ),
        ("28x28", "argument --seq-lens: seq_lens are comma-separated lengths like 15,15, got '28x28'"),
        ("-3,29", "argument --seq-lens: seq_lens are integers >= 1 like 15,15, got '-3,29'"),
        ("15,", "argument --seq-lens: seq_lens are integers like 15,15, got '15,'"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "generate-group", "flops"])
def test_seq_lens_are_never_a_kernel_shape(
    command: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # "--seq-lens -3,29" (a separate value starting with "-") reaches the same check as "--seq-lens=-3,29".
    for argv in (["--seq-lens", value], [f"--seq-lens={value}"]):
        with pytest.raises(SystemExit) as caught:
            main([command, "m", *argv])
        assert caught.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"kernelgen {command}: error: {message}"


def test_version_is_the_package_metadatas(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"kernelgen {version('kernelgen')}"


def test_every_client_command_is_described_and_says_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("generate", "generate-group", "flops", "models", "health"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        usage, _, rest = text.partition(" positional arguments: ")
        assert "options:" in (rest or usage)
        # A description paragraph between the usage and the argument lists.
        described = text.split(" positional arguments:")[0].split(" options:")[0]
        assert described.rstrip().endswith("."), (command, described[-120:])
        assert "(default: 127.0.0.1:50051)" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--dtype {float32,float16,bfloat16} dtype of the kernel (or factors) on the wire" in text
    assert "(default: float32)" in text and "(default: dense)" in text and "(default: 60)" in text
    assert "15,15 gives a 29x29 kernel" in text
    with pytest.raises(SystemExit):
        main(["health", "--help"])
    assert "check one model or group" in " ".join(capsys.readouterr().out.split())


def test_client_checks_seq_lens_fit_the_wire() -> None:
    from kernelgen_client import InvalidRequest, KernelClient

    with KernelClient(f"127.0.0.1:{closed_port()}") as client:
        with pytest.raises(
            InvalidRequest,
            match=r"seq_lens must each fit in int64 \(below 2\*\*63\), got 1180591620717411303424",
        ):
            client.generate("long-1d", [2**70])  # refused before anything is sent
        with pytest.raises(InvalidRequest, match="fit in int64"):
            client.flop_count("long-1d", [2**63])
