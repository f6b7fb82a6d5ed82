"""The integers behind fake-quantized tensors, read from the quantizer modules themselves.

Each quantizer is asked for its own output (the project's one fake-quantization formula); the integers are then
``round(x̂ / s) + z``, which is exact because x̂ = (q - z)·s with |q - z| < 2^8, and checked: a quantizer whose
output is not on its grid is refused rather than exported approximately. The ONNX graph and the record both take
their integers from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evolq_pl.export.errors import ExportError
from evolq_pl.quant.functional import broadcast_shape
from evolq_pl.quant.layers import QConv2d, QLinear
from evolq_pl.quant.quantizer import FakeQuantizer


@dataclass(frozen=True)
class WeightGrid:
    """A weight as integers: w = gain·(values - zero_point)·scale + offset, per output channel (axis 0).

    ``gain``/``offset`` are None without bias correction, which makes each row's dequantized weight an affine
    function of its grid values (it re-matches the row's mean and std to the FP weight).
    """

    values: np.ndarray  # int64, the weight's shape
    scale: np.ndarray  # float32 [out]
    zero_point: np.ndarray  # int64 [out]
    bits: int
    signed: bool
    gain: np.ndarray | None = None  # float64 [out]
    offset: np.ndarray | None = None  # float64 [out]

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


def zero_points(q: FakeQuantizer, name: str) -> np.ndarray:
    """The quantizer's zero points as integers, checked to lie on its grid."""
    zp = q.zero_point.detach().cpu().double().numpy()
    if not np.array_equal(zp, np.round(zp)) or zp.min() < q.bit_type.qmin or zp.max() > q.bit_type.qmax:
        raise ExportError(f"{name}: zero points {zp.min():g}..{zp.max():g} are not integers of "
                          f"{q.bit_type.name}; recalibrate the model")
    return zp.astype(np.int64)


def scales(q: FakeQuantizer, name: str) -> np.ndarray:
    s = q.scale.detach().cpu().float().numpy()
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ExportError(f"{name}: scales must be finite and > 0 for an integer export; recalibrate the model")
    return s


@torch.no_grad()
def grid_values(q: FakeQuantizer, x: torch.Tensor, name: str) -> np.ndarray:
    """Integers q with x̂ = (q - z)·s, where x̂ is the quantizer's own output for ``x``."""
    x = x.detach().float()
    x_hat = q(x)
    shape = broadcast_shape(x, q.dim)
    s, z = q.scale.detach().float().reshape(shape), q.zero_point.detach().float().reshape(shape)
    values = torch.round(x_hat / s) + z
    if not torch.equal((values - z) * s, x_hat):
        raise ExportError(f"{name}: the quantizer's output is not on its integer grid, so it cannot be stored as "
                          "integers; is quantization switched on (set_quantized)?")
    if values.min() < q.bit_type.qmin or values.max() > q.bit_type.qmax:
        raise ExportError(f"{name}: grid values leave {q.bit_type.name}'s range")
    return values.cpu().numpy().astype(np.int64)


@torch.no_grad()
def weight_grid(layer: QLinear | QConv2d, name: str) -> WeightGrid:
    """The integer form of a quantized layer's weight, bias correction included as a per-row affine map."""
    q = layer.weight_quantizer
    w = layer.weight.detach().float()
    values = grid_values(q, w, name)
    grid = WeightGrid(values, scales(q, name), zero_points(q, name), q.bit_type.bits, q.bit_type.signed)
    if not layer.bias_correction:
        return grid
    gain, offset = _row_affine(q(w), layer.quantized_weight().float(), name)
    return WeightGrid(values, grid.scale, grid.zero_point, grid.bits, grid.signed, gain, offset)


def _row_affine(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row r, (a_r, c_r) with y_r = a_r·x_r + c_r, fitted in float64 and checked to hold.

    Read from the layer's own corrected weight instead of re-deriving the correction formula; a correction that
    is not affine per row is refused.
    """
    xs = x.double().reshape(x.shape[0], -1)
    ys = y.double().reshape(y.shape[0], -1)
    xc, yc = xs - xs.mean(dim=1, keepdim=True), ys - ys.mean(dim=1, keepdim=True)
    var = (xc * xc).sum(dim=1)
    gain = torch.where(var > 0, (xc * yc).sum(dim=1) / var.clamp(min=1e-300), torch.ones_like(var))
    offset = ys.mean(dim=1) - gain * xs.mean(dim=1)
    error = (gain[:, None] * xs + offset[:, None] - ys).abs().max()
    if error > 1e-5 * float(ys.abs().max()) + 1e-12:
        raise ExportError(f"{name}: its bias correction is not a per-row affine map of the grid values "
                          f"(residual {float(error):.3g}), so it has no exact integer form")
    return gain.numpy(), offset.numpy()
