"""lsquant.models.Transformer on the CPU: shapes, incremental == full decoding, decoding rules, checkpoints."""
import pytest
import torch

import lsquant
from lsquant.models import Transformer, TransformerConfig


def _model(**kw):
    cfg = dict(vocab_size=37, hidden_size=32, intermediate_size=48, nhead=4, num_encoder_layers=2,
               num_decoder_layers=2, dropout=0.0, max_seq_len=40, max_batch_tokens=512)
    cfg.update(kw)
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**cfg)).eval()


def _src(B=3, S=9):
    src = torch.randint(4, 37, (B, S))
    src[0, 6:] = 0      # padding
    src[:, -1:] = torch.where(src[:, -1:] == 0, 0, 2)
    return src


@pytest.mark.parametrize("pre_ln", [True, False])
def test_step_logits_equal_teacher_forced_logits(pre_ln):
    m = _model(pre_layer_norm=pre_ln)
    src = _src()
    tgt = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(4, 37, (3, 6))], dim=1)
    full = m(src, tgt)
    enc, mask = m.encode(src)
    dec = m._Decoder(m, enc, mask)
    for t in range(tgt.shape[1]):
        torch.testing.assert_close(dec.step(tgt[:, t], t), full[:, t], rtol=1e-5, atol=1e-5)


def test_greedy_tokens_are_the_argmax_of_the_full_forward():
    m = _model()
    src = _src()
    tokens, scores = m.generate(src, "greedy", max_len=12)
    assert tokens.shape[:2] == (3, 1)
    for b in range(3):
        seq = tokens[b, 0].tolist()
        n = seq.index(2) + 1 if 2 in seq else len(seq)
        tgt_in = torch.tensor([[1] + seq[:n - 1]])
        logits = m(src[b:b + 1], tgt_in)[0]
        logits[:, [0, 1]] = float("-inf")            # pad and bos are never generated
        if n == 12 and seq[-1] == 2:                  # the last position may only be </s>
            logits[-1] = torch.where(torch.arange(37) == 2, 0.0, float("-inf"))
        assert logits.argmax(-1).tolist() == seq[:n]


def test_beam_of_one_is_greedy_and_beams_are_sorted():
    m = _model()
    src = _src()
    g, _ = m.generate(src, "greedy", max_len=10)
    b1, _ = m.generate(src, "beam", beam_size=1, max_len=10, length_penalty=0.0)
    assert torch.equal(g, b1)
    tokens, scores = m.generate(src, "beam", beam_size=4, max_len=10)
    assert tokens.shape[:2] == (3, 4) and scores.shape == (3, 4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert ((tokens == 2).sum(-1) == 1).all()       # every hypothesis ends with exactly one </s>


def test_sampling_is_reproducible_for_a_seed():
    m = _model()
    src = _src()
    a = m.generate(src, "sample", top_k=5, top_p=0.9, seed=3, max_len=10)[0]
    b = m.generate(src, "sample", top_k=5, top_p=0.9, seed=3, max_len=10)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(src, "sample", top_p=0.0)
    with pytest.raises(ValueError, match="method"):
        m.generate(src, "nucleus")


def test_save_load_round_trip_with_quantization(tmp_path):
    m = _model()
    src = _src()
    tgt = torch.randint(4, 37, (3, 5))
    lsquant.calibrate(m, [(src, tgt)], progress=False)
    m.apply(lsquant.enable_quant)
    path = m.save(tmp_path / "model.pt")
    m2 = Transformer.load(path).eval()
    m2.apply(lsquant.enable_quant)
    assert torch.equal(m(src, tgt), m2(src, tgt))
    assert torch.equal(m.generate(src, "beam", max_len=8)[0], m2.generate(src, "beam", max_len=8)[0])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        Transformer.load(tmp_path / "bad.pt")


def test_config_checks():
    with pytest.raises(ValueError, match="eos_id"):
        TransformerConfig(vocab_size=2)
    with pytest.raises(ValueError, match="at least one"):
        TransformerConfig(num_encoder_layers=0)


def test_cross_kv_quantizers_follow_the_config_and_old_configs_load_without_them(tmp_path):
    """quant_cross_kv (default on): the decoder layers quantize the cross-attention K/V; a config saved before the
    option (no key) loads with it off, and so does its checkpoint, whose state has no such quantizers."""
    m = _model()
    assert m.config.quant_cross_kv and m.decoder[0].cross_k_quantizer is not None
    src, tgt = _src(), torch.randint(4, 37, (3, 5))
    lsquant.calibrate(m, [(src, tgt)], progress=False)
    clip = m.decoder[0].cross_k_quantizer.clip.item()
    assert clip > 0 and bool(m.decoder[0].cross_v_quantizer.initialized)
    m.apply(lsquant.enable_quant)
    on = m(src, tgt)
    for layer in m.decoder:   # the same model without them differs: they take part in the forward
        layer.cross_k_quantizer.apply(lsquant.disable_quant)
    assert not torch.equal(on, m(src, tgt))

    d = m.config.to_dict()
    del d["quant_cross_kv"]
    assert not TransformerConfig.from_dict(d).quant_cross_kv
    assert TransformerConfig.from_dict(m.config.to_dict()).quant_cross_kv
    old = _model(quant_cross_kv=False)
    assert old.decoder[0].cross_k_quantizer is None
    assert not any("cross_k_quantizer" in k for k in old.state_dict())
    blob = torch.load(old.save(tmp_path / "old.pt"), weights_only=False)
    del blob["config"]["quant_cross_kv"]
    torch.save(blob, tmp_path / "old.pt")
    assert not Transformer.load(tmp_path / "old.pt").config.quant_cross_kv
    with pytest.raises(ValueError, match="quant_cross_kv"):   # a layer state of the other kind
        m.decoder[0].load_state_dict(old.decoder[0].state_dict(), strict=False)
