"""``kernelgen_server.export``: a live network's kernel generators, with their masks and crops, as a group.

The network is ``reference_network``'s, built from the reference package's own ``CKConvND``
layers (every generator, every mask, 1-D causal, circular, 2-D, 3-D, FiLM), trained so that
its clamped values lie out of range. Every member is read back as the repository reads it
(``config.json`` and its weights, strictly) and gives what its layer convolves with, below, at
and above L_cache, within the float32 bound of the fidelity tests.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import reference_network as R
import torch
from torch import Tensor, nn

import kernelgen_server
from kernelgen_server.model.config import ModelConfig
from kernelgen_server.repository.export import ExportWarning, export, find_layers
from kernelgen_server.repository.layers import layer_tensor
from kernelgen_wire.layers import covered, layer_hash

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from nvsubquadratic.lazy_config import LazyConfig
    from nvsubquadratic.modules import kernels_nd as K
    from nvsubquadratic.modules.ckconv_nd import CKConvND

SOURCES = [f"network.{R.conv_path(i)}.kernel" for i in range(len(R.LAYERS))]


@pytest.fixture(scope="module")
def trained() -> tuple[R.Network, Tensor]:
    return R.shared_trained_network()


@pytest.fixture(scope="module")
def exported(trained: tuple[R.Network, Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    network, _ = trained
    repo = tmp_path_factory.mktemp("exported")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about in this network
        return export(R.Lightning(network), repo, "net")


def live_hash(conv: nn.Module) -> str:
    """The layer hash the torch client computes from a live layer."""
    return layer_hash(layer_tensor(k, v) for k, v in conv.state_dict().items() if covered(k, "kernel"))


def state_bytes(module: nn.Module) -> dict[str, bytes]:
    return {
        k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()
    }


def nothing_in(repo: Path) -> bool:
    return not repo.exists() or list(repo.iterdir()) == []


# -- what it writes ------------------------------------------------------------------------------


def test_every_member_serves_what_its_layer_convolves_with(
    trained: tuple[R.Network, Tensor], exported: Path
) -> None:
    network, conditioning = trained
    manifest = json.loads((exported / "group.json").read_text())
    assert [m["name"] for m in manifest["members"]] == [str(i) for i in range(len(R.LAYERS))]
    assert [m["source"] for m in manifest["members"]] == SOURCES
    for index, (layer, conv) in enumerate(zip(R.LAYERS, network.convs(), strict=True)):
        model = R.load_member(exported / str(index))
        # The classes by name, as the layer holds them.
        assert model.kind == type(conv.kernel).__name__
        assert (type(model.mask).__name__ if model.mask is not None else "Identity") == type(
            conv.mask
        ).__name__
        assert model.causal == conv.is_causal
        R.assert_serves_layer(model, conv, conditioning if layer.film else None, layer.name)


async def test_the_server_serves_the_exported_group_as_its_members_compute(
    trained: tuple[R.Network, Tensor], exported: Path
) -> None:
    """The repository loads every member, and the service's kernels are the members' (the engine's
    float32 measure, ``test_served_engine``), so what its layer convolves with."""
    from kernelgen_server.repository.store import ModelRepository

    from support import kernel_service

    network, conditioning = trained
    repository = ModelRepository.load(exported.parent)
    assert repository.failed == {} and repository.group_ready("net")
    service = kernel_service(repository)
    try:
        for index, (layer, conv) in enumerate(zip(R.LAYERS, network.convs(), strict=True)):
            model = repository.get(f"net/{index}").module
            lens = R.seq_lens_around_cache(conv)["above"]
            for rows in [None, conditioning] if layer.film else [None]:
                result = await service.generate(
                    f"net/{index}", lens, None if rows is None else rows.numpy(), 0, False
                )
                payload = result.kernel.payload
                got = torch.frombuffer(bytearray(payload.data), dtype=torch.float32).reshape(payload.shape)
                with torch.no_grad():
                    want = model(lens, rows)[0]
                assert got.shape == want.shape, layer.name
                assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), layer.name
    finally:
        await service.close()


def test_the_settings_outside_the_weights_are_the_constructor_s(exported: Path) -> None:
    configs = [ModelConfig.from_file(exported / str(i) / "config.json") for i in range(len(R.LAYERS))]
    causal, learnable, fourier, multi, blocks, mixed, siren3d, extent = configs
    assert (causal.omega_0, causal.L_cache, causal.causal) == (12.0, 16, True)
    assert (learnable.omega_0_scale_min, learnable.omega_0_scale_max) == (0.5, 1.5)
    assert learnable.mask is not None and learnable.mask.type == "ExponentialModulationND"
    # The circular layer's generator has the halved L_cache the layer gave it: (15 + 1) // 2.
    assert (fourier.kernel, fourier.nonlinearity, fourier.L_cache, fourier.causal) == (
        "RandomFourierKernelND", "gelu", 8, False,
    )  # fmt: skip
    assert multi.omega_0_per_row == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0) and multi.film_after_pos_embed
    assert (blocks.num_blocks, blocks.omega_0_min, blocks.omega_0_max, blocks.schedule) == (
        4,
        1.0,
        12.0,
        "linear",
    )
    assert (mixed.omega_0_min, mixed.omega_0_max, mixed.schedule, mixed.L_cache) == (2.0, 12.0, "log", (4, 8))
    assert siren3d.hidden_omega_0 == 3.0 and siren3d.num_layers == 4
    assert siren3d.mask is not None and getattr(siren3d.mask, "parametrization", None) == "softplus"
    assert extent.mask is not None and getattr(extent.mask, "init_extent", None) == (2.0, 1.0, 0.5)


def test_each_member_records_its_layer_s_hash_saved_and_clamped(
    trained: tuple[R.Network, Tensor], exported: Path
) -> None:
    network, _ = trained
    manifest = json.loads((exported / "group.json").read_text())
    ran = copy.deepcopy(network)
    for conv in ran.convs():  # any forward clamps in place
        with torch.no_grad():
            conv(torch.zeros(1, *[5] * conv.data_dim, R.CHANNELS))
    for member, conv, after in zip(manifest["members"], network.convs(), ran.convs(), strict=True):
        hashes = member["layer_hashes"]
        assert hashes[0] == live_hash(conv)
        assert live_hash(after) in hashes  # what a live network holds after any forward
        clamped = (
            hasattr(conv.kernel.positional_embedding, "omega_0_scale")
            or getattr(conv.mask, "parametrization", None) == "direct"
        )
        assert len(hashes) == (2 if clamped else 1), member["source"]


def test_export_leaves_the_network_as_it_was(trained: tuple[R.Network, Tensor], tmp_path: Path) -> None:
    network, _ = trained
    before = state_bytes(network)
    caches = [tuple(c.kernel.positional_embedding.L_cache_per_axis) for c in network.convs()]
    export(network, tmp_path, "again")
    assert state_bytes(network) == before
    assert [tuple(c.kernel.positional_embedding.L_cache_per_axis) for c in network.convs()] == caches


def test_a_network_run_past_its_l_cache_exports_the_constructor_s(
    trained: tuple[R.Network, Tensor], exported: Path, tmp_path: Path
) -> None:
    network, conditioning = trained
    ran = copy.deepcopy(network)
    for conv in ran.convs():  # twice: the second growth changes the package's step (docs/architecture.md)
        with torch.no_grad():
            for extra in (2, 5):
                conv.kernel([n + extra for n in conv.kernel.L_cache_per_axis])
        assert conv.kernel.positional_embedding.L_cache_per_axis != tuple(conv.kernel.L_cache_per_axis)
    with pytest.warns(ExportWarning, match=r"grown past L_cache .* more than once") as said:
        again = export(ran, tmp_path, "net")
    assert len(said) == len(R.LAYERS)  # one warning per layer, naming it
    for index, layer in enumerate(R.LAYERS):
        first = ModelConfig.from_file(exported / str(index) / "config.json")
        assert ModelConfig.from_file(again / str(index) / "config.json") == first
        # What a freshly loaded layer convolves with (the saved network's).
        model = R.load_member(again / str(index))
        R.assert_serves_layer(model, network.convs()[index], conditioning if layer.film else None, layer.name)


def test_a_compiled_network_exports_under_its_own_paths(
    trained: tuple[R.Network, Tensor], exported: Path, tmp_path: Path
) -> None:
    network, _ = trained
    partly = copy.deepcopy(network)
    partly.blocks[3].mixer = torch.compile(partly.blocks[3].mixer)  # a block compiled alone
    for module in (torch.compile(R.Lightning(network)), R.Lightning(partly)):
        assert any("_orig_mod" in name for name, _ in module.named_modules())
        path = export(module, tmp_path / type(module).__name__, "net")
        manifest = json.loads((path / "group.json").read_text())
        assert [m["source"] for m in manifest["members"]] == SOURCES
        assert manifest == json.loads((exported / "group.json").read_text())
        for index in range(len(R.LAYERS)):
            assert (path / str(index) / "model.safetensors").read_bytes() == (
                exported / str(index) / "model.safetensors"
            ).read_bytes()


def test_kernelgen_server_exports_export() -> None:
    assert kernelgen_server.export is export
    assert issubclass(kernelgen_server.ExportWarning, UserWarning)


# -- film_after_pos_embed without FiLM: accepted, with a warning ----------------------------------


def test_film_after_pos_embed_without_film_is_exported_false_with_a_warning(tmp_path: Path) -> None:
    """The package accepts the flag without FiLM and modulates nothing: the served kernel is the layer's,
    and config.json says what the layer does (false), warning that the module said otherwise."""
    torch.manual_seed(0)
    kernel = LazyConfig(K.SIRENKernelND)(
        out_dim=4, data_dim=1, mlp_hidden_dim=8, num_layers=3, embedding_dim=8, omega_0=5.0, L_cache=9,
        use_bias=True, film_after_pos_embed=True,
    )  # fmt: skip
    conv = CKConvND(data_dim=1, hidden_dim=4, kernel_cfg=kernel, mask_cfg=LazyConfig(nn.Identity)(),
                    grid_type="double", fft_padding="zero", is_causal=True)  # fmt: skip
    with pytest.warns(ExportWarning, match=r"film_after_pos_embed true.*modulates nothing.*says false"):
        path = export(conv.eval(), tmp_path, "plain")
    config = ModelConfig.from_file(path / "0" / "config.json")
    assert (config.film_after_pos_embed, config.film, config.causal) == (False, None, True)
    R.assert_serves_layer(R.load_member(path / "0"), conv, None)


# -- refusals: naming the generator, writing nothing ---------------------------------------------


class HannModulationND(nn.Module):
    """A mask kernelgen does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.width = nn.Parameter(torch.ones(1, R.CHANNELS))


