"""Conversion between transformers' BertLayer and lsquant's TransformerEncoderLayer (CPU).

Tolerances (DESIGN.md principle 4): in fp64 both layers compute the same function up to summation order, so they
agree to 1e-10 (relative to the output's scale). In fp32, lsquant's error against the fp64 BertLayer is at most
twice the fp32 BertLayer's own error, plus 1e-6 of the output's scale (so that an fp32 error of exactly 0 does not
demand bit equality from differently ordered sums). State-dict round trips are exact.
"""
import copy
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lsquant.layers import TransformerEncoderLayer  # noqa: E402
from lsquant.models import (config_from_hf_bert, encoder_layer_from_hf_bert,  # noqa: E402
                            encoder_layer_to_hf_bert_state_dict, encoder_layers_from_hf_bert, padding_mask_from_hf)
from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402

H, NH, FFN = 64, 4, 96


def bert_config(**kw):
    cfg = dict(hidden_size=H, num_attention_heads=NH, intermediate_size=FFN, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, max_position_embeddings=32, attn_implementation="eager")
    cfg.update(kw)
    return transformers.BertConfig(**cfg)


def random_bert_layer(**kw):
    layer = BertLayer(bert_config(**kw)).eval()
    with torch.no_grad():  # BERT initialises biases to 0 and LayerNorms to (1, 0): randomise everything
        for name, p in layer.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_((0.1 if p.dim() == 2 else 0.5) * torch.randn_like(p))
    return layer


def hf_forward(layer, x, attention_mask):
    """BertLayer on x with a (batch, seq_len) 1/0 mask, as BertModel calls it (an additive (B, 1, 1, L) mask)."""
    ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    out = layer(x, attention_mask=ext)
    return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple


def batch(B=3, L=9, dtype=torch.float32):
    x = torch.randn(B, L, H, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([L, 1, 5])[:B]
    attention_mask = (torch.arange(L)[None, :] < lengths[:, None]).long()  # 1 = token, 0 = padding
    return x, attention_mask


def check_fp32(ours32, hf32, ref64, what):
    err = (ours32.double() - ref64).abs().max().item()
    base = (hf32.double() - ref64).abs().max().item()
    tol = 2 * base + 1e-6 * ref64.abs().max().item()
    assert err <= tol, f"{what}: lsquant's fp32 error {err:.3e} > 2 x transformers' {base:.3e} (+ floor)"


def test_config_carries_bert_hyperparameters():
    bl = BertLayer(bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2))
    cfg = config_from_hf_bert(bl, max_batch_tokens=1000)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.nhead) == (H, FFN, NH)
    assert cfg.layer_norm_eps == 1e-12 and not cfg.pre_layer_norm and cfg.activation_fn == "gelu"
    assert (cfg.attn_prob_dropout_ratio, cfg.hidden_dropout_ratio, cfg.activation_dropout_ratio) == (0.2, 0.1, 0.0)
    assert cfg.max_seq_len == 32 and cfg.max_batch_tokens == 1000 and cfg.dtype == "float32"
    assert config_from_hf_bert(BertLayer(bert_config(hidden_act="relu"))).activation_fn == "relu"


def test_output_matches_bert_layer():
    torch.manual_seed(1)
    bl = random_bert_layer()
    layer = encoder_layer_from_hf_bert(bl).eval()
    x, am = batch()
    mask = padding_mask_from_hf(am)
    # fp64: the same function (padded query positions included: both compute them the same way)
    bl64, layer64 = copy.deepcopy(bl).double(), encoder_layer_from_hf_bert(bl).double().eval()
    x64 = x.double().requires_grad_()
    x64b = x64.detach().clone().requires_grad_()
    ref64 = hf_forward(bl64, x64, am)
    out64 = layer64(x64b, mask)
    scale = ref64.abs().max().item()
    assert (out64 - ref64).abs().max().item() <= 1e-10 * scale
    # gradients too
    g = torch.randn_like(ref64)
    ref64.backward(g)
    out64.backward(g)
    torch.testing.assert_close(x64b.grad, x64.grad, atol=1e-10, rtol=1e-9)
    # fp32: within twice transformers' own fp32 error
    with torch.no_grad():
        check_fp32(layer(x, mask), hf_forward(bl, x, am), ref64.detach(), "BertLayer fp32")


