from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from transformers import PreTrainedTokenizerFast

from data_pipeline.errors import DataError
from data_pipeline.sample import sample_documents
from data_pipeline.tokenizer import (
    FIXED_SPECIAL_IDS,
    SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    load_tokenizer,
    special_token_ids,
    tokenize_batch,
    train_tokenizer,
)

GPT2_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpt2_tokenizer"
TRICKY = [
    "Héllo  wörld\n\ttabs ✓ 𝔘 end  ",
    "  leading and trailing  ",
    "x = f(a, b)  # comment\n\n\n",
    "naïve 北京 🙂",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return sample_documents(seed=0, n=40) + TRICKY


@pytest.mark.parametrize("kind", list(TOKENIZER_KINDS))
def test_special_tokens_have_fixed_ids_and_are_never_added(kind: str, corpus: list[str]) -> None:
    tok = train_tokenizer(kind, corpus, vocab_size=600)
    assert (
        special_token_ids(tok)
        == FIXED_SPECIAL_IDS
        == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "[BOS]": 5, "[EOS]": 6}
    )
    assert 100 < tok.get_vocab_size() <= 600
    ids = tok.encode("the statement", add_special_tokens=True).ids
    assert ids and not set(ids) & set(range(7))  # no post-processor adds [CLS]/[SEP]
    assert tok.encode("[MASK]").ids == [4]  # special tokens in text map to their id


def test_byte_level_bpe_round_trips_exactly(corpus: list[str]) -> None:
    tok = train_tokenizer("bpe", corpus, vocab_size=800)
    for text in [*TRICKY, *corpus[:10], "\x00\x01 control", "unseen: Ω≈ç√∫"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert (
        tok.token_to_id("[UNK]") == 1 and 1 not in tok.encode("unseen: Ω≈ç√∫").ids
    )  # bytes cover everything


def test_plain_bpe_merges_characters_and_round_trips_text_of_its_alphabet(
    corpus: list[str],
) -> None:
    tok = train_tokenizer("plain_bpe", corpus, vocab_size=800)
    for text in [*TRICKY, *corpus[:10], " leading space", "two  spaces\n\nand lines"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert (
        tok.encode("the statement").tokens[-1].startswith("▁")
    )  # a space starts the next word's token
    assert not any(
        t.startswith("Ġ") for t in tok.get_vocab()
    )  # characters, not GPT-2's byte symbols
    assert tok.encode("\u2603").ids == [1]  # a character never seen is [UNK]: not byte-level
    small = train_tokenizer("plain_bpe", corpus, vocab_size=64)
    assert small.get_vocab_size() <= 64  # the alphabet is capped to fit the vocabulary


def test_char_tokenizer_is_one_token_per_character(corpus: list[str]) -> None:
    tok = train_tokenizer("char", corpus, vocab_size=5000)
    text = "The if statement\n"
    assert tok.encode(text).tokens == list(text)
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("\u2603").ids == [1]  # a character never seen is [UNK]


@pytest.mark.parametrize("kind", list(TOKENIZER_KINDS))
def test_saved_tokenizer_loads_in_transformers_and_in_kiln(
    kind: str, corpus: list[str], tmp_path: Path
) -> None:
    tok = train_tokenizer(kind, corpus, vocab_size=600)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "The if statement is used for conditional execution."
    assert hf(text, add_special_tokens=True)["input_ids"] == tok.encode(text).ids
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(7))
    again = load_tokenizer(path)
    assert (
        again.encode(text).ids == tok.encode(text).ids
        and special_token_ids(again) == FIXED_SPECIAL_IDS
    )
    assert (
        load_tokenizer(tmp_path).get_vocab_size() == tok.get_vocab_size()
    )  # a directory works too


def test_wordpiece_vocab_txt_loads_with_special_tokens_appended(tmp_path: Path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "##s", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(tmp_path)
    assert tok.encode("The cats sat.").tokens == [
        "the",
        "cat",
        "##s",
        "sat",
        ".",
    ]  # uncased vocab: lower-cased
    ids = special_token_ids(tok)
    assert ids["[PAD]"] == 0 and ids["[MASK]"] == 4 and {ids["[BOS]"], ids["[EOS]"]} == {10, 11}


@pytest.mark.skipif(not GPT2_DIR.is_dir(), reason=f"{GPT2_DIR} absent")
def test_gpt2_vocab_gives_gpt2_ids() -> None:
    tok = load_tokenizer(GPT2_DIR)
    assert tok.encode("Hello world").ids == [15496, 995]
    assert min(special_token_ids(tok).values()) == 50257  # appended after GPT-2's own 50,257 tokens


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.json: no such file"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(
        DataError, match=rf"^{tmp_path}: no tokenizer.json, vocab.txt or vocab.json"
    ):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad.json: not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(DataError, match=r"tokenizer.json: not a tokenizers JSON file"):
        load_tokenizer(tmp_path)  # a malformed tokenizer.json found in a directory


def test_saved_padding_and_truncation_never_reach_the_data(
    corpus: list[str], tmp_path: Path
) -> None:
    """sentence-transformers releases save tokenizer.json padded and truncated to a fixed length."""
    tok = train_tokenizer("wordpiece", corpus, vocab_size=600)
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=4)
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(corpus[:3])
    loaded = load_tokenizer(tmp_path)
    assert loaded.padding is None and loaded.truncation is None
    assert len(loaded.encode(text).ids) > 16  # the whole text, neither cut to 4 nor padded to 16


