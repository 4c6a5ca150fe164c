"""Tokenizers: train one of four kinds, or load an existing vocabulary; special tokens at fixed ids.

Kiln-trained tokenizers put `[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 [BOS]=5 [EOS]=6` (docs/design.md).
A loaded vocabulary (a released BERT `vocab.txt`, GPT-2 `vocab.json`+`merges.txt`) keeps its own ids, so
that released weights still line up; the special tokens it lacks are appended. Either way
`special_token_ids()` gives the ids and the top-level manifest records them.

No post-processor is installed: encoding never adds [CLS]/[SEP]; the example builders add special
tokens explicitly.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from data_pipeline.errors import DataError

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]")
FIXED_SPECIAL_IDS: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
_MIN_PAIR_FREQUENCY = 2  # a merge seen once is noise, not vocabulary


def _train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE as in GPT-2: every string is representable and decode(encode(x)) == x."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=_MIN_PAIR_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_plain_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """BPE over characters, not bytes (as subword-nmt and SentencePiece's BPE): a space becomes "▁" and
    starts the next word's token, so decode(encode(x)) == x for text of characters seen in training; a
    character never seen is [UNK]. The alphabet is capped so the vocabulary stays within `vocab_size`."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    # prepend_scheme "never": no space is invented before the first word, as byte-level BPE does not
    # (add_prefix_space=False); every space is kept, so the decoder restores the text exactly.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=_MIN_PAIR_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        limit_alphabet=vocab_size - len(SPECIAL_TOKENS),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_wordpiece(texts: Iterator[str], vocab_size: int, lowercase: bool = False) -> Tokenizer:
    """BERT-style WordPiece (whitespace and punctuation are split off, so decoding is not exact): cased, or
    uncased as bert-base-uncased (lower-cased, accents stripped). The normalizer is saved in tokenizer.json,
    so data prepared later with this tokenizer as `tokenizer_path` is lower-cased the same way."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=_MIN_PAIR_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_char(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """One token per character: the most frequent `vocab_size - 7` characters, the rest [UNK]."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = {**FIXED_SPECIAL_IDS, **{c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[\s\S]"), behavior="isolated"
    )  # every character
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


