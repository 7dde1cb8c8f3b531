"""Parallel-text loading (tiny temp corpora and the real Multi30k), text I/O and the synthetic corpus."""
import gzip
import re

import pytest
from _data import multi30k_dir

from lsquant.eval.bleu import corpus_bleu
from lsquant.files import atomic_write, read_lines, write_lines
from lsquant.recipes.mt import synthetic
from lsquant.recipes.mt.data import ENV_VAR, find_splits, load_parallel, load_split, read_split, resolve_data_dir

SRC = ["Ein Hund läuft.", "Zwei Männer sitzen auf einer Bank.", "Eine Frau liest."]
TGT = ["A dog runs.", "Two men sit on a bench.", "A woman reads."]


def _corpus(d, gz_src=False, src=SRC, tgt=TGT, split="train"):
    write_lines(d / f"{split}.de{'.gz' if gz_src else ''}", src)
    write_lines(d / f"{split}.en", tgt)
    return d


@pytest.mark.parametrize("gz", [False, True])
def test_load_split_plain_and_gzip(tmp_path, gz):
    ds = load_split(_corpus(tmp_path, gz_src=gz), "train", "de", "en")
    assert ds.column_names == ["src", "tgt"] and len(ds) == 3
    assert ds[1] == {"src": SRC[1], "tgt": TGT[1]}  # umlauts survive, line i pairs with line i


def test_read_split_gives_plain_lists(tmp_path):
    src, tgt = read_split(_corpus(tmp_path, gz_src=True), "train", "de", "en", limit=2)
    assert (src, tgt) == (SRC[:2], TGT[:2])


def test_load_parallel_finds_splits_and_limit(tmp_path):
    _corpus(tmp_path)
    _corpus(tmp_path, split="test_2016_flickr", src=SRC[:2], tgt=TGT[:2])
    (tmp_path / "val.de").write_text("only one side\n", encoding="utf-8")  # no val.en: not a split
    assert find_splits(tmp_path, "de", "en") == ["train", "test_2016_flickr"]
    dd = load_parallel(tmp_path, src_lang="de", tgt_lang="en")
    assert {k: len(v) for k, v in dd.items()} == {"train": 3, "test_2016_flickr": 2}
    assert len(load_parallel(tmp_path, ["train"], "de", "en", limit=2)["train"]) == 2


def test_misaligned_files_raise(tmp_path):
    _corpus(tmp_path, tgt=TGT[:2])
    with pytest.raises(ValueError, match=r"misaligned.*3 lines.*2"):
        load_split(tmp_path, "train", "de", "en")


def test_missing_file_names_what_is_there(tmp_path):
    _corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no val.de or val.de.gz in .*train.de"):
        load_split(tmp_path, "val", "de", "en")


def test_plain_and_gz_of_same_file_is_ambiguous(tmp_path):
    _corpus(tmp_path)
    _corpus(tmp_path, gz_src=True)
    with pytest.raises(ValueError, match="both"):
        load_split(tmp_path, "train", "de", "en")


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=f"--data DIR or set {ENV_VAR}"):
        resolve_data_dir(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    (tmp_path / "multi30k").mkdir()
    assert resolve_data_dir(tmp_path) == tmp_path / "multi30k"  # the parent (../shared/data) works too
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "multi30k"))
    assert resolve_data_dir() == tmp_path / "multi30k"


def test_read_lines_keeps_alignment_and_rejects_bad_input(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"one  \r\n\ntwo\n")  # CRLF, an empty line, trailing spaces
    assert read_lines(p) == ["one", "", "two"]
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_lines(tmp_path / "b.txt")
    (tmp_path / "c.gz").write_bytes(gzip.compress(b"x\n" * 1000)[:30])  # truncated download
    with pytest.raises(ValueError, match="truncated"):
        read_lines(tmp_path / "c.gz")
    with pytest.raises(ValueError, match="line break"):
        write_lines(tmp_path / "d.txt", ["a\nb"])


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write("new, half written")
            raise RuntimeError("crash")
    assert p.read_text(encoding="utf-8") == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_real_multi30k_val():
    d = multi30k_dir()
    ds = load_split(d, "val", "de", "en")
    assert len(ds) == 1014
    assert ds[0] == {"src": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen",
                     "tgt": "A group of men are loading cotton onto a truck"}
    for split in ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"):
        assert split in find_splits(d, "de", "en")


# -- synthetic corpus -----------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_seeded():
    a, b = synthetic.generate_pairs(300, seed=3), synthetic.generate_pairs(300, seed=3)
    assert a == b and a != synthetic.generate_pairs(300, seed=4)
    assert len({s for s, _ in a}) == 300  # distinct sentences: splits cannot overlap


def test_synthetic_docstring_is_true():
    """The README quotes the module docstring: its examples and lexicon sizes must be what the code does."""
    doc = synthetic.__doc__
    for src, tgt in re.findall(r"toy: (.+?\.)\s+en: (.+?\.)\n", doc):
        assert (src, tgt) in synthetic.generate_pairs(20, seed=0)
    sizes = (len(synthetic.NOUNS), len(synthetic.ADJECTIVES), len(synthetic.VERBS), len(synthetic.PREPOSITIONS))
    assert f"{sizes[0]}-noun, {sizes[1]}-adjective, {sizes[2]}-verb, {sizes[3]}-preposition" in doc


def test_synthetic_rules():
    pairs = dict(synthetic.generate_pairs(2000, seed=0))
    for src, tgt in pairs.items():
        assert src[0].isupper() and tgt[0].isupper() and src.endswith(".") and tgt.endswith(".")
        assert re.search(r"\ba [aeiou]", tgt.lower()) is None  # "an" before a vowel
        last = src[:-1].split()[-1]
        assert re.fullmatch(r"[a-z]+(a|eto)r?", last), src  # Toy is verb-final
        if " saw " in f" {tgt} " or tgt.startswith("Saw"):
            assert "videto" in src


def test_synthetic_bleu_is_meaningful():
    """References score 100 against themselves; word-for-word in Toy order scores far lower."""
    gloss = synthetic.monotone_gloss(500, seed=0)
    refs = [t for _, t in synthetic.generate_pairs(500, seed=0)]
    assert corpus_bleu(refs, refs).score == pytest.approx(100.0)
    assert corpus_bleu(gloss, refs).score < 30.0


def test_synthetic_corpus_files_load_like_multi30k(tmp_path):
    d = synthetic.write_corpus(tmp_path / "toy", seed=1, n_train=200, n_val=20, n_test=30)
    dd = load_parallel(d, src_lang=synthetic.SRC_LANG, tgt_lang=synthetic.TGT_LANG)
    assert {k: len(v) for k, v in dd.items()} == {"train": 200, "val": 20, "test": 30}
    assert not set(dd["train"]["src"]) & set(dd["test"]["src"])
    mtime = (d / "train.toy").stat().st_mtime_ns
    synthetic.write_corpus(d, seed=1, n_train=200, n_val=20, n_test=30)  # same settings: kept as is
    assert (d / "train.toy").stat().st_mtime_ns == mtime
    synthetic.write_corpus(d, seed=2, n_train=200, n_val=20, n_test=30)  # other seed: rewritten
    assert list(load_split(d, "train", "toy", "en")["src"]) != list(dd["train"]["src"])
