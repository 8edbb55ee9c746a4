"""kernelgen server: loads SIREN kernel generators and serves them over gRPC.

``export(module, repo, name)`` writes the kernel generators of a live network
(with their layers' masks and causal crops) into a model repository as one
group (``repository.export``).

Attributes load lazily so that ``kernelgen_server.ops.cli``, this package's entry in
the ``kernelgen.commands`` entry-point group, can be imported without paying for
torch (the ``kernelgen`` command builds its parser from it on every start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernelgen_server.model.siren import FiLMConfig, KernelFiLMGenerator, SIRENKernelND
    from kernelgen_server.repository.export import ExportWarning, export

__all__ = ["ExportWarning", "FiLMConfig", "KernelFiLMGenerator", "SIRENKernelND", "export"]

_LAZY = {
    "FiLMConfig": "kernelgen_server.model.siren",
    "KernelFiLMGenerator": "kernelgen_server.model.siren",
    "SIRENKernelND": "kernelgen_server.model.siren",
    "ExportWarning": "kernelgen_server.repository.export",
    "export": "kernelgen_server.repository.export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernelgen_server' has no attribute {name!r}")
