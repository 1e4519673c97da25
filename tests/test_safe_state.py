"""Checkpoints that cannot run code: `soctune.io.save_state` / `load_state` (one .safetensors
file, tensors + a JSON skeleton, never a pickle)."""

from __future__ import annotations

import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from soctune.io import UnsafeOrCorruptStateError, load_state, save_state
from soctune.registry import SoctuneError


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(16, 4, generator=g)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _assert_same(a, b) -> None:
    """Structural equality that also checks container types, tensor dtypes and nan."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and b.device.type == "cpu"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        assert all(type(k) is type(kb) for k, kb in zip(a, b))
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_realistic_trainer_state_round_trips(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    for i in range(2):
        _step(model, opt, i)
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    base = torch.arange(12.0)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "iteration": 2,
        "nested": {"a": [1, 2.5, (3, "x", None)], 7: {"deep": [[True, False], ()]}, "empty": {}},
        "bf16": torch.linspace(-3, 3, 6).view(3, 2).to(torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "int64": torch.tensor([-(2**62), 2**62]),
        "transposed": base.view(3, 4).t(),  # non-contiguous
        "alias_a": base,                    # three tensors on one storage
        "alias_b": base[2:5],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300],
        "none": None,
        "np": {"f32": np.linspace(0, 1, 5, dtype=np.float32), "i8": np.array([[1, -2]], dtype=np.int8),
               "bool": np.array([True, False])},
        "text": "ok ✓",
    }
    # the next draws after the captured RNG states
    want_gen = torch.randn(4, generator=gen)
    want = (torch.rand(3), np.random.rand(3), random.random())
    path = tmp_path / "ckpt.safetensors"
    save_state(path, state)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind
    assert path.read_bytes()[:1] != b"\x80" and not path.read_bytes().startswith(b"PK")
    loaded = load_state(path)
    _assert_same(state, loaded)
    assert isinstance(loaded["optimizer"]["state"], dict)
    assert all(type(k) is int for k in loaded["optimizer"]["state"])
    assert loaded["optimizer"]["state"][0]["step"].dim() == 0
    assert loaded["model"]._metadata == state["model"]._metadata  # nn.Module versions kept
    assert isinstance(loaded["numpy_rng"], tuple) and isinstance(loaded["python_rng"], tuple)

    # optimizer: a fresh model+optimizer loaded from the file takes the same next step
    model2, opt2 = _model_and_opt(seed=123)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    _step(model, opt, 2)
    _step(model2, opt2, 2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)

    # RNGs: setting the loaded states back gives the same next draws
    g2 = torch.Generator()
    g2.set_state(loaded["generator"])
    assert torch.equal(torch.randn(4, generator=g2), want_gen)
    torch.rand(5), np.random.rand(5), random.random()  # move them all on
    torch.set_rng_state(loaded["torch_rng"])
    np.random.set_state(loaded["numpy_rng"])
    random.setstate(loaded["python_rng"])
    assert torch.equal(torch.rand(3), want[0])
    np.testing.assert_array_equal(np.random.rand(3), want[1])
    assert random.random() == want[2]


def test_loaded_tensors_are_independent_copies(tmp_path: Path) -> None:
    base = torch.arange(6.0)
    save_state(tmp_path / "s.safetensors", {"a": base, "b": base[1:3], "c": [base]})
    out = load_state(tmp_path / "s.safetensors")
    out["a"].add_(100)
    assert torch.equal(out["b"], torch.tensor([1.0, 2.0])) and torch.equal(out["c"][0], torch.arange(6.0))
    assert torch.equal(load_state(tmp_path / "s.safetensors")["a"], torch.arange(6.0))
    assert torch.equal(base, torch.arange(6.0))


def test_scalars_and_special_floats(tmp_path: Path) -> None:
    state = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"), "zero": 0.0, "big": 2**80,
             "t": True, "f": False, "none": None, "np_scalar": np.float32(1.25), "np_int": np.int64(-3),
             "step": torch.tensor(2.0), "str_keys_like_tags": {"t": "tensor", "k": "t0"}}
    save_state(tmp_path / "s.safetensors", state)
    out = load_state(tmp_path / "s.safetensors")
    assert math.isnan(out["nan"]) and out["inf"] == math.inf and out["ninf"] == -math.inf
    assert out["big"] == 2**80 and out["t"] is True and out["f"] is False and out["none"] is None
    assert type(out["np_scalar"]) is np.float32 and out["np_scalar"] == 1.25
    assert type(out["np_int"]) is np.int64 and out["np_int"] == -3
    assert out["step"].shape == () and out["step"].item() == 2.0
    assert out["str_keys_like_tags"] == {"t": "tensor", "k": "t0"}


class _Marker:
    """Unpickling this creates a file: the proof that a loader ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_file_is_refused_without_running_it(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "ckpt.safetensors"
    payload = {"model": torch.zeros(2), "evil": _Marker(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    assert not marker.exists()
    with pytest.raises(UnsafeOrCorruptStateError) as info:
        load_state(path)
    msg = str(info.value)
    assert isinstance(info.value, SoctuneError)
    assert "pickle" in msg and str(path) in msg and "\n" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 4, 8, 40, -1])
def test_truncated_file_is_corrupt(tmp_path: Path, cut: int) -> None:
    good = tmp_path / "good.safetensors"
    save_state(good, {"w": torch.randn(4, 4), "meta": {"i": 1}})
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(UnsafeOrCorruptStateError) as info:
        load_state(bad)
    msg = str(info.value)
    assert "corrupt" in msg and "truncated" in msg and str(bad) in msg and "\n" not in msg
    assert "pickle" not in msg


def test_truncated_state_whose_header_length_looks_like_a_pickle_mark_is_corrupt(tmp_path: Path) -> None:
    """A header of 640 bytes = 0x0280 makes the file's first bytes 80 02, pickle protocol 2's mark; a
    truncated state of that shape is corrupt, not a pickle (test_reliability's truncated checkpoint met it in
    a fresh clone: its header length, which varies with the run's path, had the low byte 0x80)."""
    header = b'{"__metadata__":{"k":"' + b"x" * 640
    header = header[:640]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header[:300])
    assert bad.read_bytes()[:2] == b"\x80\x02"
    with pytest.raises(UnsafeOrCorruptStateError) as info:
        load_state(bad)
    msg = str(info.value)
    assert "corrupt" in msg and "truncated" in msg and "pickle" not in msg


