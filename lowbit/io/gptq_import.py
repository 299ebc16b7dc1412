"""GPTQ / AWQ import: read a checkpoint into integer weights (:class:`QuantizedCheckpoint`) and build a lowbit
model from it (split from :mod:`lowbit.io.gptq`, which re-exports every name)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from lowbit.tensor.granularity import Grouping
from lowbit.io._affine import (
    AffineWeight,
)
from lowbit.io._files import (
    CheckpointError,
    PathLike,
    empty_hf_model,
    check_dir_checksums,
    read_hf_tensors_with_origin,
    read_json_object,
    recover_interrupted,
)


logger = logging.getLogger(__name__)
from lowbit.io.gptq_packing import (  # noqa: F401
    GPTQ_BITS,
    AWQ_ORDER,
    _BLOCK_RE,
    _v1_correction_word,
    pack_gptq,
    unpack_gptq,
    pack_awq,
    unpack_awq,
)


# ---------------------------------------------------------------------------------------------
# import


@dataclass
class QuantizedCheckpoint:
    """What :func:`read_gptq` / :func:`read_awq` (and compressed-tensors' reader) return.

    ``weights``: ``{module name: AffineWeight}``; ``bias``: their biases; ``tensors``: every other
    tensor of the checkpoint; ``config``: ``config.json`` (with ``quantization_config``).
    """

    config: Dict[str, Any]
    weights: Dict[str, AffineWeight]
    bias: Dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def quantization_config(self) -> Dict[str, Any]:
        return self.config.get("quantization_config", {})


def _open_checkpoint_dir(directory: Path) -> None:
    """Restore an interrupted replacement, then check the checksum sidecar when lowbit wrote one."""
    if not directory.is_dir():
        recover_interrupted(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    check_dir_checksums(directory)


def _read_config(directory: Path) -> Dict[str, Any]:
    p = directory / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{directory}: config.json missing (not a Hugging Face checkpoint, or an interrupted "
                              "export)")
    cfg = read_json_object(p, "config")
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{p}: corrupted config: quantization_config is a {type(qc).__name__}")
    return cfg


def _quant_config(directory: Path, cfg: Dict[str, Any]) -> Dict[str, Any]:
    qc = cfg.get("quantization_config")
    side = directory / "quantize_config.json"
    if qc is not None and side.is_file():  # AutoGPTQ-style readers use this copy: it must agree
        other = read_json_object(side, "quantization config")
        for key in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "version",
                    "zero_point"):
            if key in qc and key in other and qc[key] != other[key]:
                raise CheckpointError(f"{side}: {key}={other[key]!r} disagrees with config.json's "
                                      f"quantization_config ({qc[key]!r}): corrupted")
    if qc is None:
        for name in ("quantize_config.json", "quant_config.json"):
            if (directory / name).is_file():
                qc = read_json_object(directory / name, "quantization config")
                break
    if qc is None:
        raise CheckpointError(f"{directory}: no quantization_config in config.json and no quantize_config.json")
    return qc


def _where(origin: Dict[str, Path], directory: Path, *names: str) -> str:
    """The file holding the first of ``names`` (the single weight file, else the directory)."""
    for n in names:
        if n in origin:
            return str(origin[n])
    files = set(origin.values())
    return str(files.pop()) if len(files) == 1 else str(directory)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        return f"missing {e.args[0]!r}"
    return s.splitlines()[0][:300] if s else type(e).__name__


def _cfg_int(qc: Dict[str, Any], key: str, where: Path, allowed=None, default=None) -> Optional[int]:
    v = qc.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or (allowed is not None and v not in allowed):
        raise CheckpointError(f"{where}: quantization_config {key}={v!r} is not valid")
    return v


def _check_qtensor(origin, directory, name: str, t: torch.Tensor, dtypes, dims: int) -> None:
    if t.dtype not in dtypes or t.dim() != dims:
        raise CheckpointError(f"{_where(origin, directory, name)}: tensor {name!r} is {str(t.dtype).replace('torch.', '')} "
                              f"{list(t.shape)}, expected a {dims}-D "
                              f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)} tensor")


def _check_scale_dtype(origin, directory, name: str, t: torch.Tensor, cfg: Dict[str, Any], extra=()) -> None:
    want = _config_dtype(cfg)
    allowed = {d for d in (want, *extra) if d is not None}
    if not t.is_floating_point() or (allowed and t.dtype not in allowed):
        raise CheckpointError(f"{_where(origin, directory, name)}: tensor {name!r} is "
                              f"{str(t.dtype).replace('torch.', '')}, expected "
                              f"{'/'.join(sorted(str(d).replace('torch.', '') for d in allowed)) or 'a float'}")


def read_gptq(directory: PathLike) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint (v1 or v2, any of 2/3/4/8 bits, act-order or not) without converting to float.

    Everything the format defines is checked (dtypes and shapes of ``qweight``/``qzeros``/``scales``/
    ``g_idx`` against each other and the config's bits and group size; the sidecar checksums when
    lowbit wrote the directory); errors name the file and the tensor.

    Example::

        >>> ck = read_gptq("some-gptq-model")                             # doctest: +SKIP
        >>> ck.weights["model.layers.0.mlp.down_proj"].dequantize().shape  # doctest: +SKIP
    """
    directory = Path(directory)
    _open_checkpoint_dir(directory)
    cfg = _read_config(directory)
    cfg_path = directory / "config.json"
    qc = _quant_config(directory, cfg)
    if qc.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{cfg_path}: quant_method {qc.get('quant_method')!r}, expected 'gptq'")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{cfg_path}: GPTQ format {fmt!r} is not supported (expected 'gptq' or 'gptq_v2')")
    _cfg_int(qc, "bits", cfg_path, GPTQ_BITS)
    gs = _cfg_int(qc, "group_size", cfg_path)
    if gs is not None and gs != -1 and gs <= 0:
        raise CheckpointError(f"{cfg_path}: quantization_config group_size={gs} is not valid")
    tensors, origin = read_hf_tensors_with_origin(directory)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    weights: Dict[str, AffineWeight] = {}
    bias: Dict[str, torch.Tensor] = {}
    for n in names:
        where = _where(origin, directory, f"{n}.qweight")
        for part in ("qzeros", "scales"):
            if f"{n}.{part}" not in tensors:
                raise CheckpointError(f"{where}: GPTQ module {n!r} lacks tensor '{n}.{part}'")
        qw, qz, sc = tensors.pop(f"{n}.qweight"), tensors.pop(f"{n}.qzeros"), tensors.pop(f"{n}.scales")
        g_idx = tensors.pop(f"{n}.g_idx", None)
        try:
            _check_qtensor(origin, directory, f"{n}.qweight", qw, (torch.int32,), 2)
            _check_qtensor(origin, directory, f"{n}.qzeros", qz, (torch.int32,), 2)
            _check_scale_dtype(origin, directory, f"{n}.scales", sc, cfg, (torch.float16,))
            if sc.dim() != 2:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has shape {list(sc.shape)}, expected 2-D")
            gsize = _module_group_size(qc, n)
            bits = _module_bits(qc, n)
            if bits is not None and (not isinstance(bits, int) or bits not in GPTQ_BITS):
                raise CheckpointError(f"{cfg_path}: module {n!r}: bits={bits!r} is not valid for GPTQ")
            if bits is None and g_idx is None:
                raise CheckpointError(f"{where}: module {n!r}: no g_idx and no bits in the config")
            in_f = qw.shape[0] * 32 // bits if bits else g_idx.numel()
            if g_idx is not None:
                _check_qtensor(origin, directory, f"{n}.g_idx", g_idx, (torch.int32, torch.int64), 1)
                if g_idx.numel() != in_f:
                    raise CheckpointError(f"{where}: tensor '{n}.g_idx' has {g_idx.numel()} entries, qweight holds "
                                          f"{in_f} input features at {bits} bits")
            G = sc.shape[0]
            if gsize not in (None, -1):
                if not isinstance(gsize, int) or gsize <= 0:
                    raise CheckpointError(f"{cfg_path}: module {n!r}: group_size={gsize!r} is not valid")
                want_G = -(-in_f // gsize)
                if G != want_G:
                    raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups, group_size {gsize} over "
                                          f"{in_f} inputs gives {want_G}")
            elif g_idx is None and G != 1:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups for a per-channel config")
            if g_idx is None:  # the checkpoint's granularity (-1 / None: per channel), validated above
                g_idx = Grouping.of_columns(in_f, gsize).group_index()
            w = unpack_gptq(qw, qz, sc, g_idx, bits=bits, checkpoint_format=fmt, group_size=gsize, dtype=sc.dtype)
        except CheckpointError as e:
            msg = str(e)
            if msg.startswith(str(directory)):
                raise
            raise CheckpointError(f"{where}: module {n!r}: {msg}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{where}: module {n!r}: {_first_line(e)}") from None
        weights[n] = w
        if f"{n}.bias" in tensors:
            bias[n] = tensors.pop(f"{n}.bias")
    if not weights:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors found")
    return QuantizedCheckpoint(config=cfg, weights=weights, bias=bias, tensors=tensors,
                               extra={"format": fmt, "origin": origin, "directory": directory})


