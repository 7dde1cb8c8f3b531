"""Run reports (results.json + results.md) and the run logger."""
import json
import logging
import warnings

import numpy as np
import pytest
import torch

from lsquant.recipes.report import close_logging, markdown_table, setup_logging, write_report


def test_report_json_and_markdown(tmp_path):
    results = {"fp16 engine": {"BLEU": 38.41, "file MB": 120.5},
               "int8 engine (QAT)": {"BLEU": np.float32(38.25), "file MB": torch.tensor(31.0), "note": "a|b"}}
    j, m = write_report(tmp_path, results, title="Multi30k de-en", meta={"seed": 1, "data": tmp_path})
    doc = json.loads(j.read_text())
    assert doc["results"]["int8 engine (QAT)"]["BLEU"] == pytest.approx(38.25)
    assert doc["meta"] == {"seed": 1, "data": str(tmp_path)}
    assert {"command", "created_utc", "lsquant_version", "torch_version", "git_commit"} <= set(doc["run"])
    md = m.read_text()
    assert md.startswith("# Multi30k de-en\n")
    assert "| | BLEU | file MB | note |" in md and "| fp16 engine | 38.41 | 120.50 | - |" in md
    assert "a\\|b" in md  # a pipe in a value does not break the table


def test_flat_table_and_unserialisable(tmp_path):
    assert markdown_table({"BLEU": 12.3456, "tiny": 0.000123}) == (
        "| | value |\n|---|---|\n| BLEU | 12.35 |\n| tiny | 0.000123 |\n")
    with pytest.raises(TypeError, match="cannot write object"):
        write_report(tmp_path, {"x": object()})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_logging_to_file_and_console(tmp_path, capsys):
    log = setup_logging(tmp_path)
    try:
        logging.getLogger("lsquant.recipes.mt.train").info("step 10 loss 3.2")
        warnings.warn("skipping unreadable checkpoint x")
        setup_logging(tmp_path)  # a second call must not duplicate lines
        log.info("second")
    finally:
        close_logging()
    text = (tmp_path / "log.txt").read_text()
    assert "INFO lsquant.recipes.mt.train: step 10 loss 3.2" in text
    assert "skipping unreadable checkpoint x" in text
    assert text.count("second") == 1
    assert capsys.readouterr().err.count("second") == 1
