"""The size of a kernel before it is computed: what a request will need room for."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kernelgen_server.core.tensors import decode_output_dtype, itemsize
from kernelgen_server.repository.store import LoadedModel

__all__ = ["payload_bytes"]


def payload_bytes(model: LoadedModel, lens: Sequence[int], rows: int, dtype: int, factored: bool) -> int:
    """Bytes of the kernel (or, ``factored``, its factors) of ``rows`` rows of wire ``dtype``.

    Raises ``InvalidRequest`` for an unknown dtype, as the service would.
    """
    module = model.module
    width = module.mlp_hidden_dim if factored else module.out_dim
    points = math.prod(2 * n - 1 for n in lens)
    return rows * points * width * itemsize(decode_output_dtype(dtype))
