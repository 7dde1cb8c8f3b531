"""Export and the Transformer engines on the CPU: the engines decode exactly as the PyTorch model does."""
import numpy as np
import pytest
import torch

import lsquant
from lsquant.export import FormatError, export_transformer, read_transformer
from lsquant.inference.transformer_engine import QuantTransformer, Transformer as FloatEngine
from lsquant.models import Transformer, TransformerConfig

V = 23


def _copy_batches(n, B=16, L=7, seed=0):
    """A copy task: target = source. Ids 4.. are words; 0 pad, 1 <s>, 2 </s>."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(3, L + 1, (B,), generator=g)
        src = torch.zeros(B, L + 1, dtype=torch.long)
        tgt = torch.zeros(B, L + 2, dtype=torch.long)
        for b in range(B):
            w = torch.randint(4, V, (int(lens[b]),), generator=g)
            src[b, :len(w)] = w
            src[b, len(w)] = 2
            tgt[b, 0] = 1
            tgt[b, 1:len(w) + 1] = w
            tgt[b, len(w) + 1] = 2
        out.append((src, tgt[:, :-1], tgt[:, 1:]))
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, hidden_size=48, intermediate_size=96, nhead=4, num_encoder_layers=2,
                            num_decoder_layers=2, dropout=0.0, max_seq_len=24, max_batch_tokens=4096,
                            beam_size=3, max_len_a=1.0, max_len_b=3)
    m = Transformer(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for src, tin, tout in _copy_batches(250):
        loss, _ = m.loss(src, tin, tout)
        opt.zero_grad()
        (loss / (tout != 0).sum()).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def test_src():
    return torch.cat([b[0] for b in _copy_batches(4, seed=99)])


def test_the_model_learned_the_task(trained, test_src):
    tokens, _ = trained.generate(test_src[:16], "greedy")
    right = 0
    for b in range(16):
        words = test_src[b][(test_src[b] > 3)].tolist()
        right += tokens[b, 0, :len(words) + 1].tolist() == words + [2]
    assert right >= 12, right


def test_fp16_export_engine_equals_float_model(trained, test_src, tmp_path):
    path = export_transformer(trained, tmp_path / "fp.h5", "fp16", float_dtype="float32")
    eng = FloatEngine(path, max_batch_size=64)
    for method in ("greedy", "beam"):
        ours, s1 = eng.infer(test_src, method=method)
        theirs, s2 = trained.generate(test_src, method)
        assert torch.equal(ours, theirs), method
        torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)


def test_int8_engine_equals_qat_model(trained, test_src, tmp_path):
    qat = Transformer.load(trained.save(tmp_path / "m.pt")).eval()
    lsquant.calibrate(qat, [b[:2] for b in _copy_batches(4, seed=5)], method="max", progress=False)
    qat.apply(lsquant.enable_quant)
    path = export_transformer(qat, tmp_path / "q.h5", "int8", float_dtype="float32")
    eng = QuantTransformer(path, max_batch_size=64)
    for method in ("greedy", "beam"):
        ours, s1 = eng.infer(test_src, method=method)
        theirs, s2 = qat.generate(test_src, method)
        if method == "greedy":
            assert torch.equal(ours, theirs)
        else:  # lower beams are near-ties; the best hypothesis must agree on (nearly) every sentence
            same = sum(torch.equal(a, b) for a, b in zip(ours[:, 0], theirs[:, 0]))
            assert same >= 0.95 * len(test_src), same
            s1, s2 = s1[:, 0], s2[:, 0]
        # scores: the engine accumulates exactly in int32 where QAT sums fp32 products, so an activation can
        # land on the other side of a rounding boundary now and then: measured up to 2.4e-3 here
        torch.testing.assert_close(s1, s2, rtol=0, atol=1e-2)
    a = eng.infer(test_src, "sample", top_k=4, seed=7)[0]
    assert torch.equal(a, qat.generate(test_src, "sample", top_k=4, seed=7)[0])
    fp = read_transformer(path)
    assert fp.tensors["encoder/0/qkv/weight"].dtype == np.int8


def test_ptq_export_needs_calibration(trained, tmp_path):
    m = Transformer.load(trained.save(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="calibrate"):
        export_transformer(m, tmp_path / "x.h5", "int8")
    assert not (tmp_path / "x.h5").exists()
    path = export_transformer(m, tmp_path / "x.h5", "int8", calib_batches=[b[:2] for b in _copy_batches(2)],
                              calib_method="percentile")
    QuantTransformer(path, max_batch_size=4)


def test_int8_file_is_smaller(trained, tmp_path):
    fp32 = trained.save(tmp_path / "m.pt")
    m = Transformer.load(fp32)
    q = export_transformer(m, tmp_path / "q.h5", "int8", calib_batches=[b[:2] for b in _copy_batches(1)])
    # tiny models carry proportionally more clips and biases; real sizes are in the recipe's results
    assert q.stat().st_size < 0.6 * fp32.stat().st_size


def test_bad_requests_and_the_engine_keeps_serving(trained, test_src, tmp_path):
    path = export_transformer(trained, tmp_path / "fp.h5", "fp16")
    eng = FloatEngine(path, max_batch_size=4)
    good = eng.infer(test_src[:2], "greedy")[0]
    with pytest.raises(ValueError, match="max_batch_size=4"):
        eng.infer(test_src[:5])
    with pytest.raises(ValueError, match="max_seq_len=24"):
        eng.infer(torch.full((1, 25), 5))
    with pytest.raises(ValueError, match=f"token id {V}"):
        eng.infer(torch.tensor([[5, V]]))
    with pytest.raises(ValueError, match="token id -1"):
        eng.infer(torch.tensor([[5, -1]]))
    with pytest.raises(ValueError, match="empty"):
        eng.infer(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        eng.infer(torch.ones(1, 3))
    with pytest.raises(ValueError, match="rank 2"):
        eng.infer(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="fp16 export: load it with lsquant.inference.Transformer"):
        QuantTransformer(path, max_batch_size=1)
    assert torch.equal(eng.infer(test_src[:2], "greedy")[0], good)


def test_corrupted_file_is_a_clear_error(trained, tmp_path):
    path = export_transformer(trained, tmp_path / "fp.h5", "fp16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError):
        FloatEngine(path, max_batch_size=1)


@pytest.mark.cuda
def test_cuda_engines_match_the_model_on_cuda(trained, test_src, tmp_path):
    """On the GPU: the fp16-format engine (run in fp32) equals the float model, and the int8 engine (cuBLASLt /
    Triton GEMMs, CUDA kernels) equals the QAT model's fake-quant decoding on greedy tokens."""
    path = export_transformer(trained, tmp_path / "fp.h5", "fp16", float_dtype="float32")
    model = Transformer.load(trained.save(tmp_path / "m.pt")).cuda().eval()
    src = test_src.cuda()
    eng = FloatEngine(path, max_batch_size=64, device="cuda", dtype=torch.float32)
    assert torch.equal(eng.infer(src, "greedy")[0], model.generate(src, "greedy")[0])
    lsquant.calibrate(model, [tuple(t.cuda() for t in b[:2]) for b in _copy_batches(4, seed=5)], method="max",
                      progress=False)
    model.apply(lsquant.enable_quant)
    qpath = export_transformer(model, tmp_path / "q.h5", "int8", float_dtype="float32")
    qeng = QuantTransformer(qpath, max_batch_size=64, device="cuda", dtype=torch.float32)
    ours, theirs = qeng.infer(src, "greedy")[0], model.generate(src, "greedy")[0]
    same = sum(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert same >= 0.99 * len(src), same
    # in fp16 the engine still decodes the trained task as the fp32 engine does
    eng16 = FloatEngine(export_transformer(trained, tmp_path / "fp16.h5", "fp16"), max_batch_size=64, device="cuda")
    same16 = sum(torch.equal(a, b) for a, b in zip(eng16.infer(src, "greedy")[0], eng.infer(src, "greedy")[0]))
    assert same16 >= 0.95 * len(src), same16
