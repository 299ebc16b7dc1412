"""Common machinery of lowbit's quantized modules: float weights until ``freeze``, QuantStates after.

Modelled on optimum-quanto's ``QModuleMixin`` (``optimum/quanto/nn/qmodule.py``):

* before ``freeze`` a module keeps its float parameters and fake-quantizes them in ``forward``
  (straight-through estimator, so quantization-aware training works);
* ``freeze()`` replaces each quantized parameter by a packed :class:`~lowbit.tensor.state.QuantState`
  that dequantizes to exactly the fake-quantized value, so outputs do not change;
* a frozen module's ``state_dict`` holds ``<prefix><param>.data``, ``.scales``, ``.zeros``,
  ``.meta`` ... (``QuantState.state_dict``), ``load_state_dict`` rebuilds the state (also into an
  unfrozen or meta-device module, which is what ``requantize`` relies on), and ``.to(device)``
  moves the states (their storage dtypes are kept: ``model.half()`` does not touch packed codes).

Every module exposes ``.qstate`` (None before freeze) so size accounting can sum ``.nbytes``.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from lowbit.nn.functional import dequantize_state, ste
from lowbit.tensor.state import QuantState


class QuantStateDict(dict):
    """``{param name: QuantState}`` with a summed ``nbytes`` (the ``.qstate`` of multi-weight modules)."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.values())

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.values())

    @property
    def bits_per_element(self) -> float:
        n = self.numel
        return 8.0 * self.nbytes / n if n else 0.0


class QModuleMixin:
    """Mixin for ``nn.Module`` subclasses whose float parameters become QuantStates at freeze.

    Subclasses define :meth:`quantized_param_names` and :meth:`quantize_param`, and read their
    weights through :meth:`dequantized_weight` in ``forward``.
    """

    #: label written into the quantization map
    weights: Optional[str] = None
    activations: Optional[str] = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def _qstates(self) -> Dict[str, QuantState]:
        d = self.__dict__.get("_lowbit_qstates")
        if d is None:
            d = {}
            self.__dict__["_lowbit_qstates"] = d
        return d

    def quantized_param_names(self) -> Tuple[str, ...]:
        return ("weight",)

    def quantize_param(self, name: str, w: torch.Tensor) -> QuantState:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_shape(self, name: str) -> Tuple[int, ...]:
        """Shape of the QuantState stored for ``name`` (the parameter's shape unless overridden)."""
        if name in self._qstates:
            return tuple(self._qstates[name].shape)
        return tuple(self._parameters[name].shape)

    def _state_to_param(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Reshape a dequantized state to the parameter's shape (identity unless overridden)."""
        return w

    @property
    def frozen(self) -> bool:
        return all(n in self._qstates for n in self.quantized_param_names())

    def _frozen_weight(self) -> Optional[QuantState]:
        """The packed ``weight`` state when the module is frozen, else None (the forward hot path's check:
        :attr:`frozen` without its generator)."""
        states = self.__dict__.get("_lowbit_qstates")
        st = states.get("weight") if states else None
        if st is None:
            return None
        names = self.quantized_param_names()
        if names != ("weight",) and not all(n in states for n in names):
            return None
        return st

    def _bias(self) -> Optional[torch.Tensor]:
        """``self.bias`` read from ``_parameters`` where it is registered (1.8 us less than the attribute)."""
        params = self._parameters
        return params["bias"] if "bias" in params else getattr(self, "bias", None)

    @property
    def qstate(self):
        """The QuantState of ``weight`` (None before freeze)."""
        return self._qstates.get("weight")

    def quant_states(self) -> Dict[str, QuantState]:
        """All QuantStates held by this module (empty before freeze)."""
        return dict(self._qstates)

    # -- forward helpers -----------------------------------------------------------------------
    def dequantized_weight(self, name: str = "weight") -> torch.Tensor:
        """The weight used in forward: dequantized state if frozen, else fake-quantized (STE)."""
        state = self._qstates.get(name)
        if state is not None:
            return self._state_to_param(name, dequantize_state(state))
        w = self._parameters[name]
        q = self._state_to_param(name, dequantize_state(self.quantize_param(name, w.detach())))
        return ste(w, q)

    def freeze(self) -> None:
        """Replace the float parameters by packed QuantStates (idempotent)."""
        for name in self.quantized_param_names():
            if name in self._qstates:
                continue
            w = self._parameters[name]
            if w.device.type == "meta":
                raise RuntimeError(f"cannot freeze {type(self).__name__}.{name}: the weight is on the meta device")
            state = self.quantize_param(name, w.detach())
            del self._parameters[name]
            self._qstates[name] = state

    def set_quant_state(self, name: str, state: QuantState) -> None:
        """Install a ready QuantState for parameter ``name`` (dropping its float parameter)."""
        if not isinstance(state, QuantState):
            raise TypeError(f"expected a QuantState for {name!r}, got {type(state).__name__}")
        if name not in self.quantized_param_names():
            raise KeyError(f"{type(self).__name__} has no quantized parameter {name!r}")
        self._parameters.pop(name, None)
        self._qstates[name] = state

    def __getattr__(self, name: str):
        # after freeze, `module.weight` (read by third-party code for dtype/shape) is the dequantized tensor
        try:
            return super().__getattr__(name)
        except AttributeError:
            states = self.__dict__.get("_lowbit_qstates")
            if states and name in states:
                return self._state_to_param(name, dequantize_state(states[name]))
            raise

    # -- nn.Module hooks -------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        ret = super()._apply(fn, recurse)
        if self._qstates:
            # move states to the target device only: packed codes and fp32 scales keep their dtypes
            probe = fn(torch.empty(0, device=next(iter(self._qstates.values())).device))
            for k, s in list(self._qstates.items()):
                if s.device != probe.device:
                    self._qstates[k] = s.to(probe.device)
        return ret

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, state in self._qstates.items():
            destination.update(state.state_dict(prefix + name + "."))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qprefixes = [prefix + n + "." for n in self.quantized_param_names()]
        found = False
        for name, qp in zip(self.quantized_param_names(), qprefixes):
            if qp + "meta" not in state_dict:
                if name in self._qstates and strict:
                    missing_keys.append(qp + "meta")
                continue
            found = True
            sub = {k: v for k, v in state_dict.items() if k.startswith(qp)}
            try:
                state = QuantState.from_state_dict(sub, qp)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{prefix}{name}: {e}")
                continue
            expected = self.param_shape(name)
            if tuple(state.shape) != tuple(expected):
                error_msgs.append(
                    f"size mismatch for {qp[:-1]}: QuantState of shape {tuple(state.shape)} in the checkpoint, "
                    f"expected {tuple(expected)}"
                )
                continue
            assign = local_metadata.get("assign_to_params_buffers", False)
            target = self._device_hint(name)
            if not assign and target is not None and target.type != "meta":
                state = state.to(target)
            self._parameters.pop(name, None)
            self._qstates[name] = state
        if found:
            state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(q) for q in qprefixes)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _device_hint(self, name: str) -> Optional[torch.device]:
        if name in self._qstates:
            return self._qstates[name].device
        p = self._parameters.get(name)
        if p is not None:
            return p.device
        for t in self.parameters(recurse=False):
            return t.device
        return None


def quantized_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` for every lowbit quantized module inside ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            yield name, m


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by the QuantStates of a model's frozen modules."""
    return sum(s.nbytes for _, m in quantized_modules(model) for s in m.quant_states().values())
