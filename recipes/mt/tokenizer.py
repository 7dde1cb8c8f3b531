"""Joint BPE tokenizer for translation, trained with Hugging Face ``tokenizers`` on both sides of the
training split, saved as one ``tokenizer.json`` (beside the model and inside the export).

Special tokens have fixed ids in every lsquant translation tokenizer (the model, the exporter and the
engines rely on them; the HDF5 file records them too):

    ===========  ====  =========================================================
    token        id    use
    ===========  ====  =========================================================
    ``<pad>``    0     padding (attention masks, loss ignore index)
    ``<s>``      1     beginning of sentence: the decoder's first input
    ``</s>``     2     end of sentence: ends every source and target sequence
    ``<unk>``    3     unknown; never produced (byte-level BPE covers every byte)
    ===========  ====  =========================================================

Byte-level BPE (GPT-2's pre-tokenizer with a leading space added, so a word is the same token at the start
of a sentence as inside it): any UTF-8 text encodes without ``<unk>``, and ``decode(encode(s)) == s`` exactly
for every sentence without leading or trailing whitespace. Decoding therefore returns detokenized text,
which is what sacreBLEU must score.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from lsquant.files import atomic_write

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # index = id
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.json"


def _as_list(ids) -> list[int]:
    """Accept a list, a tuple, a numpy array or a torch tensor of ids."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class MTTokenizer:
    """A ``tokenizers.Tokenizer`` with lsquant's fixed special-token ids and translation conventions.

    Sequences: ``encode`` gives ``[<s>] + pieces + [</s>]`` by default; the recipe encodes the source without
    ``<s>`` (``add_bos=False``) and the target with both, so the decoder input is ``tgt[:-1]`` and the label
    ``tgt[1:]``.
    """

    def __init__(self, tokenizer):
        for i, tok in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(tok)
            if got != i:
                raise ValueError(f"tokenizer has {tok!r} at id {got}, lsquant expects id {i} "
                                 f"({', '.join(f'{t}={j}' for j, t in enumerate(SPECIAL_TOKENS))}); "
                                 "train it with MTTokenizer.train")
        self.tokenizer = tokenizer

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0 .. vocab_size-1). The model may pad its
        embedding beyond this (e.g. to a multiple of 8 for tensor cores)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # -- training and files -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
              show_progress: bool = True, length: int | None = None) -> "MTTokenizer":
        """Learn a byte-level BPE vocabulary of at most ``vocab_size`` ids (fewer when the text runs out of
        merges seen ``min_frequency`` times) from ``texts``: pass both languages of the training split, never
        validation or test text. Deterministic for the same texts (checked by the tests)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs the 256 byte "
                             f"symbols and {len(SPECIAL_TOKENS)} special tokens; use at least 512")
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        # ByteLevel decoding gives back the prefix space that encoding added; Strip removes exactly that one.
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..3
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        if length is None and hasattr(texts, "__len__"):
            length = len(texts)
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok)

    @classmethod
    def train_on_pairs(cls, src: Sequence[str], tgt: Sequence[str], **kw) -> "MTTokenizer":
        """Joint vocabulary from both sides of a parallel training set (e.g. ``ds["src"], ds["tgt"]``)."""
        return cls.train(list(src) + list(tgt), **kw)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` atomically; ``path`` is the file or a directory to put it in."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / TOKENIZER_FILE
        with atomic_write(path, "w") as f:
            f.write(self.to_str())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MTTokenizer":
        """Read a ``tokenizer.json`` (or a directory holding one) written by :meth:`save`."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; train one with MTTokenizer.train(...).save(dir)")
        return cls.from_str(path.read_text(encoding="utf-8"))

    def to_str(self) -> str:
        """The tokenizer as a JSON string (what the exporter stores in the HDF5 file)."""
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, s: str) -> "MTTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(s))

    # -- encoding and decoding ----------------------------------------------------------------------------

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool, max_len: int | None) -> list[int]:
        if max_len is not None:
            room = max_len - add_bos - add_eos
            if room < 0:
                raise ValueError(f"max_len={max_len} leaves no room for <s>/</s>")
            ids = ids[:room]  # truncate the pieces, never the closing </s>: the model must see an end
        return [BOS_ID] * add_bos + ids + [EOS_ID] * add_eos

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True,
               max_len: int | None = None) -> list[int]:
        """Token ids of one sentence: ``[<s>]? pieces [</s>]?``, at most ``max_len`` ids when given."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos, max_len)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True,
                     max_len: int | None = None) -> list[list[int]]:
        """:meth:`encode` over many sentences (parallel in Rust: Multi30k's 58k sentences in about a second)."""
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos, max_len) for e in encs]

    def decode(self, ids) -> str:
        """Detokenized text of one id sequence (list, numpy array or 1-D tensor). Stops at the first
        ``</s>`` (an engine pads after it) and drops ``<s>``/``<pad>``."""
        ids = _as_list(ids)
        if EOS_ID in ids:
            ids = ids[:ids.index(EOS_ID)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, batch) -> list[str]:
        """:meth:`decode` of each row of a 2-D batch (list of lists, array or tensor [batch, len])."""
        return [self.decode(row) for row in _as_list(batch)]
