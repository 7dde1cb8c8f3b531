"""Which fp16 roundings part the int8 engine from the fake-quant model: the engine on the CPU in fp32 (which matches
the model evaluated with exact GEMMs, lsquant.exact_gemm) with one group of its linears' outputs rounded to fp16
(or bf16) at a time, greedy decoding of a real test split, against that model. Also the whole engine in fp16 and
bf16. Needs a run directory of scripts/diag_agreement.py (its qat/model.pt and export/qat_int8.h5).

    python scripts/diag_rounding.py --run-dir /tmp/diagcpu/run --data .gpu_data/multi30k --limit 300 \\
      --model '{"hidden_size": 256, "intermediate_size": 1024, "nhead": 4, "num_encoder_layers": 3, ...}'
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diag_agreement import agree, decode_engine, decode_model  # noqa: E402

from lsquant.inference.transformer_engine import QuantTransformer  # noqa: E402
from lsquant.models import Transformer  # noqa: E402
from lsquant.recipes.mt.batching import collate, length_sorted_batches  # noqa: E402
from lsquant.recipes.mt.pipeline import RecipeConfig, fp32_model, load_pairs, tokenizer  # noqa: E402


class Rounded:
    """A linear of the engine whose float outputs are rounded to dt and back (int8 outputs untouched)."""

    def __init__(self, lin, dt):
        self.lin, self.dt = lin, dt

    def _r(self, y):
        return y if y.dtype == torch.int8 else y.to(self.dt).to(y.dtype)

    def __call__(self, *a, **k):
        return self._r(self.lin(*a, **k))

    def ln_call(self, *a, **k):
        return self._r(self.lin.ln_call(*a, **k))

    def __getattr__(self, name):
        return getattr(self.lin, name)


def _round(layers, names, dt):
    for L in layers:
        for n in names:
            L[n] = Rounded(L[n], dt)


GROUPS = {
    "the logits": lambda e, dt: setattr(e, "proj", Rounded(e.proj, dt)),
    "the decoder's residual stream (attn_out, cross_out, fc2)": lambda e, dt: _round(
        e.dec, ("attn_out", "cross_out", "fc2"), dt),
    "the decoder's queries, keys and values (qkv, cross_q)": lambda e, dt: _round(e.dec, ("qkv", "cross_q"), dt),
    "the encoder and the source keys and values (cross_kv)": lambda e, dt: (
        _round(e.enc, [n for n in e.enc[0] if hasattr(e.enc[0][n], "lin")], dt), _round(e.dec, ("cross_kv",), dt)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--model", default="{}", help="the run's model config, JSON (as given to diag_agreement.py)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    cfg = RecipeConfig(run_dir=a.run_dir, data=a.data, seed=1, vocab_size=10000, dtype="float32",
                       infer_batch_size=64, test_splits=(a.split,), device="cpu", model=json.loads(a.model))
    q, q8 = cfg.root / "qat" / "model.pt", cfg.root / "export" / "qat_int8.h5"
    for p in (q, q8):
        if not p.is_file():
            raise SystemExit(f"{p} is missing: run scripts/diag_agreement.py with --run-dir {a.run_dir} first")
    tok = tokenizer(cfg)
    srcs_txt, _ = load_pairs(cfg, a.split, a.limit)
    mcfg = Transformer.load(q).config
    eos = mcfg.eos_id
    src = tok.encode_batch(srcs_txt, add_bos=False, max_len=mcfg.max_seq_len)
    batches = [collate([src[i] for i in idx])["src_ids"]
               for idx in length_sorted_batches([len(x) for x in src], 64)]
    ref = decode_model(fp32_model(q, True), batches, "cpu", exact=True)

    def report(what, eng):
        s, n = agree(ref, decode_engine(eng, batches), eos)
        print(f"{what:<70s} {s:4d}/{n:<4d} {100 * s / n:5.1f}%", flush=True)

    print(f"{a.split}, first {len(ref)} sentences, greedy; identical to the exact-GEMM fake-quant model:")
    report("engine in fp32", QuantTransformer(q8, max_batch_size=64, device="cpu", dtype=torch.float32))
    for what, fn in GROUPS.items():
        e = QuantTransformer(q8, max_batch_size=64, device="cpu", dtype=torch.float32)
        fn(e, dt)
        report(f"engine in fp32, {what} rounded to {a.dtype}", e)
    for d in (torch.float16, torch.bfloat16):
        report(f"engine in {str(d).split('.')[-1]}", QuantTransformer(q8, max_batch_size=64, device="cpu", dtype=d))


if __name__ == "__main__":
    main()
