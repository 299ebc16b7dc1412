"""File integrity of every format lowbit writes: corrupted files, interrupted saves, CLI errors.

For each format (native; GPTQ, AWQ, compressed-tensors directories; GGUF file), a tiny Llama is
written, then corrupted in >= 100 seeded ways, each loaded by lowbit's own loader:

* structural corruptions: truncation, flipped/zeroed bytes in a header (safetensors header, GGUF
  preamble and tensor infos), invalid JSON / wrong JSON types / missing keys, a file removed, a
  tensor dropped / renamed / reshaped / retyped, a GGUF tensor's type / offset / dimensions changed,
  a shape-defining GGUF hyperparameter changed or removed;
* data corruptions: flipped or zeroed bytes inside a tensor's data, a metadata value changed in
  valid JSON / a GGUF key-value string.

Outcomes: ``rejected`` (a lowbit error, one line, naming the file, and the tensor when the
corruption targets one), ``checksum`` (rejected by a checksum: native per-file/per-tensor sha256,
or the export's sidecar, at load or by ``lowbit.io.verify``), ``unclear`` (an error that is not
lowbit's, several lines, or not naming the file/tensor), ``harmless`` (loads, logits and
tokenization bit-identical, e.g. a flipped byte in ``general.name``), ``silent`` (loads with
different logits / NaN), ``crash`` (anything else escaping, e.g. a hang or BaseException).
Foreign formats are run twice: as lowbit writes them (with the checksum sidecar) and without the
sidecar (as another tool would write them: structure checks only).

Kill loop: a forked child saves (fresh target, or overwriting a previous checkpoint) and is
SIGKILLed at a random moment; the target must then be absent, the previous checkpoint or the new
one, both loading exactly; after the next save no temporary file may be left.

CLI: ``lowbit inspect`` / ``convert`` / ``export`` / ``verify`` on a sample of corrupted artifacts:
each must exit non-zero with one stderr line naming the file.

Usage (writes bench/results/reliability_files.md; ``--before`` adds a run of the original code)::

    git worktree add /tmp/orig main          # the code before this change
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/reliability_files.py --before /tmp/orig
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch  # noqa: E402

FORMATS = ("native", "gptq", "awq", "compressed-tensors", "gguf")
OUTCOMES = ("rejected", "checksum", "unclear", "harmless", "silent", "crash")
IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 250, 31, 64, 2, 77, 180, 11, 200, 150, 90]])
TEXT = "The tower is 324 metres tall."
CORPUS = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 20


# ---------------------------------------------------------------------------------------------
# artifacts


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([CORPUS], tr)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def float_model(seed=0, vocab=256, hidden=64, layers=2, intermediate=128):
    from lowbit.model.loading import tiny_llama

    return tiny_llama(vocab_size=vocab, hidden=hidden, layers=layers, intermediate=intermediate, seed=seed)


def quantized_model(seed=0, **kw):
    import lowbit

    m = float_model(seed, **kw)
    lowbit.quantize(m, method="rtn", bits=4, group_size=32, sym=False, progress=False)
    lowbit.freeze(m)
    return m


def write(fmt: str, model, target: Path, tok=None) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 scale rounding notes of the GPTQ/AWQ exporters
        return _write(fmt, model, target, tok)


def _write(fmt: str, model, target: Path, tok=None) -> Path:
    import lowbit

    if fmt == "native":
        lowbit.save(model, target)
    elif fmt == "gptq":
        from lowbit.io.gptq import export_gptq

        export_gptq(model, target)
    elif fmt == "awq":
        from lowbit.io.gptq import export_awq

        export_awq(model, target)
    elif fmt == "compressed-tensors":
        from lowbit.io.compressed_tensors import export_compressed_tensors

        export_compressed_tensors(model, target)
    elif fmt == "gguf":
        from lowbit.io.gguf import export_gguf

        export_gguf(model, target, "Q4_0", tokenizer=tok)
    return target


def load(fmt: str, path: Path):
    """``(model, tokenizer or None)`` through lowbit's loader for the format."""
    import lowbit

    if fmt == "native":
        return lowbit.load(path), None
    if fmt == "gptq":
        from lowbit.io.gptq import load_gptq

        return load_gptq(path), None
    if fmt == "awq":
        from lowbit.io.gptq import build_model, read_awq

        return build_model(read_awq(path)), None
    if fmt == "compressed-tensors":
        from lowbit.io.compressed_tensors import load_compressed_tensors

        return load_compressed_tensors(path), None
    from lowbit.io.gguf import load_gguf_model

    old = os.environ.get("LOWBIT_NO_CACHE")
    os.environ["LOWBIT_NO_CACHE"] = "1"  # never fill the user's cache with corrupted conversions
    try:
        return load_gguf_model(path)
    finally:
        if old is None:
            os.environ.pop("LOWBIT_NO_CACHE", None)
        else:
            os.environ["LOWBIT_NO_CACHE"] = old


def fingerprint(fmt, path):
    model, tok = load(fmt, path)
    with torch.no_grad():
        logits = model(IDS).logits.float()
    return logits, (tuple(tok(TEXT)["input_ids"]) if tok is not None else None)


def build(root: Path):
    """``{fmt: (artifact path, reference fingerprint)}``."""
    tok = tokenizer()
    q = quantized_model()
    out = {}
    for fmt in FORMATS:
        path = root / fmt / ("model.gguf" if fmt == "gguf" else "ckpt")
        path.parent.mkdir(parents=True, exist_ok=True)
        model = float_model(vocab=len(tok)) if fmt == "gguf" else q
        write(fmt, model, path, tok)
        out[fmt] = (path, fingerprint(fmt, path))
    return out


