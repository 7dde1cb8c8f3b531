"""The translation recipe: fp16/bf16 training, QAT fine-tuning, PTQ, export, int8 / fp16 inference and BLEU.

Every stage is a function of a :class:`RecipeConfig` and a run directory; the ``lsquant train|qat|ptq|export|
infer|eval`` commands and ``lsquant quickstart`` call these functions. Layout of a run directory::

    tokenizer.json                 joint BPE of the training data (also stored in every export)
    float/ckpt/checkpoint_*.pt     resumable training state (atomic; the newest few kept)
    float/model.pt                 the trained float model
    qat/ckpt/..., qat/model.pt     QAT fine-tuning from float/model.pt (calibrated, then trained in int8)
    ptq_<method>/model.pt          the float model with calibrated clips (no training)
    export/{fp16,qat_int8,ptq_<method>_int8}.h5
    eval/<export>.<split>.hyp      detokenised outputs; results.json / results.md: the report
    log.txt
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lsquant
from lsquant.models import Transformer, TransformerConfig
from lsquant.optim import MasterWeights

from ..checkpoint import CheckpointManager, restore_checkpoint
from ..schedule import inverse_sqrt_schedule
from .batching import TokenBatchSampler, collate, length_sorted_batches
from .tokenizer import MTTokenizer

log = logging.getLogger("lsquant")


@dataclass
class RecipeConfig:
    """Everything a run needs; saved as run_dir/recipe.json. ``model`` overrides TransformerConfig fields."""
    run_dir: str = "runs/mt"
    data: str | None = None            # a Multi30k-style folder; None: the synthetic corpus under run_dir/data
    src_lang: str = "de"
    tgt_lang: str = "en"
    train_split: str = "train"
    valid_split: str = "val"
    test_splits: tuple = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")
    vocab_size: int = 8000
    model: dict = field(default_factory=dict)
    max_batch_tokens: int = 8192
    lr: float = 1e-3
    warmup: int = 1000
    max_steps: int = 6000
    max_train_minutes: float | None = None  # also stop training (and QAT) after this long, saving the model
    save_every: int = 500
    clip_norm: float = 1.0
    qat_steps: int = 1000
    qat_lr: float = 1e-4
    calib_batches: int = 8
    calib_method: str = "percentile"
    ptq_method: str = "percentile"
    beam_size: int = 4
    infer_batch_size: int = 128
    # the engines' activation dtype ("auto": fp16 on CUDA, fp32 on the CPU; "float32": an int8 engine's greedy
    # tokens then match the fake-quant model's, see README) and an int8 engine's logits dtype ("auto": the same)
    infer_dtype: str = "auto"
    infer_logits_dtype: str = "auto"
    dtype: str = "float32"             # model (and layer) dtype; bfloat16/float16 train with fp32 master weights
    device: str = "auto"
    seed: int = 1
    limit_train: int | None = None     # first N training pairs only (smoke runs)
    limit_test: int | None = None      # first N sentences of each test split only (smoke runs)
    version: int = 1

    def __post_init__(self):
        engine_dtypes(self, True)   # a misspelt dtype fails here, not after training

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def save(self) -> None:
        from lsquant.files import atomic_write

        with atomic_write(self.root / "recipe.json", "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)


# -- data -------------------------------------------------------------------------------------------------------

def data_dir(cfg: RecipeConfig) -> Path:
    from .data import resolve_data_dir
    from .synthetic import SRC_LANG, TGT_LANG, write_corpus

    if cfg.data is None:
        if (cfg.src_lang, cfg.tgt_lang) != (SRC_LANG, TGT_LANG):
            raise ValueError(f"the synthetic corpus is {SRC_LANG}->{TGT_LANG}; set src_lang/tgt_lang to match "
                             "or pass --data")
        return write_corpus(cfg.root / "data")
    return resolve_data_dir(cfg.data)


def load_pairs(cfg: RecipeConfig, split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    from .data import read_split

    return read_split(data_dir(cfg), split, cfg.src_lang, cfg.tgt_lang, limit=limit)


def tokenizer(cfg: RecipeConfig) -> MTTokenizer:
    """The run's tokenizer: loaded from run_dir, else trained on the training split and saved there."""
    path = cfg.root / "tokenizer.json"
    if path.is_file():
        return MTTokenizer.load(path)
    src, tgt = load_pairs(cfg, cfg.train_split, cfg.limit_train)
    tok = MTTokenizer.train_on_pairs(src, tgt, vocab_size=cfg.vocab_size, show_progress=False)
    tok.save(path)
    log.info("trained a %d-token joint BPE on %d pairs", tok.vocab_size, len(src))
    return tok