def _dynamic_override(qc: Dict[str, Any], name: str) -> Dict[str, Any]:
    for pattern, override in (qc.get("dynamic") or {}).items():
        sign = "+"
        if pattern[:2] in ("+:", "-:"):
            sign, pattern = pattern[0], pattern[2:]
        if re.match(pattern, name):
            return {} if sign == "-" else dict(override or {})
    return {}


def _module_group_size(qc: Dict[str, Any], name: str) -> Optional[int]:
    return _dynamic_override(qc, name).get("group_size", qc.get("group_size"))


def _module_bits(qc: Dict[str, Any], name: str) -> Optional[int]:
    return _dynamic_override(qc, name).get("bits", qc.get("bits"))


def read_awq(directory: PathLike) -> QuantizedCheckpoint:
    """Read an AWQ GEMM checkpoint (4-bit) without converting to float (checked like :func:`read_gptq`)."""
    directory = Path(directory)
    _open_checkpoint_dir(directory)
    cfg = _read_config(directory)
    cfg_path = directory / "config.json"
    qc = _quant_config(directory, cfg)
    if qc.get("quant_method", "awq") != "awq":
        raise CheckpointError(f"{cfg_path}: quant_method {qc.get('quant_method')!r}, expected 'awq'")
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise CheckpointError(f"{cfg_path}: AWQ version {version!r} is not supported (only 'gemm')")
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise CheckpointError(f"{cfg_path}: AWQ with {bits} bits; only 4-bit GEMM checkpoints exist")
    gs = _cfg_int(qc, "group_size", cfg_path, default=qc.get("q_group_size"))
    tensors, origin = read_hf_tensors_with_origin(directory)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    weights, bias = {}, {}
    for n in names:
        where = _where(origin, directory, f"{n}.qweight")
        for part in ("qzeros", "scales"):
            if f"{n}.{part}" not in tensors:
                raise CheckpointError(f"{where}: AWQ module {n!r} lacks tensor '{n}.{part}'")
        qw, qz, sc = tensors.pop(f"{n}.qweight"), tensors.pop(f"{n}.qzeros"), tensors.pop(f"{n}.scales")
        try:
            _check_qtensor(origin, directory, f"{n}.qweight", qw, (torch.int32,), 2)
            _check_qtensor(origin, directory, f"{n}.qzeros", qz, (torch.int32,), 2)
            _check_scale_dtype(origin, directory, f"{n}.scales", sc, cfg, (torch.float16,))
            if sc.dim() != 2:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has shape {list(sc.shape)}, expected 2-D")
            in_f, G = qw.shape[0], sc.shape[0]
            if gs not in (None, -1) and (G * gs != in_f):
                raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups, group_size {gs} over "
                                      f"{in_f} inputs needs {in_f // gs if gs else '?'}")
            if G == 0 or in_f % G:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups for {in_f} inputs")
            weights[n] = unpack_awq(qw, qz, sc, dtype=sc.dtype)
        except CheckpointError as e:
            if str(e).startswith(str(directory)):
                raise
            raise CheckpointError(f"{where}: module {n!r}: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{where}: module {n!r}: {_first_line(e)}") from None
        if f"{n}.bias" in tensors:
            bias[n] = tensors.pop(f"{n}.bias")
    if not weights:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors found")
    return QuantizedCheckpoint(config=cfg, weights=weights, bias=bias, tensors=tensors,
                               extra={"format": "awq", "origin": origin, "directory": directory})


