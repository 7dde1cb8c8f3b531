"""Inference engines for exported translation Transformers: ``QuantTransformer`` (int8) and ``Transformer``
(fp16), with one API.

The int8 engine computes the function of the QAT model's forward: every linear takes its input quantized
with the exported per-tensor clip and its int8 weight with per-channel clips, accumulates in int32 and applies
scale, bias (and the FFN activation, re-quantized to int8 with the next linear's clip) in the GEMM's epilogue
(lsquant.inference.gemm.Int8Linear); the decoder's self-attention K/V are cached in int8 with their clips.
LayerNorm, softmax and residuals run in the engine's float dtype (fp16 on CUDA, fp32 on the CPU, where the
reference ops give the exact semantics). Decoding uses lsquant.inference.decoding, the code the PyTorch
model decodes with.

Decoding runs a static step: every buffer is allocated once, at construction (the self-attention K/V caches
for max_batch_size * beams rows and max_tgt_len positions, the cross-attention K/V for max_batch_size
sentences and max_src_len positions, shared by the beams of a sentence) or on the first request of its shape
(the search state of lsquant.inference.decoding), and a step reads the position from a device tensor. It
attends over a cache-length bucket (16, 32, 64, ... up to max_tgt_len; keys beyond the position are masked)
and over a source-length bucket, reads the beams' cached keys through the ancestry table that the search keeps
(the caches never move), and ends with the output
projection and the search update (log-softmax, top-k, finished hypotheses). So one step program serves every
position inside a bucket: on CUDA it is captured once per (search shape, source bucket, cache bucket) in a
CUDA graph and replayed; on the CPU the same code runs eagerly. An engine serves one request at a time.
"""
from __future__ import annotations

import os

import torch
from torch.nn import functional as F

from lsquant import ops
from lsquant.layers.embedding import sinusoidal_positions
from lsquant.layers.transformer import _sdpa

from lsquant.quant.ref import scale_and_inv

from . import attention, decoding, pdl
from .embed_step import embed_step
from .gemm import Int8Linear, ln_tail, side_stream

