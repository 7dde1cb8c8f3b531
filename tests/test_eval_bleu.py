"""sacreBLEU corpus BLEU: identity is 100, known pairs match sacrebleu called directly, the CLI."""
import json

import pytest
import sacrebleu

from lsquant.cli import main
from lsquant.eval.bleu import bleu_files, corpus_bleu
from lsquant.files import write_lines

REFS = ["A man in an orange hat starring at something.", "A Boston Terrier is running on lush green grass.",
        "A girl in karate uniform breaking a stick with a front kick.", "Five people wearing winter jackets."]
HYPS = ["A man in an orange hat stares at something.", "A Boston terrier runs on green grass.",
        "A girl in a karate uniform breaks a stick with a kick.", "Five people in winter jackets."]


def test_identical_text_is_100():
    r = corpus_bleu(REFS, REFS)
    assert r.score == pytest.approx(100.0) and r.bp == 1.0 and r.n == 4
    assert "tok:13a" in r.signature and "case:mixed" in r.signature


def test_matches_sacrebleu_directly():
    r = corpus_bleu(HYPS, REFS)
    direct = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert r.score == pytest.approx(direct.score, abs=1e-9)
    assert 10 < r.score < 90
    assert r.precisions == pytest.approx(tuple(direct.precisions))
    lower = corpus_bleu(HYPS, REFS, lowercase=True)
    assert lower.score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], lowercase=True).score)
    two = corpus_bleu(HYPS, [REFS, HYPS])  # a second reference stream
    assert two.score == pytest.approx(100.0) and "nrefs:2" in two.signature


def test_misaligned_is_an_error():
    with pytest.raises(ValueError, match="4 hypotheses but reference stream 0 has 3"):
        corpus_bleu(HYPS, REFS[:3])


def test_files_and_cli(tmp_path, capsys):
    hyp, ref = write_lines(tmp_path / "hyp.txt", HYPS), write_lines(tmp_path / "ref.en.gz", REFS)
    expected = sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert bleu_files(hyp, ref).score == pytest.approx(expected)
    assert main(["eval", "bleu", "--hyp", str(hyp), "--ref", str(ref), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score"] == pytest.approx(expected) and out["signature"].startswith("nrefs:1")
    assert main(["eval", "bleu", "--hyp", str(hyp), "--ref", str(ref)]) == 0
    assert capsys.readouterr().out.startswith(f"BLEU = {expected:.2f} (nrefs:1")
    assert main(["eval", "bleu", "--hyp", str(tmp_path / "missing.txt"), "--ref", str(ref)]) == 1
    assert "no such file" in capsys.readouterr().err
