"""``kernelgen init | import | inspect`` through the real ``kernelgen`` entry point."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kernelgen_client.cli import build_parser, main
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository.checkpoint import read_weights
from kernelgen_server.repository.store import ModelRepository, load_model

CONFIG_DICT: dict[str, Any] = {
    "out_dim": 3,
    "data_dim": 2,
    "mlp_hidden_dim": 8,
    "num_layers": 3,
    "embedding_dim": 8,
    "omega_0": 10.0,
    "L_cache": [4, 6],
    "use_bias": True,
    "film": {"cond_dim": 5, "film_hidden_dim": 6},
}
CONFIG = ModelConfig.from_dict(CONFIG_DICT)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CONFIG_DICT))
    return path


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kernelgen {command}: error: ")
    return lines[0]


# -- init -----------------------------------------------------------------------


def test_init_writes_a_seeded_model(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert main(["init", "m", "--repo", str(repo), "--config", str(config_file), "--seed", "7"]) == 0
    model = load_model(repo / "m")
    assert "initialised model 'm'" in capsys.readouterr().out
    assert model.config == CONFIG
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["config.json", "model.safetensors"]
    expected = CONFIG.build(seed=7).state_dict()
    stored = read_weights(repo / "m" / "model.safetensors")
    assert stored.keys() == expected.keys()
    assert all(torch.equal(stored[k], expected[k]) for k in expected)


def test_init_seeds_differ_and_default_to_zero(tmp_path: Path, config_file: Path) -> None:
    for name, seed in (("a", []), ("b", ["--seed", "0"]), ("c", ["--seed", "1"])):
        assert main(["init", name, "--repo", str(tmp_path), "--config", str(config_file), *seed]) == 0
    repo = ModelRepository.load(tmp_path)
    hashes = {name: repo.get(name).content_hash for name in "abc"}
    assert hashes["a"] == hashes["b"] != hashes["c"]


def test_init_refuses_to_overwrite_without_force(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["init", "m", "--repo", str(tmp_path), "--config", str(config_file)]
    assert main([*args, "--seed", "1"]) == 0
    before = load_model(tmp_path / "m").content_hash
    capsys.readouterr()
    assert main([*args, "--seed", "2"]) == 2
    assert "--force" in one_error_line(capsys, "init")
    assert load_model(tmp_path / "m").content_hash == before
    assert main([*args, "--seed", "2", "--force"]) == 0
    assert load_model(tmp_path / "m").content_hash != before


def test_init_with_an_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**CONFIG_DICT, "L_cache": [4, 6, 8]}))
    assert main(["init", "m", "--repo", str(tmp_path / "repo"), "--config", str(bad)]) == 2
    line = one_error_line(capsys, "init")
    assert str(bad) in line
    assert "L_cache" in line
    assert not (tmp_path / "repo").exists()


def test_init_with_a_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.json"
    assert main(["init", "m", "--repo", str(tmp_path), "--config", str(missing)]) == 2
    assert str(missing) in one_error_line(capsys, "init")


def test_init_with_an_invalid_name(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "../up", "--repo", str(tmp_path), "--config", str(config_file)]) == 2
    assert "invalid model name" in one_error_line(capsys, "init")


def test_init_with_a_negative_seed_is_an_argument_error(tmp_path: Path, config_file: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["init", "m", "--repo", str(tmp_path), "--config", str(config_file), "--seed", "-1"])
    assert info.value.code == 2


# -- import ---------------------------------------------------------------------


def test_import_from_a_wrapped_prefixed_pt(tmp_path: Path, config_file: Path) -> None:
    kernel = CONFIG.build(seed=3).state_dict()
    training = {f"model.mixer.filter.{k}": v for k, v in kernel.items()}
    training["model.mixer.proj.weight"] = torch.zeros(2, 2)
    ckpt = tmp_path / "train.ckpt"
    torch.save({"state_dict": training, "epoch": 12, "lr_schedulers": [{"step": 3}]}, ckpt)
    args = ["import", str(ckpt), "--prefix", "model.mixer.filter", "--config", str(config_file)]
    assert main([*args, "--name", "imported", "--repo", str(tmp_path / "repo")]) == 0
    model = load_model(tmp_path / "repo" / "imported")
    reference = CONFIG.build(seed=3).eval()
    conditioning = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.module((3, 5), conditioning)[0], reference((3, 5), conditioning)[0])


def test_import_from_a_legacy_safetensors(tmp_path: Path, config_file: Path) -> None:
    kernel = CONFIG.build(seed=4).state_dict()
    legacy = {
        re.sub(r"^hidden_linears\.(\d+)", lambda m: f"kernel_network.{2 * int(m[1])}", k): v
        for k, v in kernel.items()
    }
    ckpt = tmp_path / "old.safetensors"
    save_file(legacy, ckpt)
    args = ["import", str(ckpt), "--prefix", "", "--config", str(config_file), "--name", "old"]
    assert main([*args, "--repo", str(tmp_path / "repo")]) == 0
    stored = read_weights(tmp_path / "repo" / "old" / "model.safetensors")
    assert stored.keys() == kernel.keys()
    assert torch.equal(stored["hidden_linears.1.weight"], kernel["hidden_linears.1.weight"])


def test_import_that_does_not_fit_the_config(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = ModelConfig.from_dict({**CONFIG_DICT, "out_dim": 4})
    ckpt = tmp_path / "train.pt"
    torch.save({f"k.{k}": v for k, v in other.build(seed=0).state_dict().items()}, ckpt)
    args = ["import", str(ckpt), "--prefix", "k", "--config", str(config_file), "--name", "m"]
    assert main([*args, "--repo", str(tmp_path / "repo")]) == 2
    line = one_error_line(capsys, "import")
    assert str(ckpt) in line
    assert "under prefix 'k'" in line
    assert "'out_linear.bias' has shape [4], the config needs [3]" in line
    assert not (tmp_path / "repo" / "m").exists()


def test_import_with_a_wrong_prefix(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "train.pt"
    torch.save({f"net.kernel.{k}": v for k, v in CONFIG.build(seed=0).state_dict().items()}, ckpt)
    args = ["import", str(ckpt), "--prefix", "net.filter", "--config", str(config_file), "--name", "m"]
    assert main([*args, "--repo", str(tmp_path)]) == 2
    assert "kernels found under 'net.kernel'" in one_error_line(capsys, "import")


def test_import_of_one_generator_with_a_base_config_names_the_command_that_takes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "train.pt"
    torch.save({f"net.kernel.{k}": v for k, v in CONFIG.build(seed=0).state_dict().items()}, ckpt)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"omega_0": CONFIG_DICT["omega_0"], "L_cache": CONFIG_DICT["L_cache"]}))
    args = ["import", str(ckpt), "--prefix", "net.kernel", "--config", str(base), "--name", "m"]
    assert main([*args, "--repo", str(tmp_path / "repo")]) == 2
    line = one_error_line(capsys, "import")
    assert "missing key 'out_dim'" in line
    assert line.endswith(
        "base.json is a base config, which only --all completes from the weights' shapes: pass --all "
        "--prefix net.kernel to import the generator under that prefix with the rest inferred (as the "
        "group 'm', model m/0; --dry-run shows the config), or give --config a whole config.json"
    )
    # The command it names does import it.
    assert main([*args, "--repo", str(tmp_path / "repo"), "--all"]) == 0
    assert (tmp_path / "repo" / "m" / "0" / "model.safetensors").exists()


def test_import_help_lists_every_checkpoint_kind(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ".pt/.ckpt/.pth read with weights_only=True" in text
    assert "training checkpoint: .pt, .ckpt, .pth, .safetensors" in text


# -- inspect --------------------------------------------------------------------


@pytest.fixture
def mixed_repo(tmp_path: Path, config_file: Path) -> Path:
    repo = tmp_path / "repo"
    assert main(["init", "good", "--repo", str(repo), "--config", str(config_file)]) == 0
    (repo / "broken").mkdir()
    (repo / "broken" / "config.json").write_text(json.dumps({**CONFIG_DICT, "out_dim": True}))
    return repo


def test_inspect_json(mixed_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["inspect", str(mixed_repo), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["repository"] == str(mixed_repo)
    broken, good = report["models"]
    assert broken["name"] == "broken"
    assert broken["status"] == "failed"
    assert "out_dim" in broken["reason"]
    assert str(mixed_repo / "broken" / "config.json") in broken["reason"]

    model = load_model(mixed_repo / "good")
    assert good["name"] == "good"
    assert good["status"] == "ready"
    assert good["config"] == CONFIG.to_json_dict()
    assert good["parameter_count"] == model.parameter_count
    assert good["film"] is True
    assert good["cond_dim"] == 5
    assert good["content_hash"] == model.content_hash
    assert type(good["flop_count"]) is int
    assert good["flop_count"] == model.module.flop_count((4, 6))
    assert good["flop_grid"] == [4, 6]


def test_inspect_text(mixed_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["inspect", str(mixed_repo)]) == 1
    out = capsys.readouterr().out
    model = load_model(mixed_repo / "good")
    assert "good: ready" in out
    assert f"parameters    {model.parameter_count}\n" in out
    assert f"flops         {model.module.flop_count((4, 6))} " in out
    assert model.content_hash in out
    assert "broken: FAILED: " in out


def test_inspect_exits_zero_when_every_model_loads(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "m", "--repo", str(tmp_path), "--config", str(config_file)]) == 0
    assert main(["inspect", str(tmp_path)]) == 0


def test_inspect_missing_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in one_error_line(capsys, "inspect")


# -- the command line itself -------------------------------------------------------


def test_every_option_has_help() -> None:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("init", "import", "inspect"):
        for action in sub.choices[command]._actions:
            assert action.help, f"{command} {action.dest} has no help"


@pytest.mark.parametrize("command", ["init", "import", "inspect"])
def test_help_exits_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: kernelgen {command}" in capsys.readouterr().out


def _run(code_or_args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(code_or_args, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_building_the_parser_does_not_import_torch() -> None:
    code = (
        "import sys; from kernelgen_client.cli import build_parser; build_parser();"
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_installed_console_script(mixed_repo: Path) -> None:
    script = Path(sys.executable).with_name("kernelgen")
    assert script.exists()
    result = _run([str(script), "inspect", str(mixed_repo), "--json"])
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [(m["name"], m["status"]) for m in report["models"]] == [("broken", "failed"), ("good", "ready")]
