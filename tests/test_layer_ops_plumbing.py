"""The CUDA ops' autograd Functions on the CPU, with the extension replaced by a stand-in that computes each
binding with the references: checks the Python side of every fused op (argument order, saved tensors, returned
gradients, optional outputs) where no GPU is, so that the GPU run only has the kernels themselves left to test."""
import importlib

import pytest
import torch

from lsquant import ops
from lsquant.ops.dropout import dropout_params

# the modules (lsquant.ops.embedding and .cross_entropy are also the names of functions in lsquant.ops)
layernorm, bias_dropout, softmax, embedding, cross_entropy = (
    importlib.import_module(f"lsquant.ops.{m}") for m in ("layernorm", "bias_dropout", "softmax", "embedding",
                                                          "cross_entropy"))

P24 = float(1 << 24)


def _p(thr):
    return thr / P24


def _seed(seed, thr):
    """What csrc/bindings.cpp's layers_seed_ptr accepts: None (or anything) without dropout, else an int64 tensor
    of one element (on CUDA there; these Functions run on CPU tensors here)."""
    if not thr:
        return 0
    assert isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1, seed
    return seed


def _grads(out_fn, inputs, grads_out):
    """autograd of sum(out * g) over the outputs of out_fn(*inputs) -> grads of the inputs (None -> zeros)."""
    with torch.enable_grad():  # called from inside a backward, where grad mode is off
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        outs = out_fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        total = sum((o.float() * g.float()).sum() for o, g in zip(outs, grads_out) if g is not None and g.numel())
        want = [t for t in leaves if t.requires_grad]
        got = torch.autograd.grad(total, want, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(want, got)]


class RefExtension:
    """The bindings of csrc/bindings.cpp (Transformer-layer section), computed with the references."""

    def ln_fwd(self, x, w, b, eps, clip, pdl):
        assert pdl is False   # training never launches it with PDL
        y = layernorm.layer_norm_ref(x, w, b, eps)
        mean = x.float().mean(-1)
        rstd = 1 / torch.sqrt(x.float().var(-1, unbiased=False) + eps)
        yq = ops.fake_quantize_ref(y, clip.reshape(())) if clip.numel() else torch.empty(0)
        return y, mean, rstd, yq

    def ln_bwd(self, gy, gq, x, w, b, mean, rstd, clip):
        eps = 1e-5
        has_clip = clip.numel() > 0
        ins = [x, w, b] + ([clip.reshape(())] if has_clip else [])

        def f(x, w, b, c=None):
            y = layernorm.layer_norm_ref(x, w, b, eps)
            return (y, ops.fake_quantize(y, c)) if c is not None else (y,)

        g = _grads(f, ins, [gy if gy.numel() else None, gq if gq.numel() else None])
        gc = g[3].reshape(1) if has_clip and gq.numel() else torch.empty(0)
        return g[0], g[1].float(), g[2].float(), gc

    def bias_act_fwd(self, x, bias, act, seed, offset, thr, scale, clip):
        seed = _seed(seed, thr)
        name = ["relu", "gelu"][act]
        y = bias_dropout.bias_act_dropout_ref(x, bias, name, _p(thr), seed, offset)
        return ops.fake_quantize_ref(y, clip.reshape(())) if clip.numel() else y

    def bias_act_bwd(self, gy, x, bias, act, seed, offset, thr, scale, clip):
        seed = _seed(seed, thr)
        name = ["relu", "gelu"][act]
        if clip.numel():
            f = lambda x, b, c: bias_dropout.bias_act_dropout_fake_quant_ref(x, b, name, _p(thr), seed, c, offset)  # noqa: E731
            g = _grads(f, [x, bias, clip.reshape(())], [gy])
            return g[0], g[2].reshape(1)
        g = _grads(lambda x, b: bias_dropout.bias_act_dropout_ref(x, b, name, _p(thr), seed, offset), [x, bias], [gy])
        return g[0], torch.empty(0)

    def bias_dropout_residual_fwd(self, x, bias, residual, seed, offset, thr, scale):
        seed = _seed(seed, thr)
        return bias_dropout.bias_dropout_residual_ref(x, bias, residual, _p(thr), seed, offset)

    def dropout_bwd(self, gy, seed, offset, thr, scale):
        seed = _seed(seed, thr)
        return ops.dropout_ref(gy, _p(thr), seed, offset)

    def softmax_fwd(self, x, mask, causal, sscale, seed, offset, thr, scale):
        seed = _seed(seed, thr)
        m = mask.bool() if mask.numel() else None
        probs = softmax.masked_softmax_ref(x, m, causal, 0.0, 0, 0, sscale)
        dropped = ops.dropout_ref(probs, _p(thr), seed, offset) if thr else probs
        return probs, dropped

    def softmax_bwd(self, gy, probs, sscale, seed, offset, thr, scale):
        seed = _seed(seed, thr)
        dp = ops.dropout_ref(gy, _p(thr), seed, offset).float() if thr else gy.float()
        p = probs.float()
        return (sscale * p * (dp - (dp * p).sum(-1, keepdim=True))).to(gy.dtype)

    def embedding_fwd(self, tokens, table, pos, emb_scale, pad, start, seed, offset, thr, scale):
        seed = _seed(seed, thr)
        return embedding.embedding_ref(tokens, table, pos, emb_scale, None if pad < 0 else pad, start, _p(thr),
                                       seed, offset)

    def embedding_bwd(self, gy, tokens, V, P, need_pos, emb_scale, pad, start, seed, offset, thr, scale):
        seed = _seed(seed, thr)
        t = torch.zeros(V, gy.shape[-1], dtype=gy.dtype)
        p = torch.zeros(P, gy.shape[-1], dtype=gy.dtype)
        f = lambda t, p: embedding.embedding_ref(tokens, t, p, emb_scale, None if pad < 0 else pad, start,  # noqa: E731
                                                 _p(thr), seed, offset)
        gt, gp = _grads(f, [t, p], [gy])
        return gt.float(), gp.float() if need_pos else torch.empty(0)

    def ce_fwd(self, x, t, eps, ignore):
        loss, nll = cross_entropy.cross_entropy_ref(x, t, eps, ignore)
        return loss, nll, torch.logsumexp(x.float(), -1)

    def ce_bwd(self, gloss, x, t, lse, eps, ignore):
        return _grads(lambda x: cross_entropy.cross_entropy_ref(x, t, eps, ignore)[0], [x], [gloss])[0]