# ---------------------------------------------------------------------------------------------
# corruptions: each returns (kind, structural?, file touched, tensor names that identify it or ())


def _st_header(path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def _tensor_at(header, start, pos):
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        if start + a <= pos < start + b:
            return k
    return None


def _aliases(name: str):
    """Names an error may use for tensor ``name``: itself, its module, its HF <-> GGUF names."""
    out = {name}
    mod = name.rsplit(".", 1)[0]
    if "." in name:
        out.add(mod)
        if mod.endswith((".weight", ".bias")) or name.endswith((".data", ".scales", ".zeros", ".meta")):
            out.add(mod.rsplit(".", 1)[0])
    try:
        from lowbit.io.gguf import gguf_name, hf_name

        try:
            out.add(hf_name(name))
        except ValueError:
            pass
        try:
            out.add(gguf_name(name))
        except ValueError:
            pass
    except ImportError:
        pass
    return {a for a in out if a}


def _flip(path: Path, lo: int, hi: int, rnd: random.Random, zero=False):
    data = bytearray(path.read_bytes())
    hi = min(hi, len(data))
    if hi <= lo:
        return None
    for _ in range(20):
        if zero:
            a = rnd.randrange(lo, hi)
            b = min(hi, a + rnd.randint(1, 64))
            if any(data[a:b]):
                data[a:b] = bytes(b - a)
                path.write_bytes(bytes(data))
                return a
        else:
            a = rnd.randrange(lo, hi)
            data[a] ^= 1 << rnd.randrange(8) if rnd.random() < 0.5 else 0xFF
            path.write_bytes(bytes(data))
            return a
    return None


def _rewrite_st(path: Path, fn):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    name = fn(sd)
    save_file(sd, str(path), metadata=meta)
    return name


def _retype(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.float16:
        return t.to(torch.bfloat16)
    if t.dtype == torch.float32:
        return t.to(torch.float16)
    if t.dtype == torch.bfloat16:
        return t.to(torch.float16)
    if t.dtype == torch.int32:
        return t.to(torch.int64)
    if t.dtype == torch.int64:
        return t.to(torch.int32)
    if t.dtype == torch.uint8:
        return t.to(torch.int8)
    return t.to(torch.int16)


def _reshape(t: torch.Tensor, rnd) -> torch.Tensor:
    if t.dim() >= 2 and t.shape[0] != t.shape[1]:
        return t.reshape(t.shape[1], t.shape[0], *t.shape[2:]).contiguous() if rnd.random() < 0.5 \
            else t.reshape(-1).contiguous()
    if t.numel() > 1:
        return t.reshape(-1)[:-1].contiguous() if rnd.random() < 0.5 else t.reshape(1, -1).contiguous()
    return t.reshape(1, 1).contiguous()


def _json_garbage(path: Path, rnd) -> str:
    text = path.read_bytes()
    how = rnd.choice(["truncate", "utf8", "type", "drop-key", "syntax", "nest"])
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if how == "truncate" or obj is None:
        path.write_bytes(text[: rnd.randrange(1, max(2, len(text) - 1))])
    elif how == "utf8":
        i = rnd.randrange(len(text))
        path.write_bytes(text[:i] + b"\xff\xfe" + text[i:])
    elif how == "syntax":
        i = rnd.randrange(len(text))
        path.write_bytes(text[:i] + b"}{,:" + text[i:])
    else:
        def pick(o):
            keys = list(o) if isinstance(o, dict) else []
            return rnd.choice(keys) if keys else None

        target = obj
        path_keys = []
        for _ in range(rnd.randint(0, 2)):
            k = pick(target)
            if k is None or not isinstance(target[k], dict) or not target[k]:
                break
            path_keys.append(k)
            target = target[k]
        k = pick(target)
        if k is None:
            path.write_bytes(b"[]")
        elif how == "drop-key":
            del target[k]
        elif how == "nest":
            target[k] = {"garbage": [target[k]]}
        else:
            v = target[k]
            target[k] = rnd.choice([[1, 2], "garbage", None, -7, 3.5, True]) if not isinstance(v, list) else "x"
        if k is not None:
            path.write_bytes(json.dumps(obj).encode())
    return how


def corrupt_dir(root: Path, fmt: str, rnd: random.Random):
    """One random corruption of a safetensors-based checkpoint directory (in place)."""
    files = sorted(p for p in root.iterdir() if p.is_file())
    sts = [p for p in files if p.suffix == ".safetensors"]
    jsons = [p for p in files if p.suffix == ".json"]
    kind = rnd.choice(["truncate", "flip-header", "zero-header", "flip-data", "zero-data", "json-garbage",
                       "json-value", "file-missing", "tensor-drop", "tensor-rename", "tensor-reshape",
                       "tensor-retype", "tensor-drop", "tensor-rename", "tensor-reshape", "tensor-retype"])
    st = rnd.choice(sts)
    if kind == "truncate":
        f = rnd.choice(sts + jsons)
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(rnd.randrange(0, size))
        return kind, True, f, ()
    if kind in ("flip-header", "zero-header"):
        _, start = _st_header(st)
        _flip(st, 0, start, rnd, zero=kind == "zero-header")
        return kind, True, st, ()
    if kind in ("flip-data", "zero-data"):
        header, start = _st_header(st)
        pos = _flip(st, start, st.stat().st_size, rnd, zero=kind == "zero-data")
        t = _tensor_at(header, start, pos) if pos is not None else None
        return kind, False, st, tuple(_aliases(t)) if t else ()
    if kind == "json-garbage":
        f = rnd.choice(jsons)
        return f"json-garbage:{_json_garbage(f, rnd)}", True, f, ()
    if kind == "json-value":  # valid JSON, a number changed: a metadata value, not the structure
        f = root / "config.json"
        cfg = json.loads(f.read_text())
        key = rnd.choice(["rms_norm_eps", "rope_theta"] if "rope_theta" in cfg else ["rms_norm_eps"])
        cfg[key] = cfg[key] * rnd.choice([10.0, 0.1, 2.0])
        f.write_text(json.dumps(cfg))
        return kind, False, f, ()
    if kind == "file-missing":
        f = rnd.choice(sts + jsons)
        f.unlink()
        return kind, True, f, ()

    def mutate(sd):
        name = rnd.choice(sorted(sd))
        if kind == "tensor-drop":
            del sd[name]
        elif kind == "tensor-rename":
            new = name.replace(".", "_", 1) if rnd.random() < 0.5 else name + "x"
            sd[new] = sd.pop(name)
            renamed.append(new)
        elif kind == "tensor-reshape":
            sd[name] = _reshape(sd[name], rnd)
        else:
            sd[name] = _retype(sd[name]).contiguous()
        return name

    renamed = []
    name = _rewrite_st(st, mutate)
    return kind, True, st, tuple(_aliases(name) | set().union(*(_aliases(r) for r in renamed)))


# GGUF ---------------------------------------------------------------------------------------


def _gguf_layout(path: Path):
    import gguf

    r = gguf.GGUFReader(str(path))
    infos = []
    for t in r.tensors:
        f = t.field
        offs = [int(f.offset)]
        for part in f.parts:
            offs.append(offs[-1] + int(part.nbytes))
        # parts: name_len, name, n_dims, dims, type, offset
        infos.append({"name": t.name, "start": offs[0], "dims": (offs[3], offs[4]), "type": (offs[4], offs[5]),
                      "offset": (offs[5], offs[6]), "data": (int(t.data_offset), int(t.data_offset) + int(t.n_bytes))})
    kv_end = infos[0]["start"] if infos else int(r.data_offset)
    return r, infos, kv_end, int(r.data_offset)


def _gguf_rewrite(src: Path, dst: Path, drop=None, rename=None, kv_change=None, kv_drop=None):
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name == kv_drop:
            continue
        vt = f.types[0]
        sub = f.types[1] if vt == gguf.GGUFValueType.ARRAY else None
        val = f.contents()
        if kv_change and name == kv_change[0]:
            val = kv_change[1]
        w.add_key_value(name, val, vt, sub)
    for t in r.tensors:
        if t.name == drop:
            continue
        name = rename[1] if rename and t.name == rename[0] else t.name
        raw = np.array(t.data)
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        if qt.name in ("F32", "F16"):
            w.add_tensor(name, raw)
        else:
            w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def corrupt_gguf(path: Path, rnd: random.Random):
    import gguf

    r, infos, kv_end, data_start = _gguf_layout(path)
    size = path.stat().st_size
    kind = rnd.choice(["truncate", "flip-preamble", "flip-tensorinfo", "zero-tensorinfo", "flip-kv", "flip-data",
                       "zero-data", "tensor-type", "tensor-offset", "tensor-dims", "tensor-drop", "tensor-rename",
                       "hparam-change", "hparam-drop", "tensor-type", "tensor-offset", "tensor-drop"])
    del r
    if kind == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(rnd.randrange(0, size))
        return kind, True, path, ()
    if kind == "flip-preamble":
        _flip(path, 0, 24, rnd)
        return kind, True, path, ()
    if kind in ("flip-tensorinfo", "zero-tensorinfo"):
        t = rnd.choice(infos)
        end = t["offset"][1]
        pos = _flip(path, t["start"], end, rnd, zero=kind == "zero-tensorinfo")
        # bytes of the name length / name may make the tensor unidentifiable: the file is enough then
        named = () if pos is None or pos < t["dims"][0] - 4 else tuple(_aliases(t["name"]))
        return kind, True, path, named
    if kind == "flip-kv":  # inside the key-value metadata (tokenizer strings, names, hyperparameter values)
        _flip(path, 24, kv_end, rnd)
        return kind, False, path, ()
    if kind in ("flip-data", "zero-data"):
        pos = _flip(path, data_start, size, rnd, zero=kind == "zero-data")
        names = [t["name"] for t in infos if pos is not None and t["data"][0] <= pos < t["data"][1]]
        return kind, False, path, tuple(_aliases(names[0])) if names else ()
    data = bytearray(path.read_bytes())
    t = rnd.choice(infos)
    if kind == "tensor-type":
        a, b = t["type"]
        old = struct.unpack_from("<I", data, a)[0]
        choices = [x.value for x in gguf.GGMLQuantizationType if x.value != old and x.value < 40]
        struct.pack_into("<I", data, a, rnd.choice(choices))
        path.write_bytes(bytes(data))
        return kind, True, path, tuple(_aliases(t["name"]))
    if kind == "tensor-offset":
        a, b = t["offset"]
        old = struct.unpack_from("<Q", data, a)[0]
        new = rnd.choice([old + 32, max(0, old - 32), old + rnd.randrange(1, 4096), old * 2 + 64, 0])
        if new == old:
            new = old + 32
        struct.pack_into("<Q", data, a, new)
        path.write_bytes(bytes(data))
        return kind, True, path, tuple(_aliases(t["name"]))
    if kind == "tensor-dims":
        a, b = t["dims"]
        n = (b - a) // 8
        i = rnd.randrange(n)
        old = struct.unpack_from("<Q", data, a + 8 * i)[0]
        new = rnd.choice([old * 2, max(1, old // 2), old + 32, 0])
        if new == old:
            new = old + 32
        struct.pack_into("<Q", data, a + 8 * i, new)
        path.write_bytes(bytes(data))
        return kind, True, path, tuple(_aliases(t["name"]))
    tmp = path.with_name(path.name + ".rewrite")
    if kind == "tensor-drop":
        _gguf_rewrite(path, tmp, drop=t["name"])
    elif kind == "tensor-rename":
        new = t["name"].replace("weight", "wieght")
        _gguf_rewrite(path, tmp, rename=(t["name"], new))
        os.replace(tmp, path)
        return kind, True, path, tuple(_aliases(t["name"]) | {new})
    elif kind == "hparam-change":
        key = rnd.choice(["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                          "llama.attention.head_count", "llama.attention.head_count_kv"])
        r2 = gguf.GGUFReader(str(path))
        v = int(r2.fields[key].contents())
        del r2
        _gguf_rewrite(path, tmp, kv_change=(key, rnd.choice([v * 2, max(1, v // 2), v + 1])))
        os.replace(tmp, path)
        return f"{kind}:{key.split('.', 1)[1]}", True, path, ()
    else:
        key = rnd.choice(["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                          "llama.feed_forward_length"])
        _gguf_rewrite(path, tmp, kv_drop=key)
        os.replace(tmp, path)
        return f"{kind}:{key.split('.', 1)[1]}", True, path, ()
    os.replace(tmp, path)
    return kind, True, path, tuple(_aliases(t["name"]))


# ---------------------------------------------------------------------------------------------
# one trial


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _is_lowbit_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("lowbit") and isinstance(e, Exception)


def classify(fmt, path, ref, touched: Path, tensors, structural: bool):
    """``(outcome, message)`` of loading a corrupted artifact."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(120)
    try:
        try:
            logits, toks = fingerprint(fmt, path)
        except _Timeout:
            return "crash", "hang (> 120 s)"
        except Exception as e:  # noqa: BLE001
            return _classify_error(e, touched, tensors)
        except BaseException as e:  # noqa: BLE001
            return "crash", f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
    ref_logits, ref_toks = ref
    same = torch.equal(logits, ref_logits) and toks == ref_toks
    verify = _verify_fn()
    if verify is not None:
        try:
            verify(path)
        except Exception as e:  # noqa: BLE001
            out, msg = _classify_error(e, touched, ())
            return ("checksum", msg) if out in ("checksum", "rejected") else (out, msg)
    if same:
        return "harmless", ""
    bad = "NaN logits" if not torch.isfinite(logits).all() else "logits changed"
    return "silent", bad


def _verify_fn():
    try:
        from lowbit.io.verify import verify
    except ImportError:
        return None
    return verify


def _classify_error(e, touched: Path, tensors):
    msg = str(e).strip()
    line = msg.splitlines()[0] if msg else type(e).__name__
    one_line = "\n" not in msg
    names_file = touched.name in msg
    names_tensor = not tensors or any(t in msg for t in tensors)
    text = f"{type(e).__name__}: {line[:240]}"
    if not _is_lowbit_error(e) and e.__traceback__ is not None:
        import traceback

        fr = traceback.extract_tb(e.__traceback__)[-1]
        text += f" (at {Path(fr.filename).name}:{fr.lineno})"
    if not (_is_lowbit_error(e) and one_line and names_file):
        return "unclear", text
    if "sha256" in msg or "checksum" in msg:
        return "checksum", text
    if not names_tensor:
        return "unclear", text + " [tensor not named]"
    return "rejected", text


def run_corruptions(n: int, seed: int, formats=FORMATS, modes=("sidecar", "no-sidecar"), log=print):
    """``{(fmt, mode): [(kind, structural, outcome, message)]}``."""
    results = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="lowbit-rel-") as tmpd:
        root = Path(tmpd)
        arts = build(root / "clean")
        for fmt in formats:
            src, ref = arts[fmt]
            for mode in modes:
                if fmt == "native" and mode == "no-sidecar":
                    continue
                rnd = random.Random(f"{seed}-{fmt}")
                for i in range(n):
                    work = root / "work"
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir()
                    dst = work / src.name
                    if src.is_dir():
                        shutil.copytree(src, dst)
                    else:
                        shutil.copy2(src, dst)
                        side = src.with_name(src.name + ".lowbit-sha256")
                        if side.exists():
                            shutil.copy2(side, work / side.name)
                    if mode == "no-sidecar":
                        for p in list(work.rglob("*lowbit-sha256")) + list(work.rglob("lowbit-checksums.sha256")):
                            p.unlink()
                    if fmt == "gguf":
                        kind, structural, touched, tensors = corrupt_gguf(dst, rnd)
                    else:
                        kind, structural, touched, tensors = corrupt_dir(dst, fmt, rnd)
                    outcome, msg = classify(fmt, dst, ref, touched, tensors, structural)
                    results[(fmt, mode)].append((kind, structural, outcome, msg))
                log(f"{fmt:>20} {mode:>10}: {dict(Counter(r[2] for r in results[(fmt, mode)]))}")
    return results


# ---------------------------------------------------------------------------------------------
# kill loop


def _siblings_and_temps(target: Path):
    left = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]
    if target.is_dir():
        left += [p for p in target.rglob("*") if p.name.endswith(".tmp") or ".lowbit-new-" in p.name]
    return left


def run_kills(n: int, seed: int, formats=FORMATS, log=print, size=None):
    """``{(fmt, mode): Counter(outcome)}`` with mode "fresh" / "overwrite"; outcomes: absent, old, new,
    BROKEN (exists but neither loads exactly)."""
    rnd = random.Random(seed)
    size = size or dict(vocab=4096, hidden=256, layers=4, intermediate=768)
    tok = tokenizer()
    models = {"old": quantized_model(1, **size), "new": quantized_model(2, **size)}
    gsize = dict(size, vocab=len(tok))
    floats = {"old": float_model(1, **gsize), "new": float_model(2, **gsize)}
    results = {}
    leftovers = {}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lowbit-kill-") as tmpd:
        root = Path(tmpd)
        for fmt in formats:
            pick = floats if fmt == "gguf" else models
            refs = {}
            for which in ("old", "new"):
                p = root / f"ref-{which}-{fmt}" / ("m.gguf" if fmt == "gguf" else "ck")
                p.parent.mkdir(parents=True)
                t0 = time.perf_counter()
                write(fmt, pick[which], p, tok)
                dt = time.perf_counter() - t0
                refs[which] = fingerprint(fmt, p)[0]
            for mode in ("fresh", "overwrite"):
                c = Counter()
                stale_before_next = 0
                for i in range(n):
                    d = root / f"{fmt}-{mode}-{i}"
                    d.mkdir()
                    target = d / ("m.gguf" if fmt == "gguf" else "ck")
                    if mode == "overwrite":
                        write(fmt, pick["old"], target, tok)
                    delay = rnd.uniform(0, dt * 1.3)
                    pid = os.fork()
                    if pid == 0:  # the child: save and exit
                        try:
                            write(fmt, pick["new"], target, tok)
                        finally:
                            os._exit(0)
                    time.sleep(delay)
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    if not target.exists():
                        try:
                            from lowbit.io._files import recover_interrupted

                            recover_interrupted(target)
                        except ImportError:
                            pass
                    if not target.exists():
                        state = "absent"
                        if mode == "overwrite":
                            state = "BROKEN (previous checkpoint lost)"
                    else:
                        try:
                            got = fingerprint(fmt, target)[0]
                            state = "new" if torch.equal(got, refs["new"]) else \
                                "old" if torch.equal(got, refs["old"]) else "BROKEN (loads, wrong values)"
                        except Exception as e:  # noqa: BLE001
                            state = "BROKEN (does not load)" if mode == "overwrite" else "refused (incomplete)"
                    if mode == "fresh" and state == "absent":
                        pass
                    c[state] += 1
                    stale_before_next += len(_siblings_and_temps(target))
                    write(fmt, pick["new"], target, tok)  # the next save cleans up
                    left = _siblings_and_temps(target)
                    c["temp files left after the next save"] += bool(left)
                    shutil.rmtree(d, ignore_errors=True)
                results[(fmt, mode)] = c
                leftovers[(fmt, mode)] = stale_before_next
                log(f"kill {fmt:>20} {mode:>9}: {dict(c)} (save {dt:.2f} s)")
    return results, leftovers


# ---------------------------------------------------------------------------------------------
# CLI lines


def run_cli(n: int, seed: int, log=print):
    """Each (command, corrupted artifact): exit code, stderr lines, whether the line names the file."""
    from lowbit.cli import main

    rows = []
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="lowbit-cli-") as tmpd:
        root = Path(tmpd)
        arts = build(root / "clean")
        cmds = {
            "native": [["inspect", "{p}"], ["verify", "{p}"], ["export", "--input", "{p}", "--output", "{o}",
                                                             "--format", "gptq"]],
            "gptq": [["inspect", "{p}"], ["verify", "{p}"], ["convert", "--input", "{p}", "--output", "{o}/x.gguf"]],
            "awq": [["inspect", "{p}"], ["verify", "{p}"], ["convert", "--input", "{p}", "--output", "{o}/x.gguf"]],
            "compressed-tensors": [["inspect", "{p}"], ["verify", "{p}"],
                                   ["convert", "--input", "{p}", "--output", "{o}/x.gguf"]],
            "gguf": [["inspect", "{p}"], ["verify", "{p}"]],
        }
        for fmt in FORMATS:
            src, ref = arts[fmt]
            for i in range(n):
                work = root / "w"
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                dst = work / src.name
                if src.is_dir():
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
                    side = src.with_name(src.name + ".lowbit-sha256")
                    if side.exists():
                        shutil.copy2(side, work / side.name)
                while True:  # structural corruptions only (data ones may legitimately pass inspect)
                    if fmt == "gguf":
                        kind, structural, touched, _ = corrupt_gguf(dst, rnd)
                    else:
                        kind, structural, touched, _ = corrupt_dir(dst, fmt, rnd)
                    if structural:
                        break
                    shutil.rmtree(work, ignore_errors=True)
                    work.mkdir()
                    shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
                for cmd in cmds[fmt]:
                    argv = [a.format(p=dst, o=work / "out") for a in cmd] + ["--quiet"]
                    err = io.StringIO()
                    tb = None
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                        try:
                            rc = main(argv)
                        except SystemExit as e:
                            rc = e.code
                        except BaseException as e:  # noqa: BLE001
                            rc, tb = "traceback", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and ln.startswith("lowbit")]
                    text = tb or (lines[0] if lines else "")
                    if rc == 0 and cmd[0] != "verify":
                        status = "exit 0 (accepted)"
                    elif rc == 0:
                        status = "exit 0 (verify passed)"
                    elif tb:
                        status = "uncaught traceback"
                    elif len(lines) != 1:
                        status = f"{len(lines)} error lines"
                    elif touched.name in text or str(dst) in text:
                        status = "one line naming the file"
                    else:
                        status = "one line, file not named"
                    rows.append((fmt, cmd[0], kind, status, text[:200]))
        log(f"cli: {dict(Counter(r[3] for r in rows))}")
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _table_corruption(res):
    lines = ["| format | mode | kind | n | " + " | ".join(OUTCOMES) + " |",
             "|---|---|---|---:|" + "---:|" * len(OUTCOMES)]
    for (fmt, mode), rows in res.items():
        for structural in (True, False):
            sub = [r for r in rows if r[1] == structural]
            if not sub:
                continue
            c = Counter(r[2] for r in sub)
            lines.append(f"| {fmt} | {mode} | {'structural' if structural else 'data'} | {len(sub)} | "
                         + " | ".join(str(c.get(o, 0)) for o in OUTCOMES) + " |")
    return lines


def _by_kind(res):
    lines = ["| format | mode | corruption | n | outcomes |", "|---|---|---|---:|---|"]
    for (fmt, mode), rows in res.items():
        kinds = defaultdict(Counter)
        for kind, structural, outcome, msg in rows:
            kinds[kind.split(":")[0]][outcome] += 1
        for kind, c in sorted(kinds.items()):
            lines.append(f"| {fmt} | {mode} | {kind} | {sum(c.values())} | "
                         + ", ".join(f"{k} {v}" for k, v in c.most_common()) + " |")
    return lines


def _examples(res, outcomes=("silent", "unclear", "crash"), k=4):
    lines = []
    for (fmt, mode), rows in res.items():
        for kind, structural, outcome, msg in rows:
            if outcome in outcomes and sum(1 for x in lines if x.startswith(f"- {fmt} {mode}")) < k:
                lines.append(f"- {fmt} {mode} {kind} ({'structural' if structural else 'data'}): {outcome}: "
                             f"`{msg[:200]}`")
    return lines


def _summary(res):
    out = []
    for (fmt, mode), rows in res.items():
        st = [r for r in rows if r[1]]
        da = [r for r in rows if not r[1]]
        s_silent = sum(r[2] == "silent" for r in st)
        s_unclear = sum(r[2] in ("unclear", "crash") for r in st)
        d_caught = sum(r[2] in ("checksum", "rejected") for r in da)
        d_silent = sum(r[2] == "silent" for r in da)
        out.append((fmt, mode, len(rows), len(st), s_silent, s_unclear, len(da), d_caught, d_silent))
    lines = ["| format | mode | corruptions | structural | structural silent | structural unclear/crash | "
             "data | data caught | data silent |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out:
        lines.append("| " + " | ".join(str(x) for x in r[:2]) + " | " + " | ".join(str(x) for x in r[2:]) + " |")
    return lines


def _targets(after, before):
    """The issue's targets, before -> after."""
    def corr(raw):
        if raw is None or "corrupt" not in raw:
            return {}
        out = {}
        for (fmt, mode), rows in _unjson(raw["corrupt"]).items():
            st = [r for r in rows if r[1]]
            da = [r for r in rows if not r[1]]
            out[(fmt, mode)] = (
                sum(r[2] == "silent" for r in st), len(st),
                sum(r[2] in ("unclear", "crash") for r in st),
                sum(r[2] in ("checksum", "rejected") for r in da), len(da))
        return out

    def kills(raw):
        if raw is None or "kill" not in raw:
            return {}
        out = {}
        for k, c in raw["kill"].items():
            n = sum(v for s, v in c.items() if not s.startswith("temp"))
            bad = sum(v for s, v in c.items() if s.startswith(("BROKEN", "refused")))
            refused = sum(v for s, v in c.items() if s.startswith("refused"))
            out[tuple(k.split("|"))] = (n - bad, n, c.get("temp files left after the next save", 0), refused)
        return out

    def cli(raw):
        if raw is None or "cli" not in raw:
            return None
        rows = [r for r in raw["cli"] if r[1] != "verify"]
        errors = [r for r in rows if not r[3].startswith("exit 0")]
        good = sum(r[3] == "one line naming the file" for r in errors)
        return good, len(errors), sum(r[3].startswith("exit 0") for r in rows), len(rows)

    a, b = corr(after), corr(before)
    L = ["## Targets: before -> after", "",
         "| format | structural corruptions loaded silently | structural rejected unclearly | data corruption "
         "caught (native: checksums; exports: sidecar) |", "|---|---|---|---|"]
    for fmt in FORMATS:
        mode = "sidecar"
        if (fmt, mode) not in a:
            continue
        sa, na, ua, ca, da = a[(fmt, mode)]
        bb = b.get((fmt, "no-sidecar" if fmt != "native" else mode)) or b.get((fmt, mode))
        pb = lambda x, n: f"{x}/{n} ({100 * x / max(n, 1):.0f}%)"  # noqa: E731
        before_s = f"{pb(bb[0], bb[1])} -> " if bb else ""
        before_u = f"{pb(bb[2], bb[1])} -> " if bb else ""
        before_d = f"{pb(bb[3], bb[4])} -> " if bb else ""
        L.append(f"| {fmt} | {before_s}**{pb(sa, na)}** | {before_u}**{pb(ua, na)}** | {before_d}**{pb(ca, da)}** |")
        if fmt != "native" and (fmt, "no-sidecar") in a:
            sa2, na2, ua2, ca2, da2 = a[(fmt, "no-sidecar")]
            L.append(f"| {fmt}, written by another tool (no sidecar) | {pb(sa2, na2)} | {pb(ua2, na2)} | "
                     f"{pb(ca2, da2)} (no checksum exists: data corruption is undetectable) |")
    L.append("")
    ka, kb = kills(after), kills(before)
    if ka:
        L.extend(["Safe = the target is absent, the previous checkpoint or the complete new one, loading exactly. "
                  "*refused* = an incomplete directory was left that loading refuses (not loadable, but not "
                  "absent either; the original code's fresh saves did this).", "",
                  "| format | interrupted fresh saves safe (refused) | interrupted overwrites safe | saves after "
                  "which the next save still left temp files (fresh / overwrite) |", "|---|---|---|---|"])
        for fmt in FORMATS:
            if (fmt, "fresh") not in ka:
                continue
            f_a, o_a = ka[(fmt, "fresh")], ka[(fmt, "overwrite")]
            f_b, o_b = kb.get((fmt, "fresh")), kb.get((fmt, "overwrite"))
            fb = f"{f_b[0]}/{f_b[1]} ({f_b[3]}) -> " if f_b else ""
            ob = f"{o_b[0]}/{o_b[1]} -> " if o_b else ""
            tb = f"{f_b[2]} / {o_b[2]} -> " if f_b else ""
            L.append(f"| {fmt} | {fb}**{f_a[0]}/{f_a[1]} ({f_a[3]})** | {ob}**{o_a[0]}/{o_a[1]}** | "
                     f"{tb}**{f_a[2]} / {o_a[2]}** |")
        L.append("")
    ca_, cb_ = cli(after), cli(before)
    if ca_:
        btxt = (f"{cb_[0]}/{cb_[1]} -> " if cb_ else "")
        L.extend([f"CLI (`inspect`, `convert`, `export`; `verify` counted separately below) on structurally "
                  f"corrupted files: errors that are one line naming the file: {btxt}**{ca_[0]}/{ca_[1]}**; "
                  f"runs that exited 0 on a corrupted file: " + (f"{cb_[2]}/{cb_[3]} -> " if cb_ else "")
                  + f"**{ca_[2]}/{ca_[3]}**.", ""])
    return L


def _jsonable(res):
    return {f"{k[0]}|{k[1]}": v for k, v in res.items()}


def _unjson(d):
    return {tuple(k.split("|")): v for k, v in d.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="corruptions per format and mode")
    ap.add_argument("--kills", type=int, default=20, help="kills per format and mode (fresh, overwrite)")
    ap.add_argument("--cli", type=int, default=6, help="corrupted artifacts per format for the CLI check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--before", default=None, help="a checkout of the original code: run the same harness there")
    ap.add_argument("--json-out", default=None, help="(internal) write raw results here and stop")
    ap.add_argument("--before-json", default=None, help="reuse the raw results of an earlier --before run")
    ap.add_argument("--after-json", default=None, help="also keep this run's raw results here")
    ap.add_argument("--from-json", default=None, help="write the report from raw results kept by --after-json")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reliability_files.md"))
    ap.add_argument("--skip", default="", help="comma list of parts to skip: corrupt,kill,cli")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    skip = set(filter(None, args.skip.split(",")))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    raw = {}
    t0 = time.time()
    if args.from_json:  # re-render the report from raw results of an earlier run
        raw = json.loads(Path(args.from_json).read_text())
        skip = {"corrupt", "kill", "cli"}
    if "corrupt" not in skip:
        raw["corrupt"] = _jsonable(run_corruptions(args.n, args.seed, log=log))
    if "kill" not in skip:
        kills, left = run_kills(args.kills, args.seed, log=log)
        raw["kill"] = {f"{k[0]}|{k[1]}": dict(v) for k, v in kills.items()}
        raw["kill_left"] = {f"{k[0]}|{k[1]}": v for k, v in left.items()}
    if "cli" not in skip:
        raw["cli"] = run_cli(args.cli, args.seed, log=log)
    raw.setdefault("seconds", time.time() - t0)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(raw))
        return 0
    if args.after_json:
        Path(args.after_json).write_text(json.dumps(raw))
    before = json.loads(Path(args.before_json).read_text()) if args.before_json else None
    if args.before and before is None:
        bj = Path(tempfile.mkdtemp()) / "before.json"
        env = dict(os.environ, PYTHONPATH=str(Path(args.before).resolve()))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--n", str(args.n), "--kills", str(args.kills),
               "--cli", str(args.cli), "--seed", str(args.seed), "--json-out", str(bj), "--skip", args.skip]
        log("running the same harness on the original code: " + " ".join(cmd))
        subprocess.run(cmd, env=env, check=True, cwd=str(Path(args.before).resolve()))
        before = json.loads(bj.read_text())
        log(f"raw results of the original code: {bj} (reuse with --before-json)")
    write_report(Path(args.out), raw, before, args)
    return 0


def write_report(out: Path, after, before, args):
    import lowbit

    L = ["# File integrity: corrupted files, interrupted saves, CLI errors on bad files", "",
         "Reproduce (from the repository root; the original code checked out with `git worktree add /tmp/orig "
         "main` for the *before* columns):", "",
         "```", f"PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/reliability_files.py --n {args.n} "
                f"--kills {args.kills} --cli {args.cli} --seed {args.seed}"
                + (" --before /tmp/orig" if before else ""), "```", "",
         "(`--before-json FILE` reuses the raw results of an earlier run of the original code.)", "",
         f"lowbit {lowbit.__version__}, torch {torch.__version__}; a tiny Llama (2 layers, hidden 64, RTN int4 "
         "g32 asymmetric for native/GPTQ/AWQ/compressed-tensors; GGUF Q4_0 of the float model). The kill loop "
         "uses a larger model (4 layers, hidden 256, vocab 4096). The machine was shared with other jobs "
         "(timings are not measured here, only outcomes).", "",
         "Outcomes: **rejected** = a lowbit error, one line, naming the file (and the tensor when the corruption "
         "targets one); **checksum** = rejected by a checksum (native per-file/per-tensor sha256, or the export's "
         "sidecar checked at load or by `lowbit.io.verify`); **unclear** = an error that is not lowbit's, spans "
         "several lines, or does not name the file/tensor; **harmless** = loads with bit-identical logits and "
         "tokenization and no checksum to notice (e.g. a GGUF string value in the no-sidecar mode); **silent** = "
         "loads with different logits or NaN; **crash** = hang or a non-Exception escaping.", "",
         "Modes: *sidecar* = the export as lowbit writes it (with `lowbit-checksums.sha256` / "
         "`<file>.lowbit-sha256`); *no-sidecar* = the same files without the checksum (as another tool would "
         "write them): only the structure can be checked, so data corruptions there are expected to pass "
         "(they are listed, not counted against the targets).", ""]

    def section(title, raw, key):
        if raw is None or key not in raw:
            return
        res = _unjson(raw[key])
        L.extend([f"## Corrupted files: {title}", ""] + _summary(res) + [""] + _table_corruption(res) + [""])
        L.extend([f"<details><summary>by corruption kind ({title})</summary>", ""] + _by_kind(res)
                 + ["", "</details>", ""])
        ex = _examples(res)
        if ex:
            L.extend([f"Examples of silent / unclear outcomes ({title}):", ""] + ex + [""])

    L.extend(_targets(after, before))
    L.extend(["Known limits (files without a lowbit checksum, i.e. written by other tools): a GGUF file without "
              "`output.weight` is a valid tied-embedding model, and a tensor type swapped for another of the same "
              "block size (F16 <-> BF16, Q4_0 <-> IQ4_NL) keeps a valid layout; both load as a different model "
              "and only a checksum can tell. Changed tensor bytes or hyperparameter values in valid JSON/GGUF "
              "metadata are data corruption: caught wherever lowbit wrote a checksum, undetectable otherwise. "
              "Files lowbit writes always carry a checksum (native: per file, per tensor and of the index; "
              "exports: the sidecar, checked at load and by `lowbit verify`).", ""])
    section("after (this branch)", after, "corrupt")
    if before is not None:
        L.extend(["The original code writes no checksum sidecar, so its *sidecar* and *no-sidecar* rows are the "
                  "same files (two runs of the same corruptions).", ""])
    section("before (original code)", before, "corrupt")

    def kills(raw, title):
        if raw is None or "kill" not in raw:
            return
        L.extend([f"## Interrupted saves: {title}", "",
                  "SIGKILL at a uniformly random moment of the save (0 .. 1.3 x its duration), fresh target or "
                  "overwriting a previous checkpoint; states: absent / old (previous checkpoint, exact) / new "
                  "(exact) / BROKEN. *temp left* = saves after which the next save still left temporary files; "
                  "*stale before next save* = temporary entries found right after the kills (removed by the next "
                  "save when *temp left* is 0).", "",
                  "| format | mode | kills | absent | old | new | BROKEN | temp left after next save | "
                  "stale entries before next save |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"])
        for k, c in raw["kill"].items():
            fmt, mode = k.split("|")
            broken = sum(v for s, v in c.items() if s.startswith("BROKEN") or s.startswith("refused"))
            n = sum(v for s, v in c.items() if not s.startswith("temp"))
            L.append(f"| {fmt} | {mode} | {n} | {c.get('absent', 0)} | {c.get('old', 0)} | {c.get('new', 0)} | "
                     f"{broken} | {c.get('temp files left after the next save', 0)} | {raw['kill_left'][k]} |")
        L.append("")

    kills(after, "after (this branch)")
    kills(before, "before (original code)")

    def cli(raw, title):
        if raw is None or "cli" not in raw:
            return
        rows = raw["cli"]
        c = Counter(r[3] for r in rows)
        L.extend([f"## CLI on structurally corrupted files: {title}", "",
                  f"{len(rows)} runs (`inspect`, `verify`, `convert`/`export` on {args.cli} corrupted artifacts "
                  "per format): " + ", ".join(f"{k}: {v}" for k, v in c.most_common()), ""])
        bad = [r for r in rows if r[3] not in ("one line naming the file",)]
        if bad:
            L.extend(["| format | command | corruption | outcome | stderr |", "|---|---|---|---|---|"])
            for r in bad[:25]:
                L.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | `{r[4].replace('|', '/')[:160]}` |")
            L.append("")

    cli(after, "after (this branch)")
    cli(before, "before (original code; `verify` did not exist)")
    L.append(f"Run time: {after.get('seconds', 0):.0f} s (after)"
             + (f", {before.get('seconds', 0):.0f} s (before)" if before else "") + ".")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    print(f"wrote {out}")


import numpy as np  # noqa: E402  (used by the GGUF rewriter)

if __name__ == "__main__":
    sys.exit(main())
