"""The Kiln checkpoint directory (docs/design.md, "Checkpoints").

    <name>/
      model.safetensors        weights; a tied matrix is stored once, its other names kept in the metadata
      config.json              {"arch": "bert" | "gpt" | ..., "config": dataclasses.asdict(model_config)}
      tokenizer.json           copied from the data directory (when given)
      target_tokenizer.json    translation with a target vocabulary of its own: copied with tokenizer.json
      trainer_state/state.pt   optimizer / scheduler / step / loader / RNG dicts (torch.save; weights_only load)
      manifest.json            sha256 + size of every file above, data-manifest sha256, job config, git commit

A checkpoint is written into `.tmp-<name>` beside the target and renamed when complete, so a directory
without the leading dot either is complete or has no valid manifest (and is then ignored by
`list_checkpoints`). Nothing is ever unpickled except with `torch.load(weights_only=True)`.

This module is the format (what readers such as `kiln evaluate` and `kiln export` need too); how a
training run resumes from these directories is cluster/resume.py.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.metadata
import json
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from data_pipeline.configlib import ConfigError, from_dict
from data_pipeline.tokenizer import TARGET_TOKENIZER_FILE
from pretrain.registry import PRETRAIN_ARCHITECTURES, ArchSpec

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TRAINER_STATE_FILE = "trainer_state/state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT = "kiln-checkpoint"
FORMAT_VERSION = 1
_TIED_METADATA_KEY = "kiln.tied"  # safetensors metadata: {alias name: stored name}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


@dataclass
class LoadedCheckpoint:
    path: Path
    arch: str
    model_config: Any
    state_dict: dict[str, Tensor]  # every name the model expects, tied aliases sharing one tensor
    model: (
        nn.Module | None
    )  # built from model_config and loaded strictly (None when build_model=False)
    job_config: dict | None
    manifest: dict
    tokenizer_file: Path | None

    def trainer_state(self) -> dict | None:
        return load_trainer_state(self.path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- saving
def save_checkpoint(
    path: Path,
    model: nn.Module,
    model_config: Any,
    tokenizer_file: Path | None = None,
    job_config: dict | None = None,
    trainer_state: dict | None = None,
    data_manifest: Path | None = None,
    *,
    overwrite: bool = False,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint directory at `path` (atomically, via `.tmp-<name>`); returns `path`.

    model_config: a dataclass with an `arch` field. state_dict: use this instead of `model.state_dict()`
    (e.g. weights consolidated from ZeRO-3). data_manifest: the data directory or its manifest.json.
    overwrite: replace an existing checkpoint at `path` (otherwise that is an error)."""
    path = Path(path)
    arch = _arch_of(model_config)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise CheckpointError(f"{tokenizer_file}: tokenizer file not found")
    if trainer_state is not None:
        _check_weights_only_safe(trainer_state, "trainer_state")
    job_json = _json_or_error(job_config, "job_config")
    data_info = _data_manifest_info(data_manifest)
    tmp = path.parent / f".tmp-{path.name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that crashed; never visible as a checkpoint
    tmp.mkdir(parents=True)
    try:
        _write_weights(
            tmp / MODEL_FILE, state_dict if state_dict is not None else model.state_dict()
        )
        _write_json(tmp / CONFIG_FILE, {"arch": arch, "config": dataclasses.asdict(model_config)})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            target = _target_tokenizer_beside(Path(tokenizer_file))
            if target is not None:
                shutil.copyfile(target, tmp / TARGET_TOKENIZER_FILE)
        if trainer_state is not None:
            (tmp / TRAINER_STATE_FILE).parent.mkdir(parents=True)
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        step = trainer_state.get("step") if trainer_state is not None else None
        _write_json(tmp / MANIFEST_FILE, _manifest(tmp, arch, step, job_json, data_info))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(
                f"{path}: the disk is full ({free / 2**20:.0f} MiB free on {path.parent}) while "
                "writing this checkpoint; nothing of it was kept and the earlier checkpoints are "
                "intact. Free space (or lower trainer.keep_last) and resume with "
                "trainer.resume=auto"
            ) from None
        raise
    _move_into_place(tmp, path)
    return path


def _target_tokenizer_beside(tokenizer_file: Path) -> Path | None:
    """A data or checkpoint directory's tokenizer.json and its target_tokenizer.json (translation data prepared with
    two vocabularies) are one pair: whoever saves the first from there saves both, so no writer can drop it."""
    target = tokenizer_file.with_name(TARGET_TOKENIZER_FILE)
    return target if tokenizer_file.name == TOKENIZER_FILE and target.is_file() else None


CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights (4) + AdamW's two fp32 moments in trainer_state (8)
ZERO_CHECKPOINT_BYTES_PER_PARAM = 16  # ZeRO's trainer_state holds the fp32 master weights (4) too


