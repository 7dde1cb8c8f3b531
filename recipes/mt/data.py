"""Parallel text for translation, read from local files (no network) as plain lists (:func:`read_split`, what the
recipe uses) or as ``datasets`` objects (:func:`load_split`, :func:`load_parallel`).

Layout (Multi30k's, also written by :mod:`lsquant.recipes.mt.synthetic`): one file per split and language,
``{split}.{lang}`` or ``{split}.{lang}.gz``, UTF-8, one sentence a line, the two languages aligned by line::

    multi30k/train.de.gz  multi30k/train.en.gz  (29,000 lines)
    multi30k/val.de.gz    multi30k/val.en.gz    (1,014)
    multi30k/test_2016_flickr.{de,en}.gz (1,000)  test_2017_flickr (1,000)  test_2017_mscoco (461)
    multi30k/test_2018_flickr.{de,en}.gz (1,071)

The directory comes from ``--data`` or the environment variable ``LSQUANT_DATA``; either may name the
corpus directory itself or its parent (``../shared/data`` finds ``../shared/data/multi30k``).

We read the files ourselves and build the dataset with ``datasets.Dataset.from_dict`` rather than
``load_dataset("text")``: it needs no cache directory, and it lets us check that both sides have exactly the
same number of lines before anything is paired (a misaligned corpus trains silently to garbage).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lsquant.files import read_lines

log = logging.getLogger(__name__)

ENV_VAR = "LSQUANT_DATA"
MULTI30K_DIR = "multi30k"
MULTI30K_LANGS = ("de", "en")
MULTI30K_SPLITS = ("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")
# The headline score is on test_2016_flickr; the other two are reported beside it.
MULTI30K_TEST_SPLITS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")


def resolve_data_dir(data: str | os.PathLike | None = None, corpus: str = MULTI30K_DIR) -> Path:
    """The corpus directory: ``data`` if given, else ``$LSQUANT_DATA``; when that directory has a ``corpus``
    subdirectory (e.g. ``multi30k``), that subdirectory."""
    source = "--data"
    if data is None or str(data) == "":
        data, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if data is None:
        raise ValueError(f"no data directory: pass --data DIR or set {ENV_VAR}=DIR "
                         f"(for Multi30k, e.g. {ENV_VAR}=../shared/data)")
    path = Path(data).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} (from {source}) does not exist or is not a directory")
    if corpus and (path / corpus).is_dir():
        return path / corpus
    return path


def split_file(data_dir: str | os.PathLike, split: str, lang: str) -> Path:
    """The file of one split and language: ``{split}.{lang}`` or ``{split}.{lang}.gz`` (exactly one of them)."""
    data_dir = Path(data_dir)
    candidates = [p for p in (data_dir / f"{split}.{lang}", data_dir / f"{split}.{lang}.gz") if p.is_file()]
    if not candidates:
        have = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
        raise FileNotFoundError(f"no {split}.{lang} or {split}.{lang}.gz in {data_dir} (it holds: "
                                f"{', '.join(have[:20]) or 'nothing'}{' ...' if len(have) > 20 else ''})")
    if len(candidates) > 1:
        raise ValueError(f"both {candidates[0]} and {candidates[1]} exist; remove one so it is clear which is read")
    return candidates[0]


def find_splits(data_dir: str | os.PathLike, src_lang: str, tgt_lang: str) -> list[str]:
    """Names of the splits that have a file for both languages, sorted (train and val first)."""
    data_dir = Path(data_dir)
    names = {}
    for p in data_dir.iterdir():
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        split, _, lang = name.rpartition(".")
        if split and lang in (src_lang, tgt_lang):
            names.setdefault(split, set()).add(lang)
    found = [s for s, langs in names.items() if langs == {src_lang, tgt_lang}]
    order = {"train": 0, "val": 1}
    return sorted(found, key=lambda s: (order.get(s, 2), s))


def read_split(data_dir: str | os.PathLike, split: str, src_lang: str = "de", tgt_lang: str = "en",
               limit: int | None = None) -> tuple[list[str], list[str]]:
    """One split as two aligned lists of lines (source, target); what :func:`load_split` wraps (the recipe
    itself reads splits this way, so it runs where ``datasets`` is not installed).

    limit: keep only the first ``limit`` pairs (smoke tests); the alignment check still sees every line.
    Raises FileNotFoundError for a missing file and ValueError for files whose line counts differ.
    """
    src_path, tgt_path = split_file(data_dir, split, src_lang), split_file(data_dir, split, tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"misaligned parallel files for split {split!r}: {src_path} has {len(src)} lines, "
                         f"{tgt_path} has {len(tgt)}; line i of one must translate line i of the other")
    if not src:
        raise ValueError(f"split {split!r} is empty: {src_path} and {tgt_path} have no lines")
    empty = sum(1 for s, t in zip(src, tgt) if not s or not t)
    if empty:
        log.warning("split %s: %d of %d pairs have an empty side (%s, %s)", split, empty, len(src),
                    src_path.name, tgt_path.name)
    if limit is not None:
        src, tgt = src[:limit], tgt[:limit]
    return src, tgt


def load_split(data_dir: str | os.PathLike, split: str, src_lang: str = "de", tgt_lang: str = "en",
               limit: int | None = None):
    """One split as a ``datasets.Dataset`` with string columns ``src`` and ``tgt`` (one row per line pair);
    the lines and errors of :func:`read_split`."""
    import datasets  # deferred: importing it costs about a second

    src, tgt = read_split(data_dir, split, src_lang, tgt_lang, limit)
    return datasets.Dataset.from_dict({"src": src, "tgt": tgt})


def load_parallel(data_dir: str | os.PathLike, splits: tuple[str, ...] | list[str] | None = None,
                  src_lang: str = "de", tgt_lang: str = "en", limit: int | None = None):
    """Several splits as a ``datasets.DatasetDict`` {split name: Dataset(src, tgt)}.

    splits: None loads every split that has both languages (:func:`find_splits`).
    """
    import datasets

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    if splits is None:
        splits = find_splits(data_dir, src_lang, tgt_lang)
        if not splits:
            raise FileNotFoundError(f"no split in {data_dir} has both a .{src_lang} and a .{tgt_lang} file "
                                    f"(expected e.g. train.{src_lang}.gz and train.{tgt_lang}.gz)")
    return datasets.DatasetDict({s: load_split(data_dir, s, src_lang, tgt_lang, limit) for s in splits})