_ENC = ("qkv", "attn_out", "fc1", "fc2")
_DEC = ("qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "fc1", "fc2")
# the linears that end a sublayer: called with the residual added in their epilogue (_sublayer)
_RESIDUAL = ("attn_out", "cross_out", "fc2")


class _Normed:
    """LayerNorm(x) for an int8 pre-LN sublayer's first linear: not computed yet (q None), which that linear
    then normalizes and quantizes itself (Int8Linear.ln_call: in its GEMM kernel where that fusion is on, else
    two kernels); or q, the int8 input already computed by the residual GEMM that produced x
    (Int8Linear.call_ln_next, the decoder step with LSQUANT_LN_TAIL=1)."""

    def __init__(self, x: torch.Tensor, wb: tuple, eps: float = 1e-5, q: torch.Tensor | None = None):
        self.x, self.weight, self.bias, self.eps, self.q = x, wb[0], wb[1], eps, q

    def view(self, *shape) -> "_Normed":
        return _Normed(self.x.view(*shape), (self.weight, self.bias), self.eps,
                       None if self.q is None else self.q.view(*shape))


class _Linear:
    """One linear of the engine. int8: quantize(x, input_clip) -> Int8Linear (epilogue: scale, bias,
    activation, optional re-quantization). float: F.linear in the engine dtype."""

    def __init__(self, t: dict, base: str, device, dtype, int8: bool, activation: str = "none",
                 out_clip: torch.Tensor | None = None):
        self.int8, self.activation = int8, activation
        bias = torch.as_tensor(t[f"{base}/bias"]).to(device)
        if int8:
            self.in_clip = torch.as_tensor(t[f"{base}/input_clip"]).to(device=device, dtype=torch.float32)
            self.in_inv = scale_and_inv(self.in_clip.reshape(1))[1]   # for kernels that quantize this input
            self.lin = Int8Linear(torch.as_tensor(t[f"{base}/weight"]).to(device),
                                  w_clip=torch.as_tensor(t[f"{base}/weight_clip"]).to(device),
                                  x_clip=self.in_clip, bias=bias, activation=activation,
                                  out_dtype=torch.int8 if out_clip is not None else dtype, out_clip=out_clip)
        else:
            self.w = torch.as_tensor(t[f"{base}/weight"]).to(device=device, dtype=dtype)
            self.b = bias.to(dtype)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, then: tuple | None = None):
        """x: float (..., K), or int8 when the previous kernel quantized it for this linear; residual: added to
        the output (int8 engine: in the GEMM's epilogue, the same values as adding after). then (int8, with a
        residual): ((ln weight, ln bias), clip, 1/scale) of the next sublayer's LayerNorm and first linear's
        input: returns _Normed(y, with q computed here: Int8Linear.call_ln_next) instead of y."""
        normed = isinstance(x, _Normed)
        if residual is not None:
            residual = residual.reshape(*(x.x if normed else x).shape[:-1], residual.shape[-1])
        if normed:
            if x.q is not None:   # the residual GEMM before this sublayer quantized LayerNorm(x) already
                return self.lin(x.q, residual=residual)
            # int8, pre-LN: LayerNorm + quantize, then this GEMM (Int8Linear.ln_call)
            return self.lin.ln_call(x.x, x.weight, x.bias, x.eps, residual=residual)
        if self.int8:
            xq = x if x.dtype == torch.int8 else ops.quantize(x, self.in_clip)
            if then is not None and residual is not None:
                (w, b), clip, inv = then
                y, q = self.lin.call_ln_next(xq, w, b, 1e-5, clip, inv, residual=residual)
                return _Normed(y, (w, b), 1e-5, q)
            return self.lin(xq, residual=residual)
        if residual is not None:
            return residual + self(x)
        if self.activation == "relu" and x.is_cuda:
            # bias and ReLU in cuBLASLt's epilogue: one kernel; relu(round(v)) == round(relu(v)), so the values
            # are F.relu(F.linear(x, w, b))'s
            return torch._addmm_activation(self.b, x.reshape(-1, x.shape[-1]), self.w.t()).view(*x.shape[:-1], -1)
        y = F.linear(x, self.w, self.b)
        if self.activation == "relu":
            return F.relu(y)
        if self.activation == "gelu":
            return F.gelu(y)
        return y


