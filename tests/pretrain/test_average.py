"""`kiln average` (pretrain/average.py): the mean of a run's checkpoints, written as an inference
checkpoint that loads, ties and scores like a training one; bad input is one line and exit code 2."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from kiln_testlib import word_tokenizer
from safetensors import safe_open
from torch import Tensor, nn

from cluster.cli import main
from data_pipeline.configlib import from_preset
from finetune.models import ARCHITECTURES
from finetune.models.transformer import TransformerConfig, TransformerSeq2Seq
from pretrain.average import AVERAGED_KEY, average_checkpoints
from pretrain.checkpoint import (
    MODEL_FILE,
    TRAINER_STATE_FILE,
    load_checkpoint,
    load_weights,
    publish_checkpoint,
    read_manifest,
    save_checkpoint,
    select_checkpoint,
    sha256_file,
    verify_checkpoint,
)
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.registry import ArchSpec

PAIRS = [("good movie", "movie good"), ("bad plot", "plot bad"), ("a very good plot", "dull")]
WORDS = sorted({w for pair in PAIRS for side in pair for w in side.split()})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json and target_tokenizer.json (the same vocabulary) and a data manifest."""
    data = tmp_path_factory.mktemp("data")
    for name in ("tokenizer.json", "target_tokenizer.json"):
        word_tokenizer(WORDS).save(str(data / name))
    (data / "manifest.json").write_text(json.dumps({"config": {"seq_len": 16}}))
    return data


def transformer(**overrides: Any) -> tuple[TransformerSeq2Seq, TransformerConfig]:
    vocab = 7 + len(WORDS)  # kiln_testlib's specials, then the words
    config = from_preset(TransformerConfig, "tiny", vocab_size=vocab, **overrides)
    return TransformerSeq2Seq(config), config


def gpt() -> tuple[GPTLMHeadModel, GPTConfig]:
    config = from_preset(GPTConfig, "tiny", vocab_size=7 + len(WORDS), n_inner=96, n_positions=32)
    return GPTLMHeadModel(config), config


def save_run(
    run: Path, model: nn.Module, config: Any, steps: Sequence[int], data: Path | None = None
) -> list[Path]:
    """A run directory's checkpoints at `steps`, the weights moved between saves as training would."""
    saved = []
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():  # a tied matrix is one Parameter: the tie survives
                p.add_(0.1 * torch.randn_like(p))
        path = run / "checkpoints" / f"step-{step:07d}"
        saved.append(
            save_checkpoint(
                path,
                model,
                config,
                data / "tokenizer.json" if data else None,
                job_config={"task": "translation", "saved_at": step},
                trainer_state={"step": step},
                data_manifest=data,
            )
        )
    return saved


def mean_by_hand(paths: Sequence[Path]) -> dict[str, Tensor]:
    weights = [load_weights(p / MODEL_FILE) for p in paths]
    return {
        name: torch.stack([w[name].double() for w in weights]).mean(0).to(t.dtype)
        for name, t in weights[-1].items()
    }


