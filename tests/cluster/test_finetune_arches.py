"""Every fine-tuning architecture through the path `kiln finetune` takes, minus Ray: config from YAML-style
overrides → the task registry's model and loaders → training steps → a Kiln checkpoint → `kiln evaluate`'s
scoring. The models' own behaviour (caches, overfitting, attention) is tested in tests/finetune/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from cluster.config import load_config
from cluster.evaluation import evaluate_checkpoint
from cluster.jobs import DecodeConfig, FinetuneJob
from cluster.tasks import TASKS, count_parameters, preflight
from data_pipeline.configlib import ConfigError
from data_pipeline.examples import BUILDERS
from data_pipeline.shards import write_json, write_task
from finetune.models import load_finetuned
from pretrain.checkpoint import CheckpointError, save_checkpoint
from pretrain.models.meta import num_parameters

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]
WORDS = ["one", "two", "three", "four", "five", "un", "deux", "trois", "quatre", "cinq"]
EN_FR = dict(zip(WORDS[:5], WORDS[5:], strict=True))


def tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


def pairs(n: int, start: int) -> list[dict]:
    tok, rows = tokenizer(), []
    for i in range(start, start + n):
        src = " ".join(WORDS[(i * 7 + j) % 5] for j in range(1 + i % 4))
        tgt = " ".join(EN_FR[w] for w in src.split())
        rows.append(
            {
                "sample_id": i,
                "src_ids": tok.encode(src).ids + [6],
                "tgt_ids": [5, *tok.encode(tgt).ids, 6],
                "src_text": src,
                "tgt_text": tgt,
            }
        )
    return rows


def labelled(n: int, start: int) -> list[dict]:
    tok, rows = tokenizer(), []
    for i in range(start, start + n):
        label = i % 2
        text = " ".join(
            WORDS[label * 5 + (i + j) % 5] for j in range(2 + i % 3)
        )  # English or French words
        rows.append(
            {
                "sample_id": i,
                "input_ids": [2, *tok.encode(text).ids, 3],
                "label": label,
                "text": text,
            }
        )
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for task, make, extra in (
        ("translation", pairs, None),
        ("classification", labelled, {"labels": ["en", "fr"]}),
    ):
        builder = BUILDERS[task]
        splits = {"train": make(40, 0), "validation": make(8, 40), "test": make(8, 48)}
        write_task(root / task, task, builder.schema, splits, 16, builder.token_columns, extra)
    tok = tokenizer()
    write_json(
        root / "manifest.json",
        {
            "tasks": {"translation": {}, "classification": {}},
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {t: i for i, t in enumerate(SPECIALS)},
            "config": {"max_src_len": 16, "max_tgt_len": 16},
        },
    )
    tok.save(str(root / "tokenizer.json"))
    return root


ARCHES = [
    ("translation", ["model.arch=transformer", "model.preset=tiny", "model.max_positions=32"]),
    ("translation", ["model.arch=lstm", "model.preset=tiny"]),
    ("translation", ["model.arch=lstm_attention", "model.attention=bahdanau", "model.preset=tiny"]),
    (
        "translation",
        ["model.arch=lstm_attention", "model.attention=luong_general", "model.preset=tiny"],
    ),
    ("translation", ["model.arch=convs2s", "model.preset=tiny", "model.max_positions=32"]),
    ("classification", ["model.arch=lstm_classifier", "model.preset=tiny"]),
]


@pytest.mark.parametrize(
    ("task", "overrides"),
    ARCHES,
    ids=[o[0].split("=")[1] + o[1][-1] for o in [(a[1][0], a[1][1:]) for a in ARCHES]],
)
def test_scratch_arch_trains_saves_and_evaluates(
    data_dir: Path, tmp_path: Path, task: str, overrides: list[str]
) -> None:
    job = load_config(
        FinetuneJob,
        None,
        [
            f"data_dir={data_dir}",
            f"task={task}",
            "trainer.batch_size=8",
            "trainer.max_steps=30",
            "optim.lr=3e-3",
            "optim.warmup_steps=0",
            *overrides,
        ],
    )
    job = preflight(job, tmp_path / "run")
    torch.manual_seed(0)
    parts = TASKS[task](job, 0, 1)
    assert parts.model_config.vocab_size == len(SPECIALS) + len(WORDS)
    # the disk-space check sizes the model on the meta device: the same count as the real one
    assert count_parameters(job) == num_parameters(parts.module.model)
    opt = torch.optim.AdamW(parts.module.model.parameters(), lr=3e-3)
    losses = []
    for _, batch in zip(range(30), iter_forever(parts.train_loader), strict=False):
        loss = parts.module.compute(batch, "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    ckpt = save_checkpoint(
        tmp_path / "ckpt", parts.module.model, parts.model_config, data_dir / "tokenizer.json"
    )
    loaded = load_finetuned(ckpt)
    assert (
        type(loaded.model) is type(parts.module.model) and loaded.model_config == parts.model_config
    )
    metrics = evaluate_checkpoint(
        ckpt, data_dir, "test", DecodeConfig(beam_size=2, max_len=8), tmp_path / "eval"
    )
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()
    assert ("bleu" in metrics) == (task == "translation") and ("accuracy" in metrics) == (
        task == "classification"
    )


def iter_forever(loader: object) -> object:
    while True:
        yield from loader  # type: ignore[misc]


def test_config_errors_name_the_key(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model.arch': unknown architecture 'gru'"):
        load_config(FinetuneJob, None, ["model.arch=gru"])
    with pytest.raises(
        ConfigError, match=r"'model.arch': 'lstm_classifier' is a classification model"
    ):
        load_config(FinetuneJob, None, ["task=translation", "model.arch=lstm_classifier"])
    with pytest.raises(
        ConfigError, match=r"'encoder_checkpoint': model.arch=transformer trains from scratch"
    ):
        load_config(FinetuneJob, None, ["model.arch=transformer", "encoder_checkpoint=runs/bert"])
    short = load_config(
        FinetuneJob,
        None,
        [
            f"data_dir={data_dir}",
            "model.arch=transformer",
            "model.preset=tiny",
            "model.max_positions=8",
        ],
    )
    with pytest.raises(
        CheckpointError, match=r"'model.max_positions' \(8\) < the data's longest sequence \(16"
    ):
        preflight(short)


def test_classifier_pooling_reaches_the_bert_classifier_and_its_checkpoint(
    data_dir: Path, tmp_path: Path
) -> None:
    from data_pipeline.configlib import from_preset
    from pretrain.models.bert import BertConfig, BertForPreTraining

    config = from_preset(BertConfig, "tiny", vocab_size=len(SPECIALS) + len(WORDS))
    bert = save_checkpoint(
        tmp_path / "bert", BertForPreTraining(config), config, data_dir / "tokenizer.json"
    )
    base = [
        f"data_dir={data_dir}",
        "task=classification",
        f"encoder_checkpoint={bert}",
        "trainer.batch_size=8",
    ]
    for pooling, pooler_trains in (("cls", True), ("mean", False)):
        job = preflight(
            load_config(FinetuneJob, None, [*base, f"classifier_pooling={pooling}"]),
            tmp_path / f"run-{pooling}",
        )
        model = TASKS["classification"](job, 0, 1).module.model
        assert model.config.pooling == pooling
        assert all(p.requires_grad == pooler_trains for p in model.bert.pooler.parameters())
        ckpt = save_checkpoint(tmp_path / f"clf-{pooling}", model, model.config)
        assert load_finetuned(ckpt).model.config.pooling == pooling


def test_classifier_pooling_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'classifier_pooling'"):
        load_config(FinetuneJob, None, ["task=classification", "classifier_pooling=max"])
    for overrides in (
        ["task=translation", "encoder_checkpoint=runs/bert"],
        ["task=classification", "decoder_checkpoint=runs/gpt"],
        ["task=classification", "model.arch=lstm_classifier"],
    ):
        with pytest.raises(
            ConfigError, match=r"'classifier_pooling': mean applies to a BERT classifier only"
        ):
            load_config(FinetuneJob, None, [*overrides, "classifier_pooling=mean"])
