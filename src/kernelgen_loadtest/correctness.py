"""``--check-correctness``: a uniform sample of responses recomputed in-process and compared.

The sample is a reservoir over the successful measured responses of a step,
taken as they arrive (copying only the kernels kept); the recomputation runs
after the step, so it costs the measurement nothing.

The reference model is not this package's: it comes from the
``kernelgen.reference`` entry-point group, which the server package fills
(``kernelgen_server.repository.reference``, the ``server`` extra). An entry point names a
function ``open_reference(model_repo: Path | None) -> Reference``.

Tolerance, per docs/architecture.md ("Exactness"): float32 kernels within
``1e-4 * max|reference|``; float16/bfloat16 kernels are float32 kernels rounded
once more, so each element may also be off by one unit in the last place of
that dtype (``2**-10`` resp. ``2**-7`` relative).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["REFERENCE_GROUP", "Checker", "Kept", "Reference", "Reservoir", "reference_missing"]

T = TypeVar("T")
#: Entry-point group of the functions that open a reference model repository.
REFERENCE_GROUP = "kernelgen.reference"
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
    content_hash: str
    #: What the reduced dtype's rounding scales with, per element: ``|kernel|`` when None (a
    #: dense kernel rounded once); for factors rounded once, ``|factors| @ |W^T|``.
    rounding_bound: npt.NDArray[np.float32] | None = None


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


class Reference(Protocol):
    """Recomputes kernels with the reference model of a repository."""

    #: Where its models come from, for messages.
    source: str

    def kernel(
        self,
        model: str,
        seq_lens: tuple[int, ...],
        conditioning: npt.NDArray[np.float32] | None,
        content_hash: str,
    ) -> npt.NDArray[np.float64] | str:
        """The float64 kernel, or why this repository cannot recompute it (a missing model, other weights)."""
        ...


def _opener() -> Callable[[Path | None], Reference] | str:
    """The first installed ``open_reference``, or why there is none."""
    found = sorted(entry_points(group=REFERENCE_GROUP), key=lambda e: e.name)
    problems = []
    for entry in found:
        try:
            opener: Callable[[Path | None], Reference] = entry.load()
        except ImportError as exc:
            problems.append(str(exc))
            continue
        return opener
    detail = f" ({'; '.join(problems)})" if problems else ""
    return (
        f"--check-correctness recomputes kernels with the server package's reference model, "
        f"which is not installed{detail}: pip install 'kernelgen[server]'"
    )


def reference_missing() -> str | None:
    """Why ``--check-correctness`` cannot run here, or ``None`` when it can."""
    opener = _opener()
    return opener if isinstance(opener, str) else None


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
        opener = _opener()
        if isinstance(opener, str):
            raise RuntimeError(opener)
        self.reference = opener(model_repo)

    def check(self, kept: Iterable[Kept]) -> CheckResult:
        import numpy as np

        result = CheckResult()
        for item in kept:
            reference = self.reference.kernel(item.model, item.seq_lens, item.conditioning, item.content_hash)
            if isinstance(reference, str):
                result.skipped += 1
                _note(result, reference)
                continue
            result.checked += 1
            if reference.shape != item.kernel.shape:
                result.mismatches += 1
                _note(result, f"{item.model}: shape {item.kernel.shape}, expected {reference.shape}")
                continue
            scale = float(np.abs(reference).max())
            rounded = np.abs(reference) if item.rounding_bound is None else item.rounding_bound
            tolerance = REL_TOLERANCE * scale + ULP[item.dtype] * rounded
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
