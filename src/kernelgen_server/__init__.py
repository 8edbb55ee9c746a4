"""kernelgen server: loads SIREN kernel generators and serves them over gRPC.

Attributes load lazily so that ``kernelgen_server.ops.cli``, this package's entry in
the ``kernelgen.commands`` entry-point group, can be imported without paying for
torch (the ``kernelgen`` command builds its parser from it on every start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernelgen_server.model.siren import FiLMConfig, KernelFiLMGenerator, SIRENKernelND

__all__ = ["FiLMConfig", "KernelFiLMGenerator", "SIRENKernelND"]

_LAZY = {name: "kernelgen_server.model.siren" for name in __all__}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernelgen_server' has no attribute {name!r}")