TOKENIZER_KINDS: dict[str, Callable[[Iterator[str], int], Tokenizer]] = {
    "bpe": _train_bpe,
    "plain_bpe": _train_plain_bpe,
    "wordpiece": _train_wordpiece,
    "wordpiece_uncased": partial(_train_wordpiece, lowercase=True),
    "char": _train_char,
}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts`; special tokens get the fixed ids 0..6."""
    if kind not in TOKENIZER_KINDS:
        raise DataError(
            f"tokenizer: unknown kind {kind!r}; choose one of {sorted(TOKENIZER_KINDS)}"
        )
    tok = TOKENIZER_KINDS[kind](iter(texts), vocab_size)
    ids = special_token_ids(tok)
    if ids != FIXED_SPECIAL_IDS:  # the trainers put special tokens first; this guards that contract
        raise RuntimeError(f"special tokens landed at {ids}, expected {FIXED_SPECIAL_IDS}")
    return tok


def load_tokenizer(path: str | os.PathLike[str], key: str = "tokenizer_path") -> Tokenizer:
    """Load a tokenizer.json, or a directory holding tokenizer.json, vocab.txt or vocab.json + merges.txt.

    Padding and truncation saved in a tokenizer.json are removed: sentence-transformers releases pad and
    truncate to a fixed length, which would silently cut every document the data pipeline encodes. `key` is the
    config key errors name."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name, loader in (
            ("tokenizer.json", _from_file),
            ("vocab.txt", _load_wordpiece_vocab),
            ("vocab.json", _load_bpe_vocab),
        ):
            if os.path.isfile(os.path.join(path, name)):
                return _unpadded(_with_special_tokens(loader(os.path.join(path, name), key)))
        raise DataError(
            f"{path}: no tokenizer.json, vocab.txt or vocab.json in this directory ({key})"
        )
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory ({key})")
    return _unpadded(_with_special_tokens(_from_file(path, key)))


def _from_file(path: str, key: str = "") -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        where = f" ({key})" if key else ""  # the config key, when a user named the file
        raise DataError(
            f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]}){where}"
        ) from None


def _unpadded(tok: Tokenizer) -> Tokenizer:
    tok.no_padding()
    tok.no_truncation()
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """The id of each Kiln special token in `tok` (all must be present)."""
    ids = {token: tok.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise DataError(f"tokenizer lacks special tokens {missing}")
    return ids  # type: ignore[return-value]


def _load_wordpiece_vocab(vocab_path: str, key: str) -> Tokenizer:
    """A BERT vocab.txt; lower-cases input when the vocabulary has no upper-case word (an uncased model)."""
    tok = Tokenizer(models.WordPiece.from_file(vocab_path, unk_token="[UNK]"))
    config_path = os.path.join(os.path.dirname(vocab_path), "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            lowercase = bool(json.load(f).get("do_lower_case", True))
    else:
        lowercase = not any(t.lower() != t for t in tok.get_vocab() if not t.startswith("["))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _load_bpe_vocab(vocab_path: str, key: str) -> Tokenizer:
    """GPT-2 style vocab.json + merges.txt (gives GPT-2's exact ids, see the design sketch)."""
    merges = os.path.join(os.path.dirname(vocab_path), "merges.txt")
    if not os.path.isfile(merges):
        raise DataError(f"{merges}: missing (vocab.json needs merges.txt beside it) ({key})")
    tok = Tokenizer(models.BPE.from_file(vocab_path, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _with_special_tokens(tok: Tokenizer) -> Tokenizer:
    """Append the special tokens a loaded vocabulary lacks, and mark all of them special."""
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = None  # builders add special tokens themselves
    return tok


# ---------------------------------------------------------------------- translation: source and target sides
TARGET_TOKENIZER_FILE = (
    "target_tokenizer.json"  # beside tokenizer.json when the target has its own vocabulary
)
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token


@dataclass(frozen=True)
class SequenceSpecials:
    """How one side of a translation pair is framed: `[bos] ids [eos]` (no bos: `ids [eos]`), padded with `pad`."""

    bos: int | None
    eos: int
    pad: int

    def to_dict(self) -> dict[str, int | None]:
        return {"bos": self.bos, "eos": self.eos, "pad": self.pad}


@dataclass(frozen=True)
class TranslationTokenizers:
    """The source and target tokenizers of a translation model or data directory, and how each side is framed.

    With one shared tokenizer (`target is source`) the Kiln format holds: `src [EOS]`, `[BOS] tgt [EOS]`. With two
    (a BERT release's WordPiece for the encoder, a GPT-2 release's BPE for the decoder) each side uses its own
    tokenizer's specials: `[CLS] src [SEP]` as BERT was trained, and GPT-2's `<|endoftext|>` as BOS, EOS and PAD
    (as Hugging Face's BERT2GPT2 recipes do), or `[BOS]`/`[EOS]`/`[PAD]` for a target tokenizer without it."""

    source: Tokenizer
    target: Tokenizer
    src: SequenceSpecials
    tgt: SequenceSpecials

    @property
    def shared(self) -> bool:
        return self.target is self.source


def _special(tok: Tokenizer, token: str, side: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise DataError(
            f"{side} tokenizer has no {token} token; Kiln tokenizers define {' '.join(SPECIAL_TOKENS)} "
            "(docs/design.md)"
        )
    return token_id


def translation_tokenizers(
    source: Tokenizer, target: Tokenizer | None = None
) -> TranslationTokenizers:
    """The framing rules of docs/design.md ("Special tokens"), as data preparation and every reader apply them."""
    if target is None or target is source:
        pad, bos, eos = (_special(source, t, "the") for t in ("[PAD]", "[BOS]", "[EOS]"))
        return TranslationTokenizers(
            source, source, SequenceSpecials(None, eos, pad), SequenceSpecials(bos, eos, pad)
        )
    cls, sep, pad = (_special(source, t, "the source") for t in ("[CLS]", "[SEP]", "[PAD]"))
    eot = target.token_to_id(END_OF_TEXT)
    if eot is not None:
        tgt = SequenceSpecials(eot, eot, eot)
    else:
        tgt = SequenceSpecials(
            *(_special(target, t, "the target") for t in ("[BOS]", "[EOS]", "[PAD]"))
        )
    return TranslationTokenizers(source, target, SequenceSpecials(cls, sep, pad), tgt)


def as_translation_tokenizers(
    tokenizers: Tokenizer | TranslationTokenizers,
) -> TranslationTokenizers:
    """Callers holding one shared tokenizer may pass it as it is."""
    return (
        tokenizers
        if isinstance(tokenizers, TranslationTokenizers)
        else translation_tokenizers(tokenizers)
    )


def load_translation_tokenizers(directory: str | os.PathLike[str]) -> TranslationTokenizers:
    """The one way to read a translation checkpoint's (or data directory's) tokenizers: `tokenizer.json` for the
    source and, when present, `target_tokenizer.json` for the target; without it the source's serves both, so every
    checkpoint written before target tokenizers existed reads as it always did."""
    root = os.fspath(directory)
    source_file, target_file = (
        os.path.join(root, "tokenizer.json"),
        os.path.join(root, TARGET_TOKENIZER_FILE),
    )
    if not os.path.isfile(source_file):
        raise DataError(
            f"{source_file}: missing; translation needs the tokenizer it was trained with"
        )
    source = _from_file(source_file)
    return translation_tokenizers(
        source, _from_file(target_file) if os.path.isfile(target_file) else None
    )


# ------------------------------------------------------------------------------------ batch encoding

_CACHE: dict[
    int, Tokenizer
] = {}  # per worker process: parse the tokenizer JSON once, not once per batch


def tokenize_batch(
    batch: pa.Table,
    tokenizer_json: str,
    kind: str,
    segments: bool,
    whole: bool,
    target_tokenizer_json: str | None = None,
) -> pa.Table:
    """Ray UDF: add token-id columns (no special tokens) to a cleaned batch of one row kind.

    documents: `segments` (one id list per line, for mlm_nsp) and/or `ids` (the whole text, for clm), and
    the text itself is dropped (no builder needs it, and it would double what travels to the driver);
    pairs: `src_ids`, `tgt_ids`; labelled: `ids`. Rows that cleaning marked for dropping (a `drop`
    column) get empty lists: their tokens would be thrown away.
    """
    tok = _cached(tokenizer_json)
    keep = (
        [not reason for reason in batch.column("drop").to_pylist()]
        if "drop" in batch.column_names
        else None
    )
    ids_type = pa.list_(pa.int32())
    if kind == "pairs":  # targets with the target tokenizer when there is one (a second vocabulary)
        sides = (
            ("src", tok),
            ("tgt", _cached(target_tokenizer_json) if target_tokenizer_json else tok),
        )
        for name, side_tok in sides:
            batch = batch.append_column(
                f"{name}_ids", pa.array(_encode(side_tok, _texts(batch, name, keep)), ids_type)
            )
        return batch
    texts = _texts(batch, "text", keep)
    if kind == "documents" and segments:
        lines = [t.split("\n") if t else [] for t in texts]
        # A leading space makes a segment's first word tokenize as it does mid-text (byte-level BPE's
        # "ĠWord", not "Word"), so A and B read naturally when concatenated; WordPiece ignores it.
        flat = _encode(tok, [" " + line for doc in lines for line in doc])
        grouped, start = [], 0
        for doc in lines:
            grouped.append(flat[start : start + len(doc)])
            start += len(doc)
        batch = batch.append_column("segments", pa.array(grouped, pa.list_(ids_type)))
    if kind != "documents" or whole:
        batch = batch.append_column("ids", pa.array(_encode(tok, texts), ids_type))
    return batch.drop_columns(["text"]) if kind == "documents" else batch


def _cached(tokenizer_json: str) -> Tokenizer:
    key = hash(tokenizer_json)
    return _CACHE.get(key) or _CACHE.setdefault(key, Tokenizer.from_str(tokenizer_json))


def _texts(batch: pa.Table, name: str, keep: list[bool] | None) -> list[str]:
    texts = batch.column(name).to_pylist()
    return texts if keep is None else [t if k else "" for t, k in zip(texts, keep, strict=True)]


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which nothing here reads: the same
    # ids, ~10% less time on WikiText-2 with GPT-2's BPE.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]
