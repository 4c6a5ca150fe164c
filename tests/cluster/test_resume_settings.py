"""Exact resume without Ray: a single-process Lightning run with KilnCheckpoint, restored through KilnCheckpointIO,
ends bitwise where an uninterrupted run ends; plus the checks around it (which checkpoint, which config, metrics)."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

from cluster.callbacks import KilnCheckpoint, KilnCheckpointIO, StopOnRequest
from cluster.config import load_config
from cluster.jobs import PretrainJob
from cluster.resume import (
    check_resume,
    lightning_checkpoint,
    rank_state,
    restore_metrics,
    resume_checkpoint,
    stash_metrics,
)
from cluster.rundir import prepare_run_dir, run_dir
from data_pipeline.configlib import ConfigError, to_dict
from pretrain.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.models.bert import BertConfig
from pretrain.module import BertPretrainModule
from pretrain.optim import OptimConfig

V, BATCHES_PER_EPOCH = 48, 4
CFG = BertConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=16,
)  # dropout stays at 0.1: the resumed RNG stream must match too
# Constant after warmup: the k-step run's schedule then agrees with the N-step run's on their common steps.
OPTIM = OptimConfig(warmup_steps=2, schedule="constant")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Module-wide, so the module-scoped reference run uses the same thread count (and float sums) as the tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BatchLoader:
    """ShardLoader's contract in miniature: `len()` batches per epoch, a batch counts as served once handed out,
    state (epoch, batches served); each batch is a function of (epoch, index) only."""

    def __init__(self) -> None:
        self.epoch, self.served = 0, 0

    def __len__(self) -> int:
        return BATCHES_PER_EPOCH

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.served >= len(self):
            self.epoch, self.served = self.epoch + 1, 0
        while self.served < len(self):
            batch = make_batch(self.epoch, self.served)
            self.served += 1
            yield batch
        self.epoch, self.served = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.served = state["epoch"], state["served"]


def make_batch(epoch: int, index: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1000 * epoch + index)
    ids = torch.randint(7, V, (4, 12), generator=gen)
    ids[:, 0], ids[:, 11] = 2, 3
    mask = torch.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = 0, 0
    labels = torch.full_like(ids, -100)
    labels[:, 2], labels[:, 7] = ids[:, 2], ids[:, 7]
    ids[:, 2], ids[:, 7] = 4, 4
    return {
        "input_ids": ids,
        "token_type_ids": (torch.arange(12) >= 6).long().expand(4, 12).contiguous(),
        "attention_mask": mask,
        "mlm_labels": labels,
        "next_sentence_label": torch.randint(0, 2, (4,), generator=gen),
        "sample_id": torch.arange(4),
    }


def train(
    root: Path, max_steps: int, resume: bool, init_seed: int = 0, stop_at: int | None = None
) -> tuple[pl.Trainer, KilnCheckpoint]:
    """One run writing checkpoints under root; with resume, continuing from the newest one there; with stop_at,
    a stop is requested (cluster/preemption.py) during that step."""
    torch.manual_seed(init_seed)
    module = BertPretrainModule(CFG, OPTIM, max_steps)
    loader = BatchLoader()
    checkpoint = KilnCheckpoint(root, CFG, None, {}, None, every=0, keep_last=5, loader=loader)
    callbacks: list[pl.Callback] = [checkpoint]
    if stop_at is not None:
        stop_file = root.parent / "STOP"
        callbacks += [StopOnRequest(stop_file, checkpoint), RequestStopAt(stop_file, stop_at)]
    resume_from = resume_checkpoint(root, "auto" if resume else "never")
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        limit_val_batches=0,
        plugins=[KilnCheckpointIO()] if resume_from else None,
    )
    torch.manual_seed(
        123
    )  # the RNG dropout draws from; a resumed run must replace it with the saved one
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*")
        trainer.fit(
            module, train_dataloaders=loader, ckpt_path=str(resume_from) if resume_from else None
        )
    return trainer, checkpoint


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tensor]:
    _, checkpoint = train(tmp_path_factory.mktemp("full"), 7, resume=False)
    return load_checkpoint(checkpoint.last_saved).state_dict


# k=3: mid-epoch; k=4: the checkpoint is the epoch's last batch, so the resume starts the loader's next epoch.
@pytest.mark.parametrize("k", [3, 4])
def test_resumed_run_ends_bitwise_equal_to_uninterrupted(
    tmp_path: Path, uninterrupted: dict[str, Tensor], k: int
) -> None:
    first, _ = train(tmp_path, k, resume=False)
    assert first.global_step == k and latest_checkpoint(tmp_path).name == f"step-{k:07d}"
    second, checkpoint = train(
        tmp_path, 7, resume=True, init_seed=99
    )  # other init: the weights must come back
    assert second.global_step == 7 and checkpoint.last_saved.name == "step-0000007"
    # The schedule keeps this run's total (7), not the interrupted run's (k).
    assert second.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 7
    resumed = load_checkpoint(checkpoint.last_saved).state_dict
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_resume_without_restoring_rng_diverges(
    tmp_path: Path, uninterrupted: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bitwise test above can fail: drop the saved RNG and dropout draws other masks."""
    train(tmp_path, 3, resume=False)
    monkeypatch.setattr(KilnCheckpoint, "on_load_checkpoint", lambda *args: None)
    _, checkpoint = train(tmp_path, 7, resume=True)
    resumed = load_checkpoint(checkpoint.last_saved).state_dict
    assert not all(torch.equal(resumed[n], t) for n, t in uninterrupted.items())


