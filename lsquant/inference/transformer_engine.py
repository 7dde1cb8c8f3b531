"""Inference engines for exported translation Transformers: ``QuantTransformer`` (int8) and ``Transformer``
(fp16), with one API.

The int8 engine computes the function of the QAT model's forward: every linear takes its input quantized
with the exported per-tensor clip and its int8 weight with per-channel clips, accumulates in int32 and applies
scale, bias (and the FFN activation, re-quantized to int8 with the next linear's clip) in the GEMM's epilogue
(lsquant.inference.gemm.Int8Linear); the decoder's self-attention K/V are cached in int8 with their clips.
LayerNorm, softmax and residuals run in the engine's float dtype (fp16 on CUDA, fp32 on the CPU, where the
reference ops give the exact semantics). Decoding uses lsquant.inference.decoding, the code the PyTorch
model decodes with.

Buffers: the K/V caches (max_batch_size * beams rows, max_seq_len positions) are allocated once, at
construction, and reused by every request.
"""
from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from lsquant import ops
from lsquant.layers.embedding import sinusoidal_positions

from . import decoding
from .gemm import Int8Linear

_ENC = ("qkv", "attn_out", "fc1", "fc2")
_DEC = ("qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "fc1", "fc2")


class _Linear:
    """One linear of the engine. int8: quantize(x, input_clip) -> Int8Linear (epilogue: scale, bias,
    activation, optional re-quantization). float: F.linear in the engine dtype."""

    def __init__(self, t: dict, base: str, device, dtype, int8: bool, activation: str = "none",
                 out_clip: torch.Tensor | None = None):
        self.int8, self.activation = int8, activation
        bias = torch.as_tensor(t[f"{base}/bias"]).to(device)
        if int8:
            self.in_clip = torch.as_tensor(t[f"{base}/input_clip"]).to(device=device, dtype=torch.float32)
            self.lin = Int8Linear(torch.as_tensor(t[f"{base}/weight"]).to(device),
                                  w_clip=torch.as_tensor(t[f"{base}/weight_clip"]).to(device),
                                  x_clip=self.in_clip, bias=bias, activation=activation,
                                  out_dtype=torch.int8 if out_clip is not None else dtype, out_clip=out_clip)
        else:
            self.w = torch.as_tensor(t[f"{base}/weight"]).to(device=device, dtype=dtype)
            self.b = bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (..., K), or int8 when the previous linear re-quantized its output for this one."""
        if self.int8:
            return self.lin(x if x.dtype == torch.int8 else ops.quantize(x, self.in_clip))
        y = F.linear(x, self.w, self.b)
        if self.activation == "relu":
            return F.relu(y)
        if self.activation == "gelu":
            return F.gelu(y)
        return y


class _Engine:
    precision = ""

    def __init__(self, path: str | os.PathLike, max_batch_size: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, beam_size: int | None = None):
        from lsquant.export.transformer import read_transformer
        from lsquant.models.transformer import TransformerConfig

        mf = read_transformer(path)
        if mf.precision != self.precision:
            other = "QuantTransformer" if mf.precision == "int8" else "Transformer"
            raise ValueError(f"{path} is a {mf.precision} export: load it with lsquant.inference.{other}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.path, self.file = path, mf
        self.cfg = c = TransformerConfig.from_dict(mf.config)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.max_batch_size = max_batch_size
        self.beam_size = beam_size or int(mf.decoding.get("beam_size", c.beam_size))
        self.length_penalty = float(mf.decoding.get("length_penalty", c.length_penalty))
        sp = mf.special_tokens
        self.pad, self.bos, self.eos = int(sp["pad"]), int(sp["bos"]), int(sp["eos"])
        self._load(mf.tensors)
        # K/V caches for every decoder layer, allocated once for the largest request
        rows, nH, D = max_batch_size * self.beam_size, c.nhead, c.hidden_size // c.nhead
        kv_dtype = torch.int8 if self.int8 else self.dtype
        shape = (rows, nH, c.max_seq_len, D)
        self.k_cache = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(c.num_decoder_layers)]
        self.v_cache = [torch.zeros(shape, dtype=kv_dtype, device=self.device) for _ in range(c.num_decoder_layers)]

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    # -- weights ------------------------------------------------------------------------------------------------
    def _f(self, t, name):
        return torch.as_tensor(t[name]).to(device=self.device, dtype=self.dtype)

    def _load(self, t: dict) -> None:
        c, dev, dt, q = self.cfg, self.device, self.dtype, self.int8
        self.tables = {}
        for emb in ("src_embedding", "tgt_embedding"):
            key = emb if f"{emb}/table" in t else "src_embedding"
            table = torch.as_tensor(t[f"{key}/table"]).to(dev)
            if q:
                clip = torch.as_tensor(t[f"{key}/table_clip"]).to(dev)
                proj = Int8Linear(table, w_clip=clip, x_clip=torch.as_tensor(t["output_projection/input_clip"]).to(dev),
                                  out_dtype=dt) if emb == "tgt_embedding" else None
                table = ops.dequantize(table, clip, 0, dt)   # the fake-quantized table QAT looked rows up in
            else:
                table, proj = table.to(dt), None
            pos = self._f(t, f"{key}/pos") if c.learned_pos else sinusoidal_positions(c.max_seq_len, c.hidden_size).to(dev, dt)
            self.tables[emb] = (table, pos, proj)
        if q:
            self.proj_clip = torch.as_tensor(t["output_projection/input_clip"]).to(dev)
        self.enc, self.dec = [], []
        for stack, n, names, out in (("encoder", c.num_encoder_layers, _ENC, self.enc),
                                     ("decoder", c.num_decoder_layers, _DEC, self.dec)):
            for i in range(n):
                base = f"{stack}/{i}"
                L = {}
                fc2_clip = torch.as_tensor(t[f"{base}/fc2/input_clip"]).to(dev) if q else None
                for p in names:
                    if p == "fc1":
                        L[p] = _Linear(t, f"{base}/fc1", dev, dt, q, c.activation_fn, out_clip=fc2_clip)
                    else:
                        L[p] = _Linear(t, f"{base}/{p}", dev, dt, q)
                for ln in ("attn_ln", "cross_ln", "ffn_ln"):
                    if f"{base}/{ln}/weight" in t:
                        L[ln] = (self._f(t, f"{base}/{ln}/weight"), self._f(t, f"{base}/{ln}/bias"))
                if q and stack == "decoder":
                    L["k_clip"] = torch.as_tensor(t[f"{base}/k_clip"]).to(dev)
                    L["v_clip"] = torch.as_tensor(t[f"{base}/v_clip"]).to(dev)
                out.append(L)
        self.norms = {s: (self._f(t, f"{s}_norm/weight"), self._f(t, f"{s}_norm/bias"))
                      for s in ("encoder", "decoder") if c.pre_layer_norm}

    # -- pieces -------------------------------------------------------------------------------------------------
    def _ln(self, x, wb):
        return ops.layer_norm(x, wb[0], wb[1], 1e-5)

    def _embed(self, which: str, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        table, pos, _ = self.tables[which]
        scale = self.cfg.hidden_size ** 0.5
        return ops.embedding(tokens, table, pos, scale, self.pad, start)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, H = t.shape
        nH = self.cfg.nhead
        return t.view(B, L, nH, H // nH).transpose(1, 2)

    def _attend(self, q, k, v, mask, causal):
        D = q.shape[-1]
        probs = ops.masked_softmax(torch.matmul(q, k.transpose(-1, -2)), mask, causal, scale=D ** -0.5)
        ctx = torch.matmul(probs, v)
        B, nH, L, D = ctx.shape
        return ctx.transpose(1, 2).reshape(B, L, nH * D)

    def _sublayer(self, x, L, ln, fn):
        pre = self.cfg.pre_layer_norm
        y = x + fn(self._ln(x, L[ln]) if pre else x)
        return y if pre else self._ln(y, L[ln])

    def _ffn(self, L):
        return lambda h: L["fc2"](L["fc1"](h))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = src == self.pad
        x = self._embed("src_embedding", src)
        for L in self.enc:
            def attn(h, L=L):
                q, k, v = (self._heads(t) for t in L["qkv"](h).chunk(3, dim=-1))
                return L["attn_out"](self._attend(q, k, v, mask, False))
            x = self._sublayer(x, L, "attn_ln", attn)
            x = self._sublayer(x, L, "ffn_ln", self._ffn(L))
        if self.cfg.pre_layer_norm:
            x = self._ln(x, self.norms["encoder"])
        return x, mask

    class _Decoder:
        """step/reorder over the engine's preallocated K/V caches (rows 0..N-1 in use)."""

        def __init__(self, eng: "_Engine", enc: torch.Tensor, mask: torch.Tensor):
            self.e, self.mask, self.N = eng, mask, enc.shape[0]
            self.cross = []
            for L in eng.dec:   # cross-attention K/V once per request
                k, v = (eng._heads(t) for t in L["cross_kv"](enc).chunk(2, dim=-1))
                self.cross.append((k, v))

        def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
            e, N = self.e, self.N
            x = e._embed("tgt_embedding", tokens[:, None], start=t)
            for i, L in enumerate(e.dec):
                def self_attn(h, i=i, L=L):
                    q, k, v = (e._heads(u) for u in L["qkv"](h).chunk(3, dim=-1))
                    kc, vc = e.k_cache[i], e.v_cache[i]
                    if e.int8:
                        kc[:N, :, t:t + 1] = ops.quantize(k, L["k_clip"])
                        vc[:N, :, t:t + 1] = ops.quantize(v, L["v_clip"])
                        K = ops.dequantize(kc[:N, :, :t + 1].contiguous(), L["k_clip"], None, e.dtype)
                        V = ops.dequantize(vc[:N, :, :t + 1].contiguous(), L["v_clip"], None, e.dtype)
                    else:
                        kc[:N, :, t:t + 1], vc[:N, :, t:t + 1] = k, v
                        K, V = kc[:N, :, :t + 1], vc[:N, :, :t + 1]
                    return L["attn_out"](e._attend(q, K, V, None, False))

                def cross_attn(h, i=i, L=L):
                    q = e._heads(L["cross_q"](h))
                    return L["cross_out"](e._attend(q, *self.cross[i], self.mask, False))

                x = e._sublayer(x, L, "attn_ln", self_attn)
                x = e._sublayer(x, L, "cross_ln", cross_attn)
                x = e._sublayer(x, L, "ffn_ln", e._ffn(L))
                self.t = t
            if e.cfg.pre_layer_norm:
                x = e._ln(x, e.norms["decoder"])
            return e._project(x)[:, 0]

        def reorder(self, rows: torch.Tensor) -> None:
            e, N = self.e, self.N
            upto = getattr(self, "t", 0) + 1
            for kc, vc in zip(e.k_cache, e.v_cache):
                kc[:N, :, :upto] = kc[:N, :, :upto].index_select(0, rows)
                vc[:N, :, :upto] = vc[:N, :, :upto].index_select(0, rows)
            self.mask = self.mask.index_select(0, rows)
            self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        table, _, proj = self.tables["tgt_embedding"]
        if self.int8:
            return proj(ops.quantize(x, self.proj_clip))
        return F.linear(x, table)

    # -- the API --------------------------------------------------------------------------------------------
    def check_input(self, src_ids) -> torch.Tensor:
        """src_ids: int (batch, src_len) tensor or nested list -> int64 tensor on the engine's device.
        ValueError for anything the engine cannot serve, naming the limit and the value."""
        c = self.cfg
        if not isinstance(src_ids, torch.Tensor):
            try:
                src_ids = torch.as_tensor(src_ids)
            except (TypeError, ValueError) as e:
                raise ValueError(f"src_ids must be a (batch, src_len) array of token ids: {e}") from e
        if src_ids.dim() != 2:
            raise ValueError(f"src_ids must have rank 2 (batch, src_len), got shape {tuple(src_ids.shape)}")
        if src_ids.dtype.is_floating_point or src_ids.dtype == torch.bool or src_ids.is_complex():
            raise ValueError(f"src_ids must hold integer token ids, got dtype {src_ids.dtype}")
        B, S = src_ids.shape
        if B == 0 or S == 0:
            raise ValueError(f"empty batch: src_ids has shape {tuple(src_ids.shape)}")
        if B > self.max_batch_size:
            raise ValueError(f"batch of {B} sentences is over max_batch_size={self.max_batch_size}: split the "
                             "request or build the engine with a larger max_batch_size")
        if S > c.max_seq_len:
            raise ValueError(f"source length {S} is over the model's max_seq_len={c.max_seq_len}")
        lo, hi = int(src_ids.min()), int(src_ids.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {c.vocab_size})")
        return src_ids.to(device=self.device, dtype=torch.long)

    @torch.inference_mode()
    def infer(self, src_ids, method: str = "beam", beam_size: int | None = None, length_penalty: float | None = None,
              max_len: int | None = None, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
              seed: int = 0, min_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """src_ids (batch, src_len) int ids padded with the file's pad id -> (tokens (batch, beams, tgt_len) int64,
        without <s>, padded after </s>; scores (batch, beams) fp32, best first). method: "beam" (beam_size,
        length_penalty), "greedy", or "sample" (top_k, top_p, temperature, seed)."""
        src = self.check_input(src_ids)
        B, S = src.shape
        K = beam_size or self.beam_size
        if method == "beam" and K > self.beam_size:
            raise ValueError(f"beam_size {K} is over the engine's {self.beam_size} (set beam_size at construction)")
        max_len = max_len or self.cfg.max_output_len(S)
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} is over the model's max_seq_len={self.cfg.max_seq_len}")
        enc, mask = self.encode(src)
        return decoding.generate(
            lambda e, m: self._Decoder(self, e, m), enc, mask, method=method, beam_size=K,
            length_penalty=self.length_penalty if length_penalty is None else length_penalty, bos=self.bos,
            eos=self.eos, pad=self.pad, max_len=max_len, min_len=min_len, top_k=top_k, top_p=top_p,
            temperature=temperature, seed=seed)


class QuantTransformer(_Engine):
    """The int8 engine. ``QuantTransformer(path, max_batch_size)``; ``infer(src_ids, ...)``."""
    precision = "int8"


class Transformer(_Engine):
    """The fp16 engine (fp32 on the CPU), same API as QuantTransformer, for fp16 exports."""
    precision = "fp16"
