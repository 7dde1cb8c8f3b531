"""A small parallel corpus that lsquant generates itself, so the quickstart runs on any fresh machine (CPU,
no downloads) and still measures something real with BLEU.

What it is: translation from **Toy** (code ``toy``), a made-up language, into simplified **English**
(``en``). Every sentence comes from one grammar (subject, transitive verb in present or past tense, object,
optional prepositional phrase; nouns with an optional adjective, singular or plural) drawn at random, and is
written out in both languages by fixed rules, so each Toy sentence has exactly one correct English
translation. A 24-noun, 14-adjective, 14-verb, 6-preposition lexicon maps word stems one to one, and the
languages differ the way real ones do:

- word order: Toy is verb-final (subject, object, place, verb); English is subject, verb, object, place;
- Toy puts adjectives after the noun, and its prepositions after their noun phrase (postpositions);
- morphology: Toy marks plural (noun ``-i``, adjective ``-e``), the object case (``-n``), tense (``-a``
  present, ``-eto`` past) and plural subjects (verb ``-r``) with suffixes; English has its own rules
  (``-s``/``-es``/``-ies`` and irregular plurals such as *men*, *mice*, *fish*; third-person ``-s``;
  ``-ed`` and irregular pasts such as *saw*, *took*; *a* versus *an*).

Examples (from seed 0; the meanings are random, the grammar is exact)::

    toy: Mi kapel blanko ka bolon desena.          en: A white hat draws the ball.
    toy: Tri varoi kvete ka fluvoin blue portar.   en: Three quiet men carry the blue rivers.

Sentence starts are capitalised and sentences end with a full stop, in both languages. A tiny Transformer
learns the mapping in a few minutes on a CPU; a monotone word-for-word gloss (right words, Toy order) scores
far below 100 BLEU, so the score shows whether the model learned the reordering and the morphology. The
corpus is written as ``{train,val,test}.{toy,en}`` in Multi30k's layout, so
:mod:`lsquant.recipes.mt.data` reads it like the real data; it is a deterministic function of the seed.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from lsquant.files import atomic_write, write_lines

SRC_LANG, TGT_LANG = "toy", "en"
GENERATOR_VERSION = 1  # bump when the grammar or lexicon changes: corpus.json then no longer matches
META_FILE = "corpus.json"

# English singular, English plural, Toy stem
NOUNS = [
    ("dog", "dogs", "hund"), ("cat", "cats", "miaz"), ("man", "men", "varo"), ("woman", "women", "fema"),
    ("child", "children", "kimo"), ("bird", "birds", "pilo"), ("horse", "horses", "kaval"),
    ("fish", "fish", "ikto"), ("mouse", "mice", "muso"), ("box", "boxes", "kesto"), ("ball", "balls", "bolo"),
    ("apple", "apples", "pomo"), ("tree", "trees", "arbo"), ("house", "houses", "domo"), ("car", "cars", "voko"),
    ("book", "books", "libro"), ("river", "rivers", "fluvo"), ("garden", "gardens", "gardo"),
    ("table", "tables", "tavol"), ("city", "cities", "urbo"), ("boat", "boats", "navo"), ("hat", "hats", "kapel"),
    ("cup", "cups", "tazo"), ("bridge", "bridges", "ponto"),
]
# English, Toy stem (Toy adds -o in the singular, -e in the plural)
ADJECTIVES = [
    ("big", "grand"), ("small", "pik"), ("red", "ros"), ("green", "verd"), ("old", "antik"), ("young", "jun"),
    ("happy", "felik"), ("tall", "alt"), ("blue", "blu"), ("black", "nigr"), ("white", "blank"),
    ("quiet", "kvet"), ("orange", "oranj"), ("empty", "vak"),
]
# English base, third person singular, past; Toy stem
VERBS = [
    ("see", "sees", "saw", "vid"), ("find", "finds", "found", "trov"), ("hold", "holds", "held", "ten"),
    ("take", "takes", "took", "pren"), ("carry", "carries", "carried", "port"),
    ("watch", "watches", "watched", "spekt"), ("like", "likes", "liked", "am"),
    ("push", "pushes", "pushed", "pus"), ("follow", "follows", "followed", "sekv"),
    ("wash", "washes", "washed", "lav"), ("paint", "paints", "painted", "pikt"),
    ("catch", "catches", "caught", "kapt"), ("draw", "draws", "drew", "desen"), ("eat", "eats", "ate", "manj"),
]
PREPOSITIONS = [("in", "ene"), ("on", "sur"), ("near", "apud"), ("under", "sub"), ("behind", "post"),
                ("with", "kun")]
# determiner kind: (English, Toy); "a" becomes "an" before a vowel
DETERMINERS = {"def": ("the", "ka"), "indef": ("a", "mi"), "two": ("two", "du"), "three": ("three", "tri"),
               "some": ("some", "sena")}
SINGULAR_DETS, PLURAL_DETS = ("def", "indef"), ("def", "two", "three", "some")


class _Rng:
    """Draws only through ``random.Random.random()``, whose sequence Python guarantees across versions
    (``choice``/``randrange`` are not guaranteed), so a seed gives the same corpus everywhere."""

    def __init__(self, seed: int):
        self._r = random.Random(seed)

    def chance(self, p: float) -> bool:
        return self._r.random() < p

    def pick(self, items):
        return items[min(int(self._r.random() * len(items)), len(items) - 1)]


def _noun_phrase(rng: _Rng, case: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], bool]:
    """One noun phrase as (English order, Toy order) lists of (English word, Toy word) pairs, and whether
    it is plural.
    case: "nom" (subject), "acc" (object: Toy suffix -n), "obl" (inside a prepositional phrase)."""
    plural = rng.chance(0.35)
    det = rng.pick(PLURAL_DETS if plural else SINGULAR_DETS)
    en_sg, en_pl, toy_noun = rng.pick(NOUNS)
    adj = rng.pick(ADJECTIVES) if rng.chance(0.5) else None
    noun = (en_pl if plural else en_sg, toy_noun + ("i" if plural else "") + ("n" if case == "acc" else ""))
    adj_pair = (adj[0], adj[1] + ("e" if plural else "o")) if adj else None
    first_en = adj_pair[0] if adj_pair else noun[0]
    det_en, det_toy = DETERMINERS[det]
    if det_en == "a" and first_en[0] in "aeiou":
        det_en = "an"
    det_pair = (det_en, det_toy)
    en = [det_pair] + ([adj_pair] if adj_pair else []) + [noun]
    toy = [det_pair, noun] + ([adj_pair] if adj_pair else [])
    return en, toy, plural


def _sentence(rng: _Rng) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(English order, Toy order) lists of (English word, Toy word) pairs of one random sentence."""
    subj_en, subj_toy, subj_plural = _noun_phrase(rng, "nom")
    base, third, past_en, toy_verb = rng.pick(VERBS)
    past = rng.chance(0.5)
    verb = (past_en if past else (base if subj_plural else third),
            toy_verb + ("eto" if past else "a") + ("r" if subj_plural else ""))
    obj_en, obj_toy, _ = _noun_phrase(rng, "acc")
    en, toy = subj_en + [verb] + obj_en, subj_toy + obj_toy
    if rng.chance(0.6):
        prep = rng.pick(PREPOSITIONS)
        pp_en, pp_toy, _ = _noun_phrase(rng, "obl")
        en, toy = en + [prep] + pp_en, toy + pp_toy + [prep]
    return en, toy + [verb]


