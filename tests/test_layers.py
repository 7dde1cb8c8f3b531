"""The fused layers on the CPU reference path: against torch.nn, state dicts, quantization, bad input,
convergence. The CUDA path is checked against this path in test_layers_cuda.py."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lsquant
from lsquant import ops
from lsquant.layers import (CrossEntropyLayer, TransformerDecoderLayer, TransformerEmbeddingLayer,
                            TransformerEncoderLayer, TransformerLayerConfig)
from layer_helpers import TinyTagger, padding_mask, train

H, NH, FFN = 48, 4, 80  # hidden not a power of two; 12 per head


def torch_encoder(norm_first, act, dropout=0.0):
    return nn.TransformerEncoderLayer(H, NH, FFN, dropout=dropout, activation=act, batch_first=True,
                                      norm_first=norm_first).eval()


def torch_decoder(norm_first, act):
    return nn.TransformerDecoderLayer(H, NH, FFN, dropout=0.0, activation=act, batch_first=True,
                                      norm_first=norm_first).eval()


# ---- configs ------------------------------------------------------------------------------------------------

def test_get_config_returns_new_instances_and_layers_own_their_config():
    a, b = TransformerEncoderLayer.get_config(hidden_size=64, nhead=4), TransformerEncoderLayer.get_config()
    assert a is not b and a.hidden_size == 64 and b.hidden_size == 512
    layer = TransformerEncoderLayer(a)
    a.hidden_dropout_ratio = 0.5
    assert layer.config is not a and layer.config.hidden_dropout_ratio == 0.1
    assert layer.config.version == 1 and TransformerLayerConfig.from_dict(layer.config.to_dict()) == layer.config


@pytest.mark.parametrize("kw, word", [(dict(hidden_size=50, nhead=4), "divisible"),
                                      (dict(activation_fn="swish"), "activation_fn"),
                                      (dict(hidden_dropout_ratio=1.0), "hidden_dropout_ratio"),
                                      (dict(max_seq_len=0), "max_seq_len"), (dict(dtype="int8"), "dtype")])
def test_bad_config_raises(kw, word):
    with pytest.raises(ValueError, match=word):
        TransformerEncoderLayer.get_config(**kw)


def test_newer_config_version_is_refused():
    d = TransformerEncoderLayer.get_config().to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        TransformerLayerConfig.from_dict(d)


# ---- against torch.nn ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_encoder_matches_torch(norm_first, act):
    ref = torch_encoder(norm_first, act)
    layer = TransformerEncoderLayer.from_torch(ref, max_seq_len=16).eval()
    assert layer.config.pre_layer_norm == norm_first and layer.config.activation_fn == act
    x = torch.randn(3, 7, H)
    mask = padding_mask([7, 1, 4], 7)
    out = layer(x, mask)
    want = ref(x, src_key_padding_mask=mask)
    keep = ~mask  # torch's fast path leaves padded rows undefined
    torch.testing.assert_close(out[keep], want[keep], atol=2e-5, rtol=1e-5)
    # gradients against torch too (float64 to make the comparison tight)
    ref64, layer64 = ref.double(), layer.double()
    x64 = x.double().requires_grad_()
    x64b = x64.detach().clone().requires_grad_()
    (layer64(x64, mask)[keep] ** 2).sum().backward()
    ref64.train()  # the slow path (the fast path has no backward)
    (ref64(x64b, src_key_padding_mask=mask)[keep] ** 2).sum().backward()
    torch.testing.assert_close(x64.grad, x64b.grad, atol=1e-9, rtol=1e-7)
    grads = dict(zip(layer64.weight_names(), [None] * 12))
    flat_grad = layer64.flat.grad
    for theirs, ours in TransformerEncoderLayer._TORCH_NAMES.items():
        start = layer64._offsets[ours]
        g = flat_grad[start:start + math.prod(layer64._shapes[ours])].view(layer64._shapes[ours])
        torch.testing.assert_close(g, ref64.get_parameter(theirs).grad, atol=1e-9, rtol=1e-7)
        grads[ours] = g
    assert all(g is not None for g in grads.values())


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_decoder_matches_torch_and_incremental_equals_full(norm_first, act):
    ref = torch_decoder(norm_first, act)
    layer = TransformerDecoderLayer.from_torch(ref, max_seq_len=16).eval()
    mem = torch.randn(2, 9, H)
    mem_mask = padding_mask([9, 3], 9)
    y = torch.randn(2, 7, H)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    want = ref(y, mem, tgt_mask=causal, memory_key_padding_mask=mem_mask, tgt_is_causal=True)
    out = layer(y, mem, mem_mask)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    cache = {}
    steps = [layer(y[:, :3], mem, mem_mask, cache=cache)]  # a 3-token prompt, then one token at a time
    steps += [layer(y[:, i:i + 1], mem, mem_mask, cache=cache) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), out, atol=2e-6, rtol=1e-6)
    assert cache["self_k"].shape == (2, NH, 7, H // NH)


def test_decoder_target_padding_mask_matches_torch():
    ref = torch_decoder(True, "relu")
    layer = TransformerDecoderLayer.from_torch(ref, max_seq_len=16).eval()
    mem, y = torch.randn(2, 5, H), torch.randn(2, 6, H)
    tmask = padding_mask([6, 4], 6)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    want = ref(y, mem, tgt_mask=causal, tgt_key_padding_mask=tmask)
    out = layer(y, mem, self_padding_mask=tmask)
    torch.testing.assert_close(out[~tmask], want[~tmask], atol=2e-5, rtol=1e-5)


# ---- parameters and state dicts --------------------------------------------------------------------------

def test_parameters_are_views_of_one_flat_buffer():
    layer = TransformerDecoderLayer(TransformerDecoderLayer.get_config(hidden_size=H, intermediate_size=FFN,
                                                                       nhead=NH))
    floats = [n for n, p in layer.named_parameters() if not n.endswith("clip")]
    assert floats == ["flat"]
    for name in layer.weight_names():
        v = layer.w(name)
        assert v.data_ptr() - layer.flat.data_ptr() == layer._offsets[name] * 4
        assert layer._offsets[name] % 8 == 0  # 16-byte aligned views in fp16/bf16


def test_half_precision_layer_keeps_fp32_clips():
    dec = TransformerDecoderLayer(TransformerDecoderLayer.get_config(hidden_size=H, intermediate_size=FFN,
                                                                     nhead=NH)).to(torch.bfloat16)
    assert dec.flat.dtype == torch.bfloat16
    assert {p.dtype for n, p in dec.named_parameters() if n.endswith("clip")} == {torch.float32}


def test_state_dict_round_trips():
    ref = torch_encoder(False, "gelu")
    a = TransformerEncoderLayer.from_torch(ref, max_seq_len=16).eval()
    x = torch.randn(2, 5, H)
    # the full state dict (flat buffer + clips + config)
    b = TransformerEncoderLayer(a.config).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    # per-weight state dict in and out
    c = TransformerEncoderLayer(a.config).eval()
    c.load_state_dict(a.per_weight_state_dict())
    assert torch.equal(a(x), c(x))
    # back to torch.nn
    back = torch_encoder(False, "gelu")
    back.load_state_dict(a.to_torch_state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # decoder to torch and back
    rd = torch_decoder(True, "relu")
    d = TransformerDecoderLayer.from_torch(rd)
    back_d = torch_decoder(True, "relu")
    back_d.load_state_dict(d.to_torch_state_dict())
    for k, v in rd.state_dict().items():
        assert torch.equal(back_d.state_dict()[k], v), k


def test_loading_a_checkpoint_of_another_shape_says_so():
    a = TransformerEncoderLayer(TransformerEncoderLayer.get_config(hidden_size=H, intermediate_size=FFN, nhead=NH))
    b = TransformerEncoderLayer(TransformerEncoderLayer.get_config(hidden_size=H, intermediate_size=FFN, nhead=NH,
                                                                   pre_layer_norm=False))
    with pytest.raises(ValueError, match="pre_layer_norm"):
        b.load_state_dict(a.state_dict())


# ---- dropout ------------------------------------------------------------------------------------------------

def test_dropout_mask_rate_and_reproducibility():
    keep = ops.keep_mask_ref((4096, 64), 0.25, seed=123, offset=7)
    assert abs(keep.float().mean().item() - 0.75) < 0.005  # 262144 draws: std 0.0008
    assert torch.equal(keep, ops.keep_mask_ref((4096, 64), 0.25, seed=123, offset=7))
    assert not torch.equal(keep, ops.keep_mask_ref((4096, 64), 0.25, seed=124, offset=7))
    # offset shifts the counter: element i at offset o+1 is element i+1 at offset o
    shifted = ops.keep_mask_ref((100,), 0.5, seed=5, offset=1)
    assert torch.equal(shifted, ops.keep_mask_ref((101,), 0.5, seed=5, offset=0)[1:])
    # neighbouring seeds give independent masks (agreement ~ p^2 + (1-p)^2 = 0.625)
    a, b = ops.keep_mask_ref((65536,), 0.25, 1), ops.keep_mask_ref((65536,), 0.25, 2)
    assert abs((a == b).float().mean().item() - 0.625) < 0.01


def test_layer_dropout_in_training_only():
    cfg = TransformerEncoderLayer.get_config(hidden_size=H, intermediate_size=FFN, nhead=NH, max_seq_len=16,
                                             hidden_dropout_ratio=0.2, attn_prob_dropout_ratio=0.2,
                                             activation_dropout_ratio=0.2)
    layer = TransformerEncoderLayer(cfg)
    x = torch.randn(2, 6, H)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    assert torch.equal(a, layer(x))  # seeds come from torch's generator
    assert not torch.equal(a, layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


# ---- quantization ------------------------------------------------------------------------------------------

def _quant_layers():
    enc = TransformerEncoderLayer.from_torch(torch_encoder(True, "relu"), max_seq_len=16)
    dec = TransformerDecoderLayer.from_torch(torch_decoder(False, "gelu"), max_seq_len=16)
    return enc, dec


def test_quantized_forward_with_calibrated_clips():
    enc, dec = _quant_layers()
    x, mem = torch.randn(2, 7, H), torch.randn(2, 5, H)
    mask = padding_mask([7, 5], 7)
    float_enc, float_dec = enc(x, mask).detach(), dec(x, mem).detach()
    clips = lsquant.calibrate(enc, [(x, mask)], progress=False)
    assert set(clips) == {f"{n}_quant.input_quantizer" for n in ("qkv", "attn_out", "fc1", "fc2")}
    clips_dec = lsquant.calibrate(dec, [(x, mem)], progress=False)
    assert {"k_quantizer", "v_quantizer", "cross_kv_quant.input_quantizer"} <= set(clips_dec)
    assert all(float(c) > 0 for c in list(clips.values()) + list(clips_dec.values()))
    enc.apply(lsquant.enable_quant)
    dec.apply(lsquant.enable_quant)
    # the QKV linear sees int8 levels: its input divided by the scale is integral
    seen = {}
    hook = enc.qkv_quant.input_quantizer.register_forward_hook(lambda m, i, o: seen.update(x=o.detach()))
    q_enc = enc(x, mask)
    scale = enc.qkv_quant.input_quantizer.clip.detach() / 127
    hook.remove()
    lv = seen["x"] / scale
    torch.testing.assert_close(lv, lv.round(), atol=1e-3, rtol=0)
    q_dec = dec(x, mem).detach()
    q_enc = q_enc.detach()
    for q, f in ((q_enc[~mask], float_enc[~mask]), (q_dec, float_dec)):
        assert not torch.equal(q, f)
        sqnr = 10 * math.log10(float((f ** 2).sum() / ((q - f) ** 2).sum()))
        assert sqnr > 20, sqnr  # int8 with calibrated clips: typically 30-40 dB here
    # the cache holds K/V as the engine will (fake-quantized): K / scale integral
    cache = {}
    dec(x[:, :1], mem, cache=cache)
    lv = cache["self_k"] / (dec.k_quantizer.clip.detach() / 127)
    torch.testing.assert_close(lv, lv.round(), atol=1e-3, rtol=0)
    # disable_quant restores the float forward exactly
    enc.apply(lsquant.disable_quant)
    dec.apply(lsquant.disable_quant)
    assert torch.equal(enc(x, mask), float_enc) and torch.equal(dec(x, mem), float_dec)


def test_gradients_flow_to_clips():
    enc, dec = _quant_layers()
    x, mem = torch.randn(2, 7, H), torch.randn(2, 5, H)
    lsquant.calibrate(dec, [(x, mem)], method="percentile", percentile=99.0, progress=False)
    dec.apply(lsquant.qat_mode)
    (dec(x, mem) ** 2).sum().backward()
    clips = {n: p.grad for n, p in dec.named_parameters() if n.endswith("clip")}
    assert len(clips) == 11  # 7 linears' inputs + K + V + cross-attention K + V
    for n, g in clips.items():
        assert g is not None and float(g.abs()) > 0, n
    assert float(dec.flat.grad.abs().sum()) > 0


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_names_the_limit_and_the_value():
    cfg = TransformerEncoderLayer.get_config(hidden_size=H, intermediate_size=FFN, nhead=NH, max_seq_len=10,
                                             max_batch_tokens=40)
    enc = TransformerEncoderLayer(cfg)
    with pytest.raises(ValueError, match=r"45 tokens .*max_batch_tokens=40"):
        enc(torch.randn(5, 9, H))
    with pytest.raises(ValueError, match=r"sequence length 11 is over max_seq_len=10"):
        enc(torch.randn(1, 11, H))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape .*\(2, 5\), got \(2, 6\)"):
        enc(torch.randn(2, 5, H), torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"hidden_size=48"):
        enc(torch.randn(2, 5, 32))
    with pytest.raises(TypeError, match=r"float64 but .*float32"):
        enc(torch.randn(2, 5, H, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"on meta but .*on cpu"):
        enc(torch.randn(2, 5, H, device="meta"))
    dec = TransformerDecoderLayer(cfg)
    cache = {}
    dec(torch.randn(1, 8, H), torch.randn(1, 3, H), cache=cache)
    with pytest.raises(ValueError, match=r"sequence length 3 is over max_seq_len=2"):
        dec(torch.randn(1, 3, H), torch.randn(1, 3, H), cache=cache)  # 8 cached + 3 > 10
    emb = TransformerEmbeddingLayer(TransformerEmbeddingLayer.get_config(vocab_size=20, embedding_dim=H,
                                                                         max_seq_len=10, max_batch_tokens=40))
    with pytest.raises(ValueError, match=r"token id 20 is outside the vocabulary \[0, 20\)"):
        emb(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match=r"over max_seq_len=10"):
        emb(torch.ones(1, 11, dtype=torch.long))
    ce = CrossEntropyLayer(CrossEntropyLayer.get_config(max_batch_tokens=40))
    with pytest.raises(ValueError, match=r"target id 7 is outside"):
        ce(torch.randn(3, 5), torch.tensor([1, 7, 0]))
    with pytest.raises(ValueError, match=r"41 tokens, over max_batch_tokens=40"):
        ce(torch.randn(41, 5), torch.ones(41, dtype=torch.long))


# ---- embedding and cross-entropy layers --------------------------------------------------------------------

@pytest.mark.parametrize("learned", [False, True])
def test_embedding_layer(learned):
    cfg = TransformerEmbeddingLayer.get_config(vocab_size=37, embedding_dim=H, max_seq_len=12, padding_idx=1,
                                               dropout=0.0, learned_pos=learned)
    emb = TransformerEmbeddingLayer(cfg)
    tokens = torch.tensor([[5, 9, 36, 1, 1], [2, 1, 3, 4, 0]])
    out = emb(tokens)
    pos = emb.w("pos_embeddings") if learned else emb.sin_pos
    want = F.embedding(tokens, emb.w("embeddings")) * math.sqrt(H) + pos[:5]
    want = want.masked_fill((tokens == 1)[..., None], 0)
    torch.testing.assert_close(out, want)
    # incremental positions
    torch.testing.assert_close(emb(tokens[:, 3:], step=3), out[:, 3:])
    out.sum().backward()
    g = emb.flat.grad[:37 * H].view(37, H)
    assert float(g[1].abs().sum()) == 0.0  # padding rows get no gradient
    assert torch.allclose(g[5], torch.full((H,), math.sqrt(H)))
    if not learned:
        assert emb.sin_pos[0, 0] == 0 and emb.sin_pos[0, H // 2] == 1  # sin(0), cos(0)
    # quantized table: each row on its own int8 grid; the projection shares it
    emb.apply(lsquant.enable_quant)
    t = emb.table()
    lv = t / (emb.w("embeddings").abs().amax(1, keepdim=True).clamp(min=1e-8) / 127)  # padding row: 0
    torch.testing.assert_close(lv, lv.round(), atol=1e-3, rtol=0)
    emb.proj_input_quantizer.set_clip(4.0)
    logits = emb.project(out.detach())
    assert logits.shape == (2, 5, 37)


def test_cross_entropy_layer_matches_torch():
    ce = CrossEntropyLayer(CrossEntropyLayer.get_config(padding_idx=0, epsilon=0.1))
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 11, (3, 7))
    targets[1, 4:] = 0
    loss, nll = ce(logits, targets)
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=0, label_smoothing=0.1,
                           reduction="sum")
    want_nll = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-6, atol=1e-6)
    g1, = torch.autograd.grad(loss, logits)
    g2, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
    assert float(g1[1, 4:].abs().sum()) == 0


# ---- convergence --------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    # tensors of 32 x 8 x 32: intra-op threads only add synchronisation (10x slower on a loaded 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_convergence_and_qat_on_cpu(one_thread):
    torch.manual_seed(0)
    model = TinyTagger()
    losses = train(model, 300, quant_from=220)
    first = sum(losses[:10]) / 10
    before_q = sum(losses[210:220]) / 10
    last = sum(losses[-10:]) / 10
    # label smoothing 0.1 over 16 classes floors the loss at ~0.5; chance is ln(15) ~ 2.7 + smoothing
    assert first > 2.4, first
    assert before_q < 0.8, before_q  # learned by step ~200 at lr 1e-2 (0.57 here)
    assert last < before_q + 0.15, (before_q, last)  # QAT keeps the learned solution


# ---- the CUDA path's Python plumbing, exercised on the CPU --------------------------------------------------

@pytest.mark.parametrize("Lq,Lk,causal,masked", [(5, 9, True, True), (5, 9, False, True), (5, 9, True, False),
                                                 (5, 5, True, False), (1, 7, True, True), (4, 9, False, False)])
def test_sdpa_path_equals_masked_softmax(Lq, Lk, causal, masked):
    """Without attention dropout the CUDA layers attend through F.scaled_dot_product_attention: the same
    function as the fused masked softmax (incremental causal offsets and padding included)."""
    from lsquant.layers.transformer import _sdpa
    q, k, v = torch.randn(2, 3, Lq, 8), torch.randn(2, 3, Lk, 8), torch.randn(2, 3, Lk, 8)
    mask = padding_mask([Lk, Lk - 3], Lk) if masked else None
    probs = ops.masked_softmax(q @ k.transpose(-1, -2), mask, causal, scale=8 ** -0.5)
    torch.testing.assert_close(_sdpa(q, k, v, mask, causal), probs @ v, atol=1e-6, rtol=1e-5)


def test_fused_quant_plumbing_equals_unfused(monkeypatch):
    """The QAT fusions (LayerNorm -> quantized QKV/FFN1 input, FFN1 epilogue -> quantized FFN2 input) run only
    on CUDA; forcing them here (their ops fall back to the references) must give the unfused layer's output
    and gradients exactly."""
    from lsquant.layers.base import LinearQuant
    from lsquant.quant import QUANT
    dec = TransformerDecoderLayer.from_torch(torch_decoder(True, "gelu"), max_seq_len=16)
    x, mem = torch.randn(2, 7, H), torch.randn(2, 5, H)
    lsquant.calibrate(dec, [(x, mem)], progress=False)
    dec.apply(lsquant.qat_mode)
    out = dec(x, mem)
    out.backward(torch.ones_like(out))
    grads = {n: p.grad.clone() for n, p in dec.named_parameters()}
    dec.zero_grad()
    used = []

    def forced(self, t):
        q = self.input_quantizer
        used.append(1)
        return q.current_clip() if q.mode == QUANT and q.axis is None and not q.dynamic else None

    monkeypatch.setattr(LinearQuant, "fusable_input_clip", forced)
    out2 = dec(x, mem)
    out2.backward(torch.ones_like(out2))
    assert len(used) == 4  # QKV, cross-Q, FFN1 (LayerNorm fusions) and FFN2 (epilogue fusion)
    assert torch.equal(out, out2)
    for n, p in dec.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7, msg=n)


# ---- what keeps the CUDA path free of host syncs (checked on the GPU in test_layers_cuda.py) -----------------

def test_quantizer_keeps_its_calibrated_flag_on_the_host():
    """After calibration the quant-mode forward does not read the `initialized` buffer (on CUDA that is a sync per
    quantizer per call); loading a state dict makes the loaded buffer decide again."""
    from lsquant.quant import TensorQuantizer
    q = TensorQuantizer()
    fresh = TensorQuantizer().state_dict()
    q.set_quant_mode("quant")
    with pytest.raises(RuntimeError, match="never set"):
        q(torch.randn(4))
    assert not q.is_initialized()
    q.set_clip(2.0)
    assert q.is_initialized()
    q.initialized.fill_(False)  # not read any more: the host flag answers
    q(torch.randn(4))
    q.load_state_dict(fresh)
    with pytest.raises(RuntimeError, match="never set"):
        q(torch.randn(4))
    q.load_state_dict({"clip": torch.tensor(3.0), "initialized": torch.tensor(True)})
    assert q.is_initialized() and float(q.clip.detach()) == 3.0
    assert TensorQuantizer(axis=0, num_channels=3, dynamic=True).is_initialized()


def test_graphed_checks_its_arguments():
    from lsquant.layers import graphed
    enc = TransformerEncoderLayer(TransformerEncoderLayer.get_config(hidden_size=H, intermediate_size=FFN, nhead=NH))
    with pytest.raises(TypeError, match="sample argument 0 must be a CUDA tensor, got cpu"):
        graphed(enc, (torch.randn(2, 5, H),))
    with pytest.raises(TypeError, match="leave optional arguments out"):
        graphed(enc, (torch.randn(2, 5, H), None))
    with pytest.raises(TypeError, match="takes an nn.Module"):
        graphed(lambda x: x, (torch.randn(2),))
