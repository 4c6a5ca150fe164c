"""Loss curves and the loss-fell check read Lightning's CSV metrics (rows with gaps)."""

from __future__ import annotations

from pathlib import Path

from cluster.report import loss_drop, plot_curves, read_series


def write_csv(path: Path, losses: list[float]) -> Path:
    rows = ["epoch,step,train/loss,val/loss"]
    rows += [f"0,{i},{v}," for i, v in enumerate(losses)]
    rows.append(f"0,{len(losses)},,{losses[-1]}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_series_skip_gaps(tmp_path: Path) -> None:
    series = read_series(write_csv(tmp_path / "m.csv", [3.0, 2.0, 1.0]))
    assert series["train/loss"] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert series["val/loss"] == [(3, 1.0)]


def test_loss_drop_windows_never_overlap(tmp_path: Path) -> None:
    assert loss_drop(write_csv(tmp_path / "a.csv", [5.0, 4.0])) == (5.0, 4.0)
    first, last = loss_drop(
        write_csv(tmp_path / "b.csv", [float(10 - i) for i in range(10)]), window=5
    )
    assert (first, last) == (8.0, 3.0)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    png = plot_curves(write_csv(tmp_path / "m.csv", [3.0, 2.0, 1.0]), tmp_path / "c.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _mlm_nsp_dir(
    tmp_path: Path, train: list[list[int]], val: list[list[int]], nsp: list[int]
) -> Path:
    """A prepared-data directory with what pretrain_chance reads: manifest, tokenizer, shards."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "the": 3, "cat": 4, "sat": 5}
    Tokenizer(WordLevel(vocab, unk_token="[PAD]")).save(str(tmp_path / "tokenizer.json"))
    manifest = {"vocab_size": len(vocab), "special_tokens": {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for split, rows, labels in (("train", train, [0] * len(train)), ("validation", val, nsp)):
        (tmp_path / "mlm_nsp" / split).mkdir(parents=True)
        table = pa.table(
            {
                "input_ids": pa.array(rows, pa.list_(pa.int32())),
                "next_sentence_label": pa.array(labels, pa.int8()),
            }
        )
        pq.write_table(table, tmp_path / "mlm_nsp" / split / "part-0.parquet")
    return tmp_path


def test_pretrain_chance_is_the_unigram_guess_and_the_commoner_nsp_label(tmp_path: Path) -> None:
    from cluster.report import pretrain_chance

    # "cat" is the training split's commonest token though [CLS]/[SEP] are commoner: specials are
    # never masked
    train = [[1, 4, 4, 3, 2, 5, 2], [1, 4, 2, 2]]
    val = [[1, 4, 3, 2, 5, 2], [1, 3, 2, 4, 2], [1, 5, 2, 5, 2], [1, 3, 2, 3, 2]]  # 9 maskable
    chance = pretrain_chance(_mlm_nsp_dir(tmp_path, train, val, nsp=[1, 1, 0, 1]))
    assert chance.unigram_token == "cat"
    assert chance.unigram_accuracy == 2 / 9
    assert chance.nsp_chance == 0.75
    assert chance.nsp_pairs == 4


def test_report_says_plainly_whether_bert_learned_and_the_classifier_beat_its_baselines() -> None:
    from cluster.quickstart import _bert_verdict, _classification_verdict

    bert = {
        "mlm_acc": 0.25,
        "unigram_accuracy": 0.04,
        "unigram_token": "the",
        "nsp_acc": 0.8,
        "nsp_chance": 0.5,
        "nsp_pairs": 400,
    }
    assert _bert_verdict(bert).startswith("BERT learned")
    assert "0.250" in _bert_verdict(bert) and "0.040" in _bert_verdict(bert)
    assert _bert_verdict({**bert, "nsp_acc": 0.53}).startswith("BERT did not clearly learn")
    assert _bert_verdict({**bert, "mlm_acc": 0.07}).startswith("BERT did not clearly learn")
    # 0.57 on 400 pairs is 2.8 standard errors above 0.5: could be luck; on 2,000 pairs it is not
    assert _bert_verdict({**bert, "nsp_acc": 0.57}).startswith("BERT did not clearly learn")
    assert _bert_verdict({**bert, "nsp_acc": 0.57, "nsp_pairs": 2000}).startswith("BERT learned")
    cl = {
        "accuracy": 0.9,
        "bow_accuracy": 0.8,
        "split_majority_rate": 0.3,
        "uniform_chance": 0.2,
        "examples": 70,
    }
    assert "better than the bag-of-words" in _classification_verdict(cl)
    assert "NOT better than" in _classification_verdict({**cl, "accuracy": 0.7})
    assert "NOT above the best any constant" in _classification_verdict({**cl, "accuracy": 0.25})