def check_free_space(
    root: Path, num_params: int, keep_last: int, bytes_per_param: int = CHECKPOINT_BYTES_PER_PARAM
) -> None:
    """Before training: the disk under `root` must hold the run's checkpoints at their peak (keep_last kept + the one
    being written), less what checkpoints already there take. Raises CheckpointError naming the numbers."""
    root = Path(root)
    probe = next(p for p in (root, *root.parents) if p.exists())
    each = num_params * bytes_per_param
    present = sum(
        f.stat().st_size for c in list_checkpoints(root) for f in c.rglob("*") if f.is_file()
    )
    needed = (keep_last + 1) * each - present
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CheckpointError(
            f"{root}: {free / 2**20:.0f} MiB free, but {keep_last + 1} checkpoints of ~"
            f"{each / 2**20:.0f} MiB each ({num_params:,} parameters x {bytes_per_param} "
            "bytes) need more; free space, lower trainer.keep_last, or choose another --out"
        )


def _arch_of(model_config: Any) -> str:
    if not dataclasses.is_dataclass(model_config) or isinstance(model_config, type):
        raise CheckpointError(
            f"model_config must be a dataclass instance, got {type(model_config).__name__}"
        )
    arch = getattr(model_config, "arch", None)
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(
            f"{type(model_config).__name__} has no string `arch` field naming the model family"
        )
    return arch


def _json_or_error(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} is not JSON-serialisable: {e}") from e
    return value


def _data_manifest_info(data_manifest: Path | None) -> dict | None:
    if data_manifest is None:
        return None
    p = Path(data_manifest)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise CheckpointError(f"{p}: data manifest not found")
    return {"path": str(p.resolve()), "sha256": sha256_file(p)}


def _write_weights(file: Path, state_dict: dict[str, Tensor]) -> None:
    """safetensors refuses tensors that share memory: keep the first name of each tied group (the
    embedding, which precedes its head in state_dict order) and record the other names as aliases."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        if t.device.type == "meta":
            raise CheckpointError(
                f"{file}: tensor {name!r} is on the meta device; materialise the model first"
            )
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if key in views:
            aliases[name] = views[key]
            continue
        views[key] = name
        ptr = t.untyped_storage().data_ptr()
        # A partial view of storage already stored (not a tie) is copied, so the file holds it independently.
        stored[name] = t.detach().clone() if ptr in storages else t.detach()
        stored[name] = stored[name].to("cpu").contiguous()
        storages.add(ptr)
    save_file(stored, str(file), metadata={"format": "pt", _TIED_METADATA_KEY: json.dumps(aliases)})


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Fail at save time, naming the key, on anything `torch.load(weights_only=True)` would refuse at resume."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(
                    f"{where}: key {k!r} of type {type(k).__name__} cannot be loaded safely"
                )
            _check_weights_only_safe(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
    elif not isinstance(obj, (str, int, float, bool, Tensor, torch.Size)) and obj is not None:
        raise CheckpointError(
            f"{where} is a {type(obj).__name__}, which torch.load(weights_only=True) refuses; "
            "store tensors, numbers, strings, lists or dicts"
        )


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _manifest(root: Path, arch: str, step: Any, job_config: Any, data_info: dict | None) -> dict:
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "step": step if isinstance(step, int) else None,
        "created_ns": time.time_ns(),
        "kiln_version": _kiln_version(),
        "git_commit": _git_commit(),
        "files": files,
        "data_manifest": data_info,
        "job_config": job_config,
    }


def _kiln_version() -> str:
    try:
        return importlib.metadata.version("kiln")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        tmp.rename(path)
        return
    old = (
        path.parent / f".old-{path.name}"
    )  # dot-prefixed: never listed, even if we crash right here
    if old.exists():
        shutil.rmtree(old)
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old)


# ---------------------------------------------------------------- loading
def read_manifest(path: Path) -> dict:
    """The checkpoint's manifest.json, parsed and shape-checked (no hashing)."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (an incomplete save, or not a Kiln checkpoint)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text ({e})") from e
    valid = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not valid or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(
            f"{file}: not a {FORMAT} manifest (needs 'format': {FORMAT!r} and a 'files' mapping)"
        )
    for required in (MODEL_FILE, CONFIG_FILE):
        if required not in manifest["files"]:
            raise CheckpointError(f"{file}: 'files' does not list {required}")
    return manifest


