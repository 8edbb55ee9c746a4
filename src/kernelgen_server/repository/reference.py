"""The reference model of a repository, for checking served kernels elsewhere.

``open_reference`` is this package's entry in the ``kernelgen.reference``
entry-point group: the load tester's ``--check-correctness`` finds it there
(it never imports the server by name) and recomputes sampled responses with
``ServedModel.forward`` (the generator, its mask and the causal crop, the model's own
definition), not the serving engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from kernelgen_server.repository.store import ModelRepository, embedded_repository

__all__ = ["RepositoryReference", "open_reference"]


class RepositoryReference:
    """Kernels of a repository's models computed by their reference forward."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.source = str(repository.root)

    def kernel(
        self,
        model: str,
        seq_lens: tuple[int, ...],
        conditioning: npt.NDArray[np.float32] | None,
        content_hash: str,
    ) -> npt.NDArray[np.float64] | str:
        loaded = self.repository.ready.get(model)
        if loaded is None:
            return f"model {model!r} is not in the local repository {self.source}"
        if content_hash and loaded.content_hash != content_hash:
            return f"model {model!r}: the local weights differ from the server's (hash)"
        cond = None if conditioning is None else torch.from_numpy(conditioning)
        with torch.inference_mode():
            kernel = loaded.module(seq_lens, cond)[0]
        result: npt.NDArray[np.float64] = kernel.to(torch.float64).numpy()
        return result


def open_reference(model_repo: Path | None = None) -> RepositoryReference:
    """The models of ``model_repo``, or the embedded ones."""
    return RepositoryReference(ModelRepository.load(model_repo or embedded_repository()))
