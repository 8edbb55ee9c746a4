"""A masked model's mask as the wire describes it, for whoever materialises factored kernels.

A served model may multiply its generator's kernel by an attenuation mask that
is a product over axes, per output channel: ``m_c(x) = prod_d g(x_d; p[d, c])``
at grid point ``x``, with ``g`` one of the ``MaskForm`` functions and ``p`` a
``[data_dim, out_dim]`` parameter (``KernelMask`` in the ``OutputHead``
message). A factored kernel is then ``m * (factors @ weight_t + bias)``: the
client computes ``m`` on the kernel's grid from the mask's parameter, once per
shape, with the coordinates both ends compute (``kernelgen_wire.grids``).

The factors are evaluated in float64 and their product rounded once to
float32; the server computes the mask in float32 as the reference package
does, so the two agree to a few float32 roundings of ``m``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from kernelgen_wire.grids import axis_coordinates
from kernelgen_wire.sizes import seq_lens_of
from kernelgen_wire.v1 import kernelgen_pb2 as pb

__all__ = ["MASK_FORMS", "axis_factors", "mask_values"]

Float64 = npt.NDArray[np.float64]


def _gaussian(t: Float64, std: Float64) -> Float64:
    result: Float64 = np.exp(-0.5 * np.square(t[:, None] / std[None, :]))
    return result


def _exponential(t: Float64, rate: Float64) -> Float64:
    result: Float64 = np.exp(-np.abs(t)[:, None] * rate[None, :])
    return result


#: Each form's axis factor ``g(t; p)``: coordinates ``[n]`` and one axis's parameters ``[C]`` to ``[n, C]``.
MASK_FORMS: dict[int, Callable[[Float64, Float64], Float64]] = {
    pb.MASK_FORM_GAUSSIAN: _gaussian,
    pb.MASK_FORM_EXPONENTIAL: _exponential,
}


def axis_factors(form: int, parameter: np.ndarray, axes: Sequence[np.ndarray]) -> list[Float64]:
    """``g(axes[d]; parameter[d])`` for each axis: one float64 ``[n_d, C]`` array per axis."""
    function = MASK_FORMS.get(int(form))
    if function is None:
        raise ValueError(f"unknown mask form {int(form)}")
    if parameter.ndim != 2 or parameter.shape[0] != len(axes):
        raise ValueError(f"a mask parameter of shape {list(parameter.shape)} does not fit {len(axes)} axes")
    p = parameter.astype(np.float64)
    return [function(np.asarray(t, np.float64), p[d]) for d, t in enumerate(axes)]


def mask_values(
    form: int, parameter: np.ndarray, spatial: Sequence[int], cache_lens: Sequence[int], causal: bool
) -> npt.NDArray[np.float32]:
    """The mask on a kernel's grid of ``spatial`` shape, ``[*spatial, C]`` float32 (C-contiguous)."""
    lens = seq_lens_of(spatial, causal)
    if len(cache_lens) != len(lens):
        raise ValueError(f"a mask over {len(cache_lens)} axes does not fit a {len(lens)}-D kernel")
    axes = [
        axis_coordinates(s, c, causal=causal and d == 0)
        for d, (s, c) in enumerate(zip(lens, cache_lens, strict=True))
    ]
    factors = axis_factors(form, parameter, axes)
    total = factors[0]
    for factor in factors[1:]:
        total = total[..., None, :] * factor.reshape(*([1] * (total.ndim - 1)), *factor.shape)
    return np.ascontiguousarray(total, dtype=np.float32)