class _Table:
    """An embedding table and its positions (P, H). int8: rows int8 (V, H) with per-row clips (V,), dequantized
    per looked-up row into the engine dtype: exactly the rows of the fake-quantized table QAT looks up,
    without a float copy of the table on the device (the int8 rows also serve the output projection); float:
    rows (V, H) in the engine dtype, clip None."""

    def __init__(self, rows: torch.Tensor, clip: torch.Tensor | None, pos: torch.Tensor, dtype: torch.dtype):
        self.rows, self.pos, self.dtype = rows, pos, dtype
        self.clip = None if clip is None else clip.float().reshape(-1).expand(rows.shape[0]).contiguous()
        self.row_scale = None if clip is None else scale_and_inv(self.clip)[0]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 (n,) -> (n, H) in the engine dtype."""
        if self.clip is None:
            return self.rows.index_select(0, ids)
        return ops.dequantize(self.rows.index_select(0, ids), self.clip.index_select(0, ids), 0, self.dtype)


# encoder graphs are kept for this many request shapes (batch, source length); other shapes run eagerly
MAX_ENCODER_GRAPHS = 64


def _bucket(n: int, cap: int) -> int:
    """The attention length that serves n positions: 16, 32, 64, ... (at least n), at most cap."""
    b = 16
    while b < n:
        b *= 2
    return min(b, cap)


class _Engine:
    precision = ""

    def __init__(self, path: str | os.PathLike, max_batch_size: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, beam_size: int | None = None, max_tgt_len: int | None = None,
                 max_src_len: int | None = None, cuda_graph: bool = True, logits_dtype: torch.dtype | None = None):
        """path: an exported HDF5 file; max_batch_size: sentences per request; beam_size: the largest beam
        (default: the file's); max_tgt_len / max_src_len: the longest output (tokens, </s> included) and source
        the buffers hold (default: the model's max_seq_len; smaller values save memory); cuda_graph: capture
        the decoder step in CUDA graphs (ignored on the CPU). dtype: the activations' (default fp16 on CUDA,
        fp32 on the CPU); logits_dtype (int8 engine): the output projection's (default: dtype). With
        dtype=torch.float32 the int8 engine's greedy tokens match the fake-quant model's (recipes/mt/RESULTS.md);
        logits_dtype=torch.float16 then keeps its largest buffer (rows x vocabulary) at 2 bytes, at ~1% of
        the sentences' agreement."""
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
        for name, v in (("max_tgt_len", max_tgt_len), ("max_src_len", max_src_len)):
            if v is not None and (not isinstance(v, int) or not 1 <= v <= c.max_seq_len):
                raise ValueError(f"{name} must be an int in [1, {c.max_seq_len}] (the model's max_seq_len), got {v!r}")
        if beam_size is not None and (not isinstance(beam_size, int) or beam_size < 1):
            raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if logits_dtype is not None and logits_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"logits_dtype must be torch.float32, float16 or bfloat16, got {logits_dtype!r}")
        if logits_dtype is not None and logits_dtype != self.dtype and not self.int8:
            raise ValueError(f"logits_dtype applies to the int8 engine (QuantTransformer); the {self.precision} "
                             f"engine's logits are in its dtype ({self.dtype})")
        self.logits_dtype = logits_dtype or self.dtype
        self.max_batch_size = max_batch_size
        self.max_tgt_len = max_tgt_len or c.max_seq_len
        self.max_src_len = max_src_len or c.max_seq_len
        self.beam_size = beam_size or int(mf.decoding.get("beam_size", c.beam_size))
        self.length_penalty = float(mf.decoding.get("length_penalty", c.length_penalty))
        sp = mf.special_tokens
        self.pad, self.bos, self.eos = int(sp["pad"]), int(sp["bos"]), int(sp["eos"])
        self._load(mf.tensors)
        rows, nL, nH, D = max_batch_size * self.beam_size, c.num_decoder_layers, c.nhead, c.hidden_size // c.nhead
        kv_dtype = torch.int8 if self.int8 else self.dtype
        # [layer, K or V, row, head, position, head_dim]: a layer's K and V side by side, so that one kernel
        # reorders, writes or dequantizes both; zeros: positions beyond a request's are masked, and a masked key
        # must still be finite (0 * inf would be NaN)
        self.self_kv = torch.zeros((nL, 2, rows, nH, self.max_tgt_len, D), dtype=kv_dtype, device=self.device)
        # int8 where the model quantized them (config.quant_cross_kv, clips in the file): at batch 128 and source
        # 64 the cross K/V of Transformer-base take 96 MiB in fp16, the engine's largest buffer with the self cache
        self.cross_kv = torch.zeros((2, nL, max_batch_size, nH, self.max_src_len, D),
                                    dtype=torch.int8 if self.int8_cross else self.dtype, device=self.device)
        self.cross_mask = torch.ones((max_batch_size, self.max_src_len), dtype=torch.bool, device=self.device)
        # anc[row, j]: the cache row that holds row's key at position j (lsquant.inference.attention); zeros: an
        # entry not yet written must still name a valid row (the reference path gathers a whole bucket)
        self.anc = torch.zeros((rows, self.max_tgt_len), dtype=torch.int32, device=self.device)
        self._emb_scale = torch.tensor(c.hidden_size ** 0.5, dtype=torch.float32)   # a host scalar, as embedding_ref
        self._state: dict = {}     # decoding state buffers, (name, shape, dtype) -> tensor
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self._graphs: dict = {}    # (search key, source bucket, cache bucket) or ("encode", B, S) -> (graph, outputs)
        self._src = torch.full((max_batch_size, self.max_src_len), self.pad, dtype=torch.long, device=self.device)
        self._pool = self._stream = None

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    @property
    def int8_cross(self) -> bool:
        """Whether the cross-attention K/V are stored in int8 (an int8 file of a model with quant_cross_kv)."""
        return self.int8 and self.cfg.quant_cross_kv

    # -- weights ------------------------------------------------------------------------------------------------
    def _f(self, t, name):
        return torch.as_tensor(t[name]).to(device=self.device, dtype=self.dtype)

    def _load(self, t: dict) -> None:
        c, dev, dt, q = self.cfg, self.device, self.dtype, self.int8
        self.tables = {}
        for emb in ("src_embedding", "tgt_embedding"):
            key = emb if f"{emb}/table" in t else "src_embedding"
            if key != emb:   # shared embeddings: one table on the device
                self.tables[emb] = self.tables[key]
                continue
            table = torch.as_tensor(t[f"{key}/table"]).to(dev)
            clip = torch.as_tensor(t[f"{key}/table_clip"]).to(dev) if q else None
            pos = self._f(t, f"{key}/pos") if c.learned_pos else sinusoidal_positions(c.max_seq_len, c.hidden_size).to(dev, dt)
            self.tables[emb] = _Table(table if q else table.to(dt), clip, pos, dt)
        self.proj = None
        if q:
            tgt = self.tables["tgt_embedding"]
            self.proj_clip = torch.as_tensor(t["output_projection/input_clip"]).to(dev)
            self.proj = Int8Linear(tgt.rows, w_clip=tgt.clip, x_clip=self.proj_clip, out_dtype=self.logits_dtype)
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
                    # the K and V clips as the two channels of one per-channel clip (one quantize, one
                    # dequantize for both; per element the same arithmetic as two per-tensor calls): the
                    # self-attention cache's, and the cross-attention K/V's where the model quantized them
                    for key, prefix in [("kv", "")] + ([("cross_kv", "cross_")] if c.quant_cross_kv else []):
                        clip = torch.stack([torch.as_tensor(t[f"{base}/{prefix}{n}_clip"]).reshape(())
                                            for n in ("k", "v")]).to(device=dev, dtype=torch.float32)
                        L[f"{key}_clip"], L[f"{key}_scales"] = clip, attention.kv_scales(clip)
                out.append(L)
        self.norms = {s: (self._f(t, f"{s}_norm/weight"), self._f(t, f"{s}_norm/bias"))
                      for s in ("encoder", "decoder") if c.pre_layer_norm}

    # -- pieces -------------------------------------------------------------------------------------------------
    def _ln(self, x, wb):
        return ops.layer_norm(x, wb[0], wb[1], 1e-5, pdl=pdl.layernorm(x.device))

    def _embed(self, which: str, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) from position 0 -> (B, L, H) (the encoder's input)."""
        tab, scale = self.tables[which], self.cfg.hidden_size ** 0.5
        if tab.clip is None:
            return ops.embedding(tokens, tab.rows, tab.pos, scale, self.pad)
        # int8: the fused kernel over the request's dequantized rows (row i for token i), pads zeroed after
        B, L = tokens.shape
        rows = tab.lookup(tokens.reshape(-1))
        idx = torch.arange(B * L, device=tokens.device).view(B, L)
        return ops.embedding(idx, rows, tab.pos, scale, None).masked_fill((tokens == self.pad)[..., None], 0.0)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, H = t.shape
        nH = self.cfg.nhead
        return t.view(B, L, nH, H // nH).transpose(1, 2)

    def _attend(self, q, k, v, mask, causal):
        """The encoder's attention: q, k, v (B, nH, L, D), mask (B, L) True = padding -> (B, L, nH * D). On CUDA
        F.scaled_dot_product_attention, as the layers run it (lsquant.layers.transformer._sdpa): the scores are
        never written, and no cuBLAS call runs on the engine's stream, for each of which PyTorch keeps a cuBLAS
        workspace (32 MiB on Hopper). Elsewhere the reference ops, as the layers' CPU path."""
        if q.is_cuda:
            # a source of padding only would make every key masked (NaN from SDPA): it attends over its pads
            m = None if mask is None else mask & ~mask.all(dim=-1, keepdim=True)
            ctx = _sdpa(q, k, v, m, causal)
        else:
            D = q.shape[-1]
            probs = ops.masked_softmax(torch.matmul(q, k.transpose(-1, -2)), mask, causal, scale=D ** -0.5)
            ctx = torch.matmul(probs, v)
        B, nH, L, D = ctx.shape
        return ctx.transpose(1, 2).reshape(B, L, nH * D)

    def _sublayer(self, x, L, ln, fn, then=None):
        """x + f(LN(x)) (pre-LN) or LN(x + f(x)) (post-LN), where fn(h, residual, then) = residual + f(h) (the
        add in the last linear's epilogue). int8, pre-LN: h is LN(x) unevaluated, which f's first linear (qkv,
        cross_q, fc1) normalizes and quantizes itself (Int8Linear.ln_call: inside its GEMM kernel at decoding's
        row counts on CUDA with LSQUANT_LN_GEMM=1, else one LayerNorm-quantize kernel, then the GEMM), or, where
        x is a _Normed already (the previous sublayer's last linear was given ``then``: the next LayerNorm and
        its consumer, see _step), LN(x) quantized already."""
        if not self.cfg.pre_layer_norm:
            return self._ln(fn(x, x, None), L[ln])
        if self.int8:
            h = x if isinstance(x, _Normed) else _Normed(x, L[ln])
            return fn(h, h.x, then)
        return fn(self._ln(x, L[ln]), x, None)

    def _ffn(self, L):
        return lambda h, r, then=None: L["fc2"](L["fc1"](h), residual=r, then=then)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = src == self.pad
        x = self._embed("src_embedding", src)
        for L in self.enc:
            def attn(h, r, then=None, L=L):
                q, k, v = (self._heads(t) for t in L["qkv"](h).chunk(3, dim=-1))
                return L["attn_out"](self._attend(q, k, v, mask, False), residual=r)
            x = self._sublayer(x, L, "attn_ln", attn)
            x = self._sublayer(x, L, "ffn_ln", self._ffn(L))
        if self.cfg.pre_layer_norm:
            x = self._ln(x, self.norms["encoder"])
        return x, mask

    # -- the static decoder step -------------------------------------------------------------------------------
    class _Decoder:
        """The decoder of lsquant.inference.decoding over the engine's buffers: ``advance(search, t)`` runs one
        static step (a CUDA graph replay on CUDA). enc (B, S, H), mask (B, S): the request's encoder output;
        rows b * beams + k decode sentence b."""

        def __init__(self, eng: "_Engine", enc: torch.Tensor, mask: torch.Tensor, beams: int):
            # the request's cross-attention K/V are in the engine's buffers already (_encode_request)
            self.e, self.max_steps = eng, eng.max_tgt_len
            self.src_bucket = _bucket(enc.shape[1], eng.max_src_len)
            # the ancestry table of the self-attention caches, kept by the search in its update (with the beams'
            # token rows: lsquant.inference.decoding), so a step has no kernel of its own for it
            self.history = eng.anc[:enc.shape[0] * beams]

        def buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
            return self.e._buffer(name, shape, dtype)

        def advance(self, search, t: int) -> None:
            self.e._advance(search, t, self.src_bucket)

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (name, tuple(shape), dtype)
        buf = self._state.get(key)
        if buf is None:
            buf = self._state[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _fill_cross(self, enc: torch.Tensor, mask: torch.Tensor, src_bucket: int) -> None:
        """Cross-attention K/V of every decoder layer, once per request, one copy per sentence (its beams
        share it). enc (B, S, H); mask (B, S) bool, True = padding; positions S..src_bucket are masked."""
        B, S = mask.shape
        H = self.cfg.hidden_size
        for i, L in enumerate(self.dec):
            kv = L["cross_kv"](enc)   # (B, S, 2H): K, then V
            if self.int8_cross:   # as the model's cross_k_quantizer / cross_v_quantizer: K and V as two channels
                kv = ops.quantize(kv.view(B, S, 2, H), L["cross_kv_clip"], axis=2).view(B, S, 2 * H)
            k, v = (self._heads(u) for u in kv.chunk(2, dim=-1))
            self.cross_kv[0, i, :B, :, :S].copy_(k)
            self.cross_kv[1, i, :B, :, :S].copy_(v)
        self.cross_mask[:B, :src_bucket] = True
        self.cross_mask[:B, :S] = mask

    def _advance(self, search, t: int, src_bucket: int) -> None:
        """Step t of a search: eager on the CPU or without graphs; on CUDA a CUDA graph per (search key, source
        bucket, cache bucket) (see _graphed)."""
        # the fused attention kernel reads the position on the device: one step program for every position
        tgt_bucket = 0 if attention.use_kernel(self.self_kv) else _bucket(t + 1, self.max_tgt_len)
        if not self.cuda_graph:
            self._step(search, src_bucket, tgt_bucket)
            return
        self._graphed((search.key, src_bucket, tgt_bucket), lambda: self._step(search, src_bucket, tgt_bucket))

    def _graphed(self, key, fn):
        """fn() as a CUDA graph: the first call of a key runs fn eagerly on a side stream (the warm-up: kernels
        compile, GEMM choices are looked up, workspaces are allocated; its results are this call's), then
        records it; later calls replay the recording. Returns fn's outputs (the recording's static tensors:
        valid until the next replay of any graph)."""
        hit = self._graphs.get(key)
        if hit is not None:
            hit[0].replay()
            return hit[1]
        if self._stream is None:
            self._stream = side_stream(self.device)
            # one pool for every graph: a graph's temporaries never outlive its replay (all state is written
            # into buffers allocated outside the graphs), so graphs may share memory in any replay order
            self._pool = torch.cuda.graph_pool_handle()
        side, cur = self._stream, torch.cuda.current_stream(self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            out = fn()   # the call itself
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            static = fn()   # recorded, not run
        cur.wait_stream(side)
        self._graphs[key] = (graph, static)
        return out

    def _encode_request(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder and the cross-attention K/V of a request (src int64 (B, S) on the device). On CUDA with
        graphs, one graph per (B, S) (up to MAX_ENCODER_GRAPHS shapes; eager beyond), over a source buffer: the
        encoder's ~20 kernels a layer otherwise cost more host time to launch than GPU time to run."""
        B, S = src.shape
        bucket = _bucket(S, self.max_src_len)

        def run(x):
            enc, mask = self.encode(x)
            self._fill_cross(enc, mask, bucket)
            return enc, mask

        key = ("encode", B, S)
        if not self.cuda_graph or (key not in self._graphs and
                                   sum(k[0] == "encode" for k in self._graphs) >= MAX_ENCODER_GRAPHS):
            return run(src)
        self._src[:B, :S].copy_(src)
        return self._graphed(key, lambda: run(self._src[:B, :S]))

    def _embed_step(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ops.embedding_ref's arithmetic at the device position t (int64 [1]): tokens (N,) -> (N, 1, H)."""
        tab = self.tables["tgt_embedding"]
        return embed_step(tokens, tab.rows, tab.clip, tab.pos, t, self._emb_scale, self.pad, self.dtype,
                          tab.row_scale)[:, None, :]

    def _step(self, search, src_bucket: int, tgt_bucket: int) -> None:
        """One decoder step over the search's device state, then ``search.update`` (graph-safe: static shapes,
        no host sync). Sentence b's beams are rows b * beams .. b * beams + beams - 1."""
        B, K, N, t = search.batch, search.beams, search.N, search.t
        c = self.cfg
        H, nH = c.hidden_size, c.nhead
        # the beam reorder moves the ancestry table (search.update did, see _Decoder), never the caches
        anc = self.anc
        cross_mask = self.cross_mask[:B, :src_bucket]
        x = self._embed_step(search.tokens, t)
        # int8 pre-LN with LSQUANT_LN_TAIL=1: each residual GEMM (attn_out, cross_out, fc2) also computes the next
        # sublayer's LayerNorm + quantize (Int8Linear.call_ln_next): `then` names that LayerNorm and its consumer
        tail = self.int8 and c.pre_layer_norm and ln_tail()

        def then(ln, lin):   # LayerNorm ln and the linear it feeds (a _Linear, or the projection's Int8Linear)
            if not tail:
                return None
            return (ln, lin.in_clip, lin.in_inv) if isinstance(lin, _Linear) else (ln, lin.x_clip_t, lin.x_inv_t)

        for i, L in enumerate(self.dec):
            def self_attn(h, r, then, i=i, L=L):
                ctx = attention.self_attention(L["qkv"](h).view(N, 3 * H), self.self_kv[i], anc, t, nH,
                                               L.get("kv_clip"), L.get("kv_scales"), tgt_bucket,
                                               *self._out_q(L, "attn_out"))
                return L["attn_out"](ctx, residual=r, then=then).view(N, 1, H)

            def cross_attn(h, r, then, i=i, L=L):
                # the K beams of a sentence are K queries against its one copy of the source keys
                ctx = attention.cross_attention(L["cross_q"](h).view(N, H), self.cross_kv[:, i, :B, :, :src_bucket],
                                                cross_mask, K, *self._out_q(L, "cross_out"),
                                                kv_clip=L.get("cross_kv_clip"), kvs=L.get("cross_kv_scales"))
                return L["cross_out"](ctx, residual=r, then=then).view(N, 1, H)

            nxt = (then(self.dec[i + 1]["attn_ln"], self.dec[i + 1]["qkv"]) if i + 1 < len(self.dec)
                   else then(self.norms["decoder"], self.proj))
            x = self._sublayer(x, L, "attn_ln", self_attn, then(L["cross_ln"], L["cross_q"]))
            x = self._sublayer(x, L, "cross_ln", cross_attn, then(L["ffn_ln"], L["fc1"]))
            x = self._sublayer(x, L, "ffn_ln", self._ffn(L), nxt)
        if isinstance(x, _Normed):   # the last fc2 normalized and quantized the projection's input (tail)
            logits = self.proj(x.q)
        elif self.cfg.pre_layer_norm and self.int8:
            # the final LayerNorm and the quantize of the projection's input: in the projection's GEMM where
            # Int8Linear.ln_call fuses them (as the sublayers' first linears), else one kernel before it
            logits = self.proj.ln_call(x, *self.norms["decoder"], 1e-5)
        else:
            logits = self._project(self._ln(x, self.norms["decoder"]) if self.cfg.pre_layer_norm else x)
        search.update(logits[:, 0])

    def _out_q(self, L: dict, name: str) -> tuple:
        """(clip, 1/scale) of the linear an attention's context feeds (int8: the kernel quantizes it), or Nones."""
        if not self.int8:
            return None, None
        lin = L[name]
        return lin.in_clip, lin.in_inv

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return self.proj(ops.quantize(x, self.proj_clip))
        return F.linear(x, self.tables["tgt_embedding"].rows)

    # -- GEMM tuning --------------------------------------------------------------------------------------------
    def linears(self) -> list[tuple[str, Int8Linear]]:
        """The engine's int8 linears as (stack, layer): stack "encoder" and "cross_kv" run on batch x source
        tokens, "decoder" and "projection" on batch x beams rows per step."""
        return [(stack, lin) for stack, lin, _ in self._linears()]

    def _linears(self) -> list[tuple[str, Int8Linear, bool]]:
        """linears() with, for each, whether it is called with a residual (the last linear of a sublayer)."""
        out = []
        for stack, layers in (("encoder", self.enc), ("decoder", self.dec)):
            for L in layers:
                for name, lin in L.items():
                    if isinstance(lin, _Linear) and lin.int8:
                        out.append(("cross_kv" if name == "cross_kv" else stack, lin.lin, name in _RESIDUAL))
        if self.proj is not None:
            out.append(("projection", self.proj, False))
        return out

    def tune(self, batch_sizes, src_len: int, beam_size: int | None = None, cache=None, progress: bool = True,
             print_fn=print) -> list:
        """Tune the int8 GEMM of every distinct shape this engine runs for the given batch sizes and source
        length (lsquant.inference.gemm_tuner.tune_shape), store the choices in ``cache`` (default: the
        process-wide tuning cache, saved atomically) and use them from the next request. A float engine has
        nothing to tune. Returns the tune results."""
        from .gemm_tuner import global_cache, m_bucket, tune_shape

        if not self.int8 or self.device.type != "cuda":
            return []
        cache = cache if cache is not None else global_cache()
        K = beam_size or self.beam_size
        jobs = {}
        for stack, lin, residual in self._linears():
            for B in batch_sizes:
                M = B * src_len if stack in ("encoder", "cross_kv") else B * K
                key = (m_bucket(M), lin.N, lin.K, lin.out_dtype)
                if key not in jobs:
                    jobs[key] = (M, lin.activation, lin.bias32 is not None, residual)
                elif residual:   # one choice serves the key: verified with the residual, it serves both kinds
                    jobs[key] = jobs[key][:3] + (True,)
        results = []
        for i, ((_, N, Kd, out), (M, act, has_bias, residual)) in enumerate(sorted(jobs.items(), key=str)):
            if progress:
                print_fn(f"[{i + 1}/{len(jobs)}] tuning M={M} N={N} K={Kd} {out}{' + residual' if residual else ''}")
            r = tune_shape(M, N, Kd, out, act, has_bias, has_residual=residual)
            cache.put(M, N, Kd, out, r.choice, ms=round(r.ms, 5), default_ms=round(r.default_ms, 5),
                      tops=round(r.tops, 1), M_tuned=M)
            results.append(r)
        cache.save()
        for _, lin in self.linears():
            lin.cache = cache
            lin.choices.clear()
        self._graphs.clear()   # recorded with the earlier kernels
        return results

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
        if S > self.max_src_len:
            raise ValueError(f"source length {S} is over the engine's max_src_len={self.max_src_len}: build the "
                             "engine with a larger max_src_len")
        lo, hi = int(src_ids.min()), int(src_ids.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {c.vocab_size})")
        return src_ids.to(device=self.device, dtype=torch.long)

    @torch.inference_mode()
    def infer(self, src_ids, method: str = "beam", beam_size: int | None = None, length_penalty: float | None = None,
              max_len: int | None = None, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
              seed: int = 0, min_len: int = 0, diverse_groups: int = 1,
              diverse_strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """src_ids (batch, src_len) int ids padded with the file's pad id -> (tokens (batch, beams, tgt_len) int64,
        without <s>, padded after </s>; scores (batch, beams) fp32, best first). method: "beam" (beam_size,
        length_penalty; diverse beam search with diverse_groups > 1 groups, diverse_strength), "greedy", or
        "sample" (top_k, top_p, temperature, seed). max_len: the longest output (default: the model's rule for
        the source length, at most the engine's max_tgt_len)."""
        src = self.check_input(src_ids)
        B, S = src.shape
        K = beam_size or self.beam_size
        if method == "beam" and (not isinstance(K, int) or K < 1):
            raise ValueError(f"beam_size must be a positive int, got {K!r}")
        if method == "beam" and K > self.beam_size:
            raise ValueError(f"beam_size {K} is over the engine's {self.beam_size} (set beam_size at construction)")
        if max_len is None:
            max_len = min(self.cfg.max_output_len(S), self.max_tgt_len)
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if max_len > self.max_tgt_len:
            raise ValueError(f"max_len {max_len} is over the engine's max_tgt_len={self.max_tgt_len} (the model's "
                             f"max_seq_len is {self.cfg.max_seq_len}): build the engine with a larger max_tgt_len")
        enc, mask = self._encode_request(src)
        return decoding.generate(
            lambda e, m, k: self._Decoder(self, e, m, k), enc, mask, method=method, beam_size=K,
            length_penalty=self.length_penalty if length_penalty is None else length_penalty, bos=self.bos,
            eos=self.eos, pad=self.pad, max_len=max_len, min_len=min_len, top_k=top_k, top_p=top_p,
            temperature=temperature, seed=seed, diverse_groups=diverse_groups, diverse_strength=diverse_strength)


class QuantTransformer(_Engine):
    """The int8 engine. ``QuantTransformer(path, max_batch_size)``; ``infer(src_ids, ...)``."""
    precision = "int8"


class Transformer(_Engine):
    """The fp16 engine (fp32 on the CPU), same API as QuantTransformer, for fp16 exports."""
    precision = "fp16"
