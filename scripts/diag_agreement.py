"""Where the int8 engine and the fake-quant (QAT) model part ways on greedy decoding, on real data.

Trains the translation recipe's model briefly (or reuses --run-dir's checkpoints), exports its QAT model to int8
(and its float model to fp16, as a control), then decodes one test split greedily with:
  the model on CUDA (fp32) and on the CPU (fp32), with quantization on (fake-quant) and off;
  the engine on CUDA (fp32; the int8 one also fp32 with fp16 logits; fp16) and on the CPU (reference ops, fp32;
  the first --cpu-limit sentences).
The int8 side also decodes with the fake-quant
model's GEMMs on int8 levels (lsquant.exact_gemm: exact dot products, the engine's arithmetic; "exact_model_*").
It prints the pairwise share of sentences with identical tokens, and, for the sentences where the CUDA model and
the CUDA engine differ: the position of the first difference and the model's logit margin there between its own
token and the engine's (a margin of ~0 is a near tie that any rounding flips; a large one is a real difference),
and whether the model's teacher-forced forward over its own output reproduces that output (the incremental
decoder against the full one). Results: stdout and OUT/diag_agreement.json.

    python scripts/diag_agreement.py --data .gpu_data/multi30k --run-dir runs/diag --minutes 1.5
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import lsquant
from lsquant.inference.transformer_engine import QuantTransformer, Transformer as FloatEngine
from lsquant.models import Transformer
from lsquant.recipes.mt.batching import collate, length_sorted_batches
from lsquant.recipes.mt.pipeline import (RecipeConfig, export, fp32_model, load_pairs, qat, tf32_matmuls, tokenizer,
                                         train)


def decode_model(model, batches, dev, exact=False):
    """exact: the fake-quant GEMMs on int8 levels (lsquant.exact_gemm)."""
    out = []
    model = model.to(dev)
    with torch.no_grad(), lsquant.exact_gemm(exact):
        for ids in batches:
            out += [t for t in model.generate(ids.to(dev), "greedy")[0][:, 0].cpu()]
    return out


def decode_engine(eng, batches):
    return [t for ids in batches for t in eng.infer(ids.to(eng.device), method="greedy")[0][:, 0].cpu()]


def strip(t, eos, pad=0):
    """The tokens up to and with </s>; without one, up to the padding (an output cut at max_len)."""
    t = t.tolist()
    if eos in t:
        return t[: t.index(eos) + 1]
    while t and t[-1] == pad:
        t.pop()
    return t


def agree(a, b, eos):
    n = min(len(a), len(b))
    return sum(strip(x, eos) == strip(y, eos) for x, y in zip(a[:n], b[:n])), n


def margins(model, srcs, ours, theirs, cfg, dev):
    """For each pair of outputs that differ: (first differing position, model logit of ours - of theirs there,
    rank of theirs under the model)."""
    res = []
    model = model.to(dev)
    with torch.no_grad():
        for s, a, b in zip(srcs, ours, theirs):
            a, b = strip(a, cfg.eos_id), strip(b, cfg.eos_id)
            if a == b:
                continue
            t = next(i for i in range(min(len(a), len(b)) + 1) if i == min(len(a), len(b)) or a[i] != b[i])
            if t >= min(len(a), len(b)):
                res.append((t, float("nan"), -1))
                continue
            tgt_in = torch.tensor([[cfg.bos_id] + a[:t]], device=dev)
            logits = model(s[None].to(dev), tgt_in)[0, -1].float()
            res.append((t, float(logits[a[t]] - logits[b[t]]), int((logits > logits[b[t]]).sum())))
    return res


def teacher_forced_same(model, batches, outs, cfg, dev, exact=False):
    """Share of outputs that the model's full (teacher-forced) forward over the same batches reproduces token
    for token by argmax: the incremental decoder (generate) against the full one."""
    same, k = 0, 0
    model = model.to(dev)
    with torch.no_grad(), lsquant.exact_gemm(exact):
        for ids in batches:
            o = [strip(t, cfg.eos_id) for t in outs[k:k + ids.shape[0]]]
            k += ids.shape[0]
            T = max(len(x) for x in o)
            tgt_in = torch.full((len(o), T), cfg.pad_id, dtype=torch.long)
            for r, x in enumerate(o):
                tgt_in[r, :len(x)] = torch.tensor([cfg.bos_id] + x[:-1])
            am = model(ids.to(dev), tgt_in.to(dev)).argmax(-1).cpu()
            # an output as long as max_len: its last step (</s> or not) is the length rule's, not the argmax's
            width = outs[k - 1].numel()
            n = [len(x) - 1 if len(x) >= width else len(x) for x in o]
            same += sum(am[r, :n[r]].tolist() == x[:n[r]] for r, x in enumerate(o))
    return same / max(k, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run-dir", default="runs/diag")
    ap.add_argument("--minutes", type=float, default=1.5, help="float training time (then QAT as long, at most)")
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--limit", type=int, default=None, help="first N sentences of the split only")
    ap.add_argument("--gpu", default="cuda", help="the accelerator device (cpu: a smoke run of this script)")
    ap.add_argument("--model", default='{"hidden_size": 512, "intermediate_size": 2048, "nhead": 8, '
                    '"num_encoder_layers": 3, "num_decoder_layers": 3, "dropout": 0.3, "max_seq_len": 128}',
                    help="TransformerConfig overrides, JSON (default: the recipe's)")
    ap.add_argument("--cpu-limit", type=int, default=300, help="sentences for the CPU engine (it is slow)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tf32", choices=["off", "on", "both"], default="both",
                    help="PyTorch's TF32 switches during the decodings (the first measurement ran with them on, left "
                         "on by the recipe's training in the same process)")
    ap.add_argument("--recipe", default="{}", help="RecipeConfig overrides, JSON (e.g. a CPU run: "
                    '\'{"dtype": "float32", "warmup": 300, "max_batch_tokens": 4096}\')')
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = RecipeConfig(run_dir=a.run_dir, data=a.data, seed=1, max_train_minutes=a.minutes, max_steps=20000,
                       warmup=800, lr=1e-3, max_batch_tokens=8192, vocab_size=10000, qat_steps=a.qat_steps,
                       qat_lr=1e-4, calib_batches=8, dtype="bfloat16", beam_size=4, infer_batch_size=128,
                       test_splits=(a.split,),
                       device=a.gpu, model=json.loads(a.model))
    cfg = dataclasses.replace(cfg, **json.loads(a.recipe))
    cfg.root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fp, q = cfg.root / "float" / "model.pt", cfg.root / "qat" / "model.pt"
    if not fp.is_file():
        train(cfg)
    if not q.is_file():
        qat(cfg)
    ex = cfg.root / "export"
    q8 = export(cfg, q, ex / "qat_int8.h5", "int8")
    f16 = export(cfg, fp, ex / "fp16.h5", "fp16")
    print(f"trained + exported in {time.time() - t0:.0f} s", flush=True)

    tok = tokenizer(cfg)
    srcs_txt, _ = load_pairs(cfg, a.split, a.limit)
    mcfg = Transformer.load(q).config
    src = tok.encode_batch(srcs_txt, add_bos=False, max_len=mcfg.max_seq_len)
    order = length_sorted_batches([len(x) for x in src], cfg.infer_batch_size)
    batches = [collate([src[i] for i in idx])["src_ids"] for idx in order]
    perm = [i for idx in order for i in idx]  # decode order -> corpus index
    cpu_n = min(a.cpu_limit, len(perm))
    cpu_batches, n = [], 0
    for ids in batches:  # the first cpu_n sentences of the decode order
        if n >= cpu_n:
            break
        cpu_batches.append(ids[: cpu_n - n])
        n += cpu_batches[-1].shape[0]

    def analyse(tf32: bool) -> dict:
        """The decodings and their comparisons with PyTorch's TF32 switches set to tf32 (a run that trained in
        this process had them on: the recipe's fp32 training uses TF32)."""
        outs, times = {}, {}
        for quant, mpath, epath, Eng in ((True, q, q8, QuantTransformer), (False, fp, f16, FloatEngine)):
            tag = "q" if quant else "f"
            m = fp32_model(mpath, quant)
            exact = (((f"exact_model_cuda_{tag}", lambda: decode_model(m, batches, a.gpu, exact=True)),
                      (f"exact_model_cpu_{tag}", lambda: decode_model(m, batches, "cpu", exact=True)))
                     if quant else ())
            for name, fn in ((f"model_cuda_{tag}", lambda: decode_model(m, batches, a.gpu)),
                             (f"model_cpu_{tag}", lambda: decode_model(m, batches, "cpu")),
                             *exact,
                             (f"engine_cuda32_{tag}", lambda: decode_engine(
                                 Eng(epath, max_batch_size=cfg.infer_batch_size, device=a.gpu, dtype=torch.float32),
                                 batches)),
                             *(((f"engine_cuda32l16_{tag}", lambda: decode_engine(
                                 Eng(epath, max_batch_size=cfg.infer_batch_size, device=a.gpu, dtype=torch.float32,
                                     logits_dtype=torch.float16), batches)),) if quant else ()),
                             (f"engine_cuda16_{tag}", lambda: decode_engine(
                                 Eng(epath, max_batch_size=cfg.infer_batch_size, device=a.gpu), batches)),
                             (f"engine_cpu_{tag}", lambda: decode_engine(
                                 Eng(epath, max_batch_size=cfg.infer_batch_size, device="cpu", dtype=torch.float32),
                                 cpu_batches))):
                t1 = time.time()
                outs[name] = fn()
                times[name] = round(time.time() - t1, 1)
                print(f"{name}: {len(outs[name])} sentences in {times[name]} s", flush=True)

        report = {"split": a.split, "sentences": len(perm), "cpu_engine_sentences": cpu_n, "seconds": times,
                  "agreement": {}}
        names = list(outs)
        for i, x in enumerate(names):
            for y in names[i + 1:]:
                if x[-1] != y[-1]:
                    continue
                s, n = agree(outs[x], outs[y], mcfg.eos_id)
                report["agreement"][f"{x} = {y}"] = f"{s}/{n} ({100 * s / n:.1f}%)"
                print(f"{x:>18s} = {y:<18s} {s:4d}/{n:<4d} {100 * s / n:5.1f}%", flush=True)

        flat_src = [row for ids in batches for row in ids]  # each source as padded in its batch
        mq = fp32_model(q, True)
        for pre in ("", "exact_"):
            for dev in ("cuda", "cpu"):
                name = f"{pre}model_{dev}_q"
                tf = teacher_forced_same(mq, cpu_batches, outs[name][:cpu_n], mcfg, a.gpu if dev == "cuda" else dev,
                                         exact=bool(pre))
                report[f"teacher-forced argmax reproduces {name}"] = round(tf, 4)
                print(f"teacher-forced argmax reproduces {name} greedy: {100 * tf:.1f}% of {cpu_n}", flush=True)
        for ref, other in (("model_cuda_q", "engine_cuda32_q"), ("model_cuda_q", "model_cpu_q"),
                           ("exact_model_cuda_q", "engine_cuda32_q"), ("model_cuda_f", "engine_cuda32_f")):
            dev = a.gpu if "cuda" in ref else "cpu"
            quant = ref.endswith("q")
            with lsquant.exact_gemm(ref.startswith("exact_")):
                ms = margins(fp32_model(q if quant else fp, quant), flat_src, outs[ref], outs[other], mcfg, dev)
            vals = sorted(abs(m) for _, m, _ in ms if m == m)
            q_ = lambda f: round(vals[min(len(vals) - 1, int(f * len(vals)))], 4) if vals else None  # noqa: E731
            lens = [len(strip(o, mcfg.eos_id)) for o in outs[ref]]
            dl = [len(strip(outs[ref][k], mcfg.eos_id)) for k, (a_, b_) in enumerate(zip(outs[ref], outs[other]))
                  if strip(a_, mcfg.eos_id) != strip(b_, mcfg.eos_id)]
            summ = {"differ": len(ms), "margin |logit| quantiles 10/50/90/max": [q_(0.1), q_(0.5), q_(0.9), q_(1.0)],
                    "first difference at position (median)": sorted(t for t, _, _ in ms)[len(ms) // 2] if ms else None,
                    "rank of the other token (counts)": {r: sum(1 for _, _, k in ms if k == r) for r in
                                                         sorted({k for _, _, k in ms})},
                    "output length: all / differing (mean)": [round(sum(lens) / max(len(lens), 1), 1),
                                                              round(sum(dl) / max(len(dl), 1), 1)],
                    "first 10 (pos, margin, rank)": [(t, round(m, 5), k) for t, m, k in ms[:10]]}
            report[f"{ref} vs {other}"] = summ
            print(f"{ref} vs {other}: {json.dumps(summ)}", flush=True)
        report["tf32"] = tf32
        return report

    reports = {}
    for setting in {"on": (True,), "off": (False,), "both": (False, True)}[a.tf32]:
        print(f"== TF32 {'on' if setting else 'off'} for fp32 matmuls", flush=True)
        with tf32_matmuls(setting):
            reports[f"tf32 {'on' if setting else 'off'}"] = analyse(setting)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "diag_agreement.json").write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