class Spline(nn.Module):
    """A generator kernelgen does not know, where a layer keeps its kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.knots = nn.Parameter(torch.zeros(4))


def _changed(network: R.Network, index: int, change: Any) -> R.Lightning:
    copied = copy.deepcopy(network)
    change(copied.convs()[index])
    return R.Lightning(copied)


REFUSALS: dict[str, tuple[int, Any, str]] = {
    "unknown-mask": (
        4,
        lambda conv: setattr(conv, "mask", HannModulationND()),
        "'network.blocks.4.mixer.global_conv' masks its kernel with a HannModulationND, which kernelgen "
        "does not know",
    ),
    "unknown-generator": (
        6,
        lambda conv: setattr(conv, "kernel", Spline()),
        "generator 'network.blocks.6.mixer.global_conv.kernel' is a Spline, which kernelgen does not know",
    ),
    "unknown-activation": (
        2,
        lambda conv: conv.kernel.kernel_network.__setitem__(1, nn.ELU()),
        "generator 'network.blocks.2.mixer.global_conv.kernel': its activation is a ELU",
    ),
    "l-cache-changed": (
        0,
        lambda conv: setattr(conv.kernel, "L_cache", 12),
        "L_cache is 12 but its grid's step is",
    ),
    # The package's forward multiplies by its omega_0_const buffer; kernelgen rebuilds it from omega_0.
    "a-setting-the-forward-does-not-use": (
        7,
        lambda conv: setattr(conv.kernel.positional_embedding, "omega_0", 9.0),
        "generator 'network.blocks.7.mixer.global_conv.kernel': the served kernel differs from the layer's",
    ),
}


@pytest.mark.parametrize(("index", "change", "expected"), REFUSALS.values(), ids=REFUSALS.keys())
def test_what_kernelgen_cannot_serve_exactly_is_refused_and_nothing_written(
    trained: tuple[R.Network, Tensor], tmp_path: Path, index: int, change: Any, expected: str
) -> None:
    module = _changed(trained[0], index, change)
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        export(module, tmp_path / "repo", "net")
    assert "\n" not in str(info.value)
    assert nothing_in(tmp_path / "repo")


def test_the_check_can_be_left_out(trained: tuple[R.Network, Tensor], tmp_path: Path) -> None:
    index, change, _ = REFUSALS["a-setting-the-forward-does-not-use"]
    path = export(_changed(trained[0], index, change), tmp_path, "net", check=False)
    assert ModelConfig.from_file(path / str(index) / "config.json").omega_0 == 9.0


def test_the_same_network_again_writes_nothing_and_another_replaces_it_only_with_force(
    trained: tuple[R.Network, Tensor], tmp_path: Path
) -> None:
    network, _ = trained
    path = export(network, tmp_path, "net")
    files = {p: p.stat().st_ino for p in sorted(path.rglob("*"))}
    weights = (path / "3" / "model.safetensors").read_bytes()
    assert export(network, tmp_path, "net") == path
    assert {p: p.stat().st_ino for p in sorted(path.rglob("*"))} == files  # nothing rewritten
    other = copy.deepcopy(network)
    with torch.no_grad():
        other.convs()[3].kernel.out_linear.bias.add_(0.5)
    with pytest.raises(FileExistsError, match="already holds a group; pass --force"):
        export(other, tmp_path, "net")
    assert {p: p.stat().st_ino for p in sorted(path.rglob("*"))} == files
    export(other, tmp_path, "net", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]
    assert (path / "3" / "model.safetensors").read_bytes() != weights


def test_a_module_without_generators_or_a_bad_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"<Sequential>: no kernel generator found"):
        export(nn.Sequential(nn.Linear(2, 2)), tmp_path, "net")
    with pytest.raises(ValueError, match=r"invalid model name 'a/b'"):
        export(nn.Sequential(), tmp_path, "a/b")
    assert nothing_in(tmp_path)


def test_kernelgen_s_own_generators_are_found_beside_any_layer(tmp_path: Path) -> None:
    """A generator need not sit in a CKConvND: kernelgen's SIRENKernelND in a plain module is found too."""
    from kernelgen_server.model.siren import SIRENKernelND

    class Filter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = SIRENKernelND(4, 2, 8, 3, 8, 10.0, [5, 6], True, film_cfg={"cond_dim": 3})

    network = nn.ModuleDict({"a": Filter(), "b": nn.Linear(2, 2), "c": Filter()})
    assert [layer.source for layer in find_layers(network)] == ["a.kernel", "c.kernel"]
    path = export(network, tmp_path, "net")
    for index, name in enumerate(["a", "c"]):
        model = R.load_member(path / str(index))
        generator = network[name].kernel
        rows = torch.randn(2, 3)
        with torch.no_grad():
            assert torch.equal(model((4, 7), rows)[0], generator((4, 7), rows)[0])


def test_the_check_of_a_large_grid_evaluates_fewer_points() -> None:
    from kernelgen_server.repository.export import CHECK_POINTS, check_lens

    assert check_lens([16]) == [16] and check_lens([6, 8]) == [6, 8]
    big = check_lens([64, 64, 64])
    assert math.prod(2 * n - 1 for n in big) <= CHECK_POINTS and min(big) > 2
    assert check_lens([1 << 20])[0] * 2 - 1 <= CHECK_POINTS