def _write(words: list[str]) -> str:
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def generate_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct (Toy, English) sentence pairs, a deterministic function of ``seed``."""
    return [(s, t) for s, t, _ in _generate(n, seed)]


def _generate(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(Toy, English, gloss) triples; the gloss is the English words in Toy order (a baseline)."""
    rng, seen, out = _Rng(seed), set(), []
    for _ in range(50 * n + 1000):  # duplicates are rare (~10^12 possible sentences); the bound only guards a bad edit
        if len(out) == n:
            break
        en, toy = _sentence(rng)
        src = _write([w for _, w in toy])
        if src in seen:
            continue
        seen.add(src)
        out.append((src, _write([w for w, _ in en]), _write([w for w, _ in toy])))
    if len(out) < n:
        raise RuntimeError(f"could only generate {len(out)} distinct sentences of {n}")
    return out


def monotone_gloss(n: int, seed: int = 0) -> list[str]:
    """For the first ``n`` pairs of :func:`generate_pairs`: each Toy word replaced by its English word, in Toy
    order (what a model learns without reordering; scored in the tests to show BLEU is meaningful)."""
    return [g for _, _, g in _generate(n, seed)]


def write_corpus(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 20000, n_val: int = 500,
                 n_test: int = 500, force: bool = False) -> Path:
    """Write ``{train,val,test}.{toy,en}`` and ``corpus.json`` (the settings) into ``out_dir``; returns it.

    The splits are disjoint (all sentences distinct). When ``corpus.json`` already records the same
    settings the files are kept (the quickstart reruns instantly); ``force`` rewrites them. corpus.json is
    written last, so an interrupted write is redone on the next call.
    """
    out_dir = Path(out_dir)
    meta = {"generator": "lsquant.recipes.mt.synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "src_lang": SRC_LANG, "tgt_lang": TGT_LANG, "sizes": {"train": n_train, "val": n_val, "test": n_test}}
    meta_path = out_dir / META_FILE
    if not force and meta_path.is_file():
        try:
            same = json.loads(meta_path.read_text(encoding="utf-8")) == meta
        except ValueError:
            same = False
        if same and all((out_dir / f"{s}.{lang}").is_file() for s in meta["sizes"] for lang in (SRC_LANG, TGT_LANG)):
            return out_dir
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs at least one sentence, got train={n_train} val={n_val} test={n_test}")
    pairs = generate_pairs(n_train + n_val + n_test, seed)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    for split, (a, b) in bounds.items():
        write_lines(out_dir / f"{split}.{SRC_LANG}", (s for s, _ in pairs[a:b]))
        write_lines(out_dir / f"{split}.{TGT_LANG}", (t for _, t in pairs[a:b]))
    with atomic_write(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir
