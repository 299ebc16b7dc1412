"""compressed-tensors' 2:4 sparse representation (``sparse-24-bitmask``): export and import.

The on-disk form, as written by compressed-tensors' ``Sparse24BitMaskCompressor`` (checked against
the compressed-tensors 0.12 sources, ``compressors/sparse_compressors/sparse_24_bitmask.py`` and
``utils/helpers.py``; 0.20 keeps the config class but dropped the compressor) and read by vLLM's
``CompressedTensors24`` scheme (2:4 with dense, int8 or fp8 weights):

* for every sparse Linear ``<name>``, its (possibly already quantized) weight ``[N, K]`` becomes

  - ``<name>.compressed`` ``[N, K/2]``: the kept values of each row in column order, in the weight's
    storage dtype (the model's float dtype, or int8 for W8A8);
  - ``<name>.bitmask`` uint8 ``[N, ceil(K/8)]``: the kept positions, bits packed little-endian
    along each row (``numpy.packbits(..., axis=-1, bitorder="little")``);
  - ``<name>.shape`` int64 ``[2, 1]``: ``[N, K]``;

  the kept positions of a group of 4 are the 2 of largest ``|w|`` (compressed-tensors'
  ``get_24_bytemasks``: ``topk(2)`` of ``|w|`` per group of 4, in the storage dtype), so a group
  with fewer than two non-zeros also stores one or two zeros;
* W8A8 weights keep compressed-tensors' int-quantized scheme beside it: ``<name>.weight_scale``
  ``[N, 1]`` (channel strategy, symmetric), dynamic per-token int8 input activations;
* ``config.json``'s ``quantization_config`` carries ``"sparsity_config": {"format":
  "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": [...], "ignore": [...],
  "global_sparsity": ...}`` (and, for W8A8, the ``config_groups`` of the int-quantized scheme).

:func:`read_sparse24` / :func:`load_sparse24` read such a directory back (lowbit's own
decompression: the same bit order and value order), into :class:`lowbit.nn.sparse.SparseLinear` modules.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from lowbit.io._files import DEFAULT_MAX_SHARD_SIZE, CheckpointError, PathLike, hf_config_dict, read_hf_tensors
from lowbit.io.gptq import _dense_tensors, _write_hf_dir

__all__ = ["export_sparse24", "read_sparse24", "load_sparse24", "compress_24_bitmask", "decompress_24_bitmask",
           "SPARSE24_FORMAT"]

SPARSE24_FORMAT = "sparse-24-bitmask"
CT_VERSION = "0.12.2"  # the compressed-tensors release whose Sparse24BitMaskCompressor this follows


def _bytemask_24(w: torch.Tensor) -> torch.Tensor:
    """Kept positions as compressed-tensors chooses them: the 2 largest ``|w|`` of every 4 (row-major)."""
    g = w.reshape(-1, 4)
    a = g.abs() if w.dtype != torch.int8 else g.to(torch.int16).abs()
    idx = a.topk(2, dim=1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True).reshape(w.shape)


def _pack_bits_little(mask: torch.Tensor) -> torch.Tensor:
    """``numpy.packbits(mask, axis=-1, bitorder="little")`` in torch: uint8 ``[N, ceil(K/8)]``."""
    N, K = mask.shape
    pad = (-K) % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(N, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (m * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits_little(packed: torch.Tensor, K: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :K].bool()


def compress_24_bitmask(w: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``{"compressed", "bitmask", "shape"}`` of a 2:4-sparse ``w [N, K]`` (see the module doc)."""
    if w.dim() != 2 or w.shape[1] % 4:
        raise ValueError(f"sparse-24-bitmask needs a 2-D weight with a multiple of 4 columns, got {tuple(w.shape)}")
    w = w.detach().cpu().contiguous()
    mask = _bytemask_24(w)
    dropped = w[~mask]
    if bool((dropped != 0).any()):
        raise ValueError(f"the weight is not 2:4 sparse: {int((dropped != 0).sum())} non-zeros outside the 2 kept "
                         "positions of their group of 4")
    N, K = w.shape
    return {"compressed": w[mask].reshape(N, K // 2).contiguous(), "bitmask": _pack_bits_little(mask),
            "shape": torch.tensor([N, K], dtype=torch.int64).reshape(-1, 1)}


def decompress_24_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """The dense ``[N, K]`` weight back from :func:`compress_24_bitmask`'s tensors."""
    N, K = (int(v) for v in torch.as_tensor(shape).flatten().tolist())
    if tuple(bitmask.shape) != (N, (K + 7) // 8):
        raise CheckpointError(f"bitmask shape {tuple(bitmask.shape)} does not match the weight shape {(N, K)}")
    mask = _unpack_bits_little(bitmask.to(torch.uint8), K)
    if compressed.numel() != int(mask.sum()):
        raise CheckpointError(f"{compressed.numel()} stored values for {int(mask.sum())} set bitmask bits")
    out = torch.zeros(N, K, dtype=compressed.dtype)
    out[mask] = compressed.reshape(-1)
    return out


def export_sparse24(model: nn.Module, directory: PathLike, *, tokenizer=None,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a model with :class:`~lowbit.nn.sparse.SparseLinear` layers as a compressed-tensors
    ``sparse-24-bitmask`` checkpoint (float 2:4, or 2:4 + W8A8 int8); other modules are written dense.

    Example::

        >>> lowbit.quantize(model, method="sparse-2:4-int8", calib_dataset=ids)      # doctest: +SKIP
        >>> export_sparse24(model, "out/ct24")                                       # doctest: +SKIP
    """
    from lowbit.io.compressed_tensors import CT_VERSION as CT_Q_VERSION
    from lowbit.io.compressed_tensors import _targets, module_scheme
    from lowbit.nn.sparse import SparseLinear

    tensors: Dict[str, torch.Tensor] = {}
    done: List[str] = []
    kinds: Dict[str, Optional[Dict[str, Any]]] = {}
    n_total, n_zero = 0, 0
    for name, m in model.named_modules():
        if not isinstance(m, SparseLinear):
            continue
        if m.weights is None:
            w, scheme, extra = m.weight.detach(), None, {}
        else:
            st = m.quant_states().get("weight")
            if st is None:
                raise ValueError(f"module {name!r} is quantized but not frozen; call lowbit.freeze(model) first")
            scheme, t = module_scheme(m, st)
            w = t.pop("weight")
            sdt = st.dtype if st.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
            extra = {"weight_scale": t.pop("weight_scale").to(sdt)}
        try:
            comp = compress_24_bitmask(w)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        n_total += w.numel()
        n_zero += int((w == 0).sum())
        for k, v in {**comp, **extra}.items():
            tensors[f"{name}.{k}"] = v.contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach()
        done.append(name)
        kinds[name] = scheme
    if not done:
        raise ValueError("the model has no SparseLinear layer (prune it with method='sparse-2:4' first)")
    plain, _ = _dense_tensors(model, done, {}, None)
    tensors.update(plain)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignore = [n for n in all_linear if n not in done]
    sparsity_config = {"format": SPARSE24_FORMAT, "sparsity_structure": "2:4", "global_sparsity": n_zero / n_total,
                       "targets": _targets(done, all_linear, {}), "ignore": ignore,
                       "registry_requires_subclass": False}
    quantized = [n for n in done if kinds[n] is not None]
    if quantized and len(quantized) != len(done):
        raise ValueError("mixed float and int8 SparseLinear layers: export one kind per checkpoint")
    qcfg: Dict[str, Any] = {"version": CT_VERSION, "quant_method": "compressed-tensors", "sparsity_config": sparsity_config,
                            "quantization_status": "compressed", "ignore": ignore, "config_groups": {},
                            "format": "dense", "kv_cache_scheme": None, "global_compression_ratio": None,
                            "transform_config": {}}
    if quantized:
        scheme = kinds[quantized[0]]
        if any(json.dumps(kinds[n], sort_keys=True) != json.dumps(scheme, sort_keys=True) for n in quantized):
            raise ValueError("SparseLinear layers with different quantization schemes")
        qcfg["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": scheme["weights"],
                                             "input_activations": scheme["input_activations"],
                                             "output_activations": None, "format": None}}
        qcfg["format"] = scheme["format"]
        qcfg["compressed_tensors_quantization_version"] = CT_Q_VERSION
    cfg = hf_config_dict(model) or {}
    cfg["quantization_config"] = qcfg
    return _write_hf_dir(Path(directory), tensors, cfg, {}, max_shard_size, tokenizer)


def read_sparse24(directory: PathLike) -> Dict[str, Any]:
    """``{"config", "layers": {name: {"weight" (dense, storage dtype), "weight_scale"?, "bias"?}}, "plain"}``."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    qc = cfg.get("quantization_config") or {}
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") != SPARSE24_FORMAT:
        raise CheckpointError(f"{cfg_path}: quantization_config.sparsity_config.format is {sc.get('format')!r}, "
                              f"expected {SPARSE24_FORMAT!r}")
    tensors = read_hf_tensors(directory)
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        try:
            w = decompress_24_bitmask(tensors.pop(f"{name}.compressed"), tensors.pop(key), tensors.pop(f"{name}.shape"))
        except KeyError as e:
            raise CheckpointError(f"{directory}: layer {name!r} lacks tensor {e}") from None
        entry = {"weight": w}
        for extra in ("weight_scale", "bias"):
            if f"{name}.{extra}" in tensors:
                entry[extra] = tensors.pop(f"{name}.{extra}")
        layers[name] = entry
    return {"config": cfg, "layers": layers, "plain": tensors}


def load_sparse24(directory: PathLike, *, dtype: Optional[torch.dtype] = None, device="cpu") -> nn.Module:
    """A transformers model with :class:`~lowbit.nn.sparse.SparseLinear` layers from an :func:`export_sparse24`
    (or compressed-tensors ``sparse-24-bitmask``, float or int8 W8A8 channel) checkpoint."""
    from lowbit.io._files import empty_hf_model
    from lowbit.model.sparse_methods import _int8_channel_state
    from lowbit.nn.sparse import SparseLinear

    ck = read_sparse24(directory)
    cfg = dict(ck["config"])
    cfg.pop("quantization_config", None)
    model = empty_hf_model(cfg)
    wdt = dtype
    for name, entry in ck["layers"].items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{directory}: {name!r} is not a Linear of the model")
        w = entry["weight"]
        fdt = wdt or (entry["weight_scale"].dtype if w.dtype == torch.int8 else w.dtype)
        new_lin = nn.Linear(lin.in_features, lin.out_features, bias="bias" in entry, dtype=fdt)
        if "bias" in entry:
            new_lin.bias.data = entry["bias"].to(fdt)
        if w.dtype == torch.int8:
            codes = (w.to(torch.int16) + 128).to(torch.uint8)
            st = _int8_channel_state(codes, entry["weight_scale"].float().reshape(-1), fdt)
            new = SparseLinear.from_pruned(new_lin, state=st)
        else:
            new_lin.weight.data = w.to(fdt)
            new = SparseLinear.from_pruned(new_lin)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    plain = ck["plain"]
    if dtype is not None:
        plain = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in plain.items()}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    lost = [k for k in missing if not any(k.startswith(n + ".") for n in ck["layers"])]
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
        lost = [k for k in lost if not k.endswith("lm_head.weight")]
    if lost or unexpected:
        raise CheckpointError(f"{directory}: tensors do not match the model (missing {lost[:5]}, unexpected "
                              f"{unexpected[:5]})")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# the export format registry (lowbit.io.registry)


def _write_format(model: nn.Module, path: Path, options) -> Dict[str, Any]:
    from lowbit.io.registry import directory_size

    p = export_sparse24(model, path, tokenizer=options.tokenizer)
    return {"path": str(p), "bytes": directory_size(p)}


def _detect_format(path: Path) -> bool:
    from lowbit.io.registry import hf_quantization_config

    qc = hf_quantization_config(path)
    return bool(qc) and qc.get("quant_method") == "compressed-tensors" and \
        (qc.get("sparsity_config") or {}).get("format") == SPARSE24_FORMAT


from lowbit.io.registry import register_format  # noqa: E402

register_format("sparse24", write=_write_format, read=load_sparse24, detect=_detect_format, target="sparse24",
                aliases=("sparse-2:4", "compressed-tensors-sparse24"),
                description="compressed-tensors sparse-24-bitmask (2:4 SparseLinear, float or int8)")
