"""`prepare()` end to end on a tiny built-in sample: the only tests here that start Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from data_pipeline_testlib import write

from data_pipeline import prepare as prepare_module
from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError
from data_pipeline.loader import make_loader
from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest, read_split, sha256_file
from data_pipeline.tokenizer import load_tokenizer

TINY = DataConfig(sample_docs=30, sample_pairs=300, sample_labelled=200, vocab_size=500, seq_len=32,
                  validation_fraction=0.2, test_fraction=0.1, shard_rows=100)


def test_non_empty_output_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray() -> None:
        raise AssertionError("Ray was started for a refused output directory")

    monkeypatch.setattr(prepare_module, "_quiet_ray_data", no_ray)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'out'}: output directory exists and is not empty"):
        prepare(TINY, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    if ray.is_initialized():  # another test module's Ray: use it, leave it running
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_sample_is_complete_deterministic_and_loadable(local_ray: None, tmp_path: Path) -> None:
    messages: list[str] = []
    manifest = prepare(TINY, tmp_path / "a", progress=messages.append)
    (tmp_path / "b").mkdir()  # an existing empty directory is fine
    prepare(TINY, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # byte-identical shards, tokenizer and manifests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # temporary directories renamed away

    assert read_manifest(tmp_path / "a") == manifest
    assert manifest["special_tokens"] == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "[BOS]": 5,
                                          "[EOS]": 6}
    assert manifest["tokenizer"]["sha256"] == sha256_file(tmp_path / "a" / "tokenizer.json")
    assert manifest["vocab_size"] == load_tokenizer(tmp_path / "a" / "tokenizer.json").get_vocab_size() <= 500
    assert manifest["sources"]["documents"]["kept"] == 30 and manifest["sources"]["pairs"]["kept"] == 300
    assert manifest["dropped"]["pairs"] == {"empty": 0, "too_short": 0, "too_long": 0, "duplicate": 0}
    assert manifest["config"]["seq_len"] == 32 and any(m.startswith("tokenizer: trained bpe") for m in messages)

    for task in ("mlm_nsp", "clm", "translation", "classification"):
        task_manifest = read_manifest(tmp_path / "a" / task)
        assert task_manifest["splits"]["train"]["rows"] > 0 and task_manifest["splits"]["validation"]["rows"] > 0
        ids = [i for split in task_manifest["splits"]
               for i in read_split(tmp_path / "a" / task, split, ["sample_id"], verify=True).column(0).to_pylist()]
        assert len(ids) == len(set(ids))  # sample_id unique within the task
        batch = next(iter(make_loader(tmp_path / "a", task, "train", batch_size=4)))
        assert batch["sample_id"].shape == (4,)
    assert set(read_manifest(tmp_path / "a" / "translation")["splits"]) == {"train", "validation", "test"}
    labels = read_manifest(tmp_path / "a" / "classification")["labels"]
    assert labels == ["concurrency", "files", "network", "numbers", "text"]

    # A file source with the sample's tokenizer reused: labels from the file, ids from the loaded vocabulary.
    lines = [f'{{"sentence": "review number {i} was {w}", "label": "{w}"}}' for i in range(40)
             for w in ("good", "bad", "fine")]
    reviews = write(tmp_path / "reviews.jsonl", "\n".join(lines) + "\n" + lines[0] + "\n")
    cfg = DataConfig(source="labelled", paths=[str(reviews)], text_column="sentence", tasks=["classification"],
                     tokenizer_path=str(tmp_path / "a" / "tokenizer.json"))
    files = prepare(cfg, tmp_path / "files")
    assert files["dropped"]["labelled"]["duplicate"] == 1 and files["sources"]["labelled"]["kept"] == 120
    assert files["inputs"]["files"] == [{"path": str(reviews), "bytes": reviews.stat().st_size,
                                         "sha256": sha256_file(reviews)}]
    assert files["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    assert read_manifest(tmp_path / "files" / "classification")["labels"] == ["bad", "fine", "good"]

    # Bad input found inside a Ray task comes back as a DataError naming the file and line.
    bad = write(tmp_path / "pairs.tsv", "one\tun\ntwo\tdeux\tzwei\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: expected 2 tab-separated columns"):
        prepare(DataConfig(source="parallel", paths=[str(bad)], tasks=["translation"]), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "files", "pairs.tsv", "reviews.jsonl"]
