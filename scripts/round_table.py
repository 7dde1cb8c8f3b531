"""Side-by-side table of the engine rows of one GPU round (scripts/gpu_round.sh engine): every engine_<variant>.csv in
a folder, tokens/s per (model, method, batch, source length) and variant, int8 / fp16 within each variant, and each
int8 variant against the first one (its gain).

    python scripts/round_table.py <folder with engine_*.csv> [--base base_fused]
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def read(folder: Path) -> dict:
    """-> {(model, method, batch, src): {(variant, impl): tokens/s}} from folder/engine_<variant>.csv."""
    rows: dict = defaultdict(dict)
    for f in sorted(folder.glob("engine_*.csv")):
        variant = f.stem[len("engine_"):]
        with f.open() as fh:
            for r in csv.DictReader(fh):
                try:
                    tps = float(r["tokens_per_s"])
                except (KeyError, ValueError):
                    continue
                if tps != tps:   # NaN: the run failed (its note says why)
                    continue
                key = (r["model"].replace("transformer-", ""), r["method"], int(r["batch"]), int(r["src_len"]))
                impl = "lsquant_int8" if r["impl"].startswith("lsquant_int8") else r["impl"]   # its own variant
                rows[key][(variant, impl)] = tps
    return rows


def table(rows: dict, base: str | None) -> list[str]:
    variants = sorted({v for cells in rows.values() for v, _ in cells})
    if base is None or base not in variants:
        base = variants[0] if variants else None
    out = []
    head = ["model", "method", "batch", "src"]
    for v in variants:
        head += [f"{v} int8", f"{v} fp16", f"{v} int8/fp16"]
        if v != base:
            head.append(f"{v} int8 vs {base}")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for key in sorted(rows):
        cells = rows[key]
        line = [key[0], key[1], str(key[2]), str(key[3])]
        b = cells.get((base, "lsquant_int8"))
        for v in variants:
            i, f = cells.get((v, "lsquant_int8")), cells.get((v, "lsquant_fp16"))
            line += [f"{i:,.0f}" if i else "", f"{f:,.0f}" if f else "", f"{i / f:.2f}x" if i and f else ""]
            if v != base:
                line.append(f"{i / b:.2f}x" if i and b else "")
        out.append("| " + " | ".join(line) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--base", default="base_fused", help="the variant the int8 gains are relative to")
    a = ap.parse_args()
    rows = read(Path(a.folder))
    if not rows:
        raise SystemExit(f"no engine_*.csv rows in {a.folder}")
    print("\n".join(table(rows, a.base)))


if __name__ == "__main__":
    main()
