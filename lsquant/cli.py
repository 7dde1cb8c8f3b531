"""The ``lsquant`` command. Each subcommand is a thin wrapper over the Python API (no logic lives here
that the API lacks). A subcommand is one ``_cmd_<name>(sub)`` function that adds its parser and sets
``func``; register it in COMMANDS."""
from __future__ import annotations

import argparse
import sys


def _cmd_build(sub) -> None:
    p = sub.add_parser("build", help="compile the CUDA extension now (otherwise it builds on first CUDA use)",
                       description="Compile csrc/ with ninja for this GPU's architecture and report the time. "
                                   "Honours MAX_JOBS and TORCH_EXTENSIONS_DIR.")
    p.add_argument("-q", "--quiet", action="store_true", help="hide the compiler's output")

    def run(args) -> int:
        from lsquant.ops.build import BuildError, build, sources

        try:
            seconds = build(verbose=not args.quiet)
        except BuildError as e:
            print(f"lsquant build: {e}", file=sys.stderr)
            return 1
        print(f"lsquant build: {len(sources())} sources ready in {seconds:.1f} s")
        return 0

    p.set_defaults(func=run)


def _cmd_env(sub) -> None:
    p = sub.add_parser("env", help="what this machine offers: versions, GPU, kernels, tuning cache, settings",
                       description="Print the versions lsquant runs with, the GPU, which kernels can run here "
                                   "(Triton, TMA, CUTLASS, programmatic dependent launch), the GEMM tuning cache "
                                   "and the LSQUANT_* environment variables set. Builds and launches nothing.")

    def run(args) -> int:
        from lsquant.env import format_report, report

        print(format_report(report()))
        return 0

    p.set_defaults(func=run)


def _cmd_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="run the whole pipeline on a small example and print a summary",
                       description="Train a small translation Transformer, fine-tune it with QAT, calibrate a "
                                   "PTQ copy, export fp16 and int8 files, translate the test set with each "
                                   "engine, score BLEU and print a table. Without --data it uses a synthetic "
                                   "corpus the project generates itself and runs on the CPU in minutes.")
    p.add_argument("--data", default=None, help="a Multi30k-style folder: run the real recipe on it instead")
    p.add_argument("--run-dir", default="runs/quickstart", help="where to write (default runs/quickstart)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a RecipeConfig field (repeatable)")

    def run(args) -> int:
        from lsquant.quickstart import main as quickstart

        over = {k: _parse_value(v) for k, _, v in (item.partition("=") for item in args.set)}
        return quickstart(seed=args.seed, data=args.data, run_dir=args.run_dir, **over)

    p.set_defaults(func=run)


def _cmd_eval(sub) -> None:
    p = sub.add_parser("eval", help="score outputs (BLEU, ...)",
                       description="Evaluation metrics; one subcommand per metric.")
    metrics = p.add_subparsers(dest="metric", metavar="metric", required=True)
    b = metrics.add_parser("bleu", help="sacreBLEU corpus BLEU of detokenized text",
                           description="Corpus BLEU with sacreBLEU on detokenized text (one sentence a line, "
                                       ".gz accepted). Prints the score and sacreBLEU's signature.")
    b.add_argument("--hyp", required=True, help="hypothesis file (system output)")
    b.add_argument("--ref", required=True, action="append", help="reference file; repeat for several references")
    b.add_argument("--tokenize", default="13a", help="sacreBLEU tokenizer (default 13a)")
    b.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")
    b.add_argument("--json", action="store_true", help="print the result as JSON")

    def run_bleu(args) -> int:
        import dataclasses
        import json

        from lsquant.eval.bleu import bleu_files

        try:
            r = bleu_files(args.hyp, args.ref, tokenize=args.tokenize, lowercase=args.lowercase)
        except (OSError, ValueError) as e:
            print(f"lsquant eval bleu: {e}", file=sys.stderr)
            return 1
        print(json.dumps(dataclasses.asdict(r)) if args.json else str(r))
        return 0

    b.set_defaults(func=run_bleu)