def kiln(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`kiln ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, list[Path]]:
    """A translation run directory with three checkpoints of a tiny Transformer."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("mt") / "run"
    return run, save_run(run, transformer()[0], transformer()[1], [100, 200, 300], data_dir)


# ---------------------------------------------------------------- the mean, and what it is written as
def test_the_average_is_the_mean_and_carries_the_newest_checkpoints_files(
    mt_run: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, paths = mt_run
    lines: list[str] = []
    out = average_checkpoints(
        [paths[2], paths[0], paths[1]], tmp_path / "avg", registry=ARCHITECTURES, say=lines.append
    )
    expected = mean_by_hand(paths)
    got = load_weights(out / MODEL_FILE)
    assert set(got) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0)
    # oldest first by step, whatever the order given; one line per checkpoint and a last one
    assert lines[:3] == [
        f"[average] {i}/3 step-{s:07d} (step {s})" for i, s in ((1, 100), (2, 200), (3, 300))
    ]
    assert lines[3].startswith(f"[average] wrote {out} ")
    manifest = verify_checkpoint(out)
    newest = read_manifest(paths[2])
    assert manifest["step"] == 300 and manifest["job_config"] == newest["job_config"]
    assert manifest["data_manifest"] == newest["data_manifest"]
    assert manifest[AVERAGED_KEY] == [
        {"name": p.name, "step": s, "location": str(p)}
        for p, s in zip(paths, (100, 200, 300), strict=True)
    ]
    for name in ("tokenizer.json", "target_tokenizer.json"):
        assert sha256_file(out / name) == sha256_file(paths[2] / name)
    assert not (out / TRAINER_STATE_FILE).exists()  # scored, never resumed


def test_the_averaged_transformer_gives_the_logits_of_hand_averaged_weights(
    mt_run: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, paths = mt_run
    out = average_checkpoints(paths, tmp_path / "avg", registry=ARCHITECTURES, say=lambda _: None)
    loaded = load_checkpoint(out, ARCHITECTURES)
    by_hand, config = transformer()
    by_hand.load_state_dict(mean_by_hand(paths))
    src = torch.tensor([[7, 8, 9, 6], [10, 11, 6, 0]])
    tgt = torch.tensor([[5, 8, 7], [5, 9, 0]])
    with torch.no_grad():
        want = by_hand.eval()(src, src != 0, tgt)
        got = loaded.model.eval()(src, src != 0, tgt)
    torch.testing.assert_close(got, want)
    assert loaded.model_config == config


def test_an_averaged_gpt_keeps_its_tie_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, config = gpt()
    paths = save_run(tmp_path / "run", model, config, [1, 2, 3])
    out = average_checkpoints(
        [str(p) for p in paths], tmp_path / "avg", registry=ARCHITECTURES, say=lambda _: None
    )
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert json.loads(f.metadata()["kiln.tied"]) == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_checkpoint(out)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    by_hand = GPTLMHeadModel(config)
    by_hand.load_state_dict(mean_by_hand(paths))
    ids = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(ids), by_hand.eval()(ids))


@dataclass
class CounterConfig:
    arch: str = "counter"
    width: int = 3


class Counter(nn.Module):
    """A linear layer beside an integer and a bool buffer (a counter, a flag)."""

    def __init__(self, config: CounterConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(config.width, config.width)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("flag", torch.zeros(config.width, dtype=torch.bool))


def test_integer_and_bool_buffers_are_the_newest_checkpoints(tmp_path: Path) -> None:
    registry = {"counter": ArchSpec("counter", CounterConfig, Counter, "lm")}
    model, paths = Counter(CounterConfig()), []
    for step in (1, 2):
        model.seen.fill_(10 * step)
        model.flag[step] = True
        paths += save_run(tmp_path / "run", model, CounterConfig(), [step])
    out = average_checkpoints(paths, tmp_path / "avg", registry=registry, say=lambda _: None)
    got = load_checkpoint(out, registry).model
    assert int(got.seen) == 20 and got.flag.tolist() == [False, True, True]
    torch.testing.assert_close(got.linear.weight, mean_by_hand(paths)["linear.weight"])


# ---------------------------------------------------------------- the command line
def test_kiln_average_takes_the_last_n_of_a_run_directory(
    mt_run: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, paths = mt_run
    out = tmp_path / "avg2"
    code, stdout, err = kiln(
        capsys, "average", "--checkpoints", str(run), "--last", "2", "--out", str(out)
    )
    assert (code, err) == (0, "")
    assert stdout.splitlines() == [
        "[average] 1/2 step-0000200 (step 200)",
        "[average] 2/2 step-0000300 (step 300)",
        f"[average] wrote {out} (the mean of 2 checkpoints, steps 200..300)",
    ]
    assert [c["name"] for c in read_manifest(out)[AVERAGED_KEY]] == ["step-0000200", "step-0000300"]
    expected = mean_by_hand(paths[1:])
    for name, t in load_weights(out / MODEL_FILE).items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=0)
    assert (
        select_checkpoint(run) == paths[2]
    )  # the run's own newest is still what --checkpoint RUN means


def test_kiln_evaluate_scores_the_average_as_a_training_checkpoint_of_its_weights(
    mt_run: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, paths = mt_run
    kiln(
        capsys, "average", "--checkpoints", str(run), "--last", "3", "--out", str(tmp_path / "avg")
    )
    model, config = transformer()
    model.load_state_dict(mean_by_hand(paths))
    trained = save_checkpoint(
        tmp_path / "same-weights",
        model,
        config,
        paths[2] / "tokenizer.json",
        trainer_state={"step": 300},
    )
    (tmp_path / "src.txt").write_text("".join(f"{s}\n" for s, _ in PAIRS))
    (tmp_path / "ref.txt").write_text("".join(f"{t}\n" for _, t in PAIRS))
    scores = []
    for checkpoint in (tmp_path / "avg", trained):
        code, stdout, err = kiln(
            capsys,
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--beam",
            "2",
            "--src",
            str(tmp_path / "src.txt"),
            "--ref",
            str(tmp_path / "ref.txt"),
        )
        assert (code, err) == (0, ""), err
        scores.append(json.loads(stdout))
    assert scores[0] == scores[1] and scores[0]["sentences"] == len(PAIRS)


def one_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    code, _, err = kiln(capsys, "average", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_another_models_checkpoint_is_named_with_what_differs(
    mt_run: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, paths = mt_run
    wider = save_run(tmp_path / "other", *transformer(d_ff=128), [400])[0]
    err = one_error(
        capsys, "--checkpoints", str(paths[0]), str(wider), "--out", str(tmp_path / "avg")
    )
    assert f"{wider}: config.json d_ff (128, not 256) differs from {paths[0]}" in err
    assert not (tmp_path / "avg").exists()


def test_fewer_than_two_checkpoints_is_an_error(
    mt_run: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, paths = mt_run
    out = str(tmp_path / "avg")
    err = one_error(capsys, "--checkpoints", str(run), "--last", "4", "--out", out)
    assert f"{run}: has 3 complete checkpoint(s)" in err and "--last 4" in err
    assert "at least 2" in one_error(capsys, "--checkpoints", str(run), "--last", "1", "--out", out)
    err = one_error(capsys, "--checkpoints", str(paths[0]), "--out", out)
    assert f"{paths[0]}: one checkpoint; averaging needs at least 2" in err
    assert "needs --last N" in one_error(capsys, "--checkpoints", str(run), "--out", out)


def test_last_with_a_list_of_checkpoints_is_an_error(
    mt_run: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, paths = mt_run
    err = one_error(
        capsys,
        "--checkpoints",
        str(paths[0]),
        str(paths[1]),
        "--last",
        "2",
        "--out",
        str(tmp_path / "avg"),
    )
    assert f"--last 2: picks from one run directory, but {paths[0]} is a checkpoint" in err


def test_an_out_that_exists_is_refused(
    mt_run: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, _ = mt_run
    (tmp_path / "avg").mkdir()
    err = one_error(
        capsys, "--checkpoints", str(run), "--last", "2", "--out", str(tmp_path / "avg")
    )
    assert f"--out {tmp_path / 'avg'}: already exists" in err


def test_an_out_among_the_runs_checkpoints_is_refused(
    mt_run: tuple[Path, list[Path]], capsys: pytest.CaptureFixture
) -> None:
    run, paths = mt_run
    for out in (run / "checkpoints" / "averaged", run / "checkpoints" / "x" / "averaged"):
        err = one_error(capsys, "--checkpoints", str(run), "--last", "2", "--out", str(out))
        assert f"--out {out}: inside {run / 'checkpoints'}" in err
        err = one_error(capsys, "--checkpoints", *map(str, paths[:2]), "--out", str(out))
        assert f"--out {out}: inside" in err
    assert not (run / "checkpoints" / "averaged").exists()


# ---------------------------------------------------------------- object storage
def test_a_run_on_object_storage_averages_into_a_uri(
    s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(2)
    run, out = s3.prefix("run"), s3.prefix("avg")  # type: ignore[attr-defined]
    paths = save_run(tmp_path / "local", *gpt(), [1, 2, 3])
    for p in paths:
        publish_checkpoint(p, f"{run}/checkpoints/{p.name}")
    code, stdout, err = kiln(capsys, "average", "--checkpoints", run, "--last", "2", "--out", out)
    assert (code, err) == (0, ""), err
    assert stdout.splitlines()[-1].startswith(f"[average] wrote {out} ")
    loaded = load_checkpoint(out)
    expected = mean_by_hand(paths[1:])
    for name, t in loaded.state_dict.items():
        torch.testing.assert_close(t, expected[name], rtol=0, atol=0)
    assert read_manifest(out)[AVERAGED_KEY][0]["location"] == f"{run}/checkpoints/step-0000002"
    assert f"--out {out}: already exists" in one_error(
        capsys, "--checkpoints", run, "--last", "2", "--out", out
    )
    inside = f"{run}/checkpoints/avg"
    assert f"--out {inside}: inside" in one_error(
        capsys, "--checkpoints", run, "--last", "2", "--out", inside
    )
