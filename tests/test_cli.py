"""The lsquant command on a machine without a GPU."""
import subprocess
import sys

import pytest
import torch

from lsquant.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "build" in out and "quickstart" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_build_without_gpu_says_so(capsys):
    assert main(["build", "-q"]) == 1
    assert "need an NVIDIA GPU" in capsys.readouterr().err


def test_env_reports_the_machine_and_the_settings(capsys, monkeypatch, tmp_path):
    """`lsquant env`: versions, the GPU (or its absence), the kernels that can run, the tuning cache and each
    LSQUANT_* variable set, with what it switches; nothing built."""
    import json

    cache = tmp_path / "tune.json"
    from lsquant.inference.gemm_tuner import CACHE_VERSION

    cache.write_text(json.dumps({"version": CACHE_VERSION,
                                 "envs": {"cpu|x": {"a": {}, "b": {}}, "other GPU|y": {"c": {}}}}))
    monkeypatch.setenv("LSQUANT_GEMM_CACHE", str(cache))
    monkeypatch.setenv("LSQUANT_LN_GEMM", "1")
    monkeypatch.delenv("LSQUANT_PDL", raising=False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lsquant ") and torch.__version__ in out and "LSQUANT_LN_GEMM" in out and "LayerNorm fused" in out
    assert "LSQUANT_PDL " not in out   # only what is set
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    mine = 2 if gpu == "cpu" else 0
    assert f"{cache}: {mine} shapes for this GPU, 3 in all" in out
    if not torch.cuda.is_available():
        assert "none: the CPU reference path runs" in out and "not buildable here" in out


def test_env_lists_every_setting_the_package_reads():
    import re
    from pathlib import Path

    import lsquant
    from lsquant.env import SETTINGS

    root = Path(lsquant.__file__).parent
    read = {m for f in root.rglob("*.py") for m in re.findall(r"LSQUANT_[A-Z0-9_]+", f.read_text())}
    assert read - set(SETTINGS) == set(), read - set(SETTINGS)


def test_quickstart_runs_on_this_machine(tmp_path):
    """The README's main command, shortened: a few steps per stage, a slice of the test split."""
    out = subprocess.run([sys.executable, "-m", "lsquant", "quickstart", "--run-dir", str(tmp_path / "qs"),
                          "--set", "max_steps=12", "--set", "qat_steps=4", "--set", "limit_train=2000",
                          "--set", "limit_test=24", "--set", "save_every=6"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "qat_int8" in out.stdout and "ptq_percentile_int8" in out.stdout and "BLEU test" in out.stdout
    assert (tmp_path / "qs" / "results.md").is_file() and (tmp_path / "qs" / "results.json").is_file()
