"""Exit codes of ``kernelgen loadtest``."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_PASSED", "EXIT_USAGE"]

#: Every step passed its gates.
EXIT_PASSED = 0
#: A step failed a gate (error rate, p99 SLO or correctness).
EXIT_FAILED = 1
#: Bad arguments or workload.
EXIT_USAGE = 2
#: Interrupted; finished steps are still reported and written.
EXIT_INTERRUPTED = 130