def test_plain_safetensors_without_skeleton_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UnsafeOrCorruptStateError, match="not a soctune state"):
        load_state(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("state, where", [
    ({"a": {"b": [1, object()]}}, "state['a']['b'][1]"),
    ({"opt": {3: {"fn": len}}}, "state['opt'][3]['fn']"),
    ({"p": Path("x")}, "state['p']"),
    ({"s": {1, 2}}, "state['s']"),
    ({"k": {(1, 2): 0}}, "state['k']"),
    ({"o": np.array([object()], dtype=object)}, "state['o']"),
    ({"sp": torch.eye(2).to_sparse()}, "state['sp']"),
])
def test_unsupported_objects_raise_type_error_naming_the_key(tmp_path: Path, state, where: str) -> None:
    path = tmp_path / "s.safetensors"
    with pytest.raises(TypeError) as info:
        save_state(path, state)
    assert where in str(info.value)
    assert not path.exists() and not os.listdir(tmp_path)


def test_reference_cycle_raises_type_error(tmp_path: Path) -> None:
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match="cycle"):
        save_state(tmp_path / "s.safetensors", {"loop": loop})


def test_overwrite_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(path, {"i": 1})
    save_state(path, {"i": 2, "t": torch.ones(3)})
    out = load_state(path)
    assert out["i"] == 2 and torch.equal(out["t"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]