class RequestStopAt(pl.Callback):
    """What the driver's SIGTERM handler does (cluster/preemption.py), during the given step."""

    def __init__(self, stop_file: Path, step: int) -> None:
        self.stop_file, self.step = stop_file, step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step + 1 == self.step:
            self.stop_file.write_text("SIGTERM")


def stopper(trainer: pl.Trainer) -> StopOnRequest:
    return next(c for c in trainer.callbacks if isinstance(c, StopOnRequest))


def test_a_preempted_run_checkpoints_where_it_stops_and_resumes_bitwise(
    tmp_path: Path, uninterrupted: dict[str, Tensor]
) -> None:
    first, checkpoint = train(tmp_path / "ckpt", 7, resume=False, stop_at=3)
    # The request came during step 3 (every=0: no scheduled save before the last step), so the run stopped after
    # step 3 with that step's checkpoint instead of going on to max_steps.
    assert first.global_step == 3 and stopper(first).stopped_at == [3]
    assert checkpoint.last_saved == tmp_path / "ckpt" / "step-0000003"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-0000003"]
    (tmp_path / "STOP").unlink()  # run_training clears a stale request before a run starts
    second, checkpoint = train(tmp_path / "ckpt", 7, resume=True, init_seed=99)
    assert second.global_step == 7
    resumed = load_checkpoint(checkpoint.last_saved).state_dict
    assert [name for name, t in uninterrupted.items() if not torch.equal(resumed[name], t)] == []


def test_a_stop_request_during_the_last_step_is_a_normal_end(tmp_path: Path) -> None:
    trainer, checkpoint = train(tmp_path / "ckpt", 5, resume=False, stop_at=5)
    assert (
        trainer.global_step == 5 and stopper(trainer).stopped_at is None
    )  # not reported as preempted
    assert checkpoint.last_saved == tmp_path / "ckpt" / "step-0000005"


