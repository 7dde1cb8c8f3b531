"""Greedy agreement of a finished translation-recipe run's engines with the models they were exported from
(recipes.mt.pipeline.greedy_agreement), without re-running training: python scripts/recipe_agreement.py RUN_DIR"""
import json
import sys
from pathlib import Path

import torch

from lsquant.recipes.mt.pipeline import RecipeConfig, greedy_agreement


def main(run_dir: str) -> None:
    root = Path(run_dir)
    cfg = RecipeConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in json.loads((root / "recipe.json").read_text()).items()})
    split = cfg.test_splits[0]
    rows = [("fp16", root / "float" / "model.pt", root / "export" / "fp16.h5", False),
            ("qat_int8", root / "qat" / "model.pt", root / "export" / "qat_int8.h5", True),
            (f"ptq_{cfg.ptq_method}_int8", root / f"ptq_{cfg.ptq_method}" / "model.pt",
             root / "export" / f"ptq_{cfg.ptq_method}_int8.h5", True)]
    for name, model, export, quantized in rows:
        for label, dt in (("engine fp16", None), ("engine fp32", torch.float32)):
            share = greedy_agreement(cfg, model, export, split, quantized, dt)
            print(f"{name:22s} {label}: greedy tokens equal to the fp32 model's on {100 * share:.2f}% of {split}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
