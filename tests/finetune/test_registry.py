"""The architecture registry: one entry in `finetune.models.ARCHITECTURES` is all a new architecture
needs to be configured, trained, checkpointed and decoded (docs/design.md, "Adding an
architecture"); and every list of architectures elsewhere agrees with the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import pytest
import torch
from kiln_testlib import SPECIALS, word_tokenizer
from torch import Tensor, nn

from cluster.config import load_config
from cluster.jobs import (
    FinetuneJob,
    FinetuneTask,
    PretrainTask,
    pretrain_family,
    pretraining_models,
    scratch_models,
)
from cluster.tasks import TASKS, preflight
from data_pipeline.configlib import ConfigError, check_fields, choices
from data_pipeline.examples import BUILDERS
from data_pipeline.shards import write_json, write_task
from finetune.decode import beam_search, greedy_decode
from finetune.flops import FLOPS
from finetune.models import (
    ARCHITECTURES,
    CLASSIFICATION_ARCHES,
    TRANSLATION_ARCHES,
    ArchSpec,
    load_finetuned,
)
from pretrain.checkpoint import save_checkpoint
from pretrain.hf_export import HF_FAMILIES

WORDS = ["one", "two", "three", "un", "deux", "trois"]
BOS, EOS = 5, 6


# ---------------------------------------------------------------- a throw-away architecture
@dataclass
class ToyConfig:
    arch: Literal["toy"] = "toy"
    vocab_size: int = 16  # set from the data's tokenizer, as every from-scratch model's
    pad_id: int = 0
    width: int = 8

    def __post_init__(self) -> None:
        check_fields(self)


class ToySeq2Seq(nn.Module):
    """Mean source embedding + the previous target token's embedding -> the next token's logits."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.out = nn.Linear(config.width, config.vocab_size)

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        mask = src_mask.unsqueeze(-1).float()  # (B,S,1)
        return (self.embed(src_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B,W)

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor) -> Tensor:
        return self.out(self.embed(tgt_in) + self.encode(src_ids, src_mask)[:, None])  # (B,U,V)

    def decode_step(
        self, tgt_ids: Tensor, memory: Tensor, *, src_mask: Tensor, cache: Any
    ) -> tuple[Tensor, Any]:
        return self.out(self.embed(tgt_ids[:, -1]) + memory), None  # (N,V); nothing to cache

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return cache


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> ArchSpec:
    """The one place a new architecture is registered."""
    spec = ArchSpec("toy", ToyConfig, ToySeq2Seq, task="translation")
    monkeypatch.setitem(ARCHITECTURES, "toy", spec)
    return spec


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A prepared translation task (English words -> French words) of 24 + 8 + 8 rows."""
    tok, root = word_tokenizer(WORDS), tmp_path / "data"
    rows = []
    for i in range(40):
        src = " ".join(WORDS[(i + j) % 3] for j in range(1 + i % 3))
        tgt = " ".join(WORDS[3 + WORDS.index(w)] for w in src.split())
        rows.append(
            {
                "sample_id": i,
                "src_ids": [*tok.encode(src).ids, EOS],
                "tgt_ids": [BOS, *tok.encode(tgt).ids, EOS],
                "src_text": src,
                "tgt_text": tgt,
            }
        )
    builder = BUILDERS["translation"]
    splits = {"train": rows[:24], "validation": rows[24:32], "test": rows[32:]}
    write_task(
        root / "translation", "translation", builder.schema, splits, 16, builder.token_columns
    )
    write_json(
        root / "manifest.json",
        {
            "tasks": {"translation": {}},
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {t: i for i, t in enumerate(SPECIALS)},
            "config": {"max_src_len": 8, "max_tgt_len": 8},
        },
    )
    tok.save(str(root / "tokenizer.json"))
    return root


def test_a_registered_architecture_configures_trains_and_decodes(
    toy_registered: ArchSpec, data_dir: Path, tmp_path: Path
) -> None:
    job = load_config(
        FinetuneJob,
        None,
        [
            f"data_dir={data_dir}",
            "model.arch=toy",
            "model.width=12",
            "trainer.batch_size=4",
            "trainer.max_steps=2",
            "cluster.num_workers=1",
        ],
    )
    assert isinstance(job.model, ToyConfig) and job.model.width == 12
    job = preflight(job, tmp_path / "run")
    torch.manual_seed(0)
    parts = TASKS["translation"](job, 0, 1)
    model = parts.module.model
    assert (
        isinstance(model, ToySeq2Seq) and model.config.vocab_size == len(WORDS) + 7
    )  # the data's vocabulary
    before = model.out.weight.detach().clone()
    opt, losses = torch.optim.AdamW(model.parameters(), lr=1e-2), []
    for _, batch in zip(range(2), parts.train_loader, strict=False):  # two training steps
        loss = parts.module.compute(batch, "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert not torch.equal(model.out.weight, before)

    ckpt = save_checkpoint(
        tmp_path / "ckpt", model, parts.model_config, data_dir / "tokenizer.json"
    )
    loaded = load_finetuned(ckpt).model.eval()  # the checkpoint's arch is found in the registry too
    src = torch.tensor([[7, 8, EOS], [9, EOS, 0]])
    mask = (torch.arange(3) < torch.tensor([[3], [2]])).long()
    greedy = greedy_decode(loaded, src, mask, BOS, EOS, max_len=5)
    beams = beam_search(loaded, src, mask, BOS, EOS, max_len=5, beam_size=2)
    assert len(greedy) == len(beams) == 2
    assert all(0 <= t < loaded.config.vocab_size for hyps in beams for t in hyps[0].tokens)


def test_an_unregistered_architecture_is_refused_by_name() -> None:
    with pytest.raises(
        ConfigError, match=r"'model.arch': unknown architecture 'toy' \(choose from transformer"
    ):
        load_config(FinetuneJob, None, ["model.arch=toy"])


# ---------------------------------------------------------------- lists derived from the registry
def test_every_entry_names_its_config_arch_and_a_known_task() -> None:
    for name, spec in ARCHITECTURES.items():
        assert spec.name == name
        assert name in choices(spec.config, "arch"), (
            f"{spec.config.__name__}.arch does not allow {name!r}"
        )


def test_the_derived_lists() -> None:
    assert [pretrain_family(task) for task in get_args(PretrainTask)] == ["bert", "gpt"]
    assert list(pretraining_models()) == ["bert", "gpt"]
    assert {spec.task for spec in ARCHITECTURES.values()} == {
        *get_args(PretrainTask),
        *get_args(FinetuneTask),
        "lm",
    }
    assert TRANSLATION_ARCHES == (
        "seq2seq_warm",
        "transformer",
        "lstm",
        "lstm_attention",
        "convs2s",
    )
    assert CLASSIFICATION_ARCHES == ("bert_classifier", "gpt_classifier", "lstm_classifier")
    assert list(scratch_models()) == [
        "transformer",
        "lstm",
        "lstm_attention",
        "convs2s",
        "lstm_classifier",
    ]


def test_tables_keyed_by_arch_name_registered_architectures() -> None:
    """The HF export and the FLOP counts exist for some architectures only, keyed by registered
    names."""
    assert set(HF_FAMILIES) <= set(ARCHITECTURES)
    assert set(FLOPS) <= set(ARCHITECTURES)