@pytest.fixture(autouse=True)
def ref_extension(monkeypatch):
    ext = RefExtension()
    for mod in (layernorm, bias_dropout, softmax, embedding, cross_entropy):
        monkeypatch.setattr(mod, "load", lambda: ext)


def _compare(fn_function, fn_ref, inputs, n_out=1, tol=1e-5):
    """Same forward and same input gradients through the Function path and through the reference."""
    g = [torch.randn(3, 1) for _ in range(n_out)]  # placeholder; real grads made below
    a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    oa, ob = fn_function(*a), fn_ref(*b)
    oa = oa if isinstance(oa, tuple) else (oa,)
    ob = ob if isinstance(ob, tuple) else (ob,)
    g = [torch.randn_like(o) for o in ob]
    for x, y in zip(oa, ob):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)
    sum((o * gg).sum() for o, gg in zip(oa, g) if o.requires_grad).backward()
    sum((o * gg).sum() for o, gg in zip(ob, g) if o.requires_grad).backward()
    for x, y in zip(a, b):
        if y.requires_grad and y.grad is not None:
            torch.testing.assert_close(x.grad, y.grad, atol=tol, rtol=tol)


def test_layer_norm_functions():
    x, w, b = torch.randn(5, 7, 24), torch.randn(24), torch.randn(24)
    _compare(lambda x, w, b: layernorm._LayerNorm.apply(x, w, b, 1e-5, None),
             lambda x, w, b: layernorm.layer_norm_ref(x, w, b, 1e-5), [x, w, b])
    clip = torch.tensor(1.5)
    _compare(lambda x, w, b, c: layernorm._LayerNorm.apply(x, w, b, 1e-5, c),
             lambda x, w, b, c: layernorm.layer_norm_fake_quant_ref(x, w, b, 1e-5, c), [x, w, b, clip], n_out=2)
    # only yq used (the pre-LN layers): y's gradient is None inside the Function
    a = [t.clone().requires_grad_() for t in (x, w, b, clip)]
    layernorm._LayerNorm.apply(*a[:3], 1e-5, a[3])[1].sum().backward()
    r = [t.clone().requires_grad_() for t in (x, w, b, clip)]
    layernorm.layer_norm_fake_quant_ref(*r[:3], 1e-5, r[3])[1].sum().backward()
    for u, v in zip(a, r):
        torch.testing.assert_close(u.grad, v.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bias_functions(p):
    x, bias, res = torch.randn(6, 40), torch.randn(40), torch.randn(6, 40)
    for act in ("relu", "gelu"):
        code = bias_dropout.ACTIVATIONS[act]
        _compare(lambda x, b: bias_dropout._BiasAct.apply(x, b, code, p, 11, 0, None),
                 lambda x, b: bias_dropout.bias_act_dropout_ref(x, b, act, p, 11), [x, bias])
        _compare(lambda x, b, c: bias_dropout._BiasAct.apply(x, b, code, p, 11, 0, c),
                 lambda x, b, c: bias_dropout.bias_act_dropout_fake_quant_ref(x, b, act, p, 11, c),
                 [x, bias, torch.tensor(1.0)])
    _compare(lambda x, b, r: bias_dropout._BiasDropoutResidual.apply(x, b, r, p, 12, 0),
             lambda x, b, r: bias_dropout.bias_dropout_residual_ref(x, b, r, p, 12), [x, bias, res])


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_softmax_function(p):
    s = torch.randn(2, 3, 5, 9)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    _compare(lambda s: softmax._MaskedSoftmax.apply(s, mask.to(torch.uint8), True, p, 13, 0, 0.3),
             lambda s: softmax.masked_softmax_ref(s, mask, True, p, 13, 0, 0.3), [s])


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_embedding_function(p):
    tokens = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    table, pos = torch.randn(10, 16), torch.randn(8, 16)
    _compare(lambda t, q: embedding._Embedding.apply(tokens, t, q, 4.0, 1, 2, p, 14, 0),
             lambda t, q: embedding.embedding_ref(tokens, t, q, 4.0, 1, 2, p, 14), [table, pos])


def test_cross_entropy_function():
    x = torch.randn(7, 11)
    t = torch.tensor([1, 2, -100, 4, 5, 10, 0])
    _compare(lambda x: cross_entropy._CrossEntropy.apply(x, t, 0.1, -100)[0],
             lambda x: cross_entropy.cross_entropy_ref(x, t, 0.1, -100)[0], [x])
    loss, nll = cross_entropy._CrossEntropy.apply(x, t, 0.1, -100)
    assert not nll.requires_grad
    assert dropout_params(0.2)[0] == round(0.2 * P24)


# ---- seeds: an int or a one-element int64 tensor, the same mask either way ---------------------------------

SEEDS = [11, 2**40 + 7, 2**62 - 1, -5]  # high bits used; a negative int64 reads as its two's complement


@pytest.mark.parametrize("seed", SEEDS)
def test_int_and_tensor_seeds_give_the_same_references(seed):
    t = torch.tensor([seed], dtype=torch.int64)
    x, bias, res = torch.randn(6, 40), torch.randn(40), torch.randn(6, 40)
    assert torch.equal(ops.keep_mask_ref((6, 40), 0.3, seed), ops.keep_mask_ref((6, 40), 0.3, t))
    assert torch.equal(ops.keep_mask_ref((50,), 0.3, seed), ops.keep_mask_ref((50,), 0.3, t.reshape(())))
    assert torch.equal(ops.dropout_ref(x, 0.3, seed), ops.dropout_ref(x, 0.3, t))
    assert torch.equal(ops.bias_act_dropout_ref(x, bias, "gelu", 0.3, seed),
                       ops.bias_act_dropout_ref(x, bias, "gelu", 0.3, t))
    assert torch.equal(ops.bias_dropout_residual_ref(x, bias, res, 0.3, seed),
                       ops.bias_dropout_residual_ref(x, bias, res, 0.3, t))
    s = torch.randn(2, 3, 5, 9)
    assert torch.equal(ops.masked_softmax_ref(s, None, True, 0.3, seed), ops.masked_softmax_ref(s, None, True, 0.3, t))
    tokens, table, pos = torch.tensor([[3, 1, 4], [5, 9, 2]]), torch.randn(10, 16), torch.randn(8, 16)
    assert torch.equal(ops.embedding_ref(tokens, table, pos, 4.0, 1, 0, 0.3, seed),
                       ops.embedding_ref(tokens, table, pos, 4.0, 1, 0, 0.3, t))
    # the uint64 bits of the seed decide (the kernels read an int64 and hash it as uint64)
    if seed < 0:
        assert torch.equal(ops.keep_mask_ref((64,), 0.3, seed), ops.keep_mask_ref((64,), 0.3, seed + 2**64))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_functions_take_int_or_tensor_seeds(p):
    """The Functions turn an int into the one-element tensor the bindings read (and pass no seed without
    dropout: RefExtension checks both); a tensor seed gives the int's result."""
    x, bias, res = torch.randn(6, 40), torch.randn(40), torch.randn(6, 40)
    for seed in (12, torch.tensor([12]), torch.tensor(12)):
        _compare(lambda x, b, r: bias_dropout._BiasDropoutResidual.apply(x, b, r, p, seed, 0),
                 lambda x, b, r: bias_dropout.bias_dropout_residual_ref(x, b, r, p, 12), [x, bias, res])
        _compare(lambda x, b, c: bias_dropout._BiasAct.apply(x, b, 1, p, seed, 0, c),
                 lambda x, b, c: bias_dropout.bias_act_dropout_fake_quant_ref(x, b, "gelu", p, 12, c),
                 [x, bias, torch.tensor(1.0)])
        s = torch.randn(2, 3, 5, 9)
        _compare(lambda s: softmax._MaskedSoftmax.apply(s, torch.empty(0, dtype=torch.uint8), True, p, seed, 0, 0.3),
                 lambda s: softmax.masked_softmax_ref(s, None, True, p, 12, 0, 0.3), [s])
        tokens, table, pos = torch.tensor([[3, 1, 4, 1]]), torch.randn(10, 16), torch.randn(8, 16)
        _compare(lambda t, q: embedding._Embedding.apply(tokens, t, q, 4.0, 1, 2, p, seed, 0),
                 lambda t, q: embedding.embedding_ref(tokens, t, q, 4.0, 1, 2, p, 12), [table, pos])


def test_seed_conversions():
    from lsquant.ops.dropout import seed_int, seed_tensor
    t = seed_tensor(5, "cpu")
    assert t.dtype == torch.int64 and t.shape == (1,) and int(t) == 5
    s = torch.tensor([9, 8, 7])[1]  # a view, as the layers pass them
    assert seed_tensor(s, "cpu") is s and seed_int(s) == 8
    assert seed_int(7) == 7 and seed_int(torch.tensor([[3]])) == 3
    for bad in (torch.tensor([1, 2]), torch.tensor([1.0])):
        with pytest.raises(ValueError, match="seed tensor"):
            seed_tensor(bad, "cpu")
        with pytest.raises(ValueError, match="seed tensor"):
            seed_int(bad)
    with pytest.raises(ValueError, match="int64"):
        seed_tensor(torch.tensor([1], dtype=torch.int32), "cpu")


def test_new_seeds_on_the_cpu():
    assert ops.new_seeds(0, "cpu") == []
    torch.manual_seed(3)
    a = ops.new_seeds(4, "cpu")
    torch.manual_seed(3)
    assert ops.new_seeds(4, "cpu") == a
    assert all(isinstance(v, int) and 0 <= v < 2**62 for v in a) and len(set(a)) == 4


def test_layers_draw_their_seeds_in_one_call(monkeypatch):
    """One new_seeds call per layer call, with one seed per dropout site that is on (the CUDA path makes this
    one device kernel, no host sync), and none in eval mode; the seeds reach the ops as drawn."""
    from lsquant.layers import TransformerDecoderLayer, TransformerEncoderLayer
    calls, used = [], []
    real = ops.new_seeds

    def counting(n, device):
        calls.append(n)
        return real(n, device)

    monkeypatch.setattr(ops, "new_seeds", counting)
    kw = dict(hidden_size=16, intermediate_size=32, nhead=2, max_seq_len=8, hidden_dropout_ratio=0.1,
              attn_prob_dropout_ratio=0.1, activation_dropout_ratio=0.1)
    enc = TransformerEncoderLayer(TransformerEncoderLayer.get_config(**kw))
    dec = TransformerDecoderLayer(TransformerDecoderLayer.get_config(**kw))
    x = torch.randn(2, 5, 16)
    enc(x)
    dec(x, x)
    assert calls == [4, 6]
    calls.clear()
    enc.eval()
    dec.eval()
    enc(x)
    dec(x, x)
    assert calls == [0, 0]
    no_attn = TransformerEncoderLayer(TransformerEncoderLayer.get_config(**{**kw, "attn_prob_dropout_ratio": 0.0}))
    calls.clear()
    no_attn(x)
    assert calls == [3]
    # the drawn seeds are the ones the ops get
    orig = bias_dropout.bias_dropout_residual

    def recording(x, b, r, p, seed, *a):
        used.append(seed)
        return orig(x, b, r, p, seed, *a)

    monkeypatch.setattr(ops, "bias_dropout_residual", recording)
    monkeypatch.setattr(ops, "new_seeds", lambda n, device: list(range(100, 100 + n)))
    enc.train()
    enc(x)
    assert used == [101, 103]  # attention probs 100, attention output 101, activation 102, FFN output 103
