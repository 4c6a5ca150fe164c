"""Copy pretrained weights into a fine-tuning model by name, refusing anything that does not line up.

Shared by the warm-started seq2seq model and the classifier: both take some tensors from a pretraining
checkpoint, initialise a few new ones (cross-attention, heads), and must report exactly which ones are new.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import Tensor, nn

from data_pipeline.storage import Location
from data_pipeline.tokenizer import load_translation_tokenizers
from pretrain.checkpoint import CONFIG_FILE, CheckpointError, LoadedCheckpoint, load_checkpoint
from pretrain.hf_import import check_tokenizer_matches_data

_SHOW = 5  # how many offending names an error message lists


def load_pretrained(path: Path | str, expected_arch: str) -> LoadedCheckpoint:
    """Load (and sha256-verify) a pretraining checkpoint, a local directory or a URI, and insist on
    its model family."""
    ckpt = load_checkpoint(path)  # a URI stays a str: Path() would turn `s3://` into `s3:/`
    arch = getattr(ckpt.model_config, "arch", None)
    if arch != expected_arch:
        raise CheckpointError(
            f"{Location.of(path) / CONFIG_FILE}: arch is {arch!r}, but a {expected_arch!r} "
            "checkpoint is needed here (were the encoder and decoder checkpoints swapped?)"
        )
    return ckpt


def check_same_tokenizer(first: Path, second: Path) -> None:
    """Without prepared data to compare with, encoder and decoder must share one tokenizer (docs/design.md)."""
    a, b = Path(first) / "tokenizer.json", Path(second) / "tokenizer.json"
    if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
        raise CheckpointError(
            f"{a} and {b} differ: encoder and decoder must share one tokenizer (docs/design.md), "
            "unless the data gives each side its own (data.target_tokenizer_path)"
        )


def check_tokenizers(
    encoder: LoadedCheckpoint, decoder: LoadedCheckpoint, data_dir: Path | None
) -> None:
    """Each half must speak its side of the data: the encoder the source tokenizer (tokenizer.json), the decoder
    the target one (target_tokenizer.json where the data has one, else the shared tokenizer.json), and have an
    embedding row for every id of it."""
    if data_dir is None:
        check_same_tokenizer(encoder.path, decoder.path)
        return
    pair = load_translation_tokenizers(data_dir)
    for ckpt, key, tok, rows in (
        (encoder, "encoder_checkpoint", pair.source, encoder.model_config.vocab_size),
        (decoder, "decoder_checkpoint", pair.target, decoder.model_config.vocab_size),
    ):
        check_tokenizer_matches_data(
            ckpt.path, Path(data_dir), key, target=key == "decoder_checkpoint"
        )
        if tok.get_vocab_size() > rows:
            side = "source" if key == "encoder_checkpoint" else "target"
            raise CheckpointError(
                f"'{key}': {ckpt.path} has {rows} embedding rows, but the data's {side} tokenizer "
                f"has {tok.get_vocab_size()} tokens ({data_dir})"
            )


def copy_matching(
    target: nn.Module, source: dict[str, Tensor], where: str, is_new: Callable[[str], bool]
) -> list[str]:
    """Load `source` into `target` by name; return the names of `target` that `source` lacks.

    Every name of `source` must exist in `target` with the same shape, and every name missing from
    `source` must satisfy `is_new` (e.g. cross-attention): anything else means the checkpoint does not
    belong to this architecture, and a silent partial load would train a half-random model.
    """
    wanted = target.state_dict()
    unexpected = sorted(set(source) - set(wanted))
    missing = [k for k in wanted if k not in source]
    not_new = [k for k in missing if not is_new(k)]
    if unexpected or not_new:
        raise CheckpointError(
            f"{where}: tensors do not match the model: missing {len(not_new)} "
            f"(e.g. {not_new[:_SHOW]}), unexpected {len(unexpected)} (e.g. {unexpected[:_SHOW]})"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(wanted[k].shape)}"
        for k, v in source.items()
        if v.shape != wanted[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{where}: {len(wrong)} tensor shapes differ, e.g. {wrong[:_SHOW]}")
    with torch.no_grad():
        for name, tensor in wanted.items():
            if name in source:
                tensor.copy_(source[name])  # state_dict tensors share storage with the parameters
    return missing


def pretrained_names(model: nn.Module, new: Collection[str]) -> frozenset[str]:
    """The parameters a warm start loaded: every name of `model.named_parameters()` (a tied parameter once)
    whose tensor is not among `new` (the names `from_pretrained` returns). Matched by tensor, not by name, so a
    tied parameter is new under whichever of its names `new` lists."""
    fresh = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in new}
    return frozenset(name for name, p in model.named_parameters() if id(p) not in fresh)
