"""Export of lsquant.models.Transformer to the HDF5 format (export/FORMAT.md), and the spec its reader checks.

Dataset names (L: a layer index; P: a linear):
    {src,tgt}_embedding/table            int8 [V, H] + table_clip [V]   (fp16 export: float [V, H])
    {src,tgt}_embedding/pos              float [max_seq_len, H]         (learned positions only)
    tgt_embedding/ only when embeddings are not shared.
    output_projection/input_clip         [] (int8; the projection's weight is the target table)
    encoder/L/P/{weight, weight_clip, input_clip, bias}  P in qkv, attn_out, fc1, fc2
    decoder/L/P/...                      P in qkv, attn_out, cross_q, cross_kv, cross_out, fc1, fc2
    {encoder,decoder}/L/<ln>/{weight, bias}               ln in attn_ln, (cross_ln), ffn_ln
    decoder/L/k_clip, decoder/L/v_clip   [] clips of the self-attention K/V cache (int8)
    decoder/L/cross_k_clip, decoder/L/cross_v_clip  [] clips of the cross-attention K/V (int8, models with
                                         quant_cross_kv: the config says whether the file has them)
    {encoder,decoder}_norm/{weight, bias} (pre-LN models)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lsquant.quant import ref
from lsquant.quant.calibrate import quantizers

from . import format as fmt

ENC_LINEARS = ("qkv", "attn_out", "fc1", "fc2")
DEC_LINEARS = ("qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "fc1", "fc2")
ENC_LNS = ("attn_ln", "ffn_ln")
DEC_LNS = ("attn_ln", "cross_ln", "ffn_ln")
FLOAT = ("float16", "float32")
QUANTIZATION = {"scheme": "symmetric", "qmax": ref.QMAX, "rounding": "half-to-even",
                "weights": "per-channel axis 0 (clip = max |w| of the row)", "activations": "per-tensor",
                "kv_cache": "per-tensor"}


def _linear_shapes(cfg: dict, name: str) -> tuple[int, int]:
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    return {"qkv": (3 * H, H), "attn_out": (H, H), "cross_q": (H, H), "cross_kv": (2 * H, H),
            "cross_out": (H, H), "fc1": (I, H), "fc2": (H, I)}[name]


def spec(cfg: dict, precision: str) -> dict[str, fmt.TensorSpec]:
    """What a file of this config and precision must hold (the reader checks every entry)."""
    S = fmt.TensorSpec
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    int8 = precision == "int8"
    out: dict[str, fmt.TensorSpec] = {}
    for emb in ("src_embedding",) + (() if cfg["share_embeddings"] else ("tgt_embedding",)):
        if int8:
            out[f"{emb}/table"] = S((V, H), ("int8",))
            out[f"{emb}/table_clip"] = S((V,), ("float32",), clip=True)
        else:
            out[f"{emb}/table"] = S((V, H), FLOAT)
        if cfg["learned_pos"]:
            out[f"{emb}/pos"] = S((cfg["max_seq_len"], H), FLOAT)
    if int8:
        out["output_projection/input_clip"] = S((), ("float32",), clip=True)
    for stack, n, linears, lns in (("encoder", cfg["num_encoder_layers"], ENC_LINEARS, ENC_LNS),
                                   ("decoder", cfg["num_decoder_layers"], DEC_LINEARS, DEC_LNS)):
        for i in range(n):
            for p in linears:
                N, K = _linear_shapes(cfg, p)
                base = f"{stack}/{i}/{p}"
                out[f"{base}/weight"] = S((N, K), ("int8",) if int8 else FLOAT)
                out[f"{base}/bias"] = S((N,), FLOAT)
                if int8:
                    out[f"{base}/weight_clip"] = S((N,), ("float32",), clip=True)
                    out[f"{base}/input_clip"] = S((), ("float32",), clip=True)
            for ln in lns:
                out[f"{stack}/{i}/{ln}/weight"] = S((H,), FLOAT)
                out[f"{stack}/{i}/{ln}/bias"] = S((H,), FLOAT)
            if int8 and stack == "decoder":
                for kv in ("k", "v") + (("cross_k", "cross_v") if cfg.get("quant_cross_kv", False) else ()):
                    out[f"decoder/{i}/{kv}_clip"] = S((), ("float32",), clip=True)
        if cfg["pre_layer_norm"]:
            out[f"{stack}_norm/weight"] = S((H,), FLOAT)
            out[f"{stack}_norm/bias"] = S((H,), FLOAT)
    return out


def _np(t: torch.Tensor, float_dtype=np.float16) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.int8:
        return t.numpy()
    return t.float().numpy().astype(float_dtype)


def _clip(q) -> np.ndarray:
    if not bool(q.initialized):
        raise ValueError(f"quantizer {getattr(q, '_lsquant_name', '')} has no clip: calibrate the model "
                         "(lsquant.calibrate or `lsquant ptq`) or train it with QAT before an int8 export")
    return q.current_clip().detach().float().cpu().numpy().astype(np.float32).reshape(q.clip.shape)


def _weight_int8(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 weight and clips, as the layers' dynamic weight quantizers compute them in QAT."""
    w = w.detach().float().cpu()
    clip = w.abs().amax(dim=1).clamp(min=1e-8)
    return ref.quantize_ref(w, clip, axis=0).numpy(), clip.numpy().astype(np.float32)


