"""Config loading: typed dataclasses from YAML + dotted overrides; every bad key or type rejected up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.jobs import FinetuneJob, PretrainJob, QuickstartJob
from data_pipeline.configlib import ConfigError, parse_override, to_dict
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe: Path) -> None:
    from cluster.cli import build_parser  # noqa: F401 — the CLI module must import without side effects
    from cluster.jobs import PrepareJob

    cls = {
        "quickstart": QuickstartJob,
        "translation": FinetuneJob,
        "classification": FinetuneJob,
    }.get(recipe.stem)
    if recipe.stem.startswith("data-"):
        cls = PrepareJob
    elif recipe.stem.startswith("lm-"):
        from finetune.lm_baselines import LMBaselineJob as cls  # noqa: N813
    elif recipe.stem.startswith(("translation-", "classification-")):
        cls = FinetuneJob
    load_config(cls or PretrainJob, recipe)


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'trainer.max_stepz' \(did you mean 'trainer.max_steps'\?\)"
    ):
        load_config(PretrainJob, CONFIGS / "tiny-bert.yaml", ["trainer.max_stepz=5"])
    with pytest.raises(
        ConfigError, match=r"job.yaml: unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"
    ):
        load_config(PretrainJob, write(tmp_path, "optim: {lrr: 0.1}\n"))


def test_wrong_type_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"'trainer.max_steps' must be an integer, got str 'many'"
    ):
        load_config(PretrainJob, None, ["trainer.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'cluster.use_gpu' must be true or false"):
        load_config(PretrainJob, write(tmp_path, "cluster: {use_gpu: 3}\n"))
    with pytest.raises(ConfigError, match=r"'trainer' must be a mapping"):
        load_config(PretrainJob, write(tmp_path, "trainer: 5\n"))


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  max_steps: 5\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"job.yaml:\d+: malformed YAML"):
        load_config(PretrainJob, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PretrainJob, tmp_path / "absent.yaml")


def test_overrides_are_typed_yaml_scalars() -> None:
    assert parse_override("trainer.max_steps=50") == ("trainer.max_steps", 50)
    assert parse_override("optim.lr=1e-4") == (
        "optim.lr",
        "1e-4",
    )  # YAML 1.1: needs a dot to be a float ...
    cfg = load_config(
        PretrainJob, None, ["optim.lr=1e-4", "wandb.tags=[a, b]", "cluster.address=null"]
    )
    assert (
        cfg.optim.lr == 1e-4 and cfg.wandb.tags == ["a", "b"] and cfg.cluster.address is None
    )  # ... but a float
    assert load_config(PretrainJob, None, ["optim.lr=0.0001"]).optim.lr == 1e-4
    with pytest.raises(ConfigError, match=r"'optim.lr' must be a number, got str '1e-4x'"):
        load_config(PretrainJob, None, ["optim.lr=1e-4x"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("trainer.max_steps")


def test_preset_then_explicit_keys_win() -> None:
    cfg = load_config(PretrainJob, None, ["model.preset=mini", "model.num_hidden_layers=3"])
    assert isinstance(cfg.model, BertConfig)
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers) == (256, 3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(PretrainJob, None, ["model.preset=huge"])


def test_model_family_is_chosen_by_arch() -> None:
    cfg = load_config(PretrainJob, CONFIGS / "tiny-gpt.yaml")
    assert isinstance(cfg.model, GPTConfig) and cfg.model.n_embd == 128
    with pytest.raises(ConfigError, match="unknown architecture 't5'"):
        load_config(PretrainJob, None, ["model.arch=t5"])
    with pytest.raises(ConfigError, match="task 'clm' trains a 'gpt' model"):
        load_config(PretrainJob, None, ["task=clm"])  # default model is a BERT


def test_validation_errors_name_the_section() -> None:
    with pytest.raises(ConfigError, match=r"'cluster.strategy' must be one of \[.*\], got 'fsdp'"):
        load_config(PretrainJob, None, ["cluster.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"'data.source' must be one of \[.*\], got 'nowhere'"):
        load_config(QuickstartJob, None, ["data.source=nowhere"])
    with pytest.raises(ConfigError, match=r"data: src_column: set both src_column and tgt_column"):
        load_config(QuickstartJob, None, ["data.src_column=en"])  # DataConfig's own check


def test_choice_names_match_the_code_that_uses_them() -> None:
    """Choices are Literal fields (the loader checks them); the tables they index live with their
    code."""
    from typing import get_args

    from cluster.jobs import LengthPenalty, SamplingSchedule, StrategyName
    from cluster.strategies import STRATEGIES
    from finetune.decode import LENGTH_PENALTIES
    from finetune.scheduled_sampling import SAMPLING_SCHEDULES
    from finetune.scheduled_sampling import SamplingSchedule as ScheduledSamplingField
    from pretrain.optim import SCHEDULES, Schedule

    assert list(get_args(StrategyName)) == list(STRATEGIES)
    assert list(get_args(SamplingSchedule)) == list(SAMPLING_SCHEDULES)
    assert get_args(ScheduledSamplingField) == get_args(SamplingSchedule)
    assert list(get_args(LengthPenalty)) == list(LENGTH_PENALTIES)
    assert list(get_args(Schedule)) == list(SCHEDULES)


def test_resolved_config_round_trips() -> None:
    cfg = load_config(QuickstartJob, CONFIGS / "quickstart.yaml")
    again = load_config(QuickstartJob, None, [])
    assert isinstance(to_dict(cfg), dict)
    from data_pipeline.configlib import build

    assert build(QuickstartJob, to_dict(cfg)) == cfg
    assert again != cfg  # the recipe is what the quickstart runs, not the bare defaults


def test_compile_is_ddp_only() -> None:
    assert load_config(PretrainJob, None, ["trainer.compile=true"]).trainer.compile
    for cls in (PretrainJob, FinetuneJob):
        with pytest.raises(
            ConfigError, match=r"'trainer.compile': with cluster.strategy=ddp only, not deepspeed"
        ):
            load_config(cls, None, ["trainer.compile=true", "cluster.strategy=deepspeed_stage_2"])


@pytest.mark.parametrize(
    ("command", "recipe", "why"),
    [
        ("finetune", "classification-lstm.yaml", "model.arch=lstm_classifier trains from scratch"),
        ("pretrain", "tiny-bert.yaml", "pretraining trains every parameter at optim.lr"),
    ],
)
def test_pretrained_lr_ratio_without_pretrained_parameters_exits_2_with_one_line(
    command: str, recipe: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cluster import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--config", str(CONFIGS / recipe), "optim.pretrained_lr_ratio=0.1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: optim.pretrained_lr_ratio: 0.1 ") and err.count("\n") == 1
    assert why in err


def test_pretrained_lr_ratio_is_a_warm_start_option() -> None:
    job = load_config(FinetuneJob, CONFIGS / "classification.yaml", ["optim.pretrained_lr_ratio=0"])
    assert job.optim.pretrained_lr_ratio == 0.0
    assert (
        load_config(FinetuneJob, CONFIGS / "classification-lstm.yaml").optim.pretrained_lr_ratio
        == 1
    )
    with pytest.raises(
        ConfigError, match="OptimConfig.pretrained_lr_ratio must be finite and >= 0"
    ):
        load_config(FinetuneJob, CONFIGS / "classification.yaml", ["optim.pretrained_lr_ratio=-1"])


def test_nsp_weight_is_a_bert_pretraining_option() -> None:
    assert load_config(PretrainJob, CONFIGS / "tiny-bert.yaml").nsp_weight == 1.0
    assert load_config(PretrainJob, CONFIGS / "tiny-bert.yaml", ["nsp_weight=0"]).nsp_weight == 0.0
    with pytest.raises(ConfigError, match=r"'nsp_weight': must be finite and >= 0 .*got -0.5"):
        load_config(PretrainJob, None, ["nsp_weight=-0.5"])
    with pytest.raises(ConfigError, match="'nsp_weight' applies to task mlm_nsp .* only, not clm"):
        load_config(PretrainJob, CONFIGS / "tiny-gpt.yaml", ["nsp_weight=0"])
    # the default is no choice, so a clm recipe keeps it
    assert load_config(PretrainJob, CONFIGS / "tiny-gpt.yaml").nsp_weight == 1.0


def test_bad_nsp_weight_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cluster import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", "--config", str(CONFIGS / "tiny-bert.yaml"), "nsp_weight=-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: ") and "'nsp_weight'" in err and err.count("\n") == 1
