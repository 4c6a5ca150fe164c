"""Example builders: tokenized rows of one split -> training examples in the shard schemas of docs/design.md.

Inputs are Arrow tables (token ids carry no special tokens; the builders add them):
    mlm_nsp         segments: list<list<int32>>     one document, one id list per segment (line)
    clm             ids: list<int32>                one document, tokenized whole
    translation     src_ids, tgt_ids, src, tgt
    classification  ids: list<int32>, label: int, text
Outputs are Arrow tables in the task's shard schema without `sample_id`, which the caller adds so that
it is unique across the splits of a task. Causal-LM packing is vectorised (NumPy): it touches every
token of the corpus, where the other builders touch each row once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.config import TASK_INPUTS
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import SequenceSpecials

SHORT_SEQ_PROB = (
    0.1  # BERT: a tenth of the rows are shorter, so fine-tuning on short inputs is not a surprise
)
NSP_RANDOM_PROB = 0.5
_IDS = pa.list_(pa.int32())


@dataclass(frozen=True)
class BuildParams:
    seq_len: int
    max_src_len: int
    max_tgt_len: int
    special_ids: dict[str, int]  # "[CLS]" -> id, ...
    # translation with a second (target) vocabulary: how each side is framed (None: `src [EOS]`, `[BOS] tgt [EOS]`)
    src_frame: SequenceSpecials | None = None
    tgt_frame: SequenceSpecials | None = None
    # mlm_nsp: how many times each document is cut into pairs, each pass with its own cuts, short
    # rows and negatives (BERT's dupe_factor); on a small corpus one pass is soon memorised
    nsp_dupe_factor: int = 1


Examples = tuple[
    pa.Table, dict[str, int]
]  # rows (shard schema less sample_id), counters (e.g. rows dropped)


# -------------------------------------------------------------------------------------------- mlm_nsp


def build_mlm_nsp(rows: pa.Table, params: BuildParams, rng: random.Random) -> Examples:
    """BERT's segment pairs: `[CLS] A [SEP] B [SEP]`, B the true continuation or (half the time) random text."""
    docs = [[s for s in doc if s] for doc in rows.column("segments").to_pylist()]
    docs = [d for d in docs if d]
    if len(docs) < 2:
        raise DataError(
            f"tasks: mlm_nsp needs at least 2 non-empty documents in a split, found {len(docs)}"
        )
    out: list[dict] = []
    for _ in range(params.nsp_dupe_factor):
        for index in range(len(docs)):
            out.extend(_document_pairs(docs, index, params.seq_len - 3, params.special_ids, rng))
    return _table(out, "mlm_nsp"), {}


