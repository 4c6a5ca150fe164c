"""Checkpoint averaging (`kiln average`): the element-wise mean of the weights of several checkpoints
of one run, written as one inference checkpoint.

Averaging the last checkpoints of a run smooths the noise of the final optimizer steps: Vaswani et
al. (2017) scored their base Transformer as the average of its last 5 checkpoints (written every 10
minutes), the big one of its last 20; fairseq has it as `scripts/average_checkpoints.py`.

Which checkpoints: either one run directory (its `checkpoints/`, or a directory of checkpoints) and
`last` (its N newest complete ones, in the manifest's step order: `list_checkpoints`), or an
explicit list of checkpoint directories. Local paths and URIs alike; each is loaded (and its sha256s
checked) by `load_checkpoint`, one at a time, so memory holds one checkpoint and the float64 sums.

All of them must have the same arch, model config, tensor names, shapes, dtypes and tied names.
Floating-point tensors are summed in float64 and cast back to their dtype; any other tensor (an
integer or bool buffer: a counter or an index, whose mean means nothing) is the newest checkpoint's.

What is written: `model.safetensors` (ties kept: the model is built from the newest checkpoint's
config through the architecture registry and loaded strictly), `config.json`, the newest
checkpoint's tokenizer(s), job config and data-manifest record, so `kiln evaluate --checkpoint OUT`
scores it exactly as it scores a training checkpoint. No `trainer_state`: there is no optimizer
state to continue from, so it is not a checkpoint to resume. Its manifest's `step` is the newest
averaged step, and `averaged` lists every checkpoint that went into it (name, step, location).
`out` must be new, and outside the directory the averaged checkpoints lie in: there a run's resume
(and `--checkpoint RUN`) would take it for the run's newest checkpoint.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data_pipeline.storage import Location
from pretrain.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    LoadedCheckpoint,
    Where,
    _order,  # the listing's own order (step, then creation), for an explicit list too
    build_strict,
    list_checkpoints,
    load_checkpoint,
    publish_checkpoint,
    read_manifest,
    save_checkpoint,
)
from pretrain.registry import PRETRAIN_ARCHITECTURES, ArchSpec

AVERAGED_KEY = "averaged"  # the manifest key listing what was averaged
CHECKPOINTS_DIR = "checkpoints"  # a run directory's (cluster.rundir.CHECKPOINTS)

Say = Callable[[str], None]


def average_checkpoints(
    sources: Sequence[Where],
    out: Where,
    *,
    last: int | None = None,
    registry: Mapping[str, ArchSpec] | None = None,
    say: Say = print,
) -> Path | str:
    """Average the checkpoints `sources` means (module docstring) into a new checkpoint at `out`; returns
    `out` (a local one as a Path). registry: the architectures to load (finetune.models.ARCHITECTURES
    for every one; pretrain's families by default). Bad input is a CheckpointError naming the path."""
    if _exists(out):
        raise CheckpointError(f"--out {out}: already exists; give a new directory")
    chosen = choose_checkpoints(sources, last)
    _check_outside(out, chosen)
    model, newest = _average(chosen, registry or PRETRAIN_ARCHITECTURES, say)
    written = _write(out, model, newest, chosen)
    steps = f"steps {chosen[0][1].get('step')}..{chosen[-1][1].get('step')}"
    say(f"[average] wrote {written} (the mean of {len(chosen)} checkpoints, {steps})")
    return written


# ---------------------------------------------------------------- which checkpoints
def choose_checkpoints(sources: Sequence[Where], last: int | None) -> list[tuple[Where, dict]]:
    """(checkpoint, manifest) of the checkpoints to average, oldest first (the manifest's step)."""
    if not sources:
        raise CheckpointError("--checkpoints: give a run directory, or at least 2 checkpoints")
    if len(sources) == 1 and not _is_checkpoint(sources[0]):
        return _newest_of_run(sources[0], last)
    if last is not None:
        raise CheckpointError(
            f"--last {last}: picks from one run directory, but {sources[0]} is a checkpoint; "
            "give a run directory with --last, or the checkpoints without it"
        )
    if len(sources) < 2:
        raise CheckpointError(
            f"{sources[0]}: one checkpoint; averaging needs at least 2 (or a run directory "
            "with --last N)"
        )
    for where in sources:
        if not _is_checkpoint(where):
            raise CheckpointError(
                f"{where}: not a checkpoint (no {MANIFEST_FILE}); a run directory goes alone, "
                "with --last N"
            )
    _refuse_repeats(sources)
    return sorted(((where, read_manifest(where)) for where in sources), key=_order)


def _newest_of_run(run: Where, last: int | None) -> list[tuple[Where, dict]]:
    if last is None:
        raise CheckpointError(
            f"--checkpoints {run}: a run directory needs --last N (how many of its newest "
            "checkpoints to average)"
        )
    if last < 2:
        raise CheckpointError(f"--last {last}: averaging needs at least 2 checkpoints")
    root = _checkpoints_root(run)
    found = list_checkpoints(root)
    if len(found) < last:
        raise CheckpointError(
            f"{run}: has {len(found)} complete checkpoint(s) under {root}, fewer than --last {last}"
        )
    return [(where, read_manifest(where)) for where in found[-last:]]


def _checkpoints_root(run: Where) -> Where:
    """As `select_checkpoint` reads a run directory: its `checkpoints/`, else itself."""
    loc = Location.of(run)
    if loc.is_remote:
        return loc / CHECKPOINTS_DIR if CHECKPOINTS_DIR in loc.list() else loc
    path = loc.local_path
    return path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path


def _refuse_repeats(sources: Sequence[Where]) -> None:
    seen: set[str] = set()
    for where in sources:
        key = _key(where)
        if key in seen:
            raise CheckpointError(f"{where}: given twice; it would count double in the mean")
        seen.add(key)


# ---------------------------------------------------------------- where the result goes
def _check_outside(out: Where, chosen: list[tuple[Where, dict]]) -> None:
    """`out` must not lie in (or below) a directory holding averaged checkpoints (module docstring)."""
    target = _key(out)
    for where, _ in chosen:
        parent = _key(Location.of(where).parent)
        if target.startswith(parent.rstrip("/") + "/"):
            raise CheckpointError(
                f"--out {out}: inside {parent}, beside the checkpoints it averages, where a "
                "resume or `--checkpoint` would take it for the run's newest; write it elsewhere "
                "(e.g. beside the run directory)"
            )


def _write(
    out: Where, model: nn.Module, newest: LoadedCheckpoint, chosen: list[tuple[Where, dict]]
) -> Path | str:
    record = [
        {"name": Location.of(where).name, "step": manifest.get("step"), "location": str(where)}
        for where, manifest in chosen
    ]
    kwargs: dict[str, Any] = dict(
        tokenizer_file=newest.tokenizer_file,  # its target_tokenizer.json comes along
        job_config=newest.job_config,
        data_manifest=newest.manifest.get("data_manifest"),
        step=newest.manifest.get("step"),
        extra={AVERAGED_KEY: record},
    )
    loc = Location.of(out)
    if not loc.is_remote:
        return save_checkpoint(loc.local_path, model, newest.model_config, **kwargs)
    with tempfile.TemporaryDirectory(prefix="kiln-average-") as tmp:
        local = save_checkpoint(Path(tmp) / loc.name, model, newest.model_config, **kwargs)
        publish_checkpoint(local, loc)
    return str(out)


# ---------------------------------------------------------------- the mean
def _average(
    chosen: list[tuple[Where, dict]], registry: Mapping[str, ArchSpec], say: Say
) -> tuple[nn.Module, LoadedCheckpoint]:
    """(the newest checkpoint's model holding the averaged weights, the newest checkpoint)."""
    sums: dict[str, Tensor] = {}
    first: tuple[Where, LoadedCheckpoint] | None = None
    for i, (where, manifest) in enumerate(chosen, 1):
        name = Location.of(where).name
        say(f"[average] {i}/{len(chosen)} {name} (step {manifest.get('step')})")
        loaded = load_checkpoint(where, registry, build_model=False)
        if first is None:
            first = (where, loaded)
        else:
            _check_alike(first, where, loaded)
        _accumulate(sums, _stored(loaded.state_dict)[0])
    newest = loaded  # chosen is oldest first
    weights = _mean(sums, newest.state_dict, len(chosen))
    return _into_model(weights, newest, registry), newest


def _stored(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(each tensor once, {tied alias: the name it is stored under}); load_weights gives an alias
    the very tensor of its name, so averaging the stored names averages the tie once."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for name, t in state_dict.items():
        if id(t) in by_id:
            aliases[name] = by_id[id(t)]
        else:
            by_id[id(t)] = name
            stored[name] = t
    return stored, aliases


def _accumulate(sums: dict[str, Tensor], stored: dict[str, Tensor]) -> None:
    for name, t in stored.items():
        if not t.is_floating_point():
            sums[name] = t  # integer / bool: the newest's (loaded last) is kept, not averaged
        elif name in sums:
            sums[name].add_(t.to(torch.float64))
        else:
            sums[name] = t.to(torch.float64, copy=True)


def _mean(sums: dict[str, Tensor], newest: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """Every name of the newest state dict, its tied aliases sharing the averaged tensor."""
    stored, aliases = _stored(newest)
    weights = {
        name: (sums[name] / n).to(t.dtype) if t.is_floating_point() else sums[name]
        for name, t in stored.items()
    }
    weights.update({alias: weights[source] for alias, source in aliases.items()})
    return weights


def _into_model(
    weights: dict[str, Tensor], newest: LoadedCheckpoint, registry: Mapping[str, ArchSpec]
) -> nn.Module:
    """The newest checkpoint's model with `weights` loaded strictly: its state_dict re-ties what the
    architecture ties, so the checkpoint stores a tied matrix once, as training's do."""
    return build_strict(registry[newest.arch].model, newest.model_config, weights, newest.path)


# ---------------------------------------------------------------- same model, or an error
def _check_alike(
    first: tuple[Where, LoadedCheckpoint], where: Where, loaded: LoadedCheckpoint
) -> None:
    """CheckpointError naming `where` and what in it differs from the first checkpoint."""
    ref_where, ref = first
    what = _difference(ref, loaded)
    if what is not None:
        raise CheckpointError(
            f"{where}: {what} differs from {ref_where}; only one model's checkpoints average"
        )


def _difference(a: LoadedCheckpoint, b: LoadedCheckpoint) -> str | None:
    if a.arch != b.arch:
        return f"arch ({b.arch!r}, not {a.arch!r})"
    config = _config_difference(asdict(a.model_config), asdict(b.model_config))
    if config is not None:
        return config
    (sa, ta), (sb, tb) = _stored(a.state_dict), _stored(b.state_dict)
    for name in sorted(set(sa) ^ set(sb)):
        return f"the tensor names ({name!r} {'missing' if name in sa else 'extra'})"
    for name, t in sa.items():
        u = sb[name]
        if (t.shape, t.dtype) != (u.shape, u.dtype):
            return f"tensor {name!r} ({tuple(u.shape)} {u.dtype}, not {tuple(t.shape)} {t.dtype})"
    return None if ta == tb else f"the tied names ({tb}, not {ta})"


def _config_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first config.json key whose value differs, as `config.key (b, not a)`."""
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _config_difference(va, vb, f"{prefix}{key}.")
            if found is not None:
                return found
        elif va != vb:
            return f"config.json {prefix}{key} ({vb!r}, not {va!r})"
    return None


# ---------------------------------------------------------------- locations
def _is_checkpoint(where: Where) -> bool:
    loc = Location.of(where) / MANIFEST_FILE
    return loc.is_file() if loc.is_remote else loc.local_path.is_file()


def _exists(where: Where) -> bool:
    loc = Location.of(where)
    if not loc.is_remote:
        return loc.local_path.exists()
    return loc.exists() or bool(loc.list())  # a prefix exists while it holds objects


def _key(where: Where) -> str:
    """A location as comparable text: a local one resolved (symlinks, `..`), a URI as written."""
    loc = Location.of(where)
    return loc.text.rstrip("/") if loc.is_remote else loc.local_path.resolve().as_posix()
