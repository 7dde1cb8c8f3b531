"""The joint BPE tokenizer: fixed special ids, exact detokenizing round trip, save/load, determinism."""
import pytest
import torch
from _data import multi30k_dir

from lsquant.recipes.mt import synthetic
from lsquant.recipes.mt.data import load_split
from lsquant.recipes.mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, MTTokenizer

ORDINARY = ["A man in an orange hat starring at something.", "Zwei Männer stehen am Herd und bereiten Essen zu.",
            "Ein Mädchen (6 Jahre) isst 3,5 Äpfel: \"lecker!\"", "Café – naïve façade", "x"]


@pytest.fixture(scope="module")
def toy_tok():
    pairs = synthetic.generate_pairs(2000, seed=0)
    return MTTokenizer.train_on_pairs([s for s, _ in pairs], [t for _, t in pairs], vocab_size=600,
                                      show_progress=False)


def test_special_token_ids(toy_tok):
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert [toy_tok.tokenizer.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    assert 300 < toy_tok.vocab_size <= 600


def test_round_trip_and_specials(toy_tok):
    for s in ORDINARY + [t for _, t in synthetic.generate_pairs(50, seed=9)]:
        ids = toy_tok.encode(s)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and UNK_ID not in ids  # byte-level: never <unk>
        assert toy_tok.decode(ids) == s
    src = toy_tok.encode("Ka hundo.", add_bos=False)
    assert src[0] != BOS_ID and src[-1] == EOS_ID


def test_decode_stops_at_eos_and_takes_tensors(toy_tok):
    a, b = toy_tok.encode("A dog runs."), toy_tok.encode("Two cats.")
    width = max(len(a), len(b)) + 3
    batch = torch.tensor([x + [PAD_ID] * (width - len(x)) for x in (a, b)])
    batch[1, len(b)] = 57  # garbage after </s> (an engine's finished beam) is ignored
    assert toy_tok.decode_batch(batch) == ["A dog runs.", "Two cats."]


def test_max_len_keeps_eos(toy_tok):
    ids = toy_tok.encode("A dog runs after the red ball in the garden.", max_len=5)
    assert len(ids) == 5 and ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert toy_tok.encode_batch(["A dog.", "A cat."], max_len=5) == [toy_tok.encode(s, max_len=5)
                                                                    for s in ("A dog.", "A cat.")]


def test_save_load_and_determinism(toy_tok, tmp_path):
    path = toy_tok.save(tmp_path / "run")
    assert path.name == "tokenizer.json"
    loaded = MTTokenizer.load(tmp_path / "run")
    assert loaded.encode(ORDINARY[1]) == toy_tok.encode(ORDINARY[1])
    pairs = synthetic.generate_pairs(2000, seed=0)
    again = MTTokenizer.train_on_pairs([s for s, _ in pairs], [t for _, t in pairs], vocab_size=600,
                                       show_progress=False)
    assert again.to_str() == toy_tok.to_str()


def test_foreign_tokenizer_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "[CLS]": 1, "</s>": 2, "<unk>": 3, "<s>": 4}
    bert_like = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    with pytest.raises(ValueError, match="'<s>' at id 4, lsquant expects id 1"):
        MTTokenizer(bert_like)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        MTTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        MTTokenizer.train(["a"], vocab_size=100)


def test_round_trip_real_multi30k():
    ds = load_split(multi30k_dir(), "val", "de", "en")
    tok = MTTokenizer.train_on_pairs(ds["src"], ds["tgt"], vocab_size=2000, show_progress=False)
    texts = list(ds["src"]) + list(ds["tgt"])
    ids = tok.encode_batch(texts)
    assert tok.decode_batch(ids) == texts
    assert sum(map(len, ids)) / len(ids) < 25  # BPE actually merges (characters would be ~60 per sentence)
