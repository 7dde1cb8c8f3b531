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


def test_quickstart_runs_on_this_machine():
    out = subprocess.run([sys.executable, "-m", "lsquant", "quickstart"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "QAT int8" in out.stdout and "SQNR" in out.stdout
