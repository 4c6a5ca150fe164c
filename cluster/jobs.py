"""The job configs the CLI reads: one dataclass tree per command, sections owned by the code that uses them.

Importing this module, and finding an error in a job config outside its `model` section, costs no
torch import (cluster/cli.py's promise): the model config classes live in the model files, which
import torch, so they are reached through the architecture registry (`architectures()`) only when a
model section is built.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from data_pipeline.config import DataConfig
from data_pipeline.configlib import ConfigError, OneOf, check_fields, from_preset
from pretrain.optim import OptimConfig

if TYPE_CHECKING:
    from finetune.scheduled_sampling import ScheduledSampling
    from pretrain.registry import Registry

PretrainTask = Literal["mlm_nsp", "clm"]  # BERT's MLM + NSP, or GPT's next-token prediction
FinetuneTask = Literal["translation", "classification"]
# cluster.strategies.STRATEGIES has one entry per name; so do
# finetune.scheduled_sampling.SAMPLING_SCHEDULES and finetune.decode.LENGTH_PENALTIES.
StrategyName = Literal["ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"]
SamplingSchedule = Literal["linear", "inverse_sigmoid"]  # Bengio et al. 2015
LengthPenalty = Literal["none", "avg", "gnmt"]
ClassifierPooling = Literal["cls", "mean"]


def architectures() -> Registry:
    """The architecture registry, `finetune.models.ARCHITECTURES`. Imported on first use, not at the
    top: the model files import torch."""
    from finetune.models import ARCHITECTURES

    return ARCHITECTURES


def pretrain_family(task: str) -> str:
    """The architecture a pretraining task trains: bert for mlm_nsp, gpt for clm."""
    return next(name for name, spec in architectures().items() if spec.task == task)


def pretraining_models() -> dict[str, type]:
    """`model.arch` of a pretraining job -> its config class."""
    return {
        name: spec.config
        for name, spec in architectures().items()
        if spec.task in get_args(PretrainTask)
    }


def scratch_models() -> dict[str, type]:
    """`model.arch` of a fine-tuning job -> its config class: the fine-tuning architectures trained
    from random weights (the others start from pretrained checkpoints: a job without `model`)."""
    return {
        name: spec.config
        for name, spec in architectures().items()
        if spec.task in get_args(FinetuneTask) and not spec.pretrained
    }


# A model section: the config class of the `arch` it names, read from the registry at build time.
PretrainModel = Annotated[Any, OneOf(pretraining_models)]  # BertConfig | GPTConfig
ScratchModel = Annotated[Any, OneOf(scratch_models)]


def tiny(arch: str) -> Any:
    """The "tiny" preset of architecture `arch`: the default model of a pretraining job."""
    return from_preset(architectures()[arch].config, "tiny")


# Where the installed Lightning lists the precision strings its Trainer takes (read, not imported:
# importing Lightning costs seconds, and a config error must come at once).
LIGHTNING_PRECISION_FILE = ("fabric", "plugins", "precision", "precision.py")
LIGHTNING_PRECISION_NAMES = ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS")


@functools.cache
def lightning_precisions() -> tuple[str, ...]:
    """The `precision=` strings the installed Lightning takes ("32-true", "bf16-mixed", "16"...)."""
    spec = importlib.util.find_spec("lightning")  # a top-level package: found without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("trainer.precision: Lightning is not installed; cannot check a precision")
    source = Path(next(iter(spec.submodule_search_locations)), *LIGHTNING_PRECISION_FILE)
    values: list[str] = []
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) in LIGHTNING_PRECISION_NAMES for t in node.targets
        ):
            values += [
                c.value
                for c in ast.walk(node.value)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
    if not values:
        raise ConfigError(f"trainer.precision: found no precision values in {source}")
    return tuple(values)


@dataclass
class TrainerConfig:
    max_steps: int = 200
    batch_size: int = (
        32  # per worker; the global batch is batch_size × num_workers × accumulate_grad_batches
    )
    accumulate_grad_batches: int = 1
    val_every: int = 100  # steps between validation passes
    limit_val_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_last: int = 2
    precision: str = (
        "32-true"  # "bf16-mixed" on GPUs; fp32 on CPU (bf16 matmuls are ~100x slower there)
    )
    seed: int = 0
    # "auto": continue from the newest complete checkpoint under <out>/checkpoints, if there is one (weights,
    # optimizer, scheduler, step, data position, RNG); "never": always start from step 0.
    resume: Literal["never", "auto"] = "never"
    # Peak FLOP/s of one device, the denominator of train/mfu. None: a table for known GPUs, else measured once
    # per worker with a matmul (on CPU, fp32 1024x1024).
    peak_flops: float | None = None
    # Steps whose loss is NaN/inf (on any rank) are skipped and counted (train/skipped_steps); this many in a row
    # stop the run with a clear error.
    max_nonfinite_steps: int = 5
    # torch.compile the model (`nn.Module.compile`: TorchInductor, which on CPU needs a C++ compiler; the first
    # steps pay for compiling). DDP only. docs/benchmarks.md measures the gain.
    compile: bool = False
    # Training batches of rows of similar length (Hugging Face Trainer's option of that name): rows are sorted by
    # length within chunks of this many batches (HF uses 50), so less of a batch is padding. 0 = off (random
    # batches). data_pipeline/loader.py says how order, exactly-once and resume are kept.
    group_by_length: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.group_by_length < 0:
            raise ConfigError(
                f"trainer.group_by_length: must be >= 0 (0 = off, N = batches sorted by length together), "
                f"got {self.group_by_length}"
            )
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(
                f"'peak_flops' must be > 0 (FLOP/s of one device), got {self.peak_flops}"
            )
        for name in (
            "max_steps",
            "batch_size",
            "accumulate_grad_batches",
            "val_every",
            "log_every",
            "keep_last",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"'checkpoint_every' must be >= 0, got {self.checkpoint_every}")
        if self.precision not in lightning_precisions():
            raise ValueError(
                f"'precision': unknown precision {self.precision!r} (choose from "
                f"{', '.join(lightning_precisions())})"
            )


@dataclass
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    strategy: StrategyName = "ddp"
    offload: bool = False  # DeepSpeed ZeRO optimizer (and, at stage 3, parameter) offload to CPU
    address: str | None = (
        None  # Ray address; None starts (or reuses) a local Ray, or takes RAY_ADDRESS
    )
    max_failures: int = 0
    # A collective (gradient all-reduce, barrier) that waits longer than this fails the run instead of hanging it:
    # a stalled or stopped worker surfaces as an error within this many seconds (torch.distributed's timeout).
    collective_timeout_s: int = 1800

    def __post_init__(self) -> None:
        check_fields(self)
        if self.collective_timeout_s < 1:
            raise ValueError(
                f"'collective_timeout_s' must be at least 1 second, got {self.collective_timeout_s}"
            )
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError("'num_workers' and 'cpus_per_worker' must be at least 1")


@dataclass
class WandbConfig:
    # offline runs are written under the output directory; `wandb sync` uploads them later
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "kiln"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class DecodeConfig:
    """How a translation job's checkpoints are decoded for scoring (`FinetuneJob.decode`,
    `kiln evaluate`): the keyword arguments of `finetune.translate.translate_texts`. The beam,
    penalty and alpha defaults are those of `kiln translate`, `kiln attention` and
    `kiln analyze-beam` too (cluster/cli.py)."""

    beam_size: int = 4
    length_penalty: LengthPenalty = "gnmt"  # score = logprob / lp(length): decode.LENGTH_PENALTIES
    alpha: float = 0.6  # the penalty's strength: GNMT's alpha (Wu et al., 2016), avg's exponent
    max_len: int = 48  # generated tokens, [EOS] included
    batch_size: int = 64  # sources per beam-search batch

    def __post_init__(self) -> None:
        check_fields(self)
        for key in ("beam_size", "max_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"DecodeConfig.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class PrepareJob:
    data: DataConfig = field(default_factory=DataConfig)


def check_compile(trainer: TrainerConfig, cluster: ClusterConfig) -> None:
    # DeepSpeed wraps the model in its engine (ZeRO-3 hooks every submodule's parameters): compiling under it is
    # not something Kiln has tested, so it is refused rather than left to fail inside a worker.
    if trainer.compile and cluster.strategy != "ddp":
        raise ValueError(
            f"'trainer.compile': with cluster.strategy=ddp only, not {cluster.strategy}"
        )


def refuse_pretrained_lr_ratio(optim: OptimConfig, why: str) -> None:
    """A job whose model loads no pretrained parameters has nothing for optim.pretrained_lr_ratio to scale."""
    if optim.pretrained_lr_ratio != 1:
        raise ConfigError(
            f"optim.pretrained_lr_ratio: {optim.pretrained_lr_ratio:g} scales the learning rate of parameters "
            f"that fine-tuning loads from encoder_checkpoint / decoder_checkpoint, but {why}; leave it at 1"
        )


@dataclass
class PretrainJob:
    # output of `kiln data prepare`
    data_dir: str = field(default="runs/data", metadata={"path": "path"})
    task: PretrainTask = "mlm_nsp"
    # Continued pretraining: start from these weights instead of a random init. A Kiln checkpoint
    # directory of the task's family (or a run directory: its newest complete checkpoint) or
    # `hf:<dir or hub name>` (imported on the driver). The model section is then the checkpoint's.
    init_from: str | None = field(default=None, metadata={"path": "checkpoint"})
    # clm: packed documents do not attend to each other (positions restart at each [BOS], attention stays within
    # the document); off = GPT-2's plain packing, where a block's tokens see the previous documents in it.
    document_attention: bool = False
    # mlm_nsp: loss = MLM loss + nsp_weight × NSP loss. 1 is BERT's sum; 0 pretrains with MLM alone (RoBERTa found
    # dropping NSP does not hurt downstream), the NSP head still built, exported and measured (train/nsp_acc).
    nsp_weight: float = 1.0
    model: PretrainModel = field(default_factory=lambda: tiny("bert"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        check_compile(self.trainer, self.cluster)
        family = pretrain_family(self.task)
        if self.document_attention and self.task != "clm":
            raise ValueError("'document_attention' applies to task clm (packed GPT blocks) only")
        self._check_nsp_weight()
        if self.model.arch != family:
            raise ValueError(
                f"'model.arch': task '{self.task}' trains a '{family}' model, not '{self.model.arch}'"
            )
        refuse_pretrained_lr_ratio(self.optim, "pretraining trains every parameter at optim.lr")

    def _check_nsp_weight(self) -> None:
        if not (math.isfinite(self.nsp_weight) and self.nsp_weight >= 0):
            raise ValueError(
                f"'nsp_weight': must be finite and >= 0 (0 = MLM only, 1 = BERT), got {self.nsp_weight}"
            )
        if self.nsp_weight != 1 and self.task != "mlm_nsp":
            raise ValueError(
                f"'nsp_weight' applies to task mlm_nsp (BERT's NSP head) only, not {self.task}"
            )


@dataclass
class FinetuneJob:
    data_dir: str = field(default="runs/data", metadata={"path": "path"})
    task: FinetuneTask = "translation"
    # A Kiln BERT checkpoint directory (or a run directory: its newest complete checkpoint) or
    # hf:<dir or hub name>: the encoder of the warm-started translation model, or the classifier's
    # encoder. Relative paths, here and in every path field, are against the working directory
    # of `kiln` (cluster.config, "locations").
    encoder_checkpoint: str | None = field(default=None, metadata={"path": "checkpoint"})
    # A Kiln GPT checkpoint directory or hf:<...>: the translation decoder; for classification given alone, the
    # classifier reads the GPT's last real token (gpt_classifier).
    decoder_checkpoint: str | None = field(default=None, metadata={"path": "checkpoint"})
    # None: the task's pretrained model (warm-started seq2seq, or a BERT/GPT classifier). A baseline
    # trained from scratch: {arch: transformer | lstm | lstm_attention | convs2s | lstm_classifier |
    # ...} (scratch_models()), with its sizes.
    model: ScratchModel | None = None
    label_smoothing: float = 0.1
    # Scheduled sampling (translation, every architecture; finetune/scheduled_sampling.py): in training, each decoder
    # input after [BOS] is replaced by the model's own prediction with probability p, which rises from 0 to this
    # maximum. 0 = off (plain teacher forcing).
    scheduled_sampling: float = 0.0
    scheduled_sampling_schedule: SamplingSchedule = "linear"
    # Both schedules pass half the maximum at half this many steps; linear reaches it here. 0 = trainer.max_steps.
    scheduled_sampling_steps: int = 0
    classifier_dropout: float = 0.1
    # What a BERT classifier (encoder_checkpoint) reads: "cls", the pooler on [CLS] (BERT, HF's head); "mean",
    # the last hidden states averaged over the real tokens (an encoder pretrained without NSP never trained
    # [CLS] or the pooler). Not for GPT or lstm_classifier, which pool their own way.
    classifier_pooling: ClassifierPooling = "cls"
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        check_compile(self.trainer, self.cluster)
        self._check_scheduled_sampling()
        self._check_pooling()
        if self.model is None:
            return
        serves = architectures()[self.model.arch].task
        if serves != self.task:
            raise ValueError(
                f"'model.arch': '{self.model.arch}' is a {serves} model, not a {self.task} one"
            )
        given = [k for k in ("encoder_checkpoint", "decoder_checkpoint") if getattr(self, k)]
        if given:
            raise ValueError(
                f"'{given[0]}': model.arch={self.model.arch} trains from scratch and uses no checkpoint "
                "(drop the model section to fine-tune a pretrained one)"
            )
        refuse_pretrained_lr_ratio(
            self.optim, f"model.arch={self.model.arch} trains from scratch and has none"
        )

    def _check_pooling(self) -> None:
        bert = self.task == "classification" and self.model is None and self.encoder_checkpoint
        if self.classifier_pooling != "cls" and not bert:
            raise ValueError(
                f"'classifier_pooling': {self.classifier_pooling} applies to a BERT classifier only "
                "(task classification with encoder_checkpoint and no model section)"
            )

    def _check_scheduled_sampling(self) -> None:
        if not 0.0 <= self.scheduled_sampling <= 1.0:
            raise ValueError(
                f"'scheduled_sampling': a probability in [0, 1] (0 = off), got {self.scheduled_sampling}"
            )
        if self.scheduled_sampling_steps < 0:
            raise ValueError(
                f"'scheduled_sampling_steps' must be >= 0 (0 = trainer.max_steps), got "
                f"{self.scheduled_sampling_steps}"
            )
        if self.scheduled_sampling and self.task != "translation":
            raise ValueError(f"'scheduled_sampling': applies to translation only, not {self.task}")

    def sampling_schedule(self) -> ScheduledSampling | None:
        """The scheduled-sampling settings TranslationModule takes; None when off."""
        # imported here: it imports torch, which a worker needs and a config does not
        from finetune.scheduled_sampling import ScheduledSampling

        if not self.scheduled_sampling:
            return None
        ramp = self.scheduled_sampling_steps or self.trainer.max_steps
        return ScheduledSampling(self.scheduled_sampling, self.scheduled_sampling_schedule, ramp)


@dataclass
class QuickstartJob:
    """Every stage of the mission on the built-in sample; stage paths are filled in from `--out`."""

    data: DataConfig = field(default_factory=DataConfig)
    bert: PretrainJob = field(default_factory=PretrainJob)
    gpt: PretrainJob = field(default_factory=lambda: PretrainJob(task="clm", model=tiny("gpt")))
    translation: FinetuneJob = field(default_factory=FinetuneJob)
    classification: FinetuneJob = field(default_factory=lambda: FinetuneJob(task="classification"))
