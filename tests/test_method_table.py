"""One method table (issue 16, part A): a method registered from outside the package runs through
``lowbit.quantize``, the CLI and ``plan``; every entry point gives a method name one meaning; an
option a method does not use is an error, an option a format overrides is announced and recorded."""
import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.cli import main
from lowbit.config import AWQConfig, GPTQConfig, HQQConfig, RTNConfig, WeightOnlyConfig
from lowbit.model.methods import METHODS, register_ptq_method
from lowbit.model.plan import Cost, storage_affine


# ---------------------------------------------------------------------------------------------
# a toy PTQ method, defined here (outside lowbit): a config, a function, one registration line


@dataclass(frozen=True)
class ToyConfig(WeightOnlyConfig):
    method: ClassVar[str] = "toy-rtn"
    shrink: float = 1.0  # the toy's own option: scales the weight before rounding


def toy_layer(weight: torch.Tensor, config: ToyConfig):
    return rtn_quantize(weight * config.shrink, config.bits, config.group_size, config.sym)


@dataclass(frozen=True)
class ToyCalConfig(WeightOnlyConfig):
    method: ClassVar[str] = "toy-cal"


SEEN_STATS = []


def toy_stage(stage, modules, config: ToyCalConfig):
    """A calibrated toy: records that the stage's statistics arrived, then rounds to nearest."""
    SEEN_STATS.append(stage.stats.hessian().shape)
    for n in stage.names:
        st = rtn_quantize(modules[n].weight.detach(), config.bits, config.group_size, config.sym)
        stage.states[n] = st