def tensors(model, precision: str = "int8", float_dtype=np.float16) -> dict[str, np.ndarray]:
    """The model's datasets (see the module docstring)."""
    if precision not in ("int8", "fp16"):
        raise ValueError(f"precision must be 'int8' or 'fp16', got {precision!r}")
    quantizers(model)  # names every quantizer for the error messages
    c = model.config
    int8 = precision == "int8"
    out: dict[str, np.ndarray] = {}
    embs = [("src_embedding", model.src_embedding)]
    if not c.share_embeddings:
        embs.append(("tgt_embedding", model.tgt_embedding))
    for name, emb in embs:
        table = emb.w("embeddings")
        if int8:
            out[f"{name}/table"], out[f"{name}/table_clip"] = _weight_int8(table)
        else:
            out[f"{name}/table"] = _np(table, float_dtype)
        if c.learned_pos:
            out[f"{name}/pos"] = _np(emb.w("pos_embeddings"), float_dtype)
    if int8:
        out["output_projection/input_clip"] = _clip(model.tgt_embedding.proj_input_quantizer)
    for stack, layers, linears, lns in (("encoder", model.encoder, ENC_LINEARS, ENC_LNS),
                                        ("decoder", model.decoder, DEC_LINEARS, DEC_LNS)):
        for i, layer in enumerate(layers):
            for p in linears:
                base = f"{stack}/{i}/{p}"
                w = layer.w(f"{p}_weight")
                out[f"{base}/bias"] = _np(layer.w(f"{p}_bias"), float_dtype)
                if int8:
                    out[f"{base}/weight"], out[f"{base}/weight_clip"] = _weight_int8(w)
                    out[f"{base}/input_clip"] = _clip(getattr(layer, f"{p}_quant").input_quantizer)
                else:
                    out[f"{base}/weight"] = _np(w, float_dtype)
            for ln in lns:
                out[f"{stack}/{i}/{ln}/weight"] = _np(layer.w(f"{ln}_weight"), float_dtype)
                out[f"{stack}/{i}/{ln}/bias"] = _np(layer.w(f"{ln}_bias"), float_dtype)
            if int8 and stack == "decoder":
                out[f"decoder/{i}/k_clip"] = _clip(layer.k_quantizer)
                out[f"decoder/{i}/v_clip"] = _clip(layer.v_quantizer)
                if c.quant_cross_kv:
                    out[f"decoder/{i}/cross_k_clip"] = _clip(layer.cross_k_quantizer)
                    out[f"decoder/{i}/cross_v_clip"] = _clip(layer.cross_v_quantizer)
        if c.pre_layer_norm:
            norm = getattr(model, f"{stack}_norm")
            out[f"{stack}_norm/weight"] = _np(norm.weight, float_dtype)
            out[f"{stack}_norm/bias"] = _np(norm.bias, float_dtype)
    return out


def export_transformer(model, path: str | os.PathLike, precision: str = "int8", *, calib_batches=None,
                       calib_method: str = "percentile", tokenizer: str | None = None,
                       float_dtype: str | None = None, decoding: dict | None = None) -> Path:
    """Write ``model`` (lsquant.models.Transformer) to ``path`` atomically.

    precision "int8": from a QAT model (learned clips) as it is, or from a float model plus calibration
    (``calib_batches``: (src, tgt_in) tuples, ``calib_method``: max | percentile | mse, the PTQ path).
    precision "fp16": all weights in float, no clips.
    float_dtype: "float16" or "float32", the float tensors' storage; default float16 for "fp16" exports and
    float32 for "int8" ones. In an int8 file the float tensors are the biases and LayerNorms (and learned
    positions): ~0.6% of the file in fp32 (a 3+3-layer, width-256 model: 8.69 MB against 8.64 MB). Rounded to
    fp16 they perturb the quantized model the file holds (a step function of its activations): the int8
    engine's greedy agreement with that model fell from 99.9% to 91.8% of a Multi30k test set
    (recipes/mt/RESULTS.md).
    tokenizer: the tokenizer's JSON, stored in the file. decoding: overrides of the config's defaults.
    """
    if float_dtype is None:
        float_dtype = "float32" if precision == "int8" else "float16"
    if float_dtype not in ("float16", "float32"):
        raise ValueError(f"float_dtype must be 'float16' or 'float32', got {float_dtype!r}")
    if calib_batches is not None:
        from lsquant.quant import calibrate

        calibrate(model, calib_batches, method=calib_method)
    fdt = {"float16": np.float16, "float32": np.float32}[float_dtype]
    c = model.config
    dec = {"beam_size": c.beam_size, "length_penalty": c.length_penalty, "max_len_a": c.max_len_a,
           "max_len_b": c.max_len_b}
    dec.update(decoding or {})
    return fmt.write(path, tensors(model, precision, fdt), model_type="transformer", precision=precision,
                     config=c.to_dict(), decoding=dec, quantization=QUANTIZATION if precision == "int8" else {},
                     special_tokens={"pad": c.pad_id, "bos": c.bos_id, "eos": c.eos_id, "unk": c.unk_id},
                     tokenizer=tokenizer)


def read_transformer(path: str | os.PathLike) -> fmt.ModelFile:
    """Read and validate a Transformer file against the spec of its own config."""
    header = fmt.read_header(path)
    if header["model_type"] != "transformer":
        raise fmt.FormatError(f"{path} holds a {header['model_type']!r} model, not a 'transformer'")
    cfg = header["config"]
    need = ("hidden_size", "intermediate_size", "vocab_size", "num_encoder_layers", "num_decoder_layers",
            "share_embeddings", "learned_pos", "pre_layer_norm", "max_seq_len", "nhead")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise fmt.FormatError(f"{path}: the config attribute lacks {', '.join(missing)}")
    return fmt.read(path, spec(cfg, header["precision"]), model_type="transformer")