def _document_pairs(
    docs: list[list[list[int]]],
    index: int,
    max_tokens: int,
    special: dict[str, int],
    rng: random.Random,
) -> list[dict]:
    """Follows BERT's create_instances_from_document: gather segments up to a target length, then split."""
    doc = docs[index]
    target = max_tokens if rng.random() >= SHORT_SEQ_PROB else rng.randint(2, max_tokens)
    out, chunk, length, i = [], [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a, b, is_random, unused = _split_chunk(chunk, docs, index, target, rng)
            i -= unused  # segments not used as B (B was random) start the next chunk, as in BERT
            _truncate_pair(a, b, max_tokens, rng)
            out.append(_pair_row(a, b, is_random, special))
            chunk, length = [], 0
        i += 1
    return out


def _split_chunk(
    chunk: list[list[int]], docs: list[list[list[int]]], index: int, target: int, rng: random.Random
) -> tuple[list[int], list[int], bool, int]:
    """(A, B, B is random, segments of the chunk left unused)."""
    single = len(chunk) == 1
    if single and len(chunk[0]) >= 2:
        # BERT forces a random B when the chunk is one segment; that skews the NSP labels when segments are
        # long, so cut the segment at a random token instead and keep the coin fair.
        cut = rng.randint(1, len(chunk[0]) - 1)
        chunk = [chunk[0][:cut], chunk[0][cut:]]
    a_end = rng.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
    a = [t for seg in chunk[:a_end] for t in seg]
    if len(chunk) > 1 and rng.random() >= NSP_RANDOM_PROB:
        return a, [t for seg in chunk[a_end:] for t in seg], False, 0
    other = docs[_other_index(len(docs), index, rng)]
    b: list[int] = []
    for seg in other[rng.randrange(len(other)) :]:
        b.extend(seg)
        if len(b) >= max(1, target - len(a)):
            break
    return a, b, True, 0 if single else len(chunk) - a_end


def _other_index(n: int, index: int, rng: random.Random) -> int:
    other = rng.randrange(n - 1)
    return other + 1 if other >= index else other


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """BERT's policy: shorten the longer segment, from the front or the back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _pair_row(a: list[int], b: list[int], is_random: bool, special: dict[str, int]) -> dict:
    cls, sep = special["[CLS]"], special["[SEP]"]
    return {
        "input_ids": [cls, *a, sep, *b, sep],
        "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
        "next_sentence_label": int(is_random),
    }


# ------------------------------------------------------------------------------------------------ clm


def build_clm(rows: pa.Table, params: BuildParams, rng: random.Random) -> Examples:
    """`[BOS] doc [EOS]` packed end to end, cut into blocks of seq_len + 1 tokens.

    Consecutive blocks share one token (stride seq_len), so every token after the first is a target
    exactly once; the tail shorter than a block is dropped and counted.
    """
    bos, eos = params.special_ids["[BOS]"], params.special_ids["[EOS]"]
    ids = rows.column("ids")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    tokens = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int32)
    bos_at = np.cumsum(lengths + 2) - (lengths + 2)  # where each document's [BOS] goes
    stream = np.empty(len(tokens) + 2 * len(lengths), np.int32)
    is_token = np.ones(len(stream), bool)
    is_token[bos_at] = is_token[bos_at + lengths + 1] = False
    stream[bos_at], stream[bos_at + lengths + 1], stream[is_token] = bos, eos, tokens
    step = params.seq_len
    n_blocks = max(0, (len(stream) - 1) // step)
    # Block k is stream[k*step : k*step + step + 1]: a (n_blocks, step + 1) view with overlapping rows.
    blocks = (
        np.lib.stride_tricks.sliding_window_view(stream, step + 1)[::step][:n_blocks]
        if n_blocks
        else (np.empty((0, step + 1), np.int32))
    )
    offsets = pa.array(np.arange(n_blocks + 1, dtype=np.int32) * (step + 1))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1)))})
    tail = len(stream) - 1 - n_blocks * step if len(stream) else 0
    return table, {"tail_tokens_dropped": tail}


# ---------------------------------------------------------------------------------------- translation


def build_translation(rows: pa.Table, params: BuildParams, rng: random.Random) -> Examples:
    """`src [EOS]` -> `[BOS] tgt [EOS]` (or each side framed by its own tokenizer's specials: `params.src_frame`,
    `params.tgt_frame`); pairs over the length limits are dropped (truncation would mistranslate)."""
    bos, eos = params.special_ids["[BOS]"], params.special_ids["[EOS]"]
    src_frame = params.src_frame or SequenceSpecials(None, eos, params.special_ids["[PAD]"])
    tgt_frame = params.tgt_frame or SequenceSpecials(bos, eos, params.special_ids["[PAD]"])
    src_head = [] if src_frame.bos is None else [src_frame.bos]
    out, too_long = [], 0
    for row in rows.select(["src_ids", "tgt_ids", "src", "tgt"]).to_pylist():
        src, tgt = (
            [*src_head, *row["src_ids"], src_frame.eos],
            [tgt_frame.bos, *row["tgt_ids"], tgt_frame.eos],
        )
        if len(src) > params.max_src_len or len(tgt) > params.max_tgt_len:
            too_long += 1
            continue
        out.append({"src_ids": src, "tgt_ids": tgt, "src_text": row["src"], "tgt_text": row["tgt"]})
    return _table(out, "translation"), {"too_long_tokens": too_long}


# ------------------------------------------------------------------------------------- classification


def build_classification(rows: pa.Table, params: BuildParams, rng: random.Random) -> Examples:
    """`[CLS] text [SEP]`, the text truncated to seq_len - 2 tokens."""
    cls, sep = params.special_ids["[CLS]"], params.special_ids["[SEP]"]
    keep = params.seq_len - 2
    ids = rows.column("ids").to_pylist()
    table = pa.table(
        {
            "input_ids": pa.array([[cls, *row[:keep], sep] for row in ids], _IDS),
            "label": rows.column("label").cast(pa.int32()),
            "text": rows.column("text"),
        }
    )
    return table, {"truncated": sum(len(row) > keep for row in ids)}


def _table(rows: list[dict], task: str) -> pa.Table:
    schema = BUILDERS[task].schema
    return pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index("sample_id")))


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Builder:
    input_kind: str  # the source row kind it consumes (data_pipeline.config.TASK_INPUTS)
    splits: tuple[str, ...]
    schema: pa.Schema  # shard schema, sample_id first
    token_columns: tuple[str, ...]  # summed for the manifest's token counts
    build: Callable[[list[dict], BuildParams, random.Random], Examples]


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([("sample_id", pa.int64()), *fields])


BUILDERS: dict[str, Builder] = {
    "mlm_nsp": Builder(
        TASK_INPUTS["mlm_nsp"],
        ("train", "validation"),
        _schema(
            ("input_ids", _IDS),
            ("token_type_ids", pa.list_(pa.int8())),
            ("next_sentence_label", pa.int8()),
        ),
        ("input_ids",),
        build_mlm_nsp,
    ),
    "clm": Builder(
        TASK_INPUTS["clm"],
        ("train", "validation"),
        _schema(("input_ids", _IDS)),
        ("input_ids",),
        build_clm,
    ),
    "translation": Builder(
        TASK_INPUTS["translation"],
        ("train", "validation", "test"),
        _schema(
            ("src_ids", _IDS),
            ("tgt_ids", _IDS),
            ("src_text", pa.string()),
            ("tgt_text", pa.string()),
        ),
        ("src_ids", "tgt_ids"),
        build_translation,
    ),
    "classification": Builder(
        TASK_INPUTS["classification"],
        ("train", "validation", "test"),
        _schema(("input_ids", _IDS), ("label", pa.int32()), ("text", pa.string())),
        ("input_ids",),
        build_classification,
    ),
}
