"""The model family: kernel generators with the exact reference semantics, their configs and output heads.

Pure torch, no serving concerns. Imports only ``kernelgen_server.errors`` of
the server; every other layer builds on this one.
"""

from kernelgen_server.model.siren import FiLMConfig, KernelFiLMGenerator, SIRENKernelND

__all__ = ["FiLMConfig", "KernelFiLMGenerator", "SIRENKernelND"]