def build_model(ck: QuantizedCheckpoint, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
                ) -> nn.Module:
    """A lowbit model from an imported checkpoint: quantized Linears become frozen ``QLinear``s holding the
    exact QuantStates (:meth:`AffineWeight.to_state`), the rest is loaded as stored (cast to ``dtype`` if given).

    Every tensor is checked against the model built from ``config.json`` (name, shape, float dtype
    against the config's), every parameter must come from the checkpoint; errors name the file.
    """
    from lowbit.nn import QLinear

    origin = ck.extra.get("origin", {})
    directory = Path(ck.extra.get("directory", "."))
    cfg_path = directory / "config.json"

    def where(*names: str) -> str:
        return _where(origin, directory, *names) if origin else str(directory)

    try:
        model = empty_hf_model(ck.config)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except Exception as e:  # transformers rejecting a damaged config, in any of its ways
        raise CheckpointError(f"{cfg_path}: cannot build the model from this config (corrupted?): "
                              f"{_first_line(e)}") from None
    state_dtype = dtype or _config_dtype(ck.config)
    cfg_dtype = _config_dtype(ck.config)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    for k, v in ck.tensors.items():
        if k not in expected:
            raise CheckpointError(f"{where(k)}: tensor {k!r} does not belong to the model built from {cfg_path}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where(k)}: tensor {k!r} has shape {list(v.shape)}, the model expects "
                                  f"{list(expected[k].shape)}")
        if v.is_floating_point() != expected[k].is_floating_point() or (
                v.is_floating_point() and cfg_dtype is not None and v.dtype != cfg_dtype):
            raise CheckpointError(f"{where(k)}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}, expected "
                                  f"{str(cfg_dtype or expected[k].dtype).replace('torch.', '')}")
    dense = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ck.tensors.items()}
    model.load_state_dict(dense, strict=False, assign=True)
    for name, w in ck.weights.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where(name + '.qweight', name + '.weight_packed', name + '.weight')}: "
                                  f"quantized module {name!r} is not in the model") from None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != w.shape:
            raise CheckpointError(f"{where(name + '.qweight', name + '.weight_packed', name + '.weight')}: "
                                  f"quantized module {name!r}: weight {w.shape} does not fit {lin}")
        state = w.to_state()
        if state_dtype is not None:
            state.dtype = state_dtype
        q = QLinear.from_quant_state(lin, state)
        if name in ck.bias:
            b = ck.bias[name]
            if tuple(b.shape) != (lin.out_features,) or not b.is_floating_point():
                raise CheckpointError(f"{where(name + '.bias')}: tensor '{name}.bias' is {b.dtype} {list(b.shape)}, "
                                      f"expected a float [{lin.out_features}]")
            q.bias = nn.Parameter(b.to(dtype) if dtype is not None else b, requires_grad=False)
        elif q.bias is not None and q.bias.is_meta:
            raise CheckpointError(f"{where(name + '.qweight')}: quantized module {name!r} has a bias in the model "
                                  "but none in the checkpoint")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where()}: tensor {left[0]!r} missing from the checkpoint"
                              + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                              + f"; the model built from {cfg_path} has it")
    return model.to(device).eval()


def _config_dtype(cfg: Dict[str, Any]) -> Optional[torch.dtype]:
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    d = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None


def load_gptq(directory: PathLike, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
              return_checkpoint: bool = False):
    """Import a GPTQ checkpoint into lowbit: a model whose quantized Linears are frozen ``QLinear``s.

    Codes, zero points and the fp16 scales are kept exactly, so every weight dequantizes to
    ``scales * (q - z)`` bit for bit. Act-order checkpoints are re-grouped exactly (see
    :meth:`AffineWeight.to_state`). ``return_checkpoint=True`` also returns the raw
    :class:`QuantizedCheckpoint` (``(model, checkpoint)``).

    Example::

        >>> model = load_gptq("out/gptq", dtype=torch.float32)     # doctest: +SKIP
    """
    ck = read_gptq(directory)
    model = build_model(ck, dtype=dtype, device=device)
    return (model, ck) if return_checkpoint else model
