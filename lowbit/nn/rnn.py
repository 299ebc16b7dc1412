"""Dynamic int8 LSTM and GRU (the scheme of ``torch.ao.nn.quantized.dynamic.LSTM``).

Weights are int8, one symmetric scale per output row (per gate unit); activations -- the layer
input at every time step and the recurrent hidden state at every step -- are quantized to int8
at run time with one scale per token (``absmax / 127``). Biases and the cell state stay in float.
The recurrence is the one of ``torch.nn.LSTM`` / ``torch.nn.GRU`` (gate order i, f, g, o and
r, z, n), written out step by step so that quantization can sit between the operations.

Parameter names equal those of ``nn.LSTM`` / ``nn.GRU`` (``weight_ih_l0``, ``weight_hh_l0_reverse``
...), so a float checkpoint loads directly. ``.qstate`` of a frozen module is a
:class:`~lowbit.nn.base.QuantStateDict` (one QuantState per weight matrix) with a summed ``nbytes``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import QType, get_qtype
from lowbit.nn.base import QModuleMixin, QuantStateDict
from lowbit.nn.functional import fake_quantize_activation
from lowbit.tensor.functional import quantize_tensor
from lowbit.tensor.state import QuantState


class _DynamicQuantRNNBase(QModuleMixin, nn.Module):
    _mode = ""
    _gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, activations: Union[str, QType, None] = "qint8") -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size={hidden_size!r}: must be a positive integer")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers={num_layers!r}: must be a positive integer")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout={dropout!r}: must be in [0, 1]")
        qt = get_qtype(activations)
        if qt is not None and qt.name not in ("qint8",):
            raise ValueError(f"activations={qt.name!r}: dynamic RNNs support 'qint8' or None")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.weights = "qint8"
        self.activation_qtype = qt
        self.activations = qt.name if qt is not None else None
        ndir = 2 if bidirectional else 1
        g = self._gates * hidden_size
        fk = {"device": device, "dtype": dtype}
        self._weight_names: List[str] = []
        for layer in range(num_layers):
            for d in range(ndir):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                in_l = input_size if layer == 0 else hidden_size * ndir
                setattr(self, "weight_ih" + sfx, nn.Parameter(torch.empty(g, in_l, **fk)))
                setattr(self, "weight_hh" + sfx, nn.Parameter(torch.empty(g, hidden_size, **fk)))
                if bias:
                    setattr(self, "bias_ih" + sfx, nn.Parameter(torch.empty(g, **fk)))
                    setattr(self, "bias_hh" + sfx, nn.Parameter(torch.empty(g, **fk)))
                self._weight_names += ["weight_ih" + sfx, "weight_hh" + sfx]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -stdv, stdv)

    @classmethod
    def from_module(cls, module: nn.RNNBase, **config: Any):
        """Wrap an ``nn.LSTM`` / ``nn.GRU`` (parameters shared; ``freeze()`` packs them)."""
        if module.mode != cls._mode:
            raise TypeError(f"{cls.__name__}.from_module expects an nn.{cls._mode}, got {type(module).__name__}")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"proj_size={module.proj_size} is not supported by {cls.__name__}")
        with torch.device("meta"):
            q = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                    module.dropout, module.bidirectional, dtype=module.weight_ih_l0.dtype, **config)
        for name in list(q._parameters):
            setattr(q, name, getattr(module, name))
        return q

    def quant_config(self) -> Dict[str, Any]:
        return {"activations": self.activations}

    # -- quantization ---------------------------------------------------------------------------------
    def quantized_param_names(self):
        return tuple(self._weight_names)

    def quantize_param(self, name: str, w: torch.Tensor) -> QuantState:
        return quantize_tensor(w, "int8", axis=0)

    @property
    def qstate(self) -> Optional[QuantStateDict]:
        """All weight QuantStates (``QuantStateDict`` with summed ``nbytes``), None before freeze."""
        return QuantStateDict(self._qstates) if self._qstates else None

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.activation_qtype, dynamic=True, dim=-1)

    def _bias(self, name: str) -> Optional[torch.Tensor]:
        return self._parameters.get(name) if self.bias else None

    # -- forward ------------------------------------------------------------------------------------
    def _cell(self, gi: torch.Tensor, gh: torch.Tensor, state):  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, x: torch.Tensor, hx, batch: int):
        raise NotImplementedError  # pragma: no cover

    def forward(self, input: torch.Tensor, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a padded tensor input, got {type(input).__name__} "
                            "(PackedSequence is not supported)")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if unbatched and hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        seq_len, batch = x.shape[0], x.shape[1]
        ndir = 2 if self.bidirectional else 1
        states = self._init_state(x, hx, batch)
        finals: List[Any] = []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(ndir):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih = self.dequantized_weight("weight_ih" + sfx).to(x.dtype)
                w_hh = self.dequantized_weight("weight_hh" + sfx).to(x.dtype)
                b_ih, b_hh = self._bias("bias_ih" + sfx), self._bias("bias_hh" + sfx)
                gi_all = F.linear(self._q(layer_in), w_ih, b_ih)
                state = states[layer * ndir + d]
                steps = range(seq_len - 1, -1, -1) if d else range(seq_len)
                out_t: List[Optional[torch.Tensor]] = [None] * seq_len
                for t in steps:
                    h = state[0] if isinstance(state, tuple) else state
                    gh = F.linear(self._q(h), w_hh, b_hh)
                    state = self._cell(gi_all[t], gh, state)
                    out_t[t] = state[0] if isinstance(state, tuple) else state
                outs.append(torch.stack(out_t, 0))
                finals.append(state)
            layer_in = torch.cat(outs, dim=-1) if ndir == 2 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, True)
        output = layer_in
        if self.batch_first and not unbatched:
            output = output.transpose(0, 1)
        h_n = self._pack_final(finals)
        if unbatched:
            output = output.squeeze(1)
            h_n = tuple(h.squeeze(1) for h in h_n) if isinstance(h_n, tuple) else h_n.squeeze(1)
        return output, h_n

    def _pack_final(self, finals):
        raise NotImplementedError  # pragma: no cover

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.batch_first:
            s += ", batch_first=True"
        return s + f", weights=qint8, activations={self.activations} (dynamic)"


class DynamicQuantLSTM(_DynamicQuantRNNBase):
    """``nn.LSTM`` with int8 weights and dynamically quantized int8 activations.

    Example::

        >>> q = DynamicQuantLSTM.from_module(nn.LSTM(16, 32, batch_first=True)); q.freeze()
        >>> out, (h, c) = q(torch.randn(4, 10, 16))
    """

    _mode = "LSTM"
    _gates = 4

    def _init_state(self, x, hx, batch):
        n = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            z = x.new_zeros(n, batch, self.hidden_size)
            return [(z[i], z[i]) for i in range(n)]
        h0, c0 = hx
        return [(h0[i], c0[i]) for i in range(n)]

    def _cell(self, gi, gh, state):
        h, c = state
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def _pack_final(self, finals) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([s[0] for s in finals], 0), torch.stack([s[1] for s in finals], 0)


class DynamicQuantGRU(_DynamicQuantRNNBase):
    """``nn.GRU`` with int8 weights and dynamically quantized int8 activations."""

    _mode = "GRU"
    _gates = 3

    def _init_state(self, x, hx, batch):
        n = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            hx = x.new_zeros(n, batch, self.hidden_size)
        return [hx[i] for i in range(n)]

    def _cell(self, gi, gh, h):
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h

    def _pack_final(self, finals) -> torch.Tensor:
        return torch.stack(finals, 0)
