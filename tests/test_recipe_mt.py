"""The translation recipe on a tiny synthetic corpus on the CPU: every stage, resume, PTQ, export, inference."""
import subprocess
import sys

import pytest
import torch

from lsquant.models import Transformer
from lsquant.recipes.mt import pipeline
from lsquant.recipes.mt.pipeline import RecipeConfig

TINY = dict(src_lang="toy", tgt_lang="en", test_splits=("test",), vocab_size=400, max_batch_tokens=1024,
            lr=2e-3, warmup=5, max_steps=8, save_every=3, qat_steps=3, qat_lr=2e-4, calib_batches=2,
            infer_batch_size=16, limit_train=600, limit_test=8,
            model=dict(hidden_size=32, intermediate_size=64, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                       max_seq_len=48, dropout=0.1))


def _cfg(tmp_path, name="run", **kw):
    return RecipeConfig(run_dir=str(tmp_path / name), **{**TINY, **kw})


def test_every_stage_writes_its_artefacts(tmp_path):
    cfg = _cfg(tmp_path)
    results = pipeline.run_all(cfg)
    root = cfg.root
    for f in ("recipe.json", "tokenizer.json", "float/model.pt", "qat/model.pt", "ptq_percentile/model.pt",
              "export/fp16.h5", "export/qat_int8.h5", "export/ptq_percentile_int8.h5", "results.json", "results.md",
              "log.txt", "eval/qat_int8.test.hyp"):
        assert (root / f).is_file(), f
    assert set(results) >= {"fp16", "qat_int8", "ptq_percentile_int8", "training"}
    assert all(0 <= results[k]["BLEU test"] <= 100 for k in ("fp16", "qat_int8"))
    assert results["qat_int8"]["file_MB"] < results["fp16"]["file_MB"]
    # on the CPU the engines compute the models' own arithmetic: every greedy output is the model's
    assert results["fp16"]["greedy = model, test"] == 1.0
    assert results["qat_int8"]["greedy = model, test"] == 1.0
    assert results["qat_int8"]["greedy = model (exact GEMM), test"] == 1.0
    assert "greedy = model (exact GEMM), test" not in results["fp16"]
    # the yardstick's plumbing (on the CPU both sides are the CPU: the same arithmetic, the same tokens); on CUDA
    # run_all reports it next to the agreements
    assert "greedy model cuda = model cpu, test" not in results["qat_int8"]
    assert pipeline.model_self_agreement(cfg, root / "qat" / "model.pt", "test", True) == 1.0
    m = Transformer.load(root / "qat" / "model.pt")      # loads back and decodes
    tokens, _ = m.generate(torch.tensor([[5, 6, 7, 2]]), "greedy", max_len=5)
    assert tokens.shape[:2] == (1, 1)


def test_tf32_switches_are_restored():
    """Training turns TF32 on for its fp32 GEMMs (CUDA); decoding after it in the same process must see the flags
    as they were (the fp32 references of greedy_agreement were once decoded in TF32)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pipeline.tf32_matmuls(not before[0]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before[0])
        assert torch.backends.cudnn.allow_tf32 is (not before[0])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError):
        with pipeline.tf32_matmuls(True):
            raise RuntimeError("an interrupted block restores them too")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = _cfg(tmp_path, "straight")
    pipeline.train(straight)
    cfg = _cfg(tmp_path, "interrupted")
    calls = {"n": 0}
    real = pipeline.collate

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:                       # killed during step 5: the checkpoint of step 3 survives
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "collate", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(cfg)
    assert not (cfg.root / "float" / "model.pt").exists()
    monkeypatch.setattr(pipeline, "collate", real)
    pipeline.train(cfg)                           # resumes at step 3, runs to 8
    a = torch.load(straight.root / "float" / "model.pt", weights_only=False)["model"]
    b = torch.load(cfg.root / "float" / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_ptq_command_on_a_tiny_model(tmp_path):
    cfg = _cfg(tmp_path)
    pipeline.train(cfg)
    cfg.save()
    out = subprocess.run([sys.executable, "-m", "lsquant", "ptq", "--run-dir", str(cfg.root), "--method", "mse"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (cfg.root / "ptq_mse" / "model.pt").is_file()
    out = subprocess.run([sys.executable, "-m", "lsquant", "export", "--run-dir", str(cfg.root),
                          str(cfg.root / "ptq_mse" / "model.pt"), str(tmp_path / "ptq.h5")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    from lsquant.inference.transformer_engine import QuantTransformer

    eng = QuantTransformer(tmp_path / "ptq.h5", max_batch_size=2)
    tokens, scores = eng.infer(torch.tensor([[5, 6, 7, 2]]), "beam")
    assert tokens.shape[:2] == (1, eng.beam_size) and torch.isfinite(scores).all()


def test_bf16_training_keeps_fp32_master_weights_and_resumes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "bf16", dtype="bfloat16", max_steps=6)
    calls = {"n": 0}
    real = pipeline.collate

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "collate", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(cfg)
    ckpt = torch.load(next((cfg.root / "float" / "ckpt").glob("checkpoint_*.pt")), weights_only=True)
    masters = ckpt["extra"]["master"]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    monkeypatch.setattr(pipeline, "collate", real)
    pipeline.train(cfg)
    m = Transformer.load(cfg.root / "float" / "model.pt")
    assert m.encoder[0].flat.dtype == torch.bfloat16
    assert torch.isfinite(m.encoder[0].flat.float()).all()


def test_float16_training_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        pipeline.train(_cfg(tmp_path, "fp16", dtype="float16"))


def test_engine_dtypes_from_the_recipe():
    """infer_dtype / infer_logits_dtype: "auto" leaves the engine's default; a dtype name is passed on (the logits
    one to int8 engines only); anything else is refused naming the field and the allowed values."""
    cfg = RecipeConfig()
    assert pipeline.engine_dtypes(cfg, True) == {} and pipeline.engine_dtypes(cfg, False) == {}
    cfg = RecipeConfig(infer_dtype="float32", infer_logits_dtype="float16")
    assert pipeline.engine_dtypes(cfg, True) == {"dtype": torch.float32, "logits_dtype": torch.float16}
    assert pipeline.engine_dtypes(cfg, False) == {"dtype": torch.float32}
    with pytest.raises(ValueError, match="infer_dtype must be 'auto' or one of"):
        RecipeConfig(infer_dtype="fp8")     # at construction: before any training