def verify_checkpoint(path: Path) -> dict:
    """Check every file listed in the manifest exists and has the recorded sha256; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {MANIFEST_FILE} but missing")
        got = sha256_file(f)
        if got != info.get("sha256"):
            raise CheckpointError(
                f"{f}: sha256 mismatch (manifest {str(info.get('sha256'))[:16]}..., file "
                f"{got[:16]}...): the file was modified or corrupted after saving"
            )
    return manifest


def load_checkpoint(
    path: Path,
    registry: Mapping[str, ArchSpec] | None = None,
    *,
    build_model: bool = True,
    verify: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Verify sha256s, rebuild the config dataclass via the arch registry, load the weights, and (by
    default) build the model and load it strictly, with tied matrices re-tied."""
    path = Path(path)
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
    # pretrain's families by default; finetune.models.ARCHITECTURES holds every architecture
    registry = PRETRAIN_ARCHITECTURES if registry is None else registry
    config_file = path / CONFIG_FILE
    doc = _read_json(config_file)
    arch = doc.get("arch") if isinstance(doc, dict) else None
    if arch not in registry:
        raise CheckpointError(
            f"{config_file}: arch {arch!r} is not in the architecture registry "
            f"(known: {sorted(registry)})"
        )
    if not isinstance(doc.get("config"), dict):
        raise CheckpointError(
            f"{config_file}: key 'config' must be a mapping of the config's fields"
        )
    config_cls, model_cls = registry[arch].config, registry[arch].model
    try:
        model_config = from_dict(config_cls, doc["config"], str(config_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None  # one line that starts with the file
    state_dict = load_weights(path / MODEL_FILE, map_location)
    model = None
    if build_model:
        model = model_cls(model_config)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"{path / MODEL_FILE}: weights do not fit {model_cls.__name__}: {e}"
            ) from e
    tokenizer = path / TOKENIZER_FILE
    return LoadedCheckpoint(
        path=path,
        arch=arch,
        model_config=model_config,
        state_dict=state_dict,
        model=model,
        job_config=manifest.get("job_config"),
        manifest=manifest,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
    )


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e


def load_weights(file: Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """model.safetensors as a state dict; each tied alias is the very tensor of the name it was stored under."""
    file = Path(file)
    try:
        state_dict = load_file(str(file), device=str(map_location))
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
    except (
        OSError,
        RuntimeError,
        ValueError,
    ) as e:  # safetensors raises SafetensorError (an Exception)
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from e
    for alias, source in json.loads(metadata.get(_TIED_METADATA_KEY, "{}")).items():
        if source not in state_dict:
            raise CheckpointError(
                f"{file}: tied name {alias!r} points at {source!r}, which is not stored"
            )
        state_dict[alias] = state_dict[source]
    return state_dict


def load_trainer_state(path: Path, *, mmap: bool = False) -> dict | None:
    """trainer_state/state.pt of a checkpoint (weights_only=True), or None when it was saved without one.
    mmap: map the tensors instead of reading them (cheap, to look at which keys a checkpoint holds)."""
    file = Path(path) / TRAINER_STATE_FILE
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # the unpickler raises several types; all mean the same to the caller
        raise CheckpointError(f"{file}: cannot load with weights_only=True: {e}") from e


# ---------------------------------------------------------------- RNG state for trainer_state
def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU, CUDA) generator states in weights_only-loadable form."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    """random.setstate wants the nested tuples back that a save/load may have turned into lists."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- a directory of checkpoints
def _is_complete(path: Path) -> bool:
    """A cheap completeness check for listing (sizes, not hashes; load_checkpoint hashes)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            return False
    return True


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints directly under `root`, oldest first (by the manifest's creation time). Names
    starting with '.' (`.tmp-*` saves in progress, `.old-*` being replaced) are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_complete(p)
    ]
    return sorted(found, key=lambda p: (read_manifest(p).get("created_ns", 0), p.name))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def newest_valid_checkpoint(
    root: Path, warn: Callable[[str], None] = print, since_ns: int = 0
) -> Path | None:
    """The newest complete checkpoint under `root` (created at or after `since_ns`) whose files match their sha256s;
    a newer one that fails the check (a flipped byte, a truncated file) is skipped with a warning. None when there
    is no such checkpoint at all; an error when there are some and none is intact (silently starting over would
    discard the run)."""
    found = [p for p in list_checkpoints(root) if read_manifest(p).get("created_ns", 0) >= since_ns]
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            warn(f"[resume] warning: skipping {path.name}: {e}")
            continue
        return path
    if found:
        raise CheckpointError(
            f"{root}: none of the {len(found)} checkpoints is intact (see the warnings above); "
            "nothing to resume from safely"
        )
    return None


def resolve_checkpoint(path: Path, warn: Callable[[str], None] = print) -> Path:
    """The checkpoint `path` means: itself when it is one (it has a manifest.json); for a run
    directory (one with `checkpoints/`) or a directory of checkpoints, its newest complete one whose
    sha256s match. Anything else is returned as is, for its loader to explain."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() or not path.is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if root is path and not any((p / MANIFEST_FILE).exists() for p in path.iterdir()):
        return path  # neither a run directory nor a directory of checkpoints
    newest = newest_valid_checkpoint(root, warn=warn)
    if newest is None:
        raise CheckpointError(
            f"{path}: holds no complete checkpoint (none under {root} has a valid manifest.json)"
        )
    return newest


def clean_partial_saves(root: Path) -> list[Path]:
    """Remove `.tmp-*` directories left by saves that were killed midway (never listed, never resumed from)."""
    root = Path(root)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def prune_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = list_checkpoints(root)[:-keep_last]
    for p in doomed:
        shutil.rmtree(p)
    return doomed
