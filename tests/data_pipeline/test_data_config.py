from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.config import DataConfig
from data_pipeline.errors import DataError


def test_defaults_are_valid_and_serialisable() -> None:
    cfg = DataConfig()
    assert cfg.source == "sample" and cfg.tasks == [
        "mlm_nsp",
        "clm",
        "translation",
        "classification",
    ]
    assert cfg.to_dict()["vocab_size"] == 4096
    assert (
        DataConfig(validation_fraction=0).validation_fraction == 0.0
    )  # ints accepted for floats, stored as float
    assert isinstance(DataConfig(validation_fraction=0).validation_fraction, float)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"source": "web"}, "source"),
        ({"tokenizer": "sentencepiece"}, "tokenizer"),
        ({"tasks": ["mlm_nsp", "summarisation"]}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["clm", "clm"]}, "tasks"),
        ({"source": "text", "paths": ["a.txt"], "tasks": ["translation"]}, "tasks"),
        ({"source": "text", "tasks": ["clm"]}, "paths"),
        ({"paths": ["a.txt"]}, "paths"),
        ({"seq_len": 4}, "seq_len"),
        ({"seq_len": "64"}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"paths": "a.txt", "source": "text"}, "paths"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": 0.6, "test_fraction": 0.5}, "validation_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"min_chars": 10, "max_chars": 5}, "max_chars"),
        ({"shard_rows": 0}, "shard_rows"),
        ({"nsp_dupe_factor": 0}, "nsp_dupe_factor"),
        ({"sample_pairs": 20_001}, "sample_pairs"),
        ({"tokenizer_path": 3}, "tokenizer_path"),
        ({"text_column": ""}, "text_column"),
        (
            {"source": "text", "paths": ["a"], "tasks": ["clm"], "text_unit": "paragraph"},
            "text_unit",
        ),
        (
            {
                "source": "text",
                "paths": ["a"],
                "tasks": ["clm"],
                "text_unit": "line",
                "wikitext_headings": True,
            },
            "wikitext_headings",
        ),
        (
            {
                "source": "parallel",
                "paths": ["a", "b"],
                "tasks": ["translation"],
                "wikitext_detokenize": True,
            },
            "wikitext_detokenize",
        ),
        ({"encoding_errors": "ignore"}, "encoding_errors"),
        (
            {"source": "parallel", "paths": ["a"], "tasks": ["translation"], "src_column": "en"},
            "src_column",
        ),
        (
            {
                "source": "parallel",
                "paths": ["a"],
                "tasks": ["translation"],
                "src_column": 1,
                "tgt_column": "en",
            },
            "src_column",
        ),
        (
            {
                "source": "parallel",
                "paths": ["a"],
                "tasks": ["translation"],
                "src_column": -1,
                "tgt_column": 0,
            },
            "src_column",
        ),
        (
            {
                "source": "parallel",
                "paths": ["a"],
                "tasks": ["translation"],
                "src_column": 1,
                "tgt_column": 1,
            },
            "src_column",
        ),
        (
            {
                "source": "parallel",
                "paths": ["a"],
                "tasks": ["translation"],
                "src_column": True,
                "tgt_column": 0,
            },
            "src_column",
        ),
        (
            {
                "source": "hf",
                "hf_name": "d",
                "tasks": ["translation"],
                "src_column": 1,
                "tgt_column": 0,
            },
            "src_column",
        ),
        ({"source": "hf", "tasks": ["clm"]}, "hf_name"),
        ({"source": "hf", "hf_name": "d", "paths": ["a"], "tasks": ["clm"]}, "paths"),
        ({"hf_name": "d"}, "hf_name"),
        ({"source": "hf", "hf_name": "d", "hf_split": "", "tasks": ["clm"]}, "hf_split"),
        ({"labels": []}, "labels"),
        ({"labels": ["a", " a "]}, "labels"),
        ({"labels": [0, 1]}, "labels"),
        ({"labels": ["a", "b"], "tasks": ["clm"]}, "labels"),
    ],
)
def test_bad_values_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(DataError, match=rf"^{key}: "):
        DataConfig(**kwargs)


def test_char_and_wordpiece_accept_small_vocabularies() -> None:
    assert DataConfig(tokenizer="char", vocab_size=100).vocab_size == 100
    with pytest.raises(DataError, match="vocab_size"):
        DataConfig(tokenizer="bpe", vocab_size=200)  # below 256 bytes + 7 special tokens


def test_input_keys_have_useful_defaults() -> None:
    cfg = DataConfig(
        source="labelled", paths=["x.tsv"], tasks=["classification"], labels=["neg ", "pos"]
    )
    assert cfg.labels == [
        "neg",
        "pos",
    ]  # spaces normalised the way cleaning normalises labels in the data
    assert (cfg.text_unit, cfg.wikitext_headings, cfg.encoding_errors, cfg.hf_split) == (
        "block",
        False,
        "strict",
        "train",
    )
    assert DataConfig(source="hf", hf_name="some/dir", tasks=["clm", "mlm_nsp"]).row_kinds() == [
        "documents"
    ]


def test_column_indices_for_header_less_parallel_files() -> None:
    cfg = DataConfig(
        source="parallel", paths=["en-ko.tsv"], tasks=["translation"], src_column=1, tgt_column=0
    )
    assert (cfg.src_column, cfg.tgt_column) == (1, 0)
    assert cfg.to_dict()["src_column"] == 1  # the manifest records the index


def test_column_indices_load_from_yaml_and_overrides(tmp_path: Path) -> None:
    from cluster.config import load_config
    from cluster.jobs import PrepareJob
    from data_pipeline.configlib import ConfigError

    path = tmp_path / "data.yaml"
    path.write_text(
        "data:\n  source: parallel\n  paths: [en-ko.tsv]\n  tasks: [translation]\n"
        "  src_column: 1\n  tgt_column: 0\n"
    )
    cfg = load_config(PrepareJob, path, [])
    assert (cfg.data.src_column, cfg.data.tgt_column) == (1, 0)
    names = load_config(PrepareJob, path, ["data.src_column=ko", "data.tgt_column=en"]).data
    assert (names.src_column, names.tgt_column) == ("ko", "en")
    with pytest.raises(
        ConfigError, match=r"src_column: give both columns as header names or both as 0-based"
    ):
        load_config(PrepareJob, path, ["data.src_column=ko"])


def test_config_names_match_the_code_that_reads_them() -> None:
    """config.py is the bottom of the data pipeline (no Ray, no readers), so it holds the names."""
    from typing import get_args

    from data_pipeline.config import SOURCE_KINDS, TASK_INPUTS, Source, Task, TokenizerKind
    from data_pipeline.examples import BUILDERS
    from data_pipeline.sources import SOURCES
    from data_pipeline.tokenizer import TOKENIZER_KINDS

    assert list(get_args(Source)) == list(SOURCE_KINDS) == list(SOURCES)
    assert list(get_args(Task)) == list(TASK_INPUTS) == list(BUILDERS)
    assert {task: b.input_kind for task, b in BUILDERS.items()} == TASK_INPUTS
    assert list(get_args(TokenizerKind)) == list(TOKENIZER_KINDS)


def test_building_a_data_config_imports_neither_ray_nor_torch() -> None:
    import subprocess
    import sys

    heavy = ("ray", "torch", "data_pipeline.sources", "data_pipeline.readers")
    code = (
        "import sys; from data_pipeline.config import DataConfig; DataConfig(); "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout
    assert out.strip() == "[]"