@pytest.fixture
def toy_methods():
    register_ptq_method("toy-rtn", config=ToyConfig, layer=toy_layer)
    register_ptq_method("toy-cal", config=ToyCalConfig, stage=toy_stage,
                        cost=Cost(calibrated=True, storage=storage_affine))
    yield
    for name in ("toy-rtn", "toy-cal"):
        METHODS._items.pop(name, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("table")
    tiny_llama(hidden=64, layers=2, intermediate=192).save_pretrained(d / "tiny")
    tiny_tokenizer().save_pretrained(d / "tiny")
    (d / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return d


def _model():
    from lowbit.model.loading import tiny_llama

    return tiny_llama(hidden=64, layers=2, intermediate=192, seed=0)


def _states(model):
    from lowbit.nn import QModuleMixin

    return {n: m.state_dict() for n, m in model.named_modules() if isinstance(m, QModuleMixin)}


def _same(a, b):
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def test_toy_method_runs_through_quantize(toy_methods):
    toy = lowbit.quantize(_model(), method="toy-rtn", bits=4, group_size=32, shrink=1.0, progress=False)
    ref = lowbit.quantize(_model(), method="rtn", bits=4, group_size=32, progress=False)
    assert _states(toy) and _same(_states(toy), _states(ref))
    assert toy.ptq_summary["method"] == "toy-rtn"
    other = lowbit.quantize(_model(), method="toy-rtn", bits=4, group_size=32, shrink=0.5, progress=False)
    assert not _same(_states(other), _states(ref))  # the option reaches the function
    with pytest.raises(ValueError, match="does not accept 'percdamp'.*accepted keys.*shrink"):
        lowbit.quantize(_model(), method="toy-rtn", percdamp=0.1)
    with pytest.raises(ValueError, match="group_size=0"):
        lowbit.quantize(_model(), method="toy-rtn", group_size=0)


def test_toy_calibrated_method_gets_statistics(toy_methods):
    SEEN_STATS.clear()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    m = lowbit.quantize(_model(), method="toy-cal", group_size=32, calib_dataset=ids, progress=False)
    assert SEEN_STATS and m.ptq_summary["calib_tokens"] == ids.numel()
    assert METHODS.get("toy-cal").calibrated and not METHODS.get("toy-rtn").calibrated


def test_toy_method_through_cli_and_plan(toy_methods, tiny, tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["quantize", "--model", str(tiny / "tiny"), "--method", "toy-rtn", "--group-size", "32",
                 "--output", str(out), "--quiet"]) == 0
    meta = json.loads((out / "lowbit_run.json").read_text())
    assert meta["method"] == "toy-rtn" and meta["group_size"] == 32 and meta["bits"] == 4
    assert meta["config"]["shrink"] == 1.0
    capsys.readouterr()
    assert main(["plan", "--model", str(tiny / "tiny"), "--method", "toy-rtn", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "toy-rtn" and plan["output_mb"] > 0
    assert main(["plan", "--model", str(tiny / "tiny"), "--method", "toy-cal", "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["peak_ram_mb"] > plan["peak_ram_mb"]  # calibration activations are costed
    rc = main(["quantize", "--model", str(tiny / "tiny"), "--method", "toy-rtn", "--n-samples", "8",
               "--output", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'toy-rtn' does not use --n-samples" in err and "no calibration data" in err


# ---------------------------------------------------------------------------------------------
# nothing dropped silently


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    return err[-1]


@pytest.mark.parametrize("argv,needle", [
    (["--method", "nf4", "--group-size", "32"], "'nf4' (bnb-nf4) does not use --group-size (it fixes bits=4, group_size=64"),
    (["--method", "nf4", "--bits", "3"], "does not use --bits"),
    (["--method", "int4", "--asym", "--bits", "8"], "does not use --bits"),
    (["--method", "rtn", "--double-quant"], "'rtn' does not use --double-quant"),
    (["--method", "hqq", "--calib-seq-len", "64"], "no calibration data"),
    (["--method", "fp16", "--group-size", "64"], "'fp16' does not use --group-size"),
    (["--method", "sparse-2:4", "--micro-batch", "2"], "does not use --micro-batch"),
])
def test_unused_option_is_an_error(tiny, tmp_path, capsys, argv, needle):
    rc = main(["quantize", "--model", str(tiny / "tiny"), *argv, "--output", str(tmp_path / "o"), "--quiet"])
    line = _one_line_error(capsys, rc)
    assert needle in line and "it takes" in line
    assert not (tmp_path / "o").exists()


def test_fixed_values_are_accepted(tiny, tmp_path, capsys):
    # nf4 is 4-bit anyway; int4 is asymmetric anyway: saying so is not an error
    assert main(["plan", "--model", str(tiny / "tiny"), "--method", "nf4", "--bits", "4", "--quiet"]) == 0
    assert main(["plan", "--model", str(tiny / "tiny"), "--method", "int4", "--asym", "--quiet"]) == 0


def test_gguf_override_is_announced_and_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["quantize", "--model", str(tiny / "tiny"), "--method", "rtn", "--bits", "4", "--group-size", "128",
                 "--format", "gguf", "--gguf-type", "Q4_0", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--format gguf: rtn quantizes onto Q4_0 blocks (4-bit, groups of 32, symmetric); replaces group_size=128" \
        in err
    meta = json.loads((out / "lowbit_run.json").read_text())
    assert (meta["bits"], meta["group_size"], meta["sym"]) == (4, 32, True)
    assert meta["requested"] == {"bits": 4, "group_size": 128}
    assert meta["config"]["gguf_type"] == "Q4_0"


def test_recorded_values_are_the_ones_used(tiny, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(tiny / "tiny"), "--method", "nf4", "--output", str(out), "--quiet"]) == 0
    meta = json.loads((out / "lowbit_run.json").read_text())
    assert (meta["bits"], meta["group_size"], meta["sym"]) == (4, 64, True)  # nf4's blocks, not the CLI's 128


def test_int4_group_minus_one_is_per_channel():
    lin = nn.Sequential()
    lin.add_module("fc", nn.Linear(96, 8))
    lowbit.quantize(lin, method="int4", group_size=-1)
    st = lin.fc.quant_states()["weight"]
    assert st.scales.numel() == 8  # one scale per output channel, not the automatic groups


# ---------------------------------------------------------------------------------------------
# one meaning per name


def test_int4_means_the_same_everywhere():
    """CLI --method int4, lowbit.quantize(method="int4") and LowbitConfig(method="int4"): asymmetric qint4 g128."""
    from lowbit.integrations.transformers import LowbitConfig

    w = nn.Linear(256, 16)
    a = nn.Sequential()
    a.add_module("fc", nn.Linear(256, 16))
    a.fc.load_state_dict(w.state_dict())
    lowbit.quantize(a, method="int4")
    b = LowbitConfig(method="int4").module_for(w)
    b.freeze()
    assert torch.equal(a.fc.weight, b.weight)
    assert (LowbitConfig(method="int4").sym, LowbitConfig(method="int4").group_size) == (False, 128)


def test_exclude_means_the_same_in_quanto_and_ptq():
    def model():
        m = nn.Sequential()
        block = nn.Sequential()
        block.add_module("proj", nn.Linear(32, 32))
        block.add_module("lm_head", nn.Linear(32, 32))
        m.add_module("block", block)
        return m

    q = lowbit.quantize(model(), weights="qint4", exclude=["lm_head"])
    p = lowbit.quantize(model(), method="rtn", group_size=32, exclude=["lm_head"], progress=False)
    for m in (q, p):
        assert type(m.block.lm_head) is nn.Linear and type(m.block.proj) is not nn.Linear


def test_config_defaults_are_the_algorithms():
    """Each config owns its defaults; they must stay the algorithm functions' own."""
    from lowbit.algorithms.awq import awq_search
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.algorithms.grid import AffineGrid
    from lowbit.algorithms.hqq import hqq_quantize

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    grid = {f.name: f.default for f in dataclasses.fields(AffineGrid)}
    funcs = {GPTQConfig: defaults(gptq_quantize), AWQConfig: {**defaults(awq_search), "gqa_tie": False},
             HQQConfig: defaults(hqq_quantize), RTNConfig: {**grid, **defaults(rtn_quantize)}}
    for cls, d in funcs.items():
        for f in cls.option_fields():
            assert f.name in d, (cls.__name__, f.name)
            assert d[f.name] == f.default, (cls.__name__, f.name, d[f.name], f.default)
        assert cls().options() == {}
    from lowbit.algorithms.gptq import GROUP_OBJECTIVES
    from lowbit.config import GPTQ_GROUP_OBJECTIVES

    assert GPTQ_GROUP_OBJECTIVES == GROUP_OBJECTIVES
    with pytest.raises(ValueError, match="group_objective='l2'"):
        GPTQConfig(group_objective="l2")


def test_every_entry_point_reads_the_table():
    from lowbit.model.plan import method_cost

    for name in ("rtn", "gptq", "awq", "hqq", "nf4", "fp4", "int8", "int4", "int2", "fp8", "fp16", "bf16", "fp32",
                 "sparse-2:4", "sparse-2:4-int8", "sparse-2:4-int4"):
        entry = METHODS.get(name)
        assert entry.config_cls is not None, name
        assert isinstance(method_cost(name), Cost), name
    assert METHODS.get("gptq").calibrated and METHODS.get("sparse-2:4").calibrated
    assert not METHODS.get("fp32").quantized and METHODS.get("int4").quantized


def test_compare_shares_flags_with_the_methods_that_use_them(tiny, capsys):
    rc = main(["compare", "--model", str(tiny / "tiny"), "--methods", "fp32,nf4,int8", "--bits", "3", "--quiet"])
    assert "--bits: used by none of --methods fp32,nf4,int8" in _one_line_error(capsys, rc)


def test_quantize_run_returns_a_report(tiny, tmp_path):
    from lowbit.workflow import quantize_run

    rep = quantize_run(str(tiny / "tiny"), tmp_path / "q", method="rtn", options={"group_size": 64},
                       formats=["native", "gguf"], gguf_type="Q8_0", progress=False)
    assert rep.used == {"bits": 8, "group_size": 32, "sym": True} and rep.formats == ["native", "gguf"]
    assert rep.notes == ["--format gguf: rtn quantizes onto Q8_0 blocks (8-bit, groups of 32, symmetric); "
                         "replaces group_size=64"]
    assert rep.gate_passed and rep.gguf_summary
    meta = json.loads((tmp_path / "q" / "lowbit_run.json").read_text())
    assert meta == json.loads(json.dumps(rep.meta, default=str))


def test_per_linear_option_mapping():
    """An option given per linear (a GGUF type per weight) reaches each layer as its own value."""
    from lowbit.model.loading import tiny_llama

    m = tiny_llama(hidden=64, layers=1, intermediate=128, seed=0)
    names = [n for n, mod in m.named_modules() if type(mod) is nn.Linear and not n.endswith("lm_head")]
    types = {n: ("Q8_0" if "mlp" in n else "q4_0") for n in names}
    lowbit.quantize(m, method="rtn", gguf_type=types, progress=False)
    got = {n: mod.quant_states()["weight"].scheme for n, mod in m.named_modules() if n in types}
    assert got == {n: t.lower() for n, t in types.items()}
    with pytest.raises(ValueError, match="no value for the linear"):
        RTNConfig(gguf_type={"nothing": "Q4_0"}).for_layer(names[0])