def test_resume_picks_newest_complete_checkpoint(tmp_path: Path) -> None:
    train(tmp_path, 2, resume=False)
    good = tmp_path / "step-0000002"
    tmp = tmp_path / ".tmp-step-0000009"  # a save killed before its rename
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    half = tmp_path / "step-0000010"  # a directory whose manifest was never written
    half.mkdir()
    (half / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    assert resume_checkpoint(tmp_path, "auto") == good
    assert resume_checkpoint(tmp_path, "never") is None
    assert resume_checkpoint(tmp_path / "absent", "auto") is None


def test_checkpoint_without_resume_state_is_refused_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = BertPretrainModule(CFG, OPTIM, 5)
    path = save_checkpoint(
        tmp_path / "step-0000005", module.model, CFG, trainer_state={"step": 5, "epoch": 0}
    )
    with pytest.raises(CheckpointError, match=r"step-0000005.*lacks \['optimizer', 'scheduler'"):
        lightning_checkpoint(path)


def test_resume_with_another_worker_count_keeps_the_streams_that_exist() -> None:
    """Elastic resume: old rank r's RNG goes to new rank r; a new rank keeps its fresh seed; the
    validation loader's state (identical on every rank) goes to every rank."""
    saved = {"kiln_rng_per_rank": [{"rank": 0}, {"rank": 1}], "kiln_val_loader": {"passes": 3}}
    assert rank_state(saved, world_size=1, rank=0) == ({"rank": 0}, {"passes": 3})
    grown = {**saved, "kiln_rng_per_rank": [{"rank": 0}]}
    assert rank_state(grown, world_size=2, rank=0) == ({"rank": 0}, {"passes": 3})
    assert rank_state(grown, world_size=2, rank=1) == (None, {"passes": 3})
    assert rank_state({}, world_size=2, rank=1) == (None, None)


def _job(*overrides: str) -> PretrainJob:
    return load_config(
        PretrainJob,
        None,
        ["data_dir=/nonexistent", "model.preset=tiny", "trainer.resume=auto", *overrides],
    )


def test_driver_refuses_resume_it_cannot_do_exactly(tmp_path: Path) -> None:
    job = _job()
    assert check_resume(job, tmp_path) is None  # nothing to resume: a fresh start
    torch.manual_seed(0)
    model = BertPretrainModule(CFG, OPTIM, 5).model
    save_checkpoint(
        tmp_path / "checkpoints" / "step-0000005",
        model,
        CFG,
        job_config=to_dict(job),
        trainer_state={"step": 5},
    )
    assert check_resume(job, tmp_path) == tmp_path / "checkpoints" / "step-0000005"
    with pytest.raises(ConfigError, match="cluster.strategy=deepspeed_stage_2"):
        check_resume(_job("cluster.strategy=deepspeed_stage_2"), tmp_path)
    with pytest.raises(
        ConfigError, match=r"different 'model' \(num_hidden_layers: 2 then, 3 now\)"
    ):
        check_resume(_job("model.num_hidden_layers=3"), tmp_path)
    assert check_resume(_job("trainer.resume=never", "model.num_hidden_layers=3"), tmp_path) is None


def test_driver_refuses_resume_with_another_pretrained_lr_ratio(tmp_path: Path) -> None:
    """The restored optimizer state fixes each group's lr: another ratio would not apply (or not load)."""
    job = _job()
    saved = to_dict(job)
    saved["optim"]["pretrained_lr_ratio"] = (
        0.1  # as a warm-started fine-tune would have recorded it
    )
    torch.manual_seed(0)
    model = BertPretrainModule(CFG, OPTIM, 5).model
    ckpt = tmp_path / "checkpoints" / "step-0000005"
    save_checkpoint(ckpt, model, CFG, job_config=saved, trainer_state={"step": 5})
    with pytest.raises(ConfigError, match=r"optim.pretrained_lr_ratio=0.1, not 1:"):
        check_resume(job, tmp_path)


def test_driver_refuses_resume_with_another_nsp_weight(tmp_path: Path) -> None:
    """nsp_weight is the objective: changing it midway is continued pretraining (init_from), not a resume."""
    torch.manual_seed(0)
    model = BertPretrainModule(CFG, OPTIM, 5).model
    ckpt = tmp_path / "checkpoints" / "step-0000005"
    save_checkpoint(
        ckpt, model, CFG, job_config=to_dict(_job("nsp_weight=0")), trainer_state={"step": 5}
    )
    with pytest.raises(ConfigError, match=r"nsp_weight=0, not 1: it weights NSP in the loss"):
        check_resume(_job(), tmp_path)
    assert check_resume(_job("nsp_weight=0"), tmp_path) == ckpt
    older = to_dict(_job())
    del older["nsp_weight"]  # a checkpoint from before the key: trained at 1
    newer = tmp_path / "checkpoints" / "step-0000006"
    save_checkpoint(newer, model, CFG, job_config=older, trainer_state={"step": 6})
    assert check_resume(_job(), tmp_path) == newer


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "trainer.resume",
            "sometimes",
            r"'trainer.resume' must be one of \['never', 'auto'\], got 'sometimes'",
        ),
        ("trainer.peak_flops", "0", "'peak_flops' must be > 0"),
    ],
)
def test_trainer_config_validates_resume_and_peak(key: str, value: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(PretrainJob, None, [f"{key}={value}"])


def _write_csv(file: Path, rows: list[dict[str, Any]]) -> None:
    fields = sorted({k for r in rows for k in r})
    with open(file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_metrics_before_the_checkpoint_survive_a_resume(tmp_path: Path) -> None:
    """Rows logged after the checkpoint are redone by the resumed run; those before it are kept in front."""
    _write_csv(
        tmp_path / "metrics.csv",
        [{"epoch": 0, "step": s, "train/loss": 10 - s} for s in range(8)]
        + [{"epoch": 0, "step": 3, "val/loss": 5.5}],
    )
    stash_metrics(tmp_path, 4)
    assert not (tmp_path / "metrics.csv").exists()  # Lightning's CSV logger would delete it anyway
    _write_csv(
        tmp_path / "metrics.csv",
        [{"epoch": 0, "step": s, "train/loss": 1.0, "train/mfu": 0.5} for s in range(4, 7)],
    )
    restore_metrics(tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 3, 4, 5, 6]
    assert (
        rows[4]["val/loss"] == "5.5"
        and rows[0]["train/mfu"] == ""
        and rows[-1]["train/mfu"] == "0.5"
    )
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_pretrain_may_continue_a_kiln_run_directory_only_with_resume_auto(tmp_path: Path) -> None:
    run = prepare_run_dir(tmp_path / "run")
    (run / "checkpoints").mkdir()
    with run_dir(run, "auto") as out:
        assert out.local == run and (run / "checkpoints").is_dir()  # continued, nothing deleted
    with pytest.raises(ConfigError, match="not empty"), run_dir(run, "never"):
        pass
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a Kiln run")
    with pytest.raises(ConfigError, match="not empty"), run_dir(other, "auto"):
        pass
    with run_dir(tmp_path / "new", "auto") as out:
        assert out.local.is_dir()  # a fresh directory is fine either way


def test_driver_refuses_resume_with_another_classifier_pooling(tmp_path: Path) -> None:
    """The head was trained on what it reads ([CLS] or the tokens' mean): switching midway is a new run."""
    from cluster.jobs import FinetuneJob

    def job(*overrides: str) -> FinetuneJob:
        base = ["data_dir=/nonexistent", "task=classification", "encoder_checkpoint=runs/bert"]
        return load_config(FinetuneJob, None, [*base, "trainer.resume=auto", *overrides])

    torch.manual_seed(0)
    model = BertPretrainModule(
        CFG, OPTIM, 5
    ).model  # any model: only the manifest's job config is read
    ckpt = tmp_path / "checkpoints" / "step-0000005"
    saved = to_dict(job("classifier_pooling=mean"))
    save_checkpoint(ckpt, model, CFG, job_config=saved, trainer_state={"step": 5})
    with pytest.raises(
        ConfigError, match=r"classifier_pooling=mean, not cls: the classifier head was trained"
    ):
        check_resume(job(), tmp_path)
    assert check_resume(job("classifier_pooling=mean"), tmp_path) == ckpt
    older = to_dict(job())
    del older["classifier_pooling"]  # a checkpoint from before the key: it read [CLS]
    newer = tmp_path / "checkpoints" / "step-0000006"
    save_checkpoint(newer, model, CFG, job_config=older, trainer_state={"step": 6})
    assert check_resume(job(), tmp_path) == newer
    with pytest.raises(ConfigError, match=r"classifier_pooling=cls, not mean"):
        check_resume(job("classifier_pooling=mean"), tmp_path)
