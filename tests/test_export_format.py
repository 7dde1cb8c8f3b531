"""The HDF5 format: round trip, atomic writes, and a clear FormatError for every kind of bad file."""
import h5py
import numpy as np
import pytest

from lsquant.export import format as fmt
from lsquant.export.format import FormatError, TensorSpec


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "encoder/0/qkv/weight": rng.integers(-127, 128, size=(12, 4)).astype(np.int8),
        "encoder/0/qkv/weight_clip": rng.uniform(0.1, 2, size=12).astype(np.float32),
        "encoder/0/qkv/input_clip": np.float32(3.5).reshape(()),
        "encoder/0/qkv/bias": rng.standard_normal(12).astype(np.float16),
    }


SPEC = {
    "encoder/0/qkv/weight": TensorSpec((12, 4), ("int8",)),
    "encoder/0/qkv/weight_clip": TensorSpec((12,), ("float32",), clip=True),
    "encoder/0/qkv/input_clip": TensorSpec((), ("float32",), clip=True),
    "encoder/0/qkv/bias": TensorSpec((12,), ("float16", "float32")),
}
HEADER = dict(model_type="transformer", precision="int8", config={"hidden_size": 4, "version": 1},
              special_tokens={"pad": 0, "bos": 1, "eos": 2, "unk": 3}, decoding={"beam_size": 4},
              quantization={"scheme": "symmetric", "qmax": 127})


def test_round_trip(tmp_path):
    path = fmt.write(tmp_path / "m.h5", _tensors(), **HEADER)
    m = fmt.read(path, SPEC, model_type="transformer")
    assert m.config == HEADER["config"] and m.special_tokens["eos"] == 2 and m.decoding["beam_size"] == 4
    for k, v in _tensors().items():
        assert np.array_equal(m.tensors[k], v) and m.tensors[k].dtype == v.dtype
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]          # no temporary file left


def test_large_datasets_are_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 1024)
    t = {"big": np.ones((4096, 3), dtype=np.float32)}
    fmt.write(tmp_path / "big.h5", t, **HEADER)
    with h5py.File(tmp_path / "big.h5") as f:
        assert f["big"].chunks is not None
    assert np.array_equal(fmt.read(tmp_path / "big.h5").tensors["big"], t["big"])


def test_interrupted_write_keeps_the_good_file(tmp_path, monkeypatch):
    path = fmt.write(tmp_path / "m.h5", _tensors(), **HEADER)
    before = path.read_bytes()
    calls = {"n": 0}
    real = h5py.Group.create_dataset

    def dying(self, name, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-export")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", dying)
    with pytest.raises(KeyboardInterrupt):
        fmt.write(path, _tensors(), **HEADER)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.h5"]


def test_unknown_version_and_foreign_files(tmp_path):
    path = fmt.write(tmp_path / "m.h5", _tensors(), **HEADER)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(FormatError, match="format version 99.*reads version 1.*upgrade"):
        fmt.read(path)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(2)
    with pytest.raises(FormatError, match="not an lsquant export"):
        fmt.read(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FormatError, match="cannot be opened as HDF5"):
        fmt.read(tmp_path / "text.h5")
    with pytest.raises(FileNotFoundError):
        fmt.read(tmp_path / "none.h5")


def test_truncated_file(tmp_path):
    path = fmt.write(tmp_path / "m.h5", {"w": np.ones((20000,), np.float32)}, **HEADER)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        fmt.read(path, {"w": TensorSpec((20000,), ("float32",))})


@pytest.mark.parametrize("name,value,match", [
    ("encoder/0/qkv/weight", np.zeros((12, 5), np.int8), r"'encoder/0/qkv/weight' has shape \(12, 5\), expected \(12, 4\)"),
    ("encoder/0/qkv/weight", np.zeros((12, 4), np.float32), "has dtype float32, expected int8"),
    ("encoder/0/qkv/input_clip", np.float32(0).reshape(()), "'encoder/0/qkv/input_clip' holds 0.0"),
    ("encoder/0/qkv/weight_clip", -np.ones(12, np.float32), "holds -1.0"),
    ("encoder/0/qkv/weight_clip", np.full(12, np.nan, np.float32), "holds nan"),
])
def test_bad_datasets_are_named(tmp_path, name, value, match):
    t = _tensors()
    t[name] = value
    path = fmt.write(tmp_path / "m.h5", t, **HEADER)
    with pytest.raises(FormatError, match=match):
        fmt.read(path, SPEC)


def test_missing_dataset_and_attribute(tmp_path):
    t = _tensors()
    del t["encoder/0/qkv/bias"]
    path = fmt.write(tmp_path / "m.h5", t, **HEADER)
    with pytest.raises(FormatError, match="dataset 'encoder/0/qkv/bias' is missing"):
        fmt.read(path, SPEC)
    with h5py.File(path, "a") as f:
        del f.attrs["decoding"]
    with pytest.raises(FormatError, match="'decoding' is missing"):
        fmt.read(path)
    with pytest.raises(FormatError, match="not a 'bert'"):
        fmt.read(fmt.write(tmp_path / "n.h5", _tensors(), **HEADER), model_type="bert")