def test_tokenize_batch_adds_id_columns(corpus: list[str]) -> None:
    tok = train_tokenizer("bpe", corpus, vocab_size=600)
    docs = pa.table(
        {"text": ["The if statement.\nIt selects a suite.", "One line."], "split": ["train"] * 2}
    )
    out = tokenize_batch(docs, tok.to_str(), "documents", segments=True, whole=True)
    segments, whole = out.column("segments").to_pylist(), out.column("ids").to_pylist()
    assert [len(s) for s in segments] == [2, 1]
    assert (
        tok.decode(segments[0][1]) == " It selects a suite."
    )  # segments start like mid-text words
    assert tok.decode(whole[0]) == "The if statement.\nIt selects a suite."
    assert (
        "text" not in out.column_names
    )  # no builder needs document text; it would only travel to the driver
    pairs = pa.table({"src": ["one", "two"], "tgt": ["un", "deux"], "drop": ["", "duplicate"]})
    out = tokenize_batch(pairs, tok.to_str(), "pairs", segments=False, whole=False)
    assert tok.decode(out.column("tgt_ids").to_pylist()[0]) == "un"
    assert out.column("src_ids").to_pylist()[1] == [] and out.column("src").to_pylist() == [
        "one",
        "two",
    ]


def test_uncased_wordpiece_lowercases_and_strips_accents_and_keeps_it_when_loaded(
    corpus: list[str], tmp_path: Path
) -> None:
    """An uncased vocabulary (as bert-base-uncased) carries its normalizer in tokenizer.json, so lower-case
    task data (SST-2) prepared with it as tokenizer_path gets the pretraining text's ids."""
    cased = train_tokenizer("wordpiece", corpus, vocab_size=600)
    uncased = train_tokenizer("wordpiece_uncased", corpus, vocab_size=600)
    words = [t for t in uncased.get_vocab() if not t.startswith("[")]  # not [PAD], [CLS], ...
    assert words and not any(t != t.lower() for t in words)
    assert any(t != t.lower() for t in cased.get_vocab() if not t.startswith("["))
    uncased.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    text = "The IF Statement: café"
    assert loaded.encode(text).ids == loaded.encode("the if statement: cafe").ids
    assert cased.encode(text).ids != cased.encode("the if statement: cafe").ids
