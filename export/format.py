"""The lsquant HDF5 format: one self-describing file per model, int8 or fp16. Documented in export/FORMAT.md.

Layout (format version 1):
    attributes of the root group (JSON strings unless noted):
        format            "lsquant"                  (str)
        format_version    1                          (int)
        lsquant_version   the writer's version       (str)
        model_type        e.g. "transformer"         (str)
        precision         "int8" or "fp16"           (str)
        config            the model's config dataclass as a dict, with its own "version"
        special_tokens    {"pad": 0, "bos": 1, ...}
        decoding          {"beam_size": 4, "length_penalty": 0.6, "max_len_a": ..., ...}
        quantization      {"scheme": "symmetric", "qmax": 127, "weights": "per-channel axis 0",
                           "activations": "per-tensor", "rounding": "half-to-even"}
    datasets, one per tensor, named by the model's mapping (export/<model>.py), e.g.
        encoder/0/qkv/weight         int8 [N, K]
        encoder/0/qkv/weight_clip    float32 [N]     (scale = clip / 127)
        encoder/0/qkv/input_clip     float32 []
        encoder/0/qkv/bias           float16 or float32 [N]

Datasets over 64 MiB are chunked (HDF5 has no 2 GB limit per dataset; chunks keep reads streaming). Files
are written atomically: to a temporary file in the target's folder, flushed and fsynced, then renamed over
the target, so an interrupted export never leaves a half file under the target name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsquant.files import atomic_path

FORMAT = "lsquant"
FORMAT_VERSION = 1
JSON_ATTRS = ("config", "special_tokens", "decoding", "quantization")
CHUNK_BYTES = 64 << 20


class FormatError(ValueError):
    """An lsquant HDF5 file is unreadable or does not match what its header promises."""


@dataclass(frozen=True)
class TensorSpec:
    """What the reader expects of one dataset: shape (ints), numpy dtype names allowed, and whether it is a
    clip (then every value must be finite and > 0)."""
    shape: tuple
    dtypes: tuple
    clip: bool = False


def _h5py():
    import h5py

    return h5py


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], *, model_type: str, precision: str,
          config: dict, special_tokens: dict, decoding: dict, quantization: dict | None = None,
          tokenizer: str | None = None) -> Path:
    """Write one model file atomically. tensors: dataset name -> numpy array (int8, float16 or float32);
    tokenizer: the tokenizer's own JSON (tokenizers' tokenizer.json), stored so the file is all a server needs."""
    from lsquant import __version__

    h5py = _h5py()
    if precision not in ("int8", "fp16"):
        raise ValueError(f"precision must be 'int8' or 'fp16', got {precision!r}")
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["lsquant_version"] = __version__
        f.attrs["model_type"] = model_type
        f.attrs["precision"] = precision
        for key, value in (("config", config), ("special_tokens", special_tokens), ("decoding", decoding),
                           ("quantization", quantization or {})):
            f.attrs[key] = json.dumps(value, sort_keys=True)
        if tokenizer is not None:
            f.attrs["tokenizer"] = tokenizer
        for name, array in tensors.items():
            array = np.asarray(array, order="C")  # (ascontiguousarray would turn a 0-d clip into 1-d)
            if array.dtype not in (np.int8, np.float16, np.float32):
                raise ValueError(f"dataset {name}: dtype {array.dtype} is not int8, float16 or float32")
            chunks = None
            if array.nbytes > CHUNK_BYTES and array.ndim >= 1:
                rows = max(1, CHUNK_BYTES // max(1, array.nbytes // array.shape[0]))
                chunks = (min(rows, array.shape[0]),) + array.shape[1:]
            f.create_dataset(name, data=array, chunks=chunks)
    return path


@dataclass
class ModelFile:
    """A validated file in memory: header fields and tensors (numpy arrays)."""
    path: Path
    model_type: str
    precision: str
    config: dict
    special_tokens: dict
    decoding: dict
    quantization: dict
    tensors: dict
    lsquant_version: str = ""
    tokenizer: str | None = None


def read_header(path: str | os.PathLike) -> dict:
    """The root attributes, checked: a FormatError says what is wrong (not HDF5, not lsquant, version)."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as e:
        raise FormatError(f"{path} cannot be opened as HDF5 (truncated, corrupted or not an lsquant export): "
                          f"{e}") from e
    if attrs.get("format") != FORMAT:
        raise FormatError(f"{path} is HDF5 but not an lsquant export (no format='lsquant' attribute)")
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {version}; this lsquant reads version {FORMAT_VERSION}"
                          + (": upgrade lsquant" if version > FORMAT_VERSION else ""))
    header = {}
    for key in ("model_type", "precision", "lsquant_version"):
        if key not in attrs:
            raise FormatError(f"{path}: attribute {key!r} is missing")
        header[key] = str(attrs[key])
    header["tokenizer"] = str(attrs["tokenizer"]) if "tokenizer" in attrs else None
    for key in JSON_ATTRS:
        if key not in attrs:
            raise FormatError(f"{path}: attribute {key!r} is missing")
        try:
            header[key] = json.loads(attrs[key])
        except (TypeError, ValueError) as e:
            raise FormatError(f"{path}: attribute {key!r} is not valid JSON ({e})") from e
    return header


def read(path: str | os.PathLike, expected: dict[str, TensorSpec] | None = None, *,
         model_type: str | None = None) -> ModelFile:
    """Read and validate a file. expected: dataset name -> TensorSpec (from the model's mapping, built from
    the file's own config); every expected dataset must be there with that shape and dtype, and clips must
    be finite and positive. Raises FormatError naming the dataset and what was expected."""
    h5py = _h5py()
    header = read_header(path)
    if model_type is not None and header["model_type"] != model_type:
        raise FormatError(f"{path} holds a {header['model_type']!r} model, not a {model_type!r}")
    tensors = {}
    try:
        with h5py.File(path, "r") as f:
            names = []
            f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
            wanted = list(expected) if expected is not None else names
            for name in wanted:
                if name not in f:
                    raise FormatError(f"{path}: dataset {name!r} is missing")
                tensors[name] = f[name][()]
    except OSError as e:
        raise FormatError(f"{path}: reading the datasets failed (truncated or corrupted file?): {e}") from e
    for name, spec in (expected or {}).items():
        a = tensors[name]
        if tuple(a.shape) != tuple(spec.shape):
            raise FormatError(f"{path}: dataset {name!r} has shape {tuple(a.shape)}, expected {tuple(spec.shape)}")
        if a.dtype.name not in spec.dtypes:
            raise FormatError(f"{path}: dataset {name!r} has dtype {a.dtype.name}, expected "
                              f"{' or '.join(spec.dtypes)}")
        if spec.clip:
            bad = ~(np.isfinite(a) & (a > 0))
            if bad.any():
                v = a.reshape(-1)[bad.reshape(-1)][0]
                raise FormatError(f"{path}: clip dataset {name!r} holds {v} (clips must be finite and > 0); "
                                  "re-export from a calibrated model")
    return ModelFile(path=Path(path), tensors=tensors, **header)
