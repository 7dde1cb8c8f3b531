"""Translation engines: tokens/s, GPU memory and file size of the int8 engine against the fp16 engine, the
PyTorch model's own decoding and Hugging Face ``generate`` on an equivalent Marian model.

    python bench/bench_engine.py [--models base big] [--out bench/results/engine_<gpu>.csv] [--quick]
        [--impls lsquant_int8 lsquant_fp16 pytorch_fp16 hf_marian_fp16 lsquant_int8_fp32 lsquant_int8_fp32l16]

Random weights (calibrated on random batches for the int8 export), a fixed output length (min_len = max_len
= 32 new tokens, so every implementation decodes the same number of steps), beam 4 and sampling (top-k 4),
batch {1, 8, 32, 128}, source length {16, 32, 64}. The lsquant engines are built for each batch with
max_batch_size = that batch, beam_size = 4 for beam search and 1 for sampling (--sample-beams), max_tgt_len = 32
and max_src_len = the longest source measured (memory "at the same batch"; --engine-src each: one engine per
source length, max_src_len = that length, as one would size an engine for one kind of traffic; column
engine_max_src), with CUDA graphs and without (column cuda_graph; --graph on|off|both). Time: median of 3 timed
runs after one warm-up (which also captures the graphs), each timed by CUDA events; ms_per_step = ms / 32.
Memory: peak allocated bytes while the implementation serves the request (its weights, caches and
activations; each implementation is measured alone) and peak reserved bytes (the allocator's cache emptied
first: this column also counts the memory pool of the captured graphs, which allocated bytes do not show), both
less `floor_mb`: what was allocated before the implementation was built (the bench's own tensors, workspaces
and caches that earlier implementations left in the process).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, gpu_slug, warm_gpu, write_rows  # noqa: E402

import lsquant  # noqa: E402
from lsquant.export import export_transformer  # noqa: E402
from lsquant.inference.transformer_engine import QuantTransformer, Transformer as FloatEngine  # noqa: E402
from lsquant.models import Transformer, TransformerConfig  # noqa: E402

MODELS = {"base": dict(hidden_size=512, intermediate_size=2048, nhead=8),
          "big": dict(hidden_size=1024, intermediate_size=4096, nhead=16)}
VOCAB, NEW = 32000, 32
# lsquant_int8_fp32: the int8 engine with fp32 activations (its GEMMs int8 as ever; LayerNorm, attention, residuals
# and logits in fp32): the setting whose greedy tokens match the fake-quant model (recipes/mt/RESULTS.md);
# lsquant_int8_fp32l16: the same with fp16 logits (logits_dtype), the largest buffer at 2 bytes
IMPLS = ["lsquant_int8", "lsquant_fp16", "pytorch_fp16", "hf_marian_fp16", "lsquant_int8_fp32", "lsquant_int8_fp32l16"]
INT8 = ("lsquant_int8", "lsquant_int8_fp32", "lsquant_int8_fp32l16")
FP32 = ("lsquant_int8_fp32", "lsquant_int8_fp32l16")


def make_files(mname: str, tmp: Path) -> tuple[TransformerConfig, Path, Path, Path]:
    """A 6+6-layer model of MODELS[mname] with random weights (seed 0), calibrated (max) on random batches ->
    (config, fp32 checkpoint, fp16 export, int8 export), written under tmp."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, num_encoder_layers=6, num_decoder_layers=6, dropout=0.0,
                            max_seq_len=128, max_batch_tokens=128 * 4 * 128, beam_size=4, **MODELS[mname])
    model = Transformer(cfg).eval()
    fp32_path = model.save(tmp / f"{mname}.pt")
    model = model.cuda()
    calib = [(torch.randint(4, VOCAB, (16, 32), device="cuda"), torch.randint(4, VOCAB, (16, 32), device="cuda"))]
    lsquant.calibrate(model, calib, method="max", progress=False)
    fp16_file = export_transformer(model, tmp / f"{mname}_fp16.h5", "fp16")
    int8_file = export_transformer(model, tmp / f"{mname}_int8.h5", "int8")
    del model
    torch.cuda.empty_cache()
    return cfg, fp32_path, Path(fp16_file), Path(int8_file)


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def peak_mb(fn):
    """(peak allocated MB, peak reserved MB) while fn runs; cached free blocks are released first."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20


def marian(sizes):
    from transformers import MarianConfig, MarianMTModel

    cfg = MarianConfig(vocab_size=VOCAB, d_model=sizes["hidden_size"], encoder_layers=6, decoder_layers=6,
                       encoder_attention_heads=sizes["nhead"], decoder_attention_heads=sizes["nhead"],
                       encoder_ffn_dim=sizes["intermediate_size"], decoder_ffn_dim=sizes["intermediate_size"],
                       max_position_embeddings=256, pad_token_id=0, eos_token_id=2, decoder_start_token_id=1,
                       bos_token_id=1, forced_eos_token_id=None)
    return MarianMTModel(cfg).half().cuda().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["base", "big"], choices=list(MODELS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="batch {1, 32}, source length 32 only")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8 32 128)")
    ap.add_argument("--src-lens", type=int, nargs="+", default=None, help="source lengths (default 16 32 64)")
    ap.add_argument("--graph", choices=["on", "off", "both"], default="both",
                    help="lsquant engines with CUDA graphs (on), without (off) or both (default)")
    ap.add_argument("--impls", nargs="+", default=IMPLS[:4], choices=IMPLS,
                    help="implementations to measure (default: the first four)")
    ap.add_argument("--methods", nargs="+", default=["beam", "sample"], choices=["beam", "sample"],
                    help="decoding methods to measure (default both)")
    ap.add_argument("--sample-beams", type=int, default=1, choices=[1, 4],
                    help="beam_size our engines are built with for the sampling rows: 1 (default) sizes their "
                         "buffers for sampling, as one would to serve it; 4 serves sampling from the beam "
                         "search's engine (column engine_beams; results before this option: 4)")
    ap.add_argument("--engine-src", choices=["max", "each"], default="max",
                    help="max_src_len of our engines: the longest source measured, one engine for every source "
                         "length (max, the default), or each source length with an engine of its own (each)")
    ap.add_argument("--tune", choices=["on", "off"], default="on",
                    help="tune the int8 engine's GEMMs for each measured batch and source length first (the "
                         "documented workflow; into a cache under a temporary folder) or use the defaults")
    args = ap.parse_args()
    out = args.out or f"bench/results/engine_{gpu_slug()}.csv"
    info = env_info()
    warm_gpu()
    batches = args.batches or ([1, 32] if args.quick else [1, 8, 32, 128])
    lens = args.src_lens or ([32] if args.quick else [16, 32, 64])
    tmp = Path(tempfile.mkdtemp())
    tune_cache = None
    if args.tune == "on":
        from lsquant.inference.gemm_tuner import TuningCache, set_global_cache

        tune_cache = TuningCache(tmp / "gemm_tuning.json")
        set_global_cache(tune_cache)   # engines built later look their GEMM kernels up here

    def pre_tune(path, B, dtype=None, beams=4):
        """Tune the int8 engine's GEMMs for batch B and every source length (the documented workflow: tune, then
        serve from the cache) on a throwaway engine, so that what tuning leaves allocated in the process (its
        timing graphs' pools, workspaces) is not counted as the measured engine's memory."""
        eng = QuantTransformer(path, max_batch_size=B, beam_size=beams, max_tgt_len=NEW, max_src_len=max(lens),
                               cuda_graph=False, dtype=dtype)
        for S in lens:
            eng.tune([B], S, cache=tune_cache, progress=False)

    for mname in args.models:
        sizes = MODELS[mname]
        cfg, fp32_path, fp16_file, int8_file = make_files(mname, tmp)
        sizes_mb = {"fp32_checkpoint": os.path.getsize(fp32_path) / 2**20, "fp16_file": os.path.getsize(fp16_file) / 2**20,
                    "int8_file": os.path.getsize(int8_file) / 2**20}
        print(f"{mname}: files {sizes_mb}", flush=True)

        def build(impl, B, graph, beams, max_src):
            if impl in INT8 or impl == "lsquant_fp16":
                cls, path = (QuantTransformer, int8_file) if impl in INT8 else (FloatEngine, fp16_file)
                kw = dict(dtype=torch.float32) if impl in FP32 else {}
                if impl == "lsquant_int8_fp32l16":
                    kw["logits_dtype"] = torch.float16
                return cls(path, max_batch_size=B, beam_size=beams, max_tgt_len=NEW, max_src_len=max_src,
                           cuda_graph=graph, **kw)
            if impl == "pytorch_fp16":
                m = Transformer(dataclasses.replace(cfg, dtype="float16"))
                m.load_state_dict(torch.load(fp32_path, map_location="cpu", weights_only=False)["model"])
                return m.cuda().eval()
            return marian(sizes)

        graphs = {"on": [True], "off": [False], "both": [True, False]}[args.graph]
        variants = [(impl, g) for impl in ("lsquant_int8", "lsquant_fp16", *FP32) for g in graphs]
        variants += [("pytorch_fp16", False), ("hf_marian_fp16", False)]
        variants = [(impl, g) for impl, g in variants if impl in args.impls]
        for impl, graph in variants:
            ours = impl.startswith("lsquant")
            name = f"{impl}{'+graph' if graph else ''}"
            rows, obj = [], None
            tuned_for = set()   # (batch, beams) the int8 engine's GEMMs were tuned for
            for B in batches:
                built = None   # (batch, beams, max_src_len) of our engine in obj
                for method in args.methods:
                    beams = 4 if method == "beam" else args.sample_beams
                    for S in lens:
                        max_src = S if args.engine_src == "each" else max(lens)
                        if (ours and built != (B, beams, max_src)) or obj is None:
                            # our engines: sized for this batch, method (and source); the others hold no buffers
                            obj = None
                            tuned = impl in INT8 and tune_cache is not None
                            if tuned and (B, beams) not in tuned_for:
                                try:
                                    pre_tune(int8_file, B, torch.float32 if impl in FP32 else None, beams)
                                    tuned_for.add((B, beams))
                                except Exception as e:  # noqa: BLE001 - measured with the default kernels instead
                                    tuned = False
                                    print(f"{mname} {impl} B={B}: tuning failed ({type(e).__name__}: {e}); "
                                          "default kernels", flush=True)
                            gc.collect()
                            torch.cuda.empty_cache()
                            # what stays allocated without this implementation (the process's CUDA context aside:
                            # workspaces, caches of earlier ones); subtracted from its peak below
                            floor = torch.cuda.memory_allocated() / 2**20
                            try:
                                obj = build(impl, B, graph, beams, max_src)
                            except Exception as e:  # noqa: BLE001 - record and go on
                                print(f"{mname} {name}: cannot build: {type(e).__name__}: {e}", flush=True)
                                break
                            built = (B, beams, max_src)
                        src = torch.randint(4, VOCAB, (B, S), device="cuda")
                        if ours:
                            run = lambda: obj.infer(src, method, max_len=NEW, min_len=NEW, top_k=4)  # noqa: E731
                        elif impl == "pytorch_fp16":
                            run = lambda: obj.generate(src, method, max_len=NEW, min_len=NEW, top_k=4)  # noqa: E731
                        else:
                            kw = dict(num_beams=4) if method == "beam" else dict(do_sample=True, top_k=4)
                            run = lambda: obj.generate(src, attention_mask=torch.ones_like(src),  # noqa: E731
                                                       max_new_tokens=NEW, min_new_tokens=NEW, **kw)
                        try:
                            with torch.inference_mode():
                                ms = timed(run)
                                mem, reserved = peak_mb(run)
                                mem, reserved = mem - floor, reserved - floor
                            note = ""
                        except Exception as e:  # noqa: BLE001
                            ms, mem, reserved = float("nan"), float("nan"), float("nan")
                            note = f"{type(e).__name__}: {str(e)[:120]}"
                        file_mb = sizes_mb[{**{i: "int8_file" for i in INT8}, "lsquant_fp16": "fp16_file"}.get(
                            impl, "fp32_checkpoint")]
                        r = {**info, "model": f"transformer-{mname}", "impl": impl, "method": method, "batch": B,
                             "src_len": S, "new_tokens": NEW, "ms": round(ms, 2),
                             "tokens_per_s": round(B * NEW / ms * 1e3, 1) if ms == ms else float("nan"),
                             "peak_mem_mb": round(mem, 1), "file_mb": round(file_mb, 2),
                             "note": note, "cuda_graph": int(graph), "ms_per_step": round(ms / NEW, 3),
                             "peak_reserved_mb": round(reserved, 1), "floor_mb": round(floor, 1),
                             "gemm_tuned": int(tuned), "engine_beams": beams if ours else "",
                             "engine_max_src": max_src if ours else ""}
                        rows.append(r)
                        print(f"{mname:4s} {name:21s} {method:6s} B={B:<4d} S={S:<3d} {ms:9.2f} ms "
                              f"{r['tokens_per_s']:>10} tok/s {mem:8.1f} MB {reserved:8.1f} MB reserved (floor {floor:.1f}) {note}",
                              flush=True)
            write_rows(out, rows)
            obj = None
            gc.collect()
            torch.cuda.empty_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
