"""compressed-tensors checkpoints (vLLM's format, written by llm-compressor): export and import.

Reference: ``shared/docs/formats-checkpoints.md`` section 3, checked against the installed
``compressed-tensors`` 0.20 (``compressors/pack_quantized``, ``compressors/naive_quantized``,
``quantization/lifecycle/forward.py``) and transformers' ``CompressedTensorsHfQuantizer``.

Conventions, and how lowbit's ``w = (q - z) * s`` (unsigned codes) maps onto them exactly:

* compressed-tensors quantizes to *signed* integers ``q_s`` in ``[-2**(b-1), 2**(b-1) - 1]`` with a
  signed zero point ``zp_s`` (0 when symmetric) and dequantizes ``(q_s - zp_s) * scale``. With
  ``q_s = q - 2**(b-1)`` and ``zp_s = z - 2**(b-1)`` the value is ``(q - z) * s``: the same integers,
  the same scale, hence the same fp32 product. A symmetric lowbit state (implicit ``z = 2**(b-1)``)
  is a symmetric compressed-tensors weight (``zp_s = 0``, no zero point stored).
* ``pack-quantized``: ``weight_packed`` int32 ``[out, ceil(in*b/32)]`` holds ``q_s + 2**(b-1)`` (that
  is, lowbit's unsigned code) as a dense LSB-first bit stream along ``in``; asymmetric zero points
  are packed the same way along ``out`` (``weight_zero_point`` int32 ``[ceil(out*b/32), G]``);
  ``weight_scale`` ``[out, G]`` (``[out, 1]`` per channel, ``[1]`` per tensor); ``weight_shape``.
* ``int-quantized`` (int weights with int8 activations): ``weight`` int8 ``q_s``, ``weight_scale``,
  signed int8 ``weight_zero_point`` when asymmetric, ``input_scale`` ``[1]`` for static activations.
* ``float-quantized`` (fp8): ``weight`` float8_e4m3fn as stored by lowbit, ``weight_scale``
  (``W = weight * scale``), ``input_scale`` for static fp8 activations.

Scales are stored in the weight's dtype (as compressed-tensors allocates them): exact for fp32
models, and for fp16/bf16 models when the scales are representable in that dtype (otherwise they
are rounded, with a warning). Group sizes must divide ``in`` (compressed-tensors' group
dequantization requires it) and act-order ``g_idx`` is not written (its decompression ignores it).

Activations: static (calibrated ``input_scale``) int8/fp8 map to the ``tensor`` strategy, dynamic
ones to ``token``. Note that compressed-tensors' own dynamic int8 fake quantization uses
``absmax / 127.5`` and the range ``[-128, 127]`` where lowbit (like vLLM's int8 kernels) uses
``absmax / 127`` and ``[-127, 127]``: a W8A8-dynamic export computed by transformers' CPU path can
differ slightly from lowbit; weights and static activations match exactly (static int8 as long as no
input saturates: compressed-tensors clamps to ``[-128, 127]``, lowbit to ``[-127, 127]``).
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lowbit.io._affine import AffineWeight, UnsupportedWeight, exact_cast, pack_int32, quantized_linears, unpack_int32
from lowbit.io._files import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointError,
    PathLike,
    hf_config_dict,
    read_hf_tensors_with_origin,
    set_config_dtype,
)
from lowbit.io.gptq import (
    QuantizedCheckpoint,
    _check_qtensor,
    _check_scale_dtype,
    _dense_tensors,
    _first_line,
    _open_checkpoint_dir,
    _read_config,
    _require_frozen,
    _where,
    _write_hf_dir,
)

__all__ = ["export_compressed_tensors", "read_compressed_tensors", "load_compressed_tensors", "module_scheme"]

logger = logging.getLogger(__name__)

CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writer follows


def _args(num_bits: int, typ: str, symmetric: bool, strategy: str, group_size: Optional[int] = None,
          dynamic: bool = False, observer: Optional[str] = "minmax") -> Dict[str, Any]:
    """A ``QuantizationArgs`` dict as llm-compressor serialises it."""
    d: Dict[str, Any] = {"num_bits": num_bits, "type": typ, "symmetric": symmetric, "group_size": group_size,
                         "strategy": strategy, "dynamic": dynamic, "actorder": None, "block_structure": None,
                         "observer": None if dynamic else observer, "observer_kwargs": {}}
    return d


def _activation_args(module: nn.Module) -> Optional[Dict[str, Any]]:
    act = getattr(module, "activations", None)
    if not act:
        return None
    dynamic = bool(getattr(module, "act_dynamic", False))
    if act == "qint8":
        typ = "int"
    elif act in ("qfloat8", "qfloat8_e4m3fn"):
        typ = "float"
    else:
        raise UnsupportedWeight(f"activations {act!r}: compressed-tensors stores int8 or float8 e4m3 activations")
    if not dynamic:
        scale = getattr(module, "input_scale", None)
        if scale is None or float(scale) <= 0:
            raise UnsupportedWeight("static activation quantization without a calibrated input_scale "
                                    "(run lowbit.Calibration first, or use act_dynamic=True)")
    return _args(8, typ, True, "token" if dynamic else "tensor", dynamic=dynamic)


def module_scheme(module: nn.Module, state) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(scheme dict {weights, input_activations, format}, tensors)`` of one frozen lowbit Linear.

    Tensors are named relative to the module (``weight_packed``, ``weight_scale`` ...).
    Raises :class:`UnsupportedWeight` with the reason for anything compressed-tensors cannot hold.
    """
    dtype = state.dtype
    out_f, in_f = state.shape if len(state.shape) == 2 else (None, None)
    if out_f is None:
        raise UnsupportedWeight(f"QuantState of shape {tuple(state.shape)}: only 2-D Linear weights")
    input_args = _activation_args(module)
    tensors: Dict[str, torch.Tensor] = {}
    if state.scheme == "fp8_e4m3":
        if state.layout == "channel" and state.axis == 0:
            strategy, gsize, scale = "channel", None, state.scales.reshape(out_f, 1)
        elif state.layout == "tensor":
            strategy, gsize, scale = "tensor", None, state.scales.reshape(1)
        elif state.layout == "group" and in_f % state.block_size == 0:
            strategy, gsize, scale = "group", state.block_size, state.scales.reshape(out_f, in_f // state.block_size)
        else:
            raise UnsupportedWeight(f"fp8 layout {state.layout!r} (block {state.block_size}, axis {state.axis}): "
                                    "compressed-tensors takes per-tensor, per-channel (axis 0) or dividing groups")
        if input_args is not None and input_args["type"] != "float":
            raise UnsupportedWeight("fp8 weights with int8 activations have no compressed-tensors format")
        weights = _args(8, "float", True, strategy, gsize)
        tensors["weight"] = state.data.reshape(out_f, in_f)
        fmt = "float-quantized"
    elif state.scheme.startswith("fp8"):
        raise UnsupportedWeight(f"scheme {state.scheme!r}: compressed-tensors' float8 weights are e4m3")
    else:
        w = AffineWeight.from_state(state)
        if not w.has_trivial_g_idx():
            raise UnsupportedWeight("act-order g_idx: compressed-tensors' decompression ignores weight_g_idx")
        G = w.n_groups
        if state.layout == "tensor":
            strategy, gsize = "tensor", None
        elif state.layout in ("group", "block", "gguf") and in_f % w.group_size == 0:
            strategy, gsize = "group", w.group_size
        elif G == 1:
            strategy, gsize = "channel", None
        else:
            raise UnsupportedWeight(f"group_size {w.group_size} does not divide in_features {in_f}; "
                                    "compressed-tensors requires dividing groups")
        sym = state.zeros is None
        offset = 1 << (w.bits - 1)
        scale = w.scales if strategy != "tensor" else w.scales[:1, :1].reshape(1)
        weights = _args(w.bits, "int", sym, strategy, gsize)
        if input_args is not None and input_args["type"] != "int":
            raise UnsupportedWeight("int weights with float8 activations have no compressed-tensors format")
        if input_args is None:
            fmt = "pack-quantized"
            tensors["weight_packed"] = pack_int32(w.codes, w.bits, dim=1)
            tensors["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
            if not sym:
                if strategy == "tensor":
                    tensors["weight_zero_point"] = (w.zeros[:1, :1].to(torch.int16) - offset).to(torch.int8).reshape(1)
                else:
                    tensors["weight_zero_point"] = pack_int32(w.zeros, w.bits, dim=0)
        else:
            fmt = "int-quantized"
            tensors["weight"] = (w.codes.to(torch.int16) - offset).to(torch.int8)
            if not sym:
                z = (w.zeros.to(torch.int16) - offset).to(torch.int8)
                tensors["weight_zero_point"] = z[:1, :1].reshape(1) if strategy == "tensor" else z
    tensors["weight_scale"] = scale
    if input_args is not None and not input_args["dynamic"]:
        tensors["input_scale"] = module.input_scale.detach().reshape(1).to(dtype)
    return {"weights": weights, "input_activations": input_args, "format": fmt}, tensors


def _targets(names: List[str], all_linear: List[str], groups: Dict[str, str]) -> List[str]:
    """Compact targets: ``re:`` suffix patterns where a whole role (``mlp.down_proj``) shares one scheme."""
    by_role: Dict[str, List[str]] = {}
    for n in all_linear:
        role = re.sub(r"^.*\.\d+\.", "", n)
        by_role.setdefault(role, []).append(n)
    mine = set(names)
    out: List[str] = []
    covered = set()
    for role, members in by_role.items():
        if len(members) > 1 and all(m in mine for m in members) and role != members[0]:
            out.append("re:.*\\." + re.escape(role) + "$")
            covered.update(members)
    out.extend(n for n in names if n not in covered)
    return out


def export_compressed_tensors(model: nn.Module, directory: PathLike, *, unsupported: str = "error", tokenizer=None,
                              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a frozen lowbit model as a compressed-tensors checkpoint (config.json + safetensors).

    Every frozen lowbit Linear with an integer affine (2..8 bits, sym/asym, group/channel/tensor)
    or fp8 e4m3 weight becomes a compressed-tensors module (``pack-quantized`` weight-only,
    ``int-quantized`` with int8 activations, ``float-quantized`` for fp8); unquantized Linears go to
    ``ignore``. One ``config_groups`` entry per distinct scheme (targets ``["Linear"]`` when there is
    a single one), ``format`` ``"mixed-precision"`` when the modules use several compressors.

    Args:
        unsupported: ``"error"`` or ``"dense"`` (write the dequantized weight and ignore the module).
        tokenizer: saved beside the weights when given.

    Example::

        >>> export_compressed_tensors(model, "out/ct")   # doctest: +SKIP
        >>> from transformers import AutoModelForCausalLM, CompressedTensorsConfig
        >>> AutoModelForCausalLM.from_pretrained("out/ct",
        ...     quantization_config=CompressedTensorsConfig(run_compressed=False))   # doctest: +SKIP
    """
    if unsupported not in ("error", "dense"):
        raise ValueError(f"unsupported={unsupported!r}: expected 'error' or 'dense'")
    _require_frozen(model)
    schemes: Dict[str, Dict[str, Any]] = {}
    members: Dict[str, List[str]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    done: List[str] = []
    dense: Dict[str, Any] = {}
    rounded: List[Tuple[str, float]] = []
    for name, (m, st) in quantized_linears(model).items():
        try:
            if not isinstance(m, nn.Linear):
                raise UnsupportedWeight(f"{type(m).__name__} is not a Linear")
            scheme, t = module_scheme(m, st)
        except UnsupportedWeight as e:
            if unsupported == "error":
                raise UnsupportedWeight(f"{name}: cannot be written as compressed-tensors: {e} "
                                        "(pass unsupported='dense' to write it unquantized)") from None
            dense[name] = (m, str(e))
            continue
        sdt = st.dtype if st.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
        s = t["weight_scale"]
        if not exact_cast(s.float(), sdt):
            rounded.append((name, float(((s.float().to(sdt).float() - s.float()).abs() / s.float().abs()).max())))
        t["weight_scale"] = s.to(sdt).contiguous()
        key = json.dumps(scheme, sort_keys=True)
        schemes[key] = scheme
        members.setdefault(key, []).append(name)
        for k, v in t.items():
            tensors[f"{name}.{k}"] = v.contiguous()
        bias = getattr(m, "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach()
        done.append(name)
    if not done:
        raise ValueError("the model has no quantized Linear layer to write as compressed-tensors")
    if rounded:
        worst = max(rounded, key=lambda x: x[1])
        warnings.warn(f"compressed-tensors stores scales in the weight dtype: {len(rounded)} modules had scales "
                      f"rounded (largest relative change {worst[1]:.2e} in {worst[0]})", stacklevel=2)
    plain, _ = _dense_tensors(model, done, dense, None)
    tensors.update(plain)

    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in all_linear if n not in done]
    formats = {s["format"] for s in schemes.values()}
    config_groups = {}
    for i, (key, scheme) in enumerate(schemes.items()):
        targets = ["Linear"] if len(schemes) == 1 else _targets(members[key], all_linear, {})
        config_groups[f"group_{i}"] = {
            "targets": targets,
            "weights": scheme["weights"],
            "input_activations": scheme["input_activations"],
            "output_activations": None,
            "format": scheme["format"] if len(formats) > 1 else None,
        }
    qcfg = {
        "version": CT_VERSION,
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    if any(not (s["weights"] or {}).get("symmetric", True) for s in schemes.values()) and \
            "pack-quantized" in {s["format"] for s in schemes.values()}:
        # transformers (5.x) with its default run_compressed=True builds packed zero points unpacked
        # ([out, groups] instead of the [out/8, groups] that compressed-tensors' own compressor writes) and
        # refuses the checkpoint; decompressing at load makes ``from_pretrained(out)`` alone work.
        qcfg["run_compressed"] = False
    cfg = hf_config_dict(model) or {}
    cfg["quantization_config"] = qcfg
    return _write_hf_dir(Path(directory), tensors, cfg, {}, max_shard_size, tokenizer)


# ---------------------------------------------------------------------------------------------
# import


def _match(name: str, targets: List[str]) -> bool:
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t == "Linear":
            return True
    return False


def _scheme_for(qc: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    for t in qc.get("ignore") or []:
        if (t.startswith("re:") and re.match(t[3:], name)) or t == name:
            return None
    for group in (qc.get("config_groups") or {}).values():
        if _match(name, group.get("targets") or []):
            return group
    return None


def read_compressed_tensors(directory: PathLike) -> QuantizedCheckpoint:
    """Integer weights of a compressed-tensors checkpoint (``pack-quantized`` / ``int-quantized`` /
    ``naive-quantized``) as :class:`AffineWeight`\\ s; fp8 weights are kept in ``extra["fp8"]``.

    Example::

        >>> ck = read_compressed_tensors("out/ct")          # doctest: +SKIP
    """
    directory = Path(directory)
    _open_checkpoint_dir(directory)
    cfg = _read_config(directory)
    cfg_path = directory / "config.json"
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{cfg_path}: quant_method {qc.get('quant_method')!r}, expected 'compressed-tensors'")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(f"{cfg_path}: quantization_status {qc.get('quantization_status')!r}; only compressed "
                              "checkpoints hold integer codes")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()) \
            or not isinstance(qc.get("ignore") or [], list):
        raise CheckpointError(f"{cfg_path}: corrupted quantization_config (config_groups / ignore)")
    tensors, origin = read_hf_tensors_with_origin(directory)
    dtype = _cfg_dtype(cfg)
    weights: Dict[str, AffineWeight] = {}
    bias: Dict[str, torch.Tensor] = {}
    fp8: Dict[str, Dict[str, torch.Tensor]] = {}
    names = sorted({k.rsplit(".", 1)[0] for k in tensors
                    if k.endswith((".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape"))})
    for n in names:
        where = _where(origin, directory, f"{n}.weight_packed", f"{n}.weight", f"{n}.weight_scale")
        try:
            group = _scheme_for(qc, n)
        except (TypeError, AttributeError, re.error) as e:
            raise CheckpointError(f"{cfg_path}: corrupted quantization_config (targets): {_first_line(e)}") from None
        if group is None or not group.get("weights"):
            raise CheckpointError(f"{where}: module {n!r} holds quantized tensors but no config group of "
                                  f"{cfg_path.name} targets it")
        wa = group["weights"]
        fmt = group.get("format") or qc.get("format")
        if tensors.get(f"{n}.weight_g_idx") is not None:
            raise CheckpointError(f"{where}: {n}: act-order (weight_g_idx) checkpoints are not supported")
        if f"{n}.weight_scale" not in tensors:
            raise CheckpointError(f"{where}: module {n!r} lacks tensor '{n}.weight_scale'")
        scale = tensors.pop(f"{n}.weight_scale")
        try:
            if not isinstance(wa, dict):
                raise CheckpointError(f"{cfg_path}: module {n!r}: corrupted weights arguments")
            _check_scale_dtype(origin, directory, f"{n}.weight_scale", scale, cfg)
            if wa.get("type") == "float":
                fp8[n] = {"weight": tensors.pop(f"{n}.weight"), "weight_scale": scale}
                continue
            if wa.get("type") != "int":
                raise CheckpointError(f"{cfg_path}: module {n!r}: weights type {wa.get('type')!r}")
            b = wa.get("num_bits")
            if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8:
                raise CheckpointError(f"{cfg_path}: module {n!r}: num_bits={b!r} is not valid")
            offset = 1 << (b - 1)
            if fmt == "pack-quantized":
                for part in ("weight_shape", "weight_packed"):
                    if f"{n}.{part}" not in tensors:
                        raise CheckpointError(f"{where}: module {n!r} lacks tensor '{n}.{part}'")
                ws = tensors.pop(f"{n}.weight_shape")
                if ws.dtype not in (torch.int64, torch.int32) or tuple(ws.shape) != (2,):
                    raise CheckpointError(f"{where}: tensor '{n}.weight_shape' is {ws.dtype} {list(ws.shape)}, "
                                          "expected 2 integers")
                shape = tuple(int(v) for v in ws.tolist())
                packed = tensors.pop(f"{n}.weight_packed")
                _check_qtensor(origin, directory, f"{n}.weight_packed", packed, (torch.int32,), 2)
                if shape[0] != packed.shape[0] or shape[1] <= 0:
                    raise CheckpointError(f"{where}: tensor '{n}.weight_packed' {list(packed.shape)} does not hold "
                                          f"weight_shape {list(shape)}")
                codes = unpack_int32(packed, b, shape[1], dim=1)
            elif fmt in ("int-quantized", "naive-quantized"):
                if f"{n}.weight" not in tensors:
                    raise CheckpointError(f"{where}: module {n!r} lacks tensor '{n}.weight'")
                q = tensors.pop(f"{n}.weight")
                if q.dtype != torch.int8 or q.dim() != 2:
                    raise CheckpointError(f"{where}: tensor '{n}.weight' is {q.dtype} {list(q.shape)}, expected 2-D "
                                          f"int8 for {fmt}")
                shape = tuple(q.shape)
                codes = (q.to(torch.int16) + offset).to(torch.uint8)
            else:
                raise CheckpointError(f"{cfg_path}: module {n!r}: format {fmt!r} is not supported for import")
            out_f, in_f = shape
            strategy = wa.get("strategy") or ("group" if wa.get("group_size") else "tensor")
            if strategy == "group":
                gsize = wa.get("group_size")
                if not isinstance(gsize, int) or isinstance(gsize, bool) or gsize <= 0:
                    raise CheckpointError(f"{cfg_path}: module {n!r}: group_size={gsize!r} is not valid")
            elif strategy in ("channel", "tensor"):
                gsize = in_f
            else:
                raise CheckpointError(f"{cfg_path}: module {n!r}: strategy {strategy!r} is not supported")
            G = math.ceil(in_f / gsize)
            want = {"tensor": [(1,), (1, 1)], "channel": [(out_f, 1)], "group": [(out_f, G)]}[strategy]
            if tuple(scale.shape) not in want:
                raise CheckpointError(f"{where}: tensor '{n}.weight_scale' has shape {list(scale.shape)}, expected "
                                      f"{list(want[0])} for the {strategy} strategy of a {list(shape)} weight")
            scale = scale.reshape(-1, 1).expand(out_f, 1) if strategy == "tensor" else scale.reshape(out_f, G)
            zeros = None
            zp = tensors.pop(f"{n}.weight_zero_point", None)
            symmetric = wa.get("symmetric", True)
            if not isinstance(symmetric, bool):
                raise CheckpointError(f"{cfg_path}: module {n!r}: symmetric={symmetric!r} is not a boolean")
            if symmetric and zp is not None:
                raise CheckpointError(f"{where}: tensor '{n}.weight_zero_point' present but the config says the "
                                      "weights are symmetric")
            if not symmetric:
                if zp is None:
                    raise CheckpointError(f"{where}: {n}: asymmetric weights without tensor '{n}.weight_zero_point'")
                if zp.dtype == torch.int32:
                    if strategy == "tensor" or tuple(zp.shape) != (math.ceil(out_f * b / 32), G):
                        raise CheckpointError(f"{where}: tensor '{n}.weight_zero_point' has shape {list(zp.shape)}, "
                                              f"expected {[math.ceil(out_f * b / 32), G]}")
                    zeros = unpack_int32(zp, b, out_f, dim=0).reshape(out_f, G)
                elif zp.dtype == torch.int8:
                    want_z = [(1,), (1, 1)] if strategy == "tensor" else [(out_f, G)]
                    if tuple(zp.shape) not in want_z:
                        raise CheckpointError(f"{where}: tensor '{n}.weight_zero_point' has shape {list(zp.shape)}, "
                                              f"expected {list(want_z[0])}")
                    z = (zp.to(torch.int16) + offset).to(torch.uint8)
                    zeros = z.reshape(1, 1).expand(out_f, 1) if strategy == "tensor" else z.reshape(out_f, G)
                else:
                    raise CheckpointError(f"{where}: tensor '{n}.weight_zero_point' is {zp.dtype}, expected int32 "
                                          "(packed) or int8")
            weights[n] = AffineWeight(codes=codes, scales=scale.contiguous(), zeros=None if zeros is None
                                      else zeros.contiguous(), bits=b, group_size=gsize, dtype=dtype or scale.dtype)
        except CheckpointError as e:
            if str(e).startswith(str(directory)):
                raise
            raise CheckpointError(f"{where}: module {n!r}: {e}") from None
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{where}: module {n!r}: {_first_line(e)}") from None
        if f"{n}.bias" in tensors:
            bias[n] = tensors.pop(f"{n}.bias")
        tensors.pop(f"{n}.input_scale", None)
        tensors.pop(f"{n}.input_zero_point", None)
    return QuantizedCheckpoint(config=cfg, weights=weights, bias=bias, tensors=tensors,
                               extra={"format": "compressed-tensors", "fp8": fp8, "origin": origin,
                                      "directory": directory})


def _cfg_dtype(cfg: Dict[str, Any]) -> Optional[torch.dtype]:
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    d = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None


def load_compressed_tensors(directory: PathLike, *, dtype: Optional[torch.dtype] = None, device="cpu") -> nn.Module:
    """Import the integer layers of a compressed-tensors checkpoint into lowbit ``QLinear``\\ s (exact codes).

    fp8 layers are imported as frozen ``QLinear`` with an ``fp8_e4m3`` state; activation
    quantization is not restored (weights only).
    """
    from lowbit.io.gptq import build_model

    ck = read_compressed_tensors(directory)
    if ck.extra.get("fp8"):
        raise NotImplementedError("importing fp8 (float-quantized) layers is not implemented; "
                                  f"modules: {sorted(ck.extra['fp8'])[:3]}")
    return build_model(ck, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# the export format registry (lowbit.io.registry)


def _write_format(model: nn.Module, path: Path, options) -> Dict[str, Any]:
    from lowbit.io.registry import directory_size

    if options.from_states:
        p = export_compressed_tensors(model, path, tokenizer=options.tokenizer, unsupported=options.unsupported)
    else:  # a model without lowbit-quantized Linears (as the CLI always wrote it)
        p = export_compressed_tensors(model, path)
    return {"path": str(p), "bytes": directory_size(p)}


def _detect_format(path: Path) -> bool:
    from lowbit.io.registry import hf_quantization_config

    qc = hf_quantization_config(path)
    return bool(qc) and qc.get("quant_method") == "compressed-tensors" and not qc.get("sparsity_config")


from lowbit.io.registry import register_format  # noqa: E402

register_format("compressed-tensors", write=_write_format, read=load_compressed_tensors, detect=_detect_format,
                target="compressed-tensors", description="vLLM's compressed-tensors (pack-quantized / int / fp8)")
