"""`kiln pretrain|finetune --dry-run`: the run's own driver checks, its resume check and a parameter
count, then exit 0, with no Ray started and nothing written or removed at --out. Run through the
CLI's main on a data directory written by the shard writer (no Ray Data)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from cluster import cli
from cluster.config import load_config
from cluster.jobs import FinetuneJob, PretrainJob
from cluster.resume import check_resume
from cluster.rundir import RERUN_TRAINING, RunDir, prepare_run_dir
from cluster.tasks import scratch_config
from data_pipeline.configlib import ConfigError, to_dict
from data_pipeline.examples import BUILDERS
from data_pipeline.shards import read_manifest, write_json, write_task
from finetune.models import ARCHITECTURES
from pretrain.checkpoint import save_checkpoint
from pretrain.models.gpt import GPTLMHeadModel
from pretrain.models.meta import num_parameters

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]
WORDS = ["one", "two", "three", "four", "five", "un", "deux", "trois", "quatre", "cinq"]
SEQ_LEN = 16
SMALL = ["trainer.batch_size=4", "cluster.num_workers=2"]


def clm_rows(n: int, start: int) -> list[dict]:
    vocab = len(SPECIALS) + len(WORDS)
    return [
        {"sample_id": i, "input_ids": [(i + j) % vocab for j in range(SEQ_LEN + 1)]}
        for i in range(start, start + n)
    ]


def pair_rows(n: int, start: int) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        src = [7 + (i + j) % 5 for j in range(1 + i % 4)]
        rows.append(
            {
                "sample_id": i,
                "src_ids": [*src, 6],
                "tgt_ids": [5, *(t + 5 for t in src), 6],
                "src_text": " ".join(WORDS[t - 7] for t in src),
                "tgt_text": " ".join(WORDS[t - 2] for t in src),
            }
        )
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for task, make in (("clm", clm_rows), ("translation", pair_rows)):
        builder = BUILDERS[task]
        splits = {"train": make(40, 0), "validation": make(8, 40)}
        write_task(root / task, task, builder.schema, splits, 16, builder.token_columns)
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(root / "tokenizer.json"))
    write_json(
        root / "manifest.json",
        {
            "tasks": {"clm": {}, "translation": {}},
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {t: i for i, t in enumerate(SPECIALS)},
            "config": {"seq_len": SEQ_LEN, "max_src_len": SEQ_LEN, "max_tgt_len": SEQ_LEN},
        },
    )
    return root


def dry_run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_started_nothing(out: Path) -> None:
    import ray

    assert not out.exists(), "a dry run created --out"
    assert not ray.is_initialized()


def test_pretrain_dry_run_prints_the_plan_and_touches_nothing(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "runs" / "gpt"
    config = ["--config", str(CONFIGS / "tiny-gpt.yaml"), f"data_dir={data_dir}", *SMALL]
    code, stdout, _ = dry_run(["pretrain", *config, "--out", str(out)], capsys)
    assert code == 0
    job = load_config(PretrainJob, CONFIGS / "tiny-gpt.yaml", SMALL)
    vocab = read_manifest(data_dir)["vocab_size"]
    built = GPTLMHeadModel(dataclasses.replace(job.model, vocab_size=vocab))
    assert f"pretrain clm: gpt (preset tiny), {num_parameters(built):,} parameters" in stdout
    assert "global batch 8 = batch_size 4 x 2 workers x accumulate_grad_batches 1" in stdout
    # 40 rows; 300 steps x 8 rows
    assert "train split 40 rows: 300 steps x 8 = 60.00 passes over it" in stdout
    assert f"out {out} (not created)" in stdout
    assert "[dry run] resume: fresh start (trainer.resume=never)" in stdout
    assert_started_nothing(out)


def test_finetune_dry_run_counts_the_scratch_model_it_would_train(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "mt"
    recipe = CONFIGS / "translation-scratch.yaml"
    overrides = [f"data_dir={data_dir}", *SMALL]
    code, stdout, _ = dry_run(
        ["finetune", "--config", str(recipe), *overrides, "--out", str(out)], capsys
    )
    assert code == 0, stdout
    job = load_config(FinetuneJob, recipe, overrides)
    config = scratch_config(job, read_manifest(data_dir))
    built = ARCHITECTURES[config.arch].model(config)
    assert f"finetune translation: transformer (preset small), {num_parameters(built):,}" in stdout
    assert "2 workers x 1 CPUs, strategy ddp" in stdout
    assert_started_nothing(out)


def test_a_missing_data_dir_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "gpt"
    argv = ["pretrain", "--config", str(CONFIGS / "tiny-gpt.yaml"), f"data_dir={tmp_path / 'no'}"]
    code, stdout, err = dry_run([*argv, "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"kiln: error: {tmp_path / 'no'}: not a prepared data directory")
    assert stdout == ""
    assert_started_nothing(out)


def test_help_says_what_a_dry_run_does(capsys: pytest.CaptureFixture) -> None:
    for command in ("pretrain", "finetune"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "writes nothing, not even --out" in " ".join(capsys.readouterr().out.split())


def gpt_job(data_dir: Path, *overrides: str) -> tuple[list[str], PretrainJob]:
    """(the command line's config arguments, the job they load) of tiny-gpt with trainer.resume=auto."""
    overrides = (f"data_dir={data_dir}", *SMALL, "trainer.resume=auto", *overrides)
    job = load_config(PretrainJob, CONFIGS / "tiny-gpt.yaml", list(overrides))
    return ["--config", str(CONFIGS / "tiny-gpt.yaml"), *overrides], job


def run_with_checkpoint(out: Path, job: PretrainJob, job_config: dict, step: int) -> Path:
    """A run directory as a killed run of `job` leaves it: a checkpoint at `step` recording
    `job_config`, and the save after it interrupted halfway (`.tmp-step-…`)."""
    prepare_run_dir(out)
    model = dataclasses.replace(job.model, vocab_size=read_manifest(job.data_dir)["vocab_size"])
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    state = {"step": step}
    save_checkpoint(ckpt, GPTLMHeadModel(model), model, None, job_config, state, job.data_dir)
    partial = out / "checkpoints" / f".tmp-step-{step + 100:07d}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a save")
    return ckpt


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def test_a_dry_run_into_a_fresh_out_says_the_run_starts_fresh(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "gpt"
    config, _ = gpt_job(data_dir)
    code, stdout, _ = dry_run(["pretrain", *config, "--out", str(out)], capsys)
    assert code == 0, stdout
    assert f"[dry run] resume: fresh start (no checkpoint in {out / 'checkpoints'})" in stdout
    assert_started_nothing(out)


def test_a_dry_run_names_the_checkpoint_the_run_would_continue_and_removes_nothing(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "gpt"
    config, job = gpt_job(data_dir)
    ckpt = run_with_checkpoint(out, job, to_dict(job), step=5)
    before = tree(out)
    code, stdout, _ = dry_run(["pretrain", *config, "--out", str(out)], capsys)
    assert code == 0, stdout
    assert f"[dry run] resume: would continue from {ckpt} at step 5 (trainer.resume=auto)" in stdout
    # the real run would remove the interrupted save; a dry run leaves every file as it was
    assert tree(out) == before and (out / "checkpoints" / ".tmp-step-0000105").is_dir()


def test_a_dry_run_refuses_a_resume_the_run_would_refuse_with_the_same_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "gpt"
    config, job = gpt_job(data_dir)
    saved = to_dict(job)
    saved["optim"]["pretrained_lr_ratio"] = 0.1  # as a warm-started run would have recorded it
    run_with_checkpoint(out, job, saved, step=5)
    before = tree(out)
    code, stdout, err = dry_run(["pretrain", *config, "--out", str(out)], capsys)
    assert code == 2 and stdout == ""
    assert tree(out) == before
    # the real run's own check (which removes the partial save: after the dry run)
    with pytest.raises(ConfigError) as real:
        check_resume(job, RunDir(out), say=lambda line: None)
    assert "optim.pretrained_lr_ratio=0.1, not 1" in str(real.value)
    assert err == f"kiln: error: {real.value}\n"


@pytest.mark.parametrize(
    ("resume", "earlier"),
    [("never", "a Kiln run"), ("never", "other files"), ("auto", "other files")],
)
def test_a_dry_run_refuses_an_out_the_run_would_not_write_into_with_the_same_line(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, resume: str, earlier: str
) -> None:
    out = tmp_path / "gpt"
    config, job = gpt_job(data_dir, f"trainer.resume={resume}")
    if earlier == "a Kiln run":
        run_with_checkpoint(out, job, to_dict(job), step=5)
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = tree(out)
    code, stdout, err = dry_run(["pretrain", *config, "--out", str(out)], capsys)
    assert code == 2 and stdout == "", stdout
    assert tree(out) == before
    # what the real run stops with, before any worker starts
    with pytest.raises(ConfigError) as real:
        prepare_run_dir(out, rerun=RERUN_TRAINING)
    expected = (
        "holds an earlier Kiln run (continue it with trainer.resume=auto, or choose another --out)"
        if earlier == "a Kiln run"
        else "is not empty (choose another --out)"
    )
    assert str(real.value) == f"{out}: output directory {expected}"
    assert err == f"kiln: error: {real.value}\n"
    assert tree(out) == before
