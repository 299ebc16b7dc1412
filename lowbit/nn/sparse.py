"""``SparseLinear``: a Linear whose weight is 2:4 semi-structured sparse, in float or int8 (W8A8).

* ``weights=None``: the float weight (zeros where pruned; the mask is implicit in the zeros) runs
  through :func:`lowbit.kernels.sparse.sparse24_linear`: on CUDA in fp16/bf16 on the sparse tensor
  cores (cuSPARSELt) once ``M`` (tokens) is large enough for them to pay off, ``F.linear``
  otherwise and on the CPU.
* ``weights="qint8"`` (with ``activations="qint8"``, dynamic per token): an int8 per-output-channel
  QuantState (symmetric, as :func:`lowbit.kernels.api.prepare_int8` reads it) whose pruned
  entries are exactly 0, run through :func:`lowbit.kernels.sparse.sparse24_int8_linear_dynamic`
  (sparse int8 tensor cores, or lowbit's dense int8 kernel at small ``M``; the reference on the CPU).

The compressed cuSPARSELt form is built once per device and weight, on first use, and is not part
of the state dict: checkpoints hold the plain (zero-filled) weight or QuantState, so the native
format needs nothing new (``lowbit.save`` / ``lowbit.load``), and
:func:`lowbit.io.compressed_tensors_sparse.export_sparse24` writes compressed-tensors' 2:4 bitmask form.

Example::

    >>> lin = nn.Linear(256, 128)
    >>> sl = SparseLinear.from_pruned(lin, magnitude_prune(lin.weight)[0])
    >>> sl(torch.randn(4, 256)).shape
    torch.Size([4, 128])
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from lowbit.nn.qlinear import QLinear
from lowbit.tensor.state import QuantState


def check_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive input columns of every row has at most ``n`` non-zeros."""
    R, K = weight.shape
    return K % m == 0 and bool(((weight.reshape(R, K // m, m) != 0).sum(-1) <= n).all())


def parse_sparsity(sparsity: str):
    """``"2:4"`` -> ``(2, 4)``."""
    try:
        n, m = (int(v) for v in str(sparsity).split(":"))
    except ValueError:
        raise ValueError(f"sparsity={sparsity!r}: expected 'N:M', e.g. '2:4'") from None
    if (n, m) != (2, 4):
        raise ValueError(f"sparsity={sparsity!r}: SparseLinear runs 2:4 (the sparse tensor cores' pattern)")
    return n, m


class SparseLinear(QLinear):
    """2:4 sparse Linear, float (``weights=None``) or W8A8 int8 (``weights="qint8"``).

    ``backend`` (attribute, default None = ``"auto"``): ``"sparse"`` always runs cuSPARSELt, ``"dense"`` the
    dense kernels, ``"auto"`` the path the tuner measured cheaper for the shape and M bucket.
    ``tune_for`` (attribute, default None = :data:`lowbit.kernels.sparse.OBJECTIVE`, ``"eager"``): what
    ``"auto"`` minimises: ``"eager"`` counts PyTorch's per-call cuSPARSELt host work where it exceeds the
    GPU time, ``"graph"`` the GPU time alone (for a model captured in CUDA graphs; tune it with one eager
    call per shape before capturing). See :mod:`lowbit.kernels.sparse`."""

    backend: Optional[str] = None
    tune_for: Optional[str] = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 weights: Optional[str] = None, activations: Optional[str] = None, act_dynamic: bool = True,
                 sparsity: str = "2:4", group_size: Optional[int] = None, per_channel: bool = True) -> None:
        if weights is not None and str(weights).lower() not in ("qint8", "none"):
            raise ValueError(f"SparseLinear weights={weights!r}: expected None (float) or 'qint8'")
        if weights is not None and str(weights).lower() == "none":
            weights = None
        if weights is not None:
            activations = activations or "qint8"
            if activations != "qint8" or not act_dynamic:
                raise ValueError("SparseLinear with qint8 weights runs W8A8 with dynamic per-token int8 "
                                 f"activations; got activations={activations!r}, act_dynamic={act_dynamic!r}")
        elif activations not in (None, "none"):
            raise ValueError(f"SparseLinear with float weights takes no activation quantization, got {activations!r}")
        else:
            activations = None
        if group_size is not None or not per_channel:
            raise ValueError("SparseLinear int8 weights are per output channel (group_size=None, per_channel=True)")
        self.sparsity = str(sparsity)
        self._nm = parse_sparsity(sparsity)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype, weights=weights,
                         activations=activations, group_size=None, act_dynamic=act_dynamic, per_channel=True)
        if in_features % self._nm[1]:
            raise ValueError(f"SparseLinear: in_features={in_features} is not a multiple of {self._nm[1]}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pruned(cls, linear: nn.Linear, weight: Optional[torch.Tensor] = None,
                    state: Optional[QuantState] = None) -> "SparseLinear":
        """A float SparseLinear from a pruned ``weight`` (or the linear's own weight when None), or
        an int8 one from an int8 per-channel ``state``; checks the 2:4 pattern."""
        if state is not None:
            q = cls.from_module(linear, weights="qint8", activations="qint8", act_dynamic=True)
            if state.scheme != "int8" or state.layout != "channel" or state.axis != 0:
                raise ValueError(f"SparseLinear needs an int8 per-channel (axis 0) state, got scheme={state.scheme!r} "
                                 f"layout={state.layout!r} axis={state.axis}")
            if tuple(state.shape) != (linear.out_features, linear.in_features):
                raise ValueError(f"state shape {tuple(state.shape)} does not match the Linear "
                                 f"{(linear.out_features, linear.in_features)}")
            q.set_quant_state("weight", state)
            if not check_nm(q._int8()[0], *q._nm):
                raise ValueError("SparseLinear: the int8 weight is not 2:4 sparse along the input dimension")
            return q
        if weight is not None:
            with torch.no_grad():
                linear.weight.copy_(weight.to(linear.weight.dtype))
        q = cls.from_module(linear)
        if not check_nm(q.weight.detach(), *q._nm):
            raise ValueError("SparseLinear: the weight is not 2:4 sparse along the input dimension "
                             "(prune it first: lowbit.algorithms.sparsegpt)")
        return q

    def quant_config(self) -> Dict[str, Any]:
        return {"weights": self.weights, "activations": self.activations, "act_dynamic": self.act_dynamic,
                "sparsity": self.sparsity}

    # -- execution --------------------------------------------------------------------------------
    def _int8(self):
        from lowbit.kernels.api import prepare_int8

        st = self.__dict__.get("_lowbit_qstates", {}).get("weight")
        if st is None:
            raise RuntimeError("SparseLinear int8: no QuantState (freeze the module first)")
        return prepare_int8(st)

    def _packed(self, w: torch.Tensor) -> Optional[torch.Tensor]:
        """The cuSPARSELt-compressed weight, built once per (storage, device, dtype)."""
        if not w.is_cuda:
            return None
        key = (w.data_ptr(), w.device, w.dtype, w._version)
        cache = self.__dict__.get("_lowbit_packed")
        if cache is not None and cache[0] == key:
            return cache[1]
        from lowbit.kernels.sparse import prepare_24

        packed = prepare_24(w)
        self.__dict__["_lowbit_packed"] = (key, packed)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.kernels import sparse as ks

        if self.weights is None:
            w = self.weight
            if w.dtype != x.dtype:
                w = w.to(x.dtype)
            return ks.sparse24_linear(x, w, self.bias, packed=self._packed(w) if w is self.weight else None,
                                      backend=self.backend, objective=self.tune_for)
        if not self.frozen:  # QAT: fake-quantized dense path
            return super().forward(x)
        w8, ws = self._int8()
        return ks.sparse24_int8_linear_dynamic(x, w8, ws, self.bias, packed=self._packed(w8), backend=self.backend,
                                               objective=self.tune_for)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sparsity={self.sparsity}"


__all__ = ["SparseLinear", "parse_sparsity", "check_nm"]
