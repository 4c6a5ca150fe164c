from __future__ import annotations

import random

import pyarrow as pa
import pytest

from data_pipeline.errors import DataError
from data_pipeline.examples import BUILDERS, BuildParams, Examples
from data_pipeline.tokenizer import FIXED_SPECIAL_IDS

CLS, SEP, BOS, EOS = 2, 3, 5, 6
SEQ_LEN = 32


def params(**kw: int) -> BuildParams:
    return BuildParams(
        **{"seq_len": SEQ_LEN, "max_src_len": 8, "max_tgt_len": 9, **kw},
        special_ids=FIXED_SPECIAL_IDS,
    )


def build(
    task: str, rows: list[dict], p: BuildParams, seed: int = 0
) -> tuple[list[dict], dict[str, int]]:
    """Run a builder on rows given as dicts (as Arrow, the way prepare() calls it); rows back as dicts."""
    table, counters = BUILDERS[task].build(pa.Table.from_pylist(rows), p, random.Random(seed))
    expected = BUILDERS[task].schema.remove(
        0
    )  # the shard schema less sample_id, which prepare() adds
    assert table.schema.equals(expected), table.schema
    return table.to_pylist(), counters


def synthetic_documents(n_docs: int, seed: int = 0) -> list[dict]:
    """Token = doc * 100_000 + position in the doc, so a test can tell where every token came from."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lengths = [rng.randint(1, 25) for _ in range(rng.randint(1, 12))]
        pos, segments = 0, []
        for length in lengths:
            segments.append([d * 100_000 + pos + i for i in range(length)])
            pos += length
        docs.append({"segments": segments})
    return docs


def _contiguous(tokens: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(tokens, tokens[1:], strict=False))


def test_mlm_nsp_rows_follow_bert() -> None:
    rows, _ = build("mlm_nsp", synthetic_documents(300), params())
    assert len(rows) > 300
    for row in rows:
        ids, types = row["input_ids"], row["token_type_ids"]
        assert len(ids) <= SEQ_LEN and len(types) == len(ids)
        seps = [i for i, t in enumerate(ids) if t == SEP]
        assert ids[0] == CLS and len(seps) == 2 and seps[1] == len(ids) - 1
        a, b = ids[1 : seps[0]], ids[seps[0] + 1 : -1]
        assert a and b and _contiguous(a) and _contiguous(b)  # truncation only trims the ends
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        same_doc = a[0] // 100_000 == b[0] // 100_000
        if row["next_sentence_label"] == 0:  # B is the actual continuation of A
            assert same_doc and b[0] > a[-1]
        else:
            assert not same_doc
    share_random = sum(r["next_sentence_label"] for r in rows) / len(rows)
    assert 0.45 < share_random < 0.55
    lengths = [len(r["input_ids"]) for r in rows]
    assert sum(n == SEQ_LEN for n in lengths) > len(rows) / 2  # most rows are full
    assert sum(n < SEQ_LEN * 0.6 for n in lengths) > 0.03 * len(
        rows
    )  # and some short on purpose (BERT's 10%)


def test_mlm_nsp_uses_most_of_the_text_and_is_seeded() -> None:
    docs = synthetic_documents(100)
    rows, _ = build("mlm_nsp", docs, params())
    assert rows == build("mlm_nsp", docs, params())[0]
    assert rows != build("mlm_nsp", docs, params(), seed=1)[0]
    pairs = (
        (t, typ) for r in rows for t, typ in zip(r["input_ids"], r["token_type_ids"], strict=True)
    )
    used = {t for t, typ in pairs if typ == 0} - {CLS, SEP}  # tokens that appear as segment A
    total = sum(len(s) for d in docs for s in d["segments"])
    assert len(used) > 0.5 * total


def test_mlm_nsp_dupe_factor_cuts_each_document_again_with_fresh_pairs() -> None:
    docs = synthetic_documents(60)
    once, _ = build("mlm_nsp", docs, params())
    thrice, _ = build("mlm_nsp", docs, params(nsp_dupe_factor=3))
    assert 2.5 * len(once) < len(thrice) < 3.5 * len(once)
    distinct = {tuple(r["input_ids"]) for r in thrice}
    assert len(distinct) > 2 * len(once)  # new cuts and new negatives, not three copies of one pass
    share_random = sum(r["next_sentence_label"] for r in thrice) / len(thrice)
    assert 0.45 < share_random < 0.55


def test_mlm_nsp_needs_two_documents() -> None:
    with pytest.raises(DataError, match="at least 2 non-empty documents"):
        build("mlm_nsp", synthetic_documents(1), params())


def test_clm_packs_documents_into_overlapping_blocks() -> None:
    docs = [
        {"ids": list(range(100 * d + 10, 100 * d + 10 + n))} for d, n in enumerate([5, 40, 0, 77])
    ]
    blocks, counters = build("clm", docs, params(seq_len=16))
    stream = [t for d in docs for t in (BOS, *d["ids"], EOS)]
    assert all(len(b["input_ids"]) == 17 for b in blocks)
    assert len(blocks) == (len(stream) - 1) // 16
    joined = blocks[0]["input_ids"] + [t for b in blocks[1:] for t in b["input_ids"][1:]]
    assert joined == stream[: len(joined)]  # each block starts with the previous block's last token
    assert counters["tail_tokens_dropped"] == len(stream) - len(joined)
    assert stream.count(BOS) == 4 and stream.count(EOS) == 4


@pytest.mark.parametrize("n_tokens", [0, 1, 16, 17])
def test_clm_edge_sizes(n_tokens: int) -> None:
    docs = [{"ids": list(range(10, 10 + n_tokens))}] if n_tokens else []
    table = pa.Table.from_pylist(docs, schema=pa.schema([("ids", pa.list_(pa.int32()))]))
    blocks: Examples = BUILDERS["clm"].build(table, params(seq_len=16), random.Random(0))
    stream = [BOS, *range(10, 10 + n_tokens), EOS] if n_tokens else []
    rows = blocks[0].column("input_ids").to_pylist()
    assert rows == [stream[k * 16 : k * 16 + 17] for k in range(max(0, (len(stream) - 1) // 16))]
    assert blocks[1]["tail_tokens_dropped"] == (len(stream) - 1 - 16 * len(rows) if stream else 0)


def test_translation_adds_bos_eos_and_drops_overlong_pairs() -> None:
    rows = [
        {"src_ids": [10, 11], "tgt_ids": [20], "src": "a b", "tgt": "c"},
        {
            "src_ids": list(range(10, 18)),
            "tgt_ids": [20],
            "src": "long",
            "tgt": "c",
        },  # 8 + [EOS] > 8
        {"src_ids": [10], "tgt_ids": list(range(20, 27)), "src": "x", "tgt": "y"},
    ]  # [BOS] 7 [EOS] = 9: fits
    out, counters = build("translation", rows, params())
    assert out == [
        {"src_ids": [10, 11, EOS], "tgt_ids": [BOS, 20, EOS], "src_text": "a b", "tgt_text": "c"},
        {
            "src_ids": [10, EOS],
            "tgt_ids": [BOS, *range(20, 27), EOS],
            "src_text": "x",
            "tgt_text": "y",
        },
    ]
    assert counters == {"too_long_tokens": 1}


def test_classification_wraps_and_truncates() -> None:
    rows = [
        {"ids": [10, 11], "label": 2, "text": "short"},
        {"ids": list(range(100)), "label": 0, "text": "long"},
    ]
    out, counters = build("classification", rows, params(seq_len=8))
    assert out[0] == {"input_ids": [CLS, 10, 11, SEP], "label": 2, "text": "short"}
    assert out[1]["input_ids"] == [CLS, 0, 1, 2, 3, 4, 5, SEP] and counters == {"truncated": 1}


@pytest.mark.parametrize("task", list(BUILDERS))
def test_schemas_match_the_design(task: str) -> None:
    expected = {
        "mlm_nsp": {
            "sample_id": "int64",
            "input_ids": "list<item: int32>",
            "token_type_ids": "list<item: int8>",
            "next_sentence_label": "int8",
        },
        "clm": {"sample_id": "int64", "input_ids": "list<item: int32>"},
        "translation": {
            "sample_id": "int64",
            "src_ids": "list<item: int32>",
            "tgt_ids": "list<item: int32>",
            "src_text": "string",
            "tgt_text": "string",
        },
        "classification": {
            "sample_id": "int64",
            "input_ids": "list<item: int32>",
            "label": "int32",
            "text": "string",
        },
    }[task]
    assert {f.name: str(f.type) for f in BUILDERS[task].schema} == expected