def encoded(cfg: RecipeConfig, tok: MTTokenizer, split: str, limit: int | None = None, max_len: int | None = None):
    src, tgt = load_pairs(cfg, split, limit)
    s = tok.encode_batch(src, add_bos=False, max_len=max_len)
    t = tok.encode_batch(tgt, max_len=max_len + 1 if max_len else None)
    return s, t, tgt


def model_config(cfg: RecipeConfig, tok: MTTokenizer) -> TransformerConfig:
    # vocabulary padded to a multiple of 8 (tensor-core friendly); the extra ids are never produced by data
    vocab = int(math.ceil(tok.vocab_size / 8) * 8)
    kw = dict(vocab_size=vocab, max_batch_tokens=cfg.max_batch_tokens, beam_size=cfg.beam_size, dtype=cfg.dtype,
              pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id, unk_id=tok.unk_id)
    kw.update(cfg.model)
    return TransformerConfig(**kw)


# -- training ---------------------------------------------------------------------------------------------------

def _batches(cfg: RecipeConfig, src, tgt, seed: int, max_tokens: int) -> TokenBatchSampler:
    return TokenBatchSampler.for_pairs(src, tgt, max_tokens, seed=seed, pad_to_multiple=8)


def _train_loop(cfg: RecipeConfig, model: Transformer, stage: str, steps: int, lr: float, warmup: int,
                src, tgt) -> Transformer:
    """Train ``model`` for ``steps`` optimizer steps with checkpoints under run_dir/<stage>/ckpt, resuming from
    the newest one; returns the model (also saved as run_dir/<stage>/model.pt)."""
    dev = cfg.torch_device()
    if model.config.dtype == "float16":
        raise ValueError("float16 training needs loss scaling, which the recipe does not do: use dtype=bfloat16 "
                         "(fp32 master weights, no scaling needed) or float32; export and serve in fp16 as usual")
    # fp32 models train with TF32 GEMMs on CUDA (10-bit mantissa products, fp32 accumulation), and only while
    # training: the fp32 references decoded later in the same process (greedy_agreement) must be fp32
    with tf32_matmuls(True) if dev.type == "cuda" else contextlib.nullcontext():
        return _train_steps(cfg, model, stage, steps, lr, warmup, src, tgt, dev)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """PyTorch's TF32 switches for fp32 matmuls and convolutions set to ``enabled`` inside the block, restored
    after it."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _train_steps(cfg: RecipeConfig, model: Transformer, stage: str, steps: int, lr: float, warmup: int, src, tgt,
                 dev) -> Transformer:
    model.to(dev).train()
    master = MasterWeights(list(model.parameters()))
    opt = torch.optim.Adam(master.optim_params(), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    sched = inverse_sqrt_schedule(opt, warmup)
    sampler = _batches(cfg, src, tgt, cfg.seed, cfg.max_batch_tokens)
    ckpts = CheckpointManager(cfg.root / stage / "ckpt", keep_last=2)
    step = 0
    ckpt = ckpts.load_latest(map_location=dev)
    if ckpt is not None:
        step = restore_checkpoint(ckpt, model, opt, sched)
        master.load_state_dict(ckpt["extra"].get("master", []))
        sampler.load_state_dict(ckpt["data_state"])
        log.info("%s: resumed from %s (step %d)", stage, ckpt["path"], step)
    it = sampler.forever()
    bar = tqdm(total=steps, initial=step, desc=stage, unit="step", dynamic_ncols=True)
    t0, tokens_seen = time.perf_counter(), 0
    deadline = t0 + 60 * cfg.max_train_minutes if cfg.max_train_minutes else None
    while step < steps:
        if deadline is not None and time.perf_counter() > deadline:
            log.info("%s: stopping at step %d: max_train_minutes=%s reached", stage, step, cfg.max_train_minutes)
            ckpts.save(step, model, opt, sched, config=model.config, data_state=sampler.state_dict(),
                       extra={"master": master.state_dict()})
            break
        idx = next(it)
        b = collate([src[i] for i in idx], [tgt[i] for i in idx], pad_to_multiple=8)
        s, ti, to = b["src_ids"].to(dev), b["tgt_in"].to(dev), b["tgt_out"].to(dev)
        ntok = int(b["ntokens"])
        loss, nll = model.loss(s, ti, to)
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        (loss / ntok).backward()
        master.grads_to_master()
        if cfg.clip_norm:
            torch.nn.utils.clip_grad_norm_(master.optim_params(), cfg.clip_norm)
        opt.step()
        master.master_to_model()
        sched.step()
        step += 1
        tokens_seen += ntok
        if step % 10 == 0 or step == steps:
            rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss.item() / ntok:.3f}", nll=f"{nll.item() / ntok:.3f}", tok_s=f"{rate:,.0f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == steps:
            ckpts.save(step, model, opt, sched, config=model.config, data_state=sampler.state_dict(),
                       extra={"master": master.state_dict()})
    bar.close()
    elapsed = time.perf_counter() - t0
    model.save(cfg.root / stage / "model.pt", extra={"train_tokens_per_s": tokens_seen / max(elapsed, 1e-9)})
    log.info("%s: %d steps, %.0f target tokens/s", stage, step, tokens_seen / max(elapsed, 1e-9))
    return model


def train(cfg: RecipeConfig) -> Path:
    """Stage 1: train the float model. -> run_dir/float/model.pt"""
    torch.manual_seed(cfg.seed)
    tok = tokenizer(cfg)
    mcfg = model_config(cfg, tok)
    src, tgt, _ = encoded(cfg, tok, cfg.train_split, cfg.limit_train, max_len=mcfg.max_seq_len - 1)
    _train_loop(cfg, Transformer(mcfg), "float", cfg.max_steps, cfg.lr, cfg.warmup, src, tgt)
    return cfg.root / "float" / "model.pt"


def _calibration_batches(cfg: RecipeConfig, src, tgt, dev):
    sampler = _batches(cfg, src, tgt, cfg.seed + 1, cfg.max_batch_tokens)
    out = []
    for idx in sampler.forever():
        b = collate([src[i] for i in idx], [tgt[i] for i in idx], pad_to_multiple=8)
        out.append((b["src_ids"].to(dev), b["tgt_in"].to(dev)))
        if len(out) == cfg.calib_batches:
            return out


def qat(cfg: RecipeConfig) -> Path:
    """Stage 2: calibrate the float model's clips, turn quantization on, fine-tune. -> run_dir/qat/model.pt"""
    torch.manual_seed(cfg.seed)
    tok = tokenizer(cfg)
    dev = cfg.torch_device()
    model = Transformer.load(cfg.root / "float" / "model.pt", map_location=dev)
    src, tgt, _ = encoded(cfg, tok, cfg.train_split, cfg.limit_train, max_len=model.config.max_seq_len - 1)
    if not CheckpointManager(cfg.root / "qat" / "ckpt").checkpoints():  # a resumed run has its clips there
        lsquant.calibrate(model, _calibration_batches(cfg, src, tgt, dev), method=cfg.calib_method)
    model.apply(lsquant.enable_quant)
    _train_loop(cfg, model, "qat", cfg.qat_steps, cfg.qat_lr, max(1, cfg.qat_steps // 10), src, tgt)
    return cfg.root / "qat" / "model.pt"


def ptq(cfg: RecipeConfig, method: str | None = None) -> Path:
    """Post-training quantization: calibrate the float model only. -> run_dir/ptq_<method>/model.pt"""
    method = method or cfg.ptq_method
    tok = tokenizer(cfg)
    dev = cfg.torch_device()
    model = Transformer.load(cfg.root / "float" / "model.pt", map_location=dev)
    src, tgt, _ = encoded(cfg, tok, cfg.train_split, cfg.limit_train, max_len=model.config.max_seq_len - 1)
    lsquant.calibrate(model, _calibration_batches(cfg, src, tgt, dev), method=method)
    out = cfg.root / f"ptq_{method}" / "model.pt"
    model.save(out)
    return out


# -- export, inference, evaluation ------------------------------------------------------------------------------

def export(cfg: RecipeConfig, model_path: str | Path, out: str | Path, precision: str) -> Path:
    from lsquant.export import export_transformer

    model = Transformer.load(model_path)
    return export_transformer(model, out, precision, tokenizer=tokenizer(cfg).to_str())


def translate(engine, tok: MTTokenizer, sentences: list[str], batch_size: int, beam_size: int | None = None,
              desc: str = "translating") -> tuple[list[str], float]:
    """-> (detokenised best hypotheses in input order, sentences per second)."""
    src = tok.encode_batch(sentences, add_bos=False, max_len=engine.cfg.max_seq_len)
    out: list[str | None] = [None] * len(src)
    batches = length_sorted_batches([len(s) for s in src], batch_size)
    t0 = time.perf_counter()
    for idx in tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True):
        b = collate([src[i] for i in idx])
        tokens, _ = engine.infer(b["src_ids"], method="beam", beam_size=beam_size)
        for i, hyp in zip(idx, tok.decode_batch(tokens[:, 0].cpu())):
            # byte-level BPE can decode a line break (an undertrained model does): one sentence, one line
            out[i] = " ".join(hyp.split()) if ("\n" in hyp or "\r" in hyp) else hyp
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return out, len(src) / max(time.perf_counter() - t0, 1e-9)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def engine_dtypes(cfg: RecipeConfig, int8: bool) -> dict:
    """The engine keyword arguments of cfg.infer_dtype and cfg.infer_logits_dtype ("auto": left to the engine);
    the logits dtype applies to int8 engines only."""
    kw = {}
    for field_, key in (("infer_dtype", "dtype"), ("infer_logits_dtype", "logits_dtype")):
        value = getattr(cfg, field_)
        if value == "auto":
            continue
        if value not in _DTYPES:
            raise ValueError(f"{field_} must be 'auto' or one of {sorted(_DTYPES)}, got {value!r}")
        if key == "logits_dtype" and not int8:
            continue
        kw[key] = _DTYPES[value]
    return kw


def evaluate(cfg: RecipeConfig, exports: dict[str, Path], splits: tuple[str, ...] | None = None) -> dict:
    """BLEU (sacreBLEU, detokenised) of each export on each split, sentences/s, file sizes."""
    from lsquant.eval.bleu import corpus_bleu
    from lsquant.files import write_lines
    from lsquant.inference.transformer_engine import QuantTransformer, Transformer as FloatEngine

    tok = tokenizer(cfg)
    results = {}
    for name, path in exports.items():
        from lsquant.export import read_header

        int8 = read_header(path)["precision"] == "int8"
        kind = QuantTransformer if int8 else FloatEngine
        eng = kind(path, max_batch_size=cfg.infer_batch_size, beam_size=cfg.beam_size, **engine_dtypes(cfg, int8))
        row = {"file_MB": round(Path(path).stat().st_size / 2**20, 2)}
        for split in splits or cfg.test_splits:
            srcs, refs = load_pairs(cfg, split, cfg.limit_test)
            hyps, sps = translate(eng, tok, srcs, cfg.infer_batch_size, desc=f"{name} {split}")
            write_lines(cfg.root / "eval" / f"{name}.{split}.hyp", hyps)
            bleu = corpus_bleu(hyps, refs)
            row[f"BLEU {split}"] = round(bleu.score, 2)
            row[f"sent/s {split}"] = round(sps, 1)
            log.info("%s %s: BLEU %.2f (%s), %.1f sentences/s", name, split, bleu.score, bleu.signature, sps)
        results[name] = row
    return results


def fp32_model(model_path: str | Path, quantized: bool) -> Transformer:
    """The checkpoint's model in fp32, eval mode, quantization on (fake-quant) if asked (a bf16 run's checkpoint
    would otherwise decode in bf16: another arithmetic)."""
    blob = torch.load(model_path, map_location="cpu", weights_only=False)
    model = Transformer(dataclasses.replace(TransformerConfig.from_dict(blob["config"]), dtype="float32"))
    model.load_state_dict(blob["model"])
    model.eval()
    if quantized:
        model.apply(lsquant.enable_quant)
    return model


def _same_greedy(cfg: RecipeConfig, split: str, decoders: tuple, max_len: int, pad: int, desc: str) -> float:
    """Share of the split's sentences on which two greedy decoders ((device, ids -> tokens (B, T)) pairs) give the
    same tokens, over the recipe's length-sorted inference batches."""
    tok = tokenizer(cfg)
    srcs, _ = load_pairs(cfg, split, cfg.limit_test)
    src = tok.encode_batch(srcs, add_bos=False, max_len=max_len)
    same = 0
    for idx in tqdm(length_sorted_batches([len(x) for x in src], cfg.infer_batch_size), unit="batch", desc=desc,
                    dynamic_ncols=True):
        ids = collate([src[i] for i in idx])["src_ids"]
        a, b = (fn(ids.to(dev)).cpu() for dev, fn in decoders)
        T = max(a.shape[-1], b.shape[-1])
        a, b = (torch.nn.functional.pad(t, (0, T - t.shape[-1]), value=pad) for t in (a, b))
        same += int((a == b).all(dim=-1).sum())
    return same / max(len(src), 1)


def greedy_agreement(cfg: RecipeConfig, model_path: str | Path, export_path: str | Path, split: str,
                     quantized: bool, engine_dtype: torch.dtype | None = None, exact: bool = False) -> float:
    """Share of the split's sentences whose greedy output (every token) is the same from the engine reading
    export_path as from the model's own decoding (lsquant.models.Transformer.generate): the float model for an
    fp16 export, the calibrated model with quantization on (fake-quant) for an int8 export. engine_dtype: the
    engine's activations (default fp16 on CUDA); the model runs in fp32. exact: the fake-quant model's GEMMs on
    int8 levels with exact dot products (lsquant.exact_gemm: the same function, independent of summation order)."""
    from lsquant.inference.transformer_engine import QuantTransformer, Transformer as FloatEngine

    dev = cfg.torch_device()
    model = fp32_model(model_path, quantized).to(dev)
    kind = QuantTransformer if quantized else FloatEngine
    eng = kind(export_path, max_batch_size=cfg.infer_batch_size, device=dev, dtype=engine_dtype)
    # fp32 means fp32 (TF32 rounds every product's inputs to 10 bits)
    with torch.no_grad(), tf32_matmuls(False), lsquant.exact_gemm(exact):
        return _same_greedy(cfg, split, ((dev, lambda ids: eng.infer(ids, method="greedy")[0][:, 0]),
                                         (dev, lambda ids: model.generate(ids, "greedy")[0][:, 0])),
                            eng.cfg.max_seq_len, eng.pad,
                            f"agreement {Path(export_path).stem}{' exact' if exact else ''} {split}")


def model_self_agreement(cfg: RecipeConfig, model_path: str | Path, split: str, quantized: bool,
                         exact: bool = False) -> float:
    """Share of the split's sentences on which the model's greedy output on the run's GPU equals its greedy output
    on the CPU (fp32 both, no TF32): the yardstick for greedy_agreement. A fake-quant model is a step function of
    its activations: another summation order can move one next to a rounding boundary by a whole int8 step
    (recipes/mt/RESULTS.md). exact: as in greedy_agreement."""
    dev = cfg.torch_device()
    gpu, cpu = fp32_model(model_path, quantized).to(dev), fp32_model(model_path, quantized)
    with torch.no_grad(), tf32_matmuls(False), lsquant.exact_gemm(exact):
        return _same_greedy(cfg, split, ((dev, lambda ids: gpu.generate(ids, "greedy")[0][:, 0]),
                                         ("cpu", lambda ids: cpu.generate(ids, "greedy")[0][:, 0])),
                            gpu.config.max_seq_len, gpu.config.pad_id, f"model {dev} = cpu {split}")


def run_all(cfg: RecipeConfig) -> dict:
    """train -> QAT -> PTQ -> export (fp16, QAT int8, PTQ int8) -> inference + BLEU on the test splits -> report."""
    from ..report import close_logging, setup_logging, write_report

    cfg.root.mkdir(parents=True, exist_ok=True)
    cfg.save()
    setup_logging(cfg.root)   # run_dir/log.txt and the console (replaces earlier handlers of this process)
    try:
        fp = train(cfg)
        q = qat(cfg)
        p = ptq(cfg)
        ex = cfg.root / "export"
        exports = {"fp16": export(cfg, fp, ex / "fp16.h5", "fp16"),
                   "qat_int8": export(cfg, q, ex / "qat_int8.h5", "int8"),
                   f"ptq_{cfg.ptq_method}_int8": export(cfg, p, ex / f"ptq_{cfg.ptq_method}_int8.h5", "int8")}
        results = evaluate(cfg, exports)
        # the engines against the models they were exported from: greedy outputs token for token
        split = cfg.test_splits[0]
        fp_dev_cuda = cfg.torch_device().type == "cuda"
        for name, model_path, quantized in (("fp16", fp, False), ("qat_int8", q, True),
                                            (f"ptq_{cfg.ptq_method}_int8", p, True)):
            # on CUDA also with the engine in fp32: what differs then is the engine's arithmetic, not fp16's
            # int8: also against the fake-quant model with exact GEMMs (lsquant.exact_gemm), the engine's arithmetic
            for exact in (False, True) if quantized else (False,):
                ex_label = " (exact GEMM)" if exact else ""
                for label, dt in (("", None),) + (((" (engine in fp32)", torch.float32),) if fp_dev_cuda else ()):
                    share = greedy_agreement(cfg, model_path, exports[name], split, quantized, dt, exact)
                    results[name][f"greedy = model{ex_label}{label}, {split}"] = round(share, 4)
                    log.info("%s: greedy tokens equal to the model's%s on %.2f%% of %s%s", name, ex_label,
                             100 * share, split, label)
                if fp_dev_cuda:   # the yardstick: how often the model agrees with itself on the CPU
                    share = model_self_agreement(cfg, model_path, split, quantized, exact)
                    results[name][f"greedy model cuda = model cpu{ex_label}, {split}"] = round(share, 4)
                    log.info("%s: the model's greedy tokens on CUDA equal its CPU ones%s on %.2f%% of %s", name,
                             ex_label, 100 * share, split)
        # the fp32 checkpoint's size: the float model's state dict in fp32 (a bf16 run's own file is half of that)
        blob = torch.load(cfg.root / "float" / "model.pt", map_location="cpu", weights_only=False)
        fp32_mb = sum(t.numel() * 4 for t in blob["model"].values()
                      if isinstance(t, torch.Tensor) and t.is_floating_point()) / 2**20
        for name, row in results.items():
            row["size vs fp32 checkpoint"] = round(row["file_MB"] / fp32_mb, 3)
        for stage in ("float", "qat"):
            blob = torch.load(cfg.root / stage / "model.pt", map_location="cpu", weights_only=False)
            results.setdefault("training", {})[f"{stage} target tokens/s"] = round(blob["extra"].get("train_tokens_per_s", 0))
        write_report(cfg.root, results, title="lsquant translation recipe")
    finally:
        close_logging()
    return results
