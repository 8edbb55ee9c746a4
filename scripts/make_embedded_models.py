"""Regenerate the embedded model repository, ``src/kernelgen_server/models``.

Each model is written by ``kernelgen init`` with a fixed seed, so running this
again reproduces the committed files (same torch version: the initialisation
draws from torch's CPU generator).

    python scripts/make_embedded_models.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kernelgen_client.cli import main as kernelgen

#: name -> (seed, config.json contents)
EMBEDDED: dict[str, tuple[int, dict[str, Any]]] = {
    # A Hyena-style 2D filter: one FiLM row per request modulates every hidden layer.
    "hyena-2d": (
        1,
        {
            "out_dim": 384,
            "data_dim": 2,
            "mlp_hidden_dim": 32,
            "num_layers": 3,
            "embedding_dim": 32,
            "omega_0": 10.0,
            "L_cache": 15,
            "use_bias": True,
            "hidden_omega_0": 1.0,
            "film_after_pos_embed": False,
            "film": {"cond_dim": 384, "film_hidden_dim": 64},
        },
    ),
    # A long 1D sequence filter without conditioning: served from the cache.
    "long-1d": (
        2,
        {
            "out_dim": 256,
            "data_dim": 1,
            "mlp_hidden_dim": 32,
            "num_layers": 4,
            "embedding_dim": 32,
            "omega_0": 30.0,
            "L_cache": 4096,
            "use_bias": True,
            "hidden_omega_0": 1.0,
            "film_after_pos_embed": False,
            "film": None,
        },
    ),
    # An anisotropic 3D filter, no biases, FiLM also on the positional embedding.
    "volume-3d": (
        3,
        {
            "out_dim": 32,
            "data_dim": 3,
            "mlp_hidden_dim": 32,
            "num_layers": 3,
            "embedding_dim": 32,
            "omega_0": 10.0,
            "L_cache": [4, 8, 8],
            "use_bias": False,
            "hidden_omega_0": 1.0,
            "film_after_pos_embed": True,
            "film": {"cond_dim": 16, "film_hidden_dim": 32},
        },
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    from kernelgen_server.repository.store import embedded_repository

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=embedded_repository(),
        help="repository to write (default: the embedded one)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (seed, config) in EMBEDDED.items():
            config_path = Path(tmp) / f"{name}.json"
            config_path.write_text(json.dumps(config))
            argv_init = ["init", name, "--repo", str(args.out), "--config", str(config_path)]
            code = kernelgen([*argv_init, "--seed", str(seed), "--force"])
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
