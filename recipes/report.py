"""Per-run outputs: the final report (``results.json`` for machines, ``results.md`` for people) and a logger
that writes to ``log.txt`` in the run directory and to the console without breaking tqdm progress bars."""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from lsquant.files import atomic_write

RESULTS_JSON, RESULTS_MD, LOG_FILE = "results.json", "results.md", "log.txt"
_HANDLER_TAG = "_lsquant_run_handler"  # marks handlers we installed, so a second setup replaces them


def _git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when it has changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_metadata() -> dict:
    """What a report needs to be reproduced: the command line, versions, the commit, the machine, the time."""
    import torch

    from lsquant import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "lsquant_version": __version__, "git_commit": _git_commit(), "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": gpu or f"cpu ({platform.processor() or platform.machine()})"}


def _jsonable(x: Any):
    """json.dump fallback: numpy and torch scalars, paths, dataclasses, sets."""
    import dataclasses

    if hasattr(x, "item") and callable(x.item):
        return x.item()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    raise TypeError(f"cannot write {type(x).__name__} to results.json; convert it to a number or string")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def markdown_table(results: Mapping[str, Any]) -> str:
    """A Markdown table: rows = keys; for a mapping of mappings the columns are the union of the inner
    keys (in first-seen order), otherwise two columns (name, value)."""
    if results and all(isinstance(v, Mapping) for v in results.values()):
        cols: list[str] = []
        for row in results.values():
            cols += [c for c in row if c not in cols]
        lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {_fmt(name)} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |"
                  for name, row in results.items()]
    else:
        lines = ["| | value |", "|---|---|"] + [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in results.items()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | os.PathLike, results: Mapping[str, Any], title: str = "lsquant run",
                 meta: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``run_dir`` (atomically) and return their paths.

    results: ``{row: {column: value}}`` (e.g. ``{"fp16 engine": {"BLEU": 38.4, "file MB": 120.0}, ...}``) or
    ``{name: value}``. meta: extra facts (config, seeds, data); :func:`run_metadata` is added under "run".
    """
    run_dir = Path(run_dir)
    doc = {"title": title, "results": dict(results), "meta": dict(meta or {}), "run": run_metadata()}
    json_path, md_path = run_dir / RESULTS_JSON, run_dir / RESULTS_MD
    text = json.dumps(doc, indent=2, default=_jsonable, ensure_ascii=False)  # fails before anything is written
    with atomic_write(json_path, "w") as f:
        f.write(text + "\n")
    md = [f"# {title}", "", markdown_table(results)]
    if meta:
        md += ["## Settings", ""] + [f"- {k}: `{json.dumps(v, default=_jsonable, ensure_ascii=False)}`"
                                      for k, v in meta.items()] + [""]
    md += ["## Run", ""] + [f"- {k}: `{v}`" for k, v in doc["run"].items()] + [""]
    with atomic_write(md_path, "w") as f:
        f.write("\n".join(md))
    return json_path, md_path


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write`` so a log line does not tear a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never kill the run
            self.handleError(record)


def setup_logging(run_dir: str | os.PathLike, name: str = "lsquant", level: int = logging.INFO,
                  console: bool = True) -> logging.Logger:
    """Logger ``name`` (default "lsquant": every ``lsquant.*`` module logger feeds it) writing to
    ``run_dir/log.txt`` (appended, so a resumed run keeps its history) and, if ``console``, to stderr.
    Python warnings (e.g. a skipped damaged checkpoint) go to the same places. Calling it again (a new run
    in the same process) replaces the handlers instead of adding duplicates."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / LOG_FILE, mode="a", encoding="utf-8")]
    if console:
        handlers.append(_TqdmHandler(sys.stderr))
    logging.captureWarnings(True)
    for lg in (logging.getLogger(name), logging.getLogger("py.warnings")):
        for h in [h for h in lg.handlers if getattr(h, _HANDLER_TAG, False)]:
            lg.removeHandler(h)
            h.close()
        for h in handlers:
            setattr(h, _HANDLER_TAG, True)
            h.setFormatter(fmt)
            lg.addHandler(h)
        lg.setLevel(level)
        lg.propagate = False  # our console handler already prints; the root's would print every line twice
    return logging.getLogger(name)


def close_logging(name: str = "lsquant") -> None:
    """Remove and close the handlers :func:`setup_logging` installed (at the end of a run), and stop
    routing warnings to logging."""
    for lg in (logging.getLogger(name), logging.getLogger("py.warnings")):
        for h in [h for h in lg.handlers if getattr(h, _HANDLER_TAG, False)]:
            lg.removeHandler(h)
            h.close()
        lg.propagate = True
    logging.captureWarnings(False)
