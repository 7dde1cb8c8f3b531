"""Corpus BLEU with sacreBLEU on detokenized text (the standard, comparable score: sacreBLEU tokenizes
hypotheses and references itself with its ``13a`` tokenizer, so never feed it BPE pieces or pre-tokenized
text). ``lsquant eval bleu --hyp FILE --ref FILE`` is the command-line form."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class BleuResult:
    """score: corpus BLEU in [0, 100]; signature: sacreBLEU's reproducibility string (report it with the
    score); precisions: the 1..4-gram precisions (%); bp: brevity penalty; sys_len/ref_len: tokens;
    n: sentences."""
    score: float
    signature: str
    precisions: tuple[float, ...]
    bp: float
    sys_len: int
    ref_len: int
    n: int

    def __str__(self) -> str:
        return f"BLEU = {self.score:.2f} ({self.signature})"


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], tokenize: str = "13a",
                lowercase: bool = False) -> BleuResult:
    """Corpus BLEU of detokenized hypotheses against one reference stream (a list of strings, one per
    hypothesis) or several (a list of such lists)."""
    from sacrebleu.metrics import BLEU

    hyps = list(hyps)
    streams = [list(refs)] if refs and isinstance(refs[0], str) else [list(r) for r in refs]
    if not hyps:
        raise ValueError("corpus_bleu: no hypotheses")
    for k, r in enumerate(streams):
        if len(r) != len(hyps):
            raise ValueError(f"corpus_bleu: {len(hyps)} hypotheses but reference stream {k} has {len(r)} lines; "
                             "they must align line by line")
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    s = metric.corpus_score(hyps, streams)
    return BleuResult(score=float(s.score), signature=str(metric.get_signature()),
                      precisions=tuple(float(p) for p in s.precisions), bp=float(s.bp),
                      sys_len=int(s.sys_len), ref_len=int(s.ref_len), n=len(hyps))


def bleu_files(hyp: str | os.PathLike, refs: str | os.PathLike | Sequence[str | os.PathLike],
               tokenize: str = "13a", lowercase: bool = False) -> BleuResult:
    """:func:`corpus_bleu` of a hypothesis file against one or more reference files (UTF-8, one sentence a
    line, ``.gz`` accepted)."""
    from lsquant.files import read_lines

    refs = [refs] if isinstance(refs, (str, os.PathLike)) else list(refs)
    return corpus_bleu(read_lines(hyp), [read_lines(r) for r in refs], tokenize=tokenize, lowercase=lowercase)
