"""``--check-correctness``: a uniform sample of responses recomputed in-process and compared.

The sample is a reservoir over the successful measured responses of a step,
taken as they arrive (copying only the kernels kept); the recomputation runs
after the step, with the server package's model (``kernelgen_server``, the
``server`` extra), so it costs the measurement nothing.

Tolerance, per DESIGN.md section 1: float32 kernels within
``1e-4 * max|reference|``; float16/bfloat16 kernels are float32 kernels rounded
once more, so each element may also be off by one unit in the last place of
that dtype (``2**-10`` resp. ``2**-7`` relative).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Checker", "Kept", "Reservoir", "server_package_missing"]

T = TypeVar("T")
REL_TOLERANCE = 1e-4
#: One unit in the last place, relative, of the reduced output dtypes.
ULP = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}


@dataclass(frozen=True)
class Kept:
    """A response kept for checking: what was asked, and the kernel as float32."""

    model: str
    seq_lens: tuple[int, ...]
    conditioning: npt.NDArray[np.float32] | None
    dtype: str
    kernel: npt.NDArray[np.float32]
    model_hash: str


class Reservoir(Generic[T]):
    """Uniform sample of at most ``size`` items of a stream of unknown length (algorithm R).

    ``offer`` takes a factory, so an item is only built (its kernel copied) when it is kept.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.items: list[T] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def offer(self, make: Callable[[], T]) -> None:
        if self.size <= 0:
            return
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(make())
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:  # invariant: each item seen so far is kept with probability size/seen
            self.items[slot] = make()


def server_package_missing() -> str | None:
    """Why ``--check-correctness`` cannot run here, or ``None`` when it can."""
    try:
        import kernelgen_server.repository  # noqa: F401
    except ImportError as exc:
        return (
            f"--check-correctness recomputes kernels with the server package, which is not installed "
            f"({exc}): pip install 'kernelgen[server]'"
        )
    return None


@dataclass
class CheckResult:
    checked: int = 0
    mismatches: int = 0
    #: Responses that could not be checked here (a model missing locally or with other weights).
    skipped: int = 0
    #: Largest error relative to its tolerance (<= 1 passes).
    worst: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "mismatches": self.mismatches,
            "skipped": self.skipped,
            "worst_error_over_tolerance": self.worst,
            "notes": self.notes,
        }


class Checker:
    """Recomputes kept responses with the models of ``model_repo`` (default: the embedded ones)."""

    def __init__(self, model_repo: Path | None = None) -> None:
        from kernelgen_server.repository import ModelRepository, embedded_repository

        self.repository = ModelRepository.load(model_repo or embedded_repository())

    def check(self, kept: Iterable[Kept]) -> CheckResult:
        import numpy as np
        import torch

        result = CheckResult()
        for item in kept:
            model = self.repository.ready.get(item.model)
            if model is None:
                result.skipped += 1
                _note(result, f"model {item.model!r} is not in the local repository {self.repository.root}")
                continue
            if item.model_hash and model.content_hash != item.model_hash:
                result.skipped += 1
                _note(result, f"model {item.model!r}: the local weights differ from the server's (hash)")
                continue
            cond = None if item.conditioning is None else torch.from_numpy(item.conditioning)
            with torch.inference_mode():
                reference = model.module(item.seq_lens, cond)[0].to(torch.float64).numpy()
            result.checked += 1
            if reference.shape != item.kernel.shape:
                result.mismatches += 1
                _note(result, f"{item.model}: shape {item.kernel.shape}, expected {reference.shape}")
                continue
            scale = float(np.abs(reference).max())
            tolerance = REL_TOLERANCE * scale + ULP[item.dtype] * np.abs(reference)
            error = np.abs(item.kernel.astype(np.float64) - reference)
            ratio = float((error / np.maximum(tolerance, 1e-30)).max()) if error.size else 0.0
            result.worst = max(result.worst, ratio)
            if ratio > 1.0 or not np.isfinite(error).all():
                result.mismatches += 1
                _note(
                    result, f"{item.model} {list(item.seq_lens)} {item.dtype}: error {ratio:.2g}x tolerance"
                )
        return result


def _note(result: CheckResult, text: str) -> None:
    if text not in result.notes and len(result.notes) < 10:
        result.notes.append(text)
