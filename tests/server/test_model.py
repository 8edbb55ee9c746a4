"""SIRENKernelND against an independent float64 evaluation, flop counts, config checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelgen_server.model.siren import SIRENKernelND

erf = np.vectorize(math.erf)


def reference_kernel(
    state: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    seq_lens: tuple[int, ...],
    conditioning: np.ndarray | None,
) -> np.ndarray:
    """The kernel in float64, written from the reference documentation alone."""
    p = {k: v.detach().double().numpy() for k, v in state.items()}
    d = cfg["data_dim"]
    cache = cfg["L_cache"] if isinstance(cfg["L_cache"], list) else [cfg["L_cache"]] * d
    axes = [np.arange(-(s - 1), s, dtype=np.float64) / (c - 1) for s, c in zip(seq_lens, cache, strict=True)]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)[None]  # [1, *spatial, D]

    def linear(h: np.ndarray, name: str) -> np.ndarray:
        out = h @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    films: list[tuple[np.ndarray, np.ndarray]] = []
    if conditioning is not None and "film_generator.mlp.0.weight" in p:
        z = linear(conditioning.astype(np.float64), "film_generator.mlp.0")
        z = 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
        z = linear(z, "film_generator.mlp.2")
        hdim = cfg["mlp_hidden_dim"]
        spatial = (1,) * d
        for chunk in np.split(z, z.shape[1] // (2 * hdim), axis=1):
            b = chunk.shape[0]
            films.append(
                (chunk[:, :hdim].reshape(b, *spatial, hdim), chunk[:, hdim:].reshape(b, *spatial, hdim))
            )

    h = np.sin(linear(x, "positional_embedding.linear"))
    pairs = iter(films)
    if films and cfg.get("film_after_pos_embed", False):
        g, b = next(pairs)
        h = g * h + b
    for i in range(cfg["num_layers"] - 1):
        h = np.sin(linear(h, f"hidden_linears.{i}"))
        if films:
            g, b = next(pairs)
            h = g * h + b
    return linear(h, "out_linear")


def make_model(cfg: dict[str, Any], seed: int) -> SIRENKernelND:
    torch.manual_seed(seed)
    film = cfg.get("film")
    model = SIRENKernelND(
        out_dim=cfg["out_dim"],
        data_dim=cfg["data_dim"],
        mlp_hidden_dim=cfg["mlp_hidden_dim"],
        num_layers=cfg["num_layers"],
        embedding_dim=cfg["embedding_dim"],
        omega_0=cfg["omega_0"],
        L_cache=cfg["L_cache"],
        use_bias=cfg["use_bias"],
        film_cfg=film,
        film_after_pos_embed=cfg.get("film_after_pos_embed", False),
    )
    return model.eval()


def assert_matches_reference(
    model: SIRENKernelND, cfg: dict[str, Any], seq_lens: tuple[int, ...], cond: torch.Tensor | None
) -> None:
    with torch.no_grad():
        kernel, grid = model(seq_lens, cond)
    ref = reference_kernel(model.state_dict(), cfg, seq_lens, None if cond is None else cond.numpy())
    batch = 1 if cond is None or model.film_generator is None else cond.shape[0]
    spatial = tuple(2 * s - 1 for s in seq_lens)
    assert tuple(kernel.shape) == (batch, *spatial, cfg["out_dim"])
    assert tuple(grid.shape) == (1, *spatial, cfg["data_dim"])
    assert kernel.dtype == torch.float32
    assert grid.dtype == torch.float32
    err = np.abs(kernel.double().numpy() - ref).max()
    assert err <= 1e-4 * np.abs(ref).max(), (err, np.abs(ref).max())


CASES = [
    # (config, seq_lens): below, equal to and above L_cache; 1D/2D/3D; anisotropic.
    (
        dict(
            out_dim=5,
            data_dim=1,
            mlp_hidden_dim=16,
            num_layers=3,
            embedding_dim=8,
            omega_0=30.0,
            L_cache=64,
            use_bias=True,
        ),
        (17,),
    ),
    (
        dict(
            out_dim=5,
            data_dim=1,
            mlp_hidden_dim=16,
            num_layers=2,
            embedding_dim=8,
            omega_0=30.0,
            L_cache=16,
            use_bias=False,
        ),
        (16,),
    ),
    (
        dict(
            out_dim=7,
            data_dim=1,
            mlp_hidden_dim=12,
            num_layers=4,
            embedding_dim=12,
            omega_0=10.0,
            L_cache=8,
            use_bias=True,
        ),
        (20,),
    ),
    (
        dict(
            out_dim=6,
            data_dim=2,
            mlp_hidden_dim=16,
            num_layers=3,
            embedding_dim=16,
            omega_0=10.0,
            L_cache=[6, 9],
            use_bias=True,
        ),
        (4, 12),
    ),
    (
        dict(
            out_dim=4,
            data_dim=3,
            mlp_hidden_dim=8,
            num_layers=3,
            embedding_dim=6,
            omega_0=5.0,
            L_cache=[3, 4, 5],
            use_bias=False,
        ),
        (3, 4, 6),
    ),
]

FILM_CASES = [
    (
        dict(
            out_dim=6,
            data_dim=2,
            mlp_hidden_dim=16,
            num_layers=3,
            embedding_dim=16,
            omega_0=10.0,
            L_cache=15,
            use_bias=True,
            film={"cond_dim": 12, "film_hidden_dim": 20},
        ),
        (15, 15),
    ),
    (
        dict(
            out_dim=6,
            data_dim=2,
            mlp_hidden_dim=16,
            num_layers=4,
            embedding_dim=16,
            omega_0=10.0,
            L_cache=[5, 7],
            use_bias=False,
            film={"cond_dim": 3},
            film_after_pos_embed=True,
        ),
        (6, 3),
    ),
    (
        dict(
            out_dim=3,
            data_dim=1,
            mlp_hidden_dim=8,
            num_layers=2,
            embedding_dim=4,
            omega_0=30.0,
            L_cache=32,
            use_bias=True,
            film={"cond_dim": 5, "film_hidden_dim": 7},
        ),
        (40,),
    ),
    (
        dict(
            out_dim=4,
            data_dim=3,
            mlp_hidden_dim=8,
            num_layers=3,
            embedding_dim=8,
            omega_0=8.0,
            L_cache=[4, 4, 6],
            use_bias=True,
            film={"cond_dim": 4},
            film_after_pos_embed=True,
        ),
        (2, 5, 3),
    ),
]


@pytest.mark.parametrize(("cfg", "seq_lens"), CASES)
def test_unconditioned_matches_float64_reference(cfg: dict[str, Any], seq_lens: tuple[int, ...]) -> None:
    assert_matches_reference(make_model(cfg, seed=1), cfg, seq_lens, None)


@pytest.mark.parametrize(("cfg", "seq_lens"), FILM_CASES)
def test_film_matches_float64_reference(cfg: dict[str, Any], seq_lens: tuple[int, ...]) -> None:
    model = make_model(cfg, seed=2)
    cond = torch.randn(3, cfg["film"]["cond_dim"], generator=torch.Generator().manual_seed(3))
    assert_matches_reference(model, cfg, seq_lens, cond)
    # Without conditioning a FiLM model gives the plain, unmodulated kernel.
    assert_matches_reference(model, cfg, seq_lens, None)


@settings(max_examples=25, deadline=None)
@given(
    data_dim=st.integers(1, 3),
    hidden=st.integers(2, 12),
    layers=st.integers(2, 4),
    use_bias=st.booleans(),
    film=st.booleans(),
    after=st.booleans(),
    data=st.data(),
)
def test_random_configs_match_reference(
    data_dim: int, hidden: int, layers: int, use_bias: bool, film: bool, after: bool, data: st.DataObject
) -> None:
    cache = data.draw(st.lists(st.integers(2, 9), min_size=data_dim, max_size=data_dim))
    seq = tuple(data.draw(st.lists(st.integers(1, 11), min_size=data_dim, max_size=data_dim)))
    cfg: dict[str, Any] = dict(
        out_dim=data.draw(st.integers(1, 5)),
        data_dim=data_dim,
        mlp_hidden_dim=hidden,
        num_layers=layers,
        embedding_dim=hidden if after else data.draw(st.integers(1, 9)),
        omega_0=data.draw(st.sampled_from([1.0, 10.0, 30.0])),
        L_cache=cache,
        use_bias=use_bias,
    )
    cond = None
    if film:
        cfg["film"] = {"cond_dim": 3, "film_hidden_dim": 5}
        cfg["film_after_pos_embed"] = after
        cond = torch.randn(data.draw(st.integers(1, 3)), 3)
    assert_matches_reference(make_model(cfg, seed=data.draw(st.integers(0, 1000))), cfg, seq, cond)


def test_grid_is_nested_and_keeps_step_past_cache() -> None:
    model = make_model(CASES[3][0], seed=0)
    small, large = model.grid((2, 3)), model.grid((10, 20))
    # The short grid is bit-for-bit the centre of the long one (cache growth keeps the step).
    assert torch.equal(large[:, 8:11, 17:22], small)
    assert large[0, 0, 0, 0].item() == pytest.approx(-9 / 5)
    assert large[0, 1, 0, 0].item() - large[0, 0, 0, 0].item() == pytest.approx(1 / 5)
    torch.testing.assert_close(model.grid((6, 9))[0, :, 0, 0], torch.linspace(-1, 1, 11), rtol=0, atol=1e-7)


def test_conditioning_without_film_is_ignored_by_the_model() -> None:
    model = make_model(CASES[0][0], seed=0)
    with torch.no_grad():
        plain, _ = model((9,))
        cond, _ = model((9,), torch.randn(4, 3))
    assert torch.equal(plain, cond)


def test_fresh_film_model_responds_to_conditioning() -> None:
    cfg = FILM_CASES[0][0]
    model = make_model(cfg, seed=0)
    with torch.no_grad():
        kernel, _ = model((5, 5), torch.randn(2, 12))
    diff = (kernel[0] - kernel[1]).abs().max() / kernel.abs().max()
    assert diff > 0.05


def test_wang_init_scales_readout_by_cache_volume() -> None:
    cfg = dict(CASES[3][0], out_dim=64, mlp_hidden_dim=64)
    model = make_model(cfg, seed=0)
    bound = math.sqrt(6.0 / 64) / math.sqrt(6 * 9)
    assert model.out_linear.weight.abs().max() <= bound
    assert model.out_linear.weight.abs().max() > 0.9 * bound


# --- flop_count, against hand-computed integers ------------------------------------------------


def test_flop_count_1d_unconditioned() -> None:
    m = SIRENKernelND(
        out_dim=8,
        data_dim=1,
        mlp_hidden_dim=16,
        num_layers=3,
        embedding_dim=16,
        omega_0=1.0,
        L_cache=10,
        use_bias=True,
    )
    # G = 9: pos 2*9*1*16 + 9*16 = 432; hidden 2 x (2*9*16*16 + 9*16) = 9504; out 2*9*16*8 = 2304.
    assert m.flop_count(5) == 12240
    assert m.flop_count((5,)) == 12240
    assert m.flop_count(5, inference=True) == 0


def test_flop_count_2d_with_film() -> None:
    m = SIRENKernelND(
        out_dim=4,
        data_dim=2,
        mlp_hidden_dim=8,
        num_layers=2,
        embedding_dim=4,
        omega_0=1.0,
        L_cache=4,
        use_bias=True,
        film_cfg={"cond_dim": 3, "film_hidden_dim": 5},
    )
    # G = 5*3 = 15: pos 300, hidden 1080, out 960; FiLM generator 2*3*5 + 5 + 2*5*16 = 195;
    # modulation 1 layer x 2*15*8 = 240.
    assert m.film_generator is not None
    assert m.film_generator.flop_count() == 195
    assert m.flop_count((3, 2)) == 2775
    assert m.flop_count((3, 2), inference=True) == 2775


def test_flop_count_3d_film_after_pos_embed() -> None:
    m = SIRENKernelND(
        out_dim=2,
        data_dim=3,
        mlp_hidden_dim=4,
        num_layers=4,
        embedding_dim=4,
        omega_0=1.0,
        L_cache=[2, 3, 4],
        use_bias=False,
        film_cfg={"cond_dim": 2, "film_hidden_dim": 3},
        film_after_pos_embed=True,
    )
    # G = 27: pos 756, hidden 972 + 2 x 972, out 432; FiLM generator 2*2*3 + 3 + 2*3*32 = 207;
    # modulation 4 layers x 2*27*4 = 864.
    assert m.flop_count(2) == 5175
    assert m.flop_count((2, 2, 2), inference=True) == 5175


# --- configuration checks ----------------------------------------------------------------------

BASE = dict(
    out_dim=4,
    data_dim=2,
    mlp_hidden_dim=8,
    num_layers=3,
    embedding_dim=8,
    omega_0=10.0,
    L_cache=8,
    use_bias=True,
)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 1}, "num_layers must be >= 2"),
        ({"L_cache": 1}, "L_cache must be >= 2"),
        ({"L_cache": True}, "L_cache must be an int"),
        ({"L_cache": [8, 8, 8]}, "L_cache has 3 entries but data_dim is 2"),
        ({"L_cache": [8, 1]}, r"L_cache\[1\] must be >= 2"),
        ({"out_dim": 0}, "out_dim must be >= 1"),
        ({"data_dim": 2.0}, "data_dim must be an int"),
        ({"omega_0": float("nan")}, "omega_0 must be a finite number"),
        ({"hidden_omega_0": -1.0}, "hidden_omega_0 must be a finite number"),
        ({"use_bias": 1}, "use_bias must be a bool"),
        ({"film_after_pos_embed": True}, "needs a FiLM config"),
        (
            {"film_after_pos_embed": True, "embedding_dim": 6, "film_cfg": {"cond_dim": 2}},
            "requires embedding_dim == mlp_hidden_dim",
        ),
        ({"film_cfg": {"cond_dim": 2, "num_film_layers": 3}}, "asks for 3 FiLM layers but the model has 2"),
        (
            {"film_cfg": {"cond_dim": 2, "num_film_layers": 2}, "film_after_pos_embed": True},
            "asks for 2 FiLM layers but the model has 3",
        ),
        ({"film_cfg": {"cond_dim": 0}}, "film cond_dim must be >= 1"),
        ({"film_cfg": {"cond": 2}}, "unknown keys"),
    ],
)
def test_invalid_configurations_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SIRENKernelND(**{**BASE, **change})


def test_seq_lens_are_checked() -> None:
    model = SIRENKernelND(**BASE)
    with pytest.raises(ValueError, match="seq_lens has 1 entries"):
        model((3,))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] must be >= 1"):
        model((0, 3))
    with pytest.raises(ValueError, match="must be an int"):
        model((True, 3))


def test_state_dict_names() -> None:
    m = SIRENKernelND(**{**BASE, "film_cfg": {"cond_dim": 2}, "use_bias": False})
    assert set(m.state_dict()) == {
        "positional_embedding.linear.weight",
        "hidden_linears.0.weight",
        "hidden_linears.1.weight",
        "out_linear.weight",
        "film_generator.mlp.0.weight",
        "film_generator.mlp.0.bias",
        "film_generator.mlp.2.weight",
        "film_generator.mlp.2.bias",
    }