def _cmd_tune(sub) -> None:
    p = sub.add_parser("tune", help="tune the int8 GEMMs of a model config and store the choices",
                       description="Times cuBLASLt algorithms, Triton int8 kernels and the fp16/bf16 fallback for "
                                   "every linear shape of a Transformer (QKV, attention output, FFN in/out, "
                                   "vocabulary) at each token count, checks each kernel's output against the "
                                   "reference, and writes the fastest to the tuning cache that engines and "
                                   "layers read at start-up.")
    p.add_argument("--model", default=None, help="preset: transformer-base, transformer-big, bert-base, "
                                                 "gpt2-medium (sets --hidden/--ffn/--vocab/--heads)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size h")
    p.add_argument("--ffn", type=int, default=None, help="FFN inner size (default 4h)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (0: no vocabulary projection)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (checked to divide h)")
    p.add_argument("--tokens", default="1,8,64,512,2048,8192",
                   help="comma-separated token counts M (batch x sequence) to tune (default %(default)s)")
    p.add_argument("--out-dtype", default="bf16", choices=["bf16", "fp16", "fp32", "int8", "int32"],
                   help="GEMM output type (default bf16)")
    p.add_argument("--activation", default="none", choices=["none", "relu", "gelu"],
                   help="fused activation used while timing (default none)")
    p.add_argument("--no-bias", action="store_true", help="time without the bias add")
    p.add_argument("--backends", default=None,
                   help="candidate families, comma-separated: cublaslt, triton, dequant, cutlass (default: all; "
                        "each only where it can run)")
    p.add_argument("--cache", default=None, help="tuning cache JSON (default $LSQUANT_GEMM_CACHE or "
                                                 "~/.cache/lsquant/gemm_tuning.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args) -> int:
        import torch

        from lsquant.inference.gemm_tuner import BACKENDS, MODEL_PRESETS, TuningCache, tune_model

        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8,
                  "int32": torch.int32}
        hidden, ffn, vocab, heads = MODEL_PRESETS.get(args.model or "", (None, None, None, None))
        if args.model and args.model not in MODEL_PRESETS:
            print(f"lsquant tune: unknown --model {args.model!r}; presets: {', '.join(MODEL_PRESETS)}",
                  file=sys.stderr)
            return 2
        hidden = args.hidden or hidden
        if not hidden:
            print("lsquant tune: give --model or --hidden", file=sys.stderr)
            return 2
        try:
            tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
            tune_model(hidden, args.ffn or ffn, vocab if args.vocab is None else args.vocab, args.heads or heads,
                       tokens=tokens, out_dtype=dtypes[args.out_dtype], activation=args.activation,
                       has_bias=not args.no_bias, cache=TuningCache(args.cache) if args.cache else None,
                       progress=not args.no_progress,
                       backends=tuple(args.backends.split(",")) if args.backends else BACKENDS)
        except (RuntimeError, ValueError) as e:
            print(f"lsquant tune: {e}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(func=run)


def _recipe_args(p) -> None:
    """Options shared by the translation-recipe commands (train, qat, ptq, export, infer)."""
    p.add_argument("--run-dir", default="runs/mt", help="the run's folder (checkpoints, exports, reports); "
                   "default runs/mt")
    p.add_argument("--data", default=None, help="Multi30k-style data folder (default $LSQUANT_DATA; with "
                   "neither, the project's synthetic corpus)")
    p.add_argument("--src-lang", default=None, help="source language suffix (default de; toy for synthetic)")
    p.add_argument("--tgt-lang", default="en", help="target language suffix (default en)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any RecipeConfig field, e.g. --set max_steps=4000 --set lr=7e-4 (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a TransformerConfig field, e.g. --model hidden_size=256 (repeatable)")


def _parse_value(v: str):
    import json

    try:
        return json.loads(v)
    except ValueError:
        return v


def _recipe_config(args):
    import dataclasses
    import json
    import os
    from pathlib import Path

    from lsquant.recipes.mt.pipeline import RecipeConfig

    saved = Path(args.run_dir) / "recipe.json"
    base = json.loads(saved.read_text()) if saved.is_file() else {}
    fields = {f.name for f in dataclasses.fields(RecipeConfig)}
    kw = {k: v for k, v in base.items() if k in fields}
    kw["run_dir"] = args.run_dir
    data = args.data or os.environ.get("LSQUANT_DATA") or kw.get("data")
    kw["data"] = data
    kw["src_lang"] = args.src_lang or kw.get("src_lang") or ("de" if data else "toy")
    kw["tgt_lang"] = args.tgt_lang
    if not data:
        kw.setdefault("test_splits", ["test"])
    for item in args.set:
        k, _, v = item.partition("=")
        if k not in fields:
            raise SystemExit(f"--set {k}: RecipeConfig has no such field (fields: {', '.join(sorted(fields))})")
        kw[k] = _parse_value(v)
    model = dict(kw.get("model") or {})
    for item in args.model:
        k, _, v = item.partition("=")
        model[k] = _parse_value(v)
    kw["model"] = model
    if isinstance(kw.get("test_splits"), list):
        kw["test_splits"] = tuple(kw["test_splits"])
    cfg = RecipeConfig(**kw)
    cfg.root.mkdir(parents=True, exist_ok=True)
    cfg.save()
    from lsquant.recipes.report import setup_logging

    setup_logging(cfg.root)
    return cfg


def _cmd_recipe(sub) -> None:
    stages = {
        "train": ("train the float model (resumes from the run's last checkpoint)", "train"),
        "qat": ("calibrate the float model, turn int8 on and fine-tune (QAT)", "qat"),
        "ptq": ("post-training quantization: calibrate the float model, no training", "ptq"),
    }
    for name, (help_, fn) in stages.items():
        p = sub.add_parser(name, help=help_, description=f"{help_}. Translation recipe stage; see README.")
        _recipe_args(p)
        if name == "ptq":
            p.add_argument("--method", choices=["max", "percentile", "mse"], default=None,
                           help="calibration method (default: the recipe's ptq_method, percentile)")

        def run(args, fn=fn, name=name):
            from lsquant.recipes.mt import pipeline

            cfg = _recipe_config(args)
            out = pipeline.ptq(cfg, args.method) if name == "ptq" else getattr(pipeline, fn)(cfg)
            print(f"lsquant {name}: wrote {out}")
            return 0

        p.set_defaults(func=run)

    p = sub.add_parser("export", help="export a model checkpoint to the int8 (or fp16) HDF5 format",
                       description="Write one self-describing HDF5 file (export/FORMAT.md) from a checkpoint "
                                   "of the recipe (float/model.pt, qat/model.pt, ptq_<method>/model.pt).")
    _recipe_args(p)
    p.add_argument("checkpoint", help="model.pt written by train, qat or ptq")
    p.add_argument("out", help="the .h5 file to write (atomically)")
    p.add_argument("--precision", choices=["int8", "fp16"], default="int8", help="default int8")

    def run_export(args):
        from lsquant.recipes.mt import pipeline

        out = pipeline.export(_recipe_config(args), args.checkpoint, args.out, args.precision)
        print(f"lsquant export: wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
        return 0

    p.set_defaults(func=run_export)

    p = sub.add_parser("infer", help="translate with an exported model and score BLEU",
                       description="Translate test splits with QuantTransformer (int8 files) or Transformer "
                                   "(fp16 files) and score them with sacreBLEU.")
    _recipe_args(p)
    p.add_argument("model_file", help="an .h5 export")
    p.add_argument("--splits", nargs="+", default=None, help="test splits (default: the recipe's)")

    def run_infer(args):
        from pathlib import Path

        from lsquant.recipes.mt import pipeline

        cfg = _recipe_config(args)
        res = pipeline.evaluate(cfg, {Path(args.model_file).stem: Path(args.model_file)},
                                tuple(args.splits) if args.splits else None)
        for name, row in res.items():
            print(name, " ".join(f"{k}={v}" for k, v in row.items()))
        return 0

    p.set_defaults(func=run_infer)


COMMANDS = [_cmd_build, _cmd_env, _cmd_quickstart, _cmd_recipe, _cmd_eval, _cmd_tune]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lsquant", description="int8 quantization for Transformer models: "
                                     "QAT, PTQ, export and inference.")
    from lsquant import __version__

    parser.add_argument("--version", action="version", version=f"lsquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