def test_state_dict_round_trip_is_exact():
    bl = random_bert_layer()
    layer = encoder_layer_from_hf_bert(bl)
    sd = encoder_layer_to_hf_bert_state_dict(layer)
    want = bl.state_dict()
    assert set(sd) == set(want)
    for k, v in want.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    fresh = BertLayer(bert_config())
    fresh.load_state_dict(sd)
    again = encoder_layer_from_hf_bert(fresh)
    assert torch.equal(again.flat, layer.flat)
    # and through lsquant's own per-weight state dict
    other = TransformerEncoderLayer(layer.config)
    other.load_state_dict(layer.per_weight_state_dict(), strict=False)
    assert torch.equal(other.flat, layer.flat)


def test_unsupported_layers_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="tanh"):
        encoder_layer_from_hf_bert(BertLayer(bert_config(hidden_act="gelu_new")))
    with pytest.raises(ValueError, match="decoder"):
        encoder_layer_from_hf_bert(BertLayer(bert_config(is_decoder=True)))
    with pytest.raises(TypeError, match="BertLayer"):
        encoder_layer_from_hf_bert(torch.nn.Linear(4, 4))
    pre = TransformerEncoderLayer(TransformerEncoderLayer.get_config(hidden_size=H, nhead=NH, intermediate_size=FFN))
    with pytest.raises(ValueError, match="post-LayerNorm"):
        encoder_layer_to_hf_bert_state_dict(pre)


# ---- the pretrained BERT of the shared folder ------------------------------------------------------------------

def minilm_dir() -> Path:
    env = os.environ.get("LSQUANT_MODELS")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "models"
    path = root / "all-MiniLM-L6-v2"
    if not (path / "config.json").is_file():
        pytest.skip(f"pretrained BERT not found at {path}: set LSQUANT_MODELS or put the shared models at "
                    "../shared/models beside the checkout")
    return path


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir()
    kw = dict(attn_implementation="eager")
    try:
        model = transformers.BertModel.from_pretrained(path, dtype=torch.float32, **kw)
    except TypeError:  # transformers 4 spells it torch_dtype
        model = transformers.BertModel.from_pretrained(path, torch_dtype=torch.float32, **kw)
    return model.eval()


def _minilm_batch(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, model.config.vocab_size, (3, 23), generator=g)
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[2, 15:] = 0
    return ids, am


def test_pretrained_bert_first_layer(minilm):
    ids, am = _minilm_batch(minilm)
    with torch.no_grad():
        x = minilm.embeddings(input_ids=ids)
        bl = minilm.encoder.layer[0]
        layer = encoder_layer_from_hf_bert(bl).eval()
        assert layer.config.layer_norm_eps == 1e-12 and layer.config.max_seq_len == 512
        out = layer(x, padding_mask_from_hf(am))
        ref = hf_forward(bl, x, am)
        ref64 = hf_forward(copy.deepcopy(bl).double(), x.double(), am)
    check_fp32(out, ref, ref64, "MiniLM layer 0")


def test_pretrained_bert_whole_encoder(minilm):
    ids, am = _minilm_batch(minilm)
    layers = encoder_layers_from_hf_bert(minilm).eval()
    assert len(layers) == 6
    with torch.no_grad():
        x = minilm.embeddings(input_ids=ids)
        mask = padding_mask_from_hf(am)
        for layer in layers:
            x = layer(x, mask)
        ref = minilm(input_ids=ids, attention_mask=am).last_hidden_state
        m64 = copy.deepcopy(minilm).double()
        ref64 = m64.encoder(m64.embeddings(input_ids=ids), attention_mask=(
            1.0 - am[:, None, None, :].double()) * torch.finfo(torch.float64).min).last_hidden_state
    keep = ~mask  # BertModel may treat padded query positions differently; compare the tokens
    check_fp32(x[keep], ref[keep], ref64[keep], "MiniLM, 6 layers")
