"""What each training task needs on a worker: the LightningModule, its loaders, and what its checkpoint records.

One explicit registry, `TASKS`, maps a job's `task` to its builder. Builders run on every Ray Train worker (and in
plain processes in tests); they read only the prepared data directory and checkpoint directories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cluster.jobs import FinetuneJob, PretrainJob, pretrain_family
from data_pipeline.errors import DataDirError, DataError
from data_pipeline.loader import make_loader, read_manifest
from data_pipeline.shards import data_view
from data_pipeline.storage import Location, is_remote
from data_pipeline.tokenizer import TARGET_TOKENIZER_FILE
from finetune.models.classifier import DecoderClassifier, EncoderClassifier
from finetune.models.seq2seq import WarmStartedSeq2Seq
from finetune.models.warm_start import pretrained_names
from pretrain.checkpoint import CheckpointError, fetch_checkpoint
from pretrain.hf_import import (
    HF_PREFIX,
    check_tokenizer_matches_data,
    import_hf,
    save_imported_checkpoint,
)
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

# Lightning (and the LightningModules) are imported where a worker builds its module: the driver's preflight
# and parameter count need only the models, and importing Lightning costs it seconds of CPU per run.
if TYPE_CHECKING:
    import lightning.pytorch as pl

Job = TypeVar("Job", PretrainJob, FinetuneJob)


@dataclass
class TaskParts:
    module: pl.LightningModule
    train_loader: Any
    val_loader: Any
    model_config: Any
    progress_keys: tuple[str, ...]
    new_tensors: list[str] = dataclasses.field(default_factory=list)


def data_paths(data_dir: str | Path, task: str) -> tuple[Path | str, Path, dict]:
    """(task directory, tokenizer file, top-level manifest) of a prepared data directory; clear errors
    if absent. A remote data directory's task directory stays its URI (the loader streams its shards);
    the tokenizer is a local copy in `shards.data_view` (fetched once per version of the manifest,
    checked against the sha256 it records, beside target_tokenizer.json where there is one: a
    checkpoint copies the pair)."""
    if not is_remote(data_dir) and not (Path(data_dir) / "manifest.json").is_file():
        raise DataDirError(
            f"{data_dir}: not a prepared data directory (no manifest.json); run `kiln data prepare`"
        )
    view = data_view(data_dir)
    manifest = read_manifest(view / "manifest.json")
    if task not in manifest.get("tasks", []):
        raise DataDirError(
            f"{data_dir}: has no '{task}' examples (prepared tasks: {', '.join(manifest['tasks'])})"
        )
    task_dir = (Location.of(data_dir) / task).text if is_remote(data_dir) else view / task
    return task_dir, view / "tokenizer.json", manifest


def fit_model_to_data(job: PretrainJob, manifest: dict) -> PretrainJob:
    """The model's vocabulary is the tokenizer's (a checkpoint's may be larger: a release's padded rows); its
    positions must cover the prepared sequence length."""
    vocab = int(manifest["vocab_size"])
    if job.init_from is None:
        model = dataclasses.replace(job.model, vocab_size=vocab)
    elif vocab > job.model.vocab_size:
        raise CheckpointError(
            f"'init_from': {job.init_from} has {job.model.vocab_size} embedding rows, but the data's "
            f"tokenizer has {vocab} tokens"
        )
    else:
        model = job.model
    seq_len = int(manifest["config"]["seq_len"])
    positions = (
        model.max_position_embeddings if isinstance(model, BertConfig) else model.n_positions
    )
    if positions < seq_len:
        key = "max_position_embeddings" if isinstance(model, BertConfig) else "n_positions"
        raise CheckpointError(
            f"model positions ({positions}) < the data's seq_len ({seq_len}): raise 'model.{key}'"
        )
    return dataclasses.replace(job, model=model)


def _loaders(job: PretrainJob | FinetuneJob, rank: int, world: int) -> tuple[Any, Any]:
    bs, seed = job.trainer.batch_size, job.trainer.seed
    docs = getattr(job, "document_attention", False)
    train = make_loader(
        job.data_dir,
        job.task,
        "train",
        bs,
        rank=rank,
        world_size=world,
        seed=seed,
        shuffle=True,
        document_attention=docs,
        group_by_length=job.trainer.group_by_length,
    )
    # Validation sees every row: ranks are topped up with repeats rather than dropping a tail.
    val = make_loader(
        job.data_dir,
        job.task,
        "validation",
        bs,
        rank=rank,
        world_size=world,
        seed=seed,
        shuffle=False,
        drop_last=False,
        document_attention=docs,
    )
    return train, val


def build_pretrain(job: PretrainJob, rank: int, world: int) -> TaskParts:
    _, _, manifest = data_paths(job.data_dir, job.task)
    job = fit_model_to_data(job, manifest)
    train, val = _loaders(job, rank, world)
    # ZeRO-3 from scratch: the model is built inside DeepSpeed's zero.Init (KilnModule.configure_model), partitioned
    # module by module. Weights loaded from a checkpoint (init_from) are read whole anyway; that model is built and
    # loaded here, and DeepSpeed partitions it when the engine starts.
    from pretrain.module import BertPretrainModule, GPTPretrainModule

    deferred = job.cluster.strategy == "deepspeed_stage_3" and job.init_from is None
    if isinstance(job.model, GPTConfig):
        module = GPTPretrainModule(job.model, job.optim, job.trainer.max_steps, deferred=deferred)
        keys = ("train/loss", "train/acc", "train/ppl", "train/tokens_per_s")
    else:
        module = BertPretrainModule(
            job.model,
            job.optim,
            job.trainer.max_steps,
            deferred=deferred,
            nsp_weight=job.nsp_weight,
        )
        keys = ("train/loss", "train/mlm_acc", "train/nsp_acc", "train/tokens_per_s")
    if job.init_from is not None:
        _load_initial_weights(module.model, job)
    return TaskParts(module, train, val, job.model, keys)


def _load_initial_weights(model: Any, job: PretrainJob) -> None:
    """Continued pretraining: every tensor from the checkpoint (preflight made the model config its config)."""
    from finetune.models.warm_start import load_pretrained

    ckpt = load_pretrained(fetch_checkpoint(job.init_from), job.model.arch)
    model.load_state_dict(ckpt.state_dict, strict=True)


def build_translation(job: FinetuneJob, rank: int, world: int) -> TaskParts:
    _, _, manifest = data_paths(job.data_dir, job.task)
    if job.model is not None:
        model, new = scratch_model(job, manifest), []
    elif not job.encoder_checkpoint or not job.decoder_checkpoint:
        raise CheckpointError(
            "translation needs 'encoder_checkpoint' (BERT) and 'decoder_checkpoint' (GPT), or a "
            "'model' section to train a baseline from scratch"
        )
    else:
        model, new = WarmStartedSeq2Seq.from_pretrained(
            fetch_checkpoint(job.encoder_checkpoint),
            fetch_checkpoint(job.decoder_checkpoint),
            data_view(job.data_dir),
        )
    from finetune.module import TranslationModule

    train, val = _loaders(job, rank, world)
    module = TranslationModule(
        model,
        job.optim,
        job.trainer.max_steps,
        label_smoothing=job.label_smoothing,
        scheduled_sampling=job.sampling_schedule(),
        pretrained=loaded_parameters(job, model, new),
    )
    keys = (
        "train/loss",
        "train/acc",
        "train/sampling_prob",
        "train/tokens_per_s",
    )  # sampling_prob: when it is on
    return TaskParts(module, train, val, model.config, keys, new)


def build_classification(job: FinetuneJob, rank: int, world: int) -> TaskParts:
    _, _, manifest = data_paths(job.data_dir, job.task)
    labels = read_manifest(data_view(job.data_dir) / job.task / "manifest.json")["labels"]
    if job.model is not None:
        model, new = scratch_model(job, manifest, labels=labels), []
    elif job.encoder_checkpoint:
        model, new = EncoderClassifier.from_pretrained(
            fetch_checkpoint(job.encoder_checkpoint), len(labels), labels
        )
    elif job.decoder_checkpoint:
        model, new = DecoderClassifier.from_pretrained(
            fetch_checkpoint(job.decoder_checkpoint), len(labels), labels
        )
    else:
        raise CheckpointError(
            "classification needs 'encoder_checkpoint' (BERT) or 'decoder_checkpoint' (GPT), or "
            "model.arch=lstm_classifier to train from scratch"
        )
    if job.model is None:
        model.dropout.p = model.config.classifier_dropout = job.classifier_dropout
    if isinstance(model, EncoderClassifier):
        model.use_pooling(job.classifier_pooling)  # recorded in the checkpoint's model config
    from finetune.module import ClassificationModule

    train, val = _loaders(job, rank, world)
    module = ClassificationModule(
        model, job.optim, job.trainer.max_steps, pretrained=loaded_parameters(job, model, new)
    )
    return TaskParts(module, train, val, model.config, ("train/loss", "train/acc"), new)


def loaded_parameters(job: FinetuneJob, model: Any, new: list[str]) -> frozenset[str]:
    """Names of the parameters loaded from a checkpoint (optim.pretrained_lr_ratio applies to them): none for a
    model from scratch (a `model` section), every one but the `new` ones for a warm start."""
    return frozenset() if job.model is not None else pretrained_names(model, new)


def scratch_config(job: FinetuneJob, manifest: dict, labels: list[str] | None = None) -> Any:
    """The job's from-scratch model config, speaking the data's vocabulary and covering its lengths."""
    if "target_tokenizer" in manifest:
        raise CheckpointError(
            f"'model.arch': {job.model.arch} trains one vocabulary for source and target, but "
            f"{job.data_dir} was prepared with a target tokenizer of its own; prepare it without "
            "data.target_tokenizer_path, or warm-start from encoder_checkpoint/decoder_checkpoint"
        )
    values: dict[str, Any] = {
        "vocab_size": int(manifest["vocab_size"]),
        "pad_id": int(manifest["special_tokens"]["[PAD]"]),
    }
    if labels is not None:
        values.update(num_labels=len(labels), label_names=list(labels))
    config = dataclasses.replace(job.model, **values)
    positions = getattr(config, "max_positions", None)
    data_cfg = manifest.get("config", {})
    longest = max(int(data_cfg.get("max_src_len", 0)), int(data_cfg.get("max_tgt_len", 0)))
    if positions is not None and positions < longest:
        raise CheckpointError(
            f"'model.max_positions' ({positions}) < the data's longest sequence ({longest}: "
            "max_src_len / max_tgt_len); raise it"
        )
    return config


def scratch_model(job: FinetuneJob, manifest: dict, labels: list[str] | None = None) -> Any:
    from finetune.models import ARCHITECTURES

    config = scratch_config(job, manifest, labels)
    return ARCHITECTURES[config.arch].model(
        config
    )  # the model's own init; every rank was seeded alike


def preflight(
    job: PretrainJob | FinetuneJob, out_dir: Path | None = None
) -> PretrainJob | FinetuneJob:
    """Driver-side checks before any worker starts: data present, checkpoints of the right family, speaking the
    data's vocabulary, and the data holding what every worker will read. `hf:` checkpoints are
    converted into `out_dir/imported/`; returns the job to launch."""
    _, _, manifest = data_paths(job.data_dir, job.task)
    job = _check_model(job, manifest, out_dir)
    check_prepared_data(job, manifest)
    return job


def _check_model(job: Job, manifest: dict, out_dir: Path | None) -> Job:
    """The model the job builds fits the data: checkpoints of the right family and vocabulary."""
    from finetune.models.warm_start import load_pretrained

    if isinstance(job, PretrainJob):
        if job.init_from:
            job = _continued_pretraining(job, out_dir)
        fit_model_to_data(job, manifest)
        return job

    if job.model is not None:
        labels = read_manifest(data_view(job.data_dir) / job.task / "manifest.json").get("labels")
        scratch_config(job, manifest, labels)
        return job
    needed = {"encoder_checkpoint": "bert"}
    if job.task == "translation":
        needed["decoder_checkpoint"] = "gpt"
    elif job.decoder_checkpoint and not job.encoder_checkpoint:
        needed = {"decoder_checkpoint": "gpt"}  # a GPT classifier
    job = import_hf_checkpoints(job, needed, out_dir)
    for key, arch in needed.items():
        path = getattr(job, key)
        if not path:
            raise CheckpointError(
                f"'{key}': {job.task} needs a Kiln {arch.upper()} checkpoint directory"
            )
        load_pretrained(fetch_checkpoint(path), arch)
        # a translation decoder speaks the target side: the data's target_tokenizer.json where it has one
        check_tokenizer_matches_data(
            fetch_checkpoint(path),
            data_view(job.data_dir),
            key,
            target=job.task == "translation" and key == "decoder_checkpoint",
        )
    return job


def check_prepared_data(job: PretrainJob | FinetuneJob, manifest: dict) -> None:
    """On the driver, what every worker will open: the tokenizer(s), the task's manifest, the
    shards of its train and validation splits, and a batch per rank. (Shard sha256s stay the
    workers' check: hashing every shard twice would cost a large corpus minutes.)"""
    root, task_dir = Location.of(job.data_dir), Location.of(job.data_dir) / job.task
    files = ["tokenizer.json"]
    if "target_tokenizer" in manifest:
        files.append(TARGET_TOKENIZER_FILE)
    present = set(root.list())
    for name in files:
        if name not in present:
            raise DataDirError(
                f"{root / name}: missing from the prepared data; run `kiln data prepare`"
            )
    task_manifest = task_dir / "manifest.json"
    splits = read_manifest(task_manifest.text).get("splits", {})
    shards = set(task_dir.walk())  # one listing, also of a bucket
    for split in ("train", "validation"):
        if split not in splits:
            raise DataDirError(f"{task_manifest}: no split {split!r}; it has {sorted(splits)}")
        for shard in splits[split]["shards"]:
            if shard["file"] not in shards:
                raise DataDirError(
                    f"{task_dir / shard['file']}: missing (listed in {task_manifest})"
                )
    world, batch = job.cluster.num_workers, job.trainer.batch_size
    train, val = int(splits["train"]["rows"]), int(splits["validation"]["rows"])
    if train // world // batch == 0 or val == 0:
        raise DataError(
            f"{task_dir}: {train} train and {val} validation rows make no batch of "
            f"{batch} on each of {world} workers; lower trainer.batch_size or add data"
        )


def count_parameters(job: PretrainJob | FinetuneJob) -> int:
    """The job's model size without allocating it (built on the meta device; a pretrained checkpoint's is read from
    its weights file), for the disk-space check before training."""
    from pretrain.models.meta import build_on_meta, num_parameters

    _, _, manifest = data_paths(job.data_dir, job.task)
    if isinstance(job, PretrainJob):
        config = fit_model_to_data(job, manifest).model
        cls = GPTLMHeadModel if isinstance(config, GPTConfig) else BertForPreTraining
        return num_parameters(build_on_meta(cls, config))
    if job.model is not None:
        from finetune.models import ARCHITECTURES

        labels = read_manifest(data_view(job.data_dir) / job.task / "manifest.json").get("labels")
        config = scratch_config(job, manifest, labels)
        return num_parameters(build_on_meta(ARCHITECTURES[config.arch].model, config))
    files = [
        fetch_checkpoint(p) / "model.safetensors"
        for p in (job.encoder_checkpoint, job.decoder_checkpoint)
        if p
    ]
    return sum(f.stat().st_size // 4 for f in files if f.is_file())  # fp32 tensors, 4 bytes each


def _continued_pretraining(job: PretrainJob, out_dir: Path | None) -> PretrainJob:
    """`init_from` imported if it is `hf:`, checked for family and vocabulary; the model config becomes its config."""
    from finetune.models.warm_start import load_pretrained

    family = pretrain_family(job.task)
    job = import_hf_checkpoints(job, {"init_from": family}, out_dir)
    ckpt = load_pretrained(fetch_checkpoint(job.init_from), family)
    check_tokenizer_matches_data(
        fetch_checkpoint(job.init_from), data_view(job.data_dir), "init_from"
    )
    print(
        f"[init] model weights and config from {job.init_from} ({family}); the config's 'model' section is not used",
        flush=True,
    )
    return dataclasses.replace(job, model=ckpt.model_config)


def import_hf_checkpoints(job: Job, needed: dict[str, str], out_dir: Path | None) -> Job:
    """Each `hf:<path or hub name>` among `needed` (key -> family) converted into `out_dir/imported/<encoder|decoder>`
    once, on the driver; the returned job points at the Kiln checkpoints instead."""
    changes = {}
    for key, arch in needed.items():
        value = getattr(job, key)
        if not value or not value.startswith(HF_PREFIX):
            continue
        if out_dir is None:
            raise CheckpointError(
                f"'{key}': {value} is converted into the run's output directory; "
                "call preflight(job, out_dir)"
            )
        imported = import_hf(value, arch)
        dest = save_imported_checkpoint(
            imported, Path(out_dir) / "imported" / key.removesuffix("_checkpoint"), overwrite=True
        )
        fresh = (
            f"; initialised fresh: {', '.join(imported.new_tensors)}"
            if imported.new_tensors
            else ""
        )
        print(f"[import] {value} ({imported.layout}) -> {dest}{fresh}", flush=True)
        changes[key] = str(dest)
    return dataclasses.replace(job, **changes) if changes else job


TASKS: dict[str, Callable[[Any, int, int], TaskParts]] = {
    "mlm_nsp": build_pretrain,
    "clm": build_pretrain,
    "translation": build_translation,
    "classification": build_classification,
}
