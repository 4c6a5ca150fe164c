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

On an object store (`s3://…`, data_pipeline.storage) there is no atomic rename: `publish_checkpoint`
uploads a complete local checkpoint file by file and its manifest.json last, so a prefix without a
readable manifest listing every file at its size is an upload in progress (or cut short) and is never
listed, selected or pruned. A remote checkpoint is read through its local copy in the cache
(`fetch_checkpoint`: fetched once per manifest, its sha256s checked before it is used). Listing,
selection, pruning, verification and loading take a local path or a URI alike; a local directory
comes back as a `Path`, a remote checkpoint as its URI (`str`).

Checkpoints are ordered by the manifest's `step` (then `created_ns`, then name): wall clocks of
different machines are never compared. `launch` in the manifest names the `kiln pretrain/finetune`
invocation that wrote it (`newest_valid_checkpoint(..., launch=...)`).

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
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from data_pipeline.configlib import ConfigError, from_dict
from data_pipeline.storage import Location, StorageError, explain, local_copy, resolve
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

# A checkpoint, or a directory of them: a local path or a URI (a `str` or a `Location`).
Where = Path | str | Location


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


@dataclass
class LoadedCheckpoint:
    path: Path  # local: a remote checkpoint's verified copy in the cache
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
    data_manifest: Path | dict | None = None,
    *,
    overwrite: bool = False,
    state_dict: dict[str, Tensor] | None = None,
    launch: str | None = None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory at `path` (atomically, via `.tmp-<name>`); returns `path`.

    model_config: a dataclass with an `arch` field. state_dict: use this instead of `model.state_dict()`
    (e.g. weights consolidated from ZeRO-3). data_manifest: the data directory or its manifest.json,
    or the `data_manifest` entry of another checkpoint's manifest (kept as is). overwrite: replace an
    existing checkpoint at `path` (otherwise that is an error). launch: the id of the `kiln
    pretrain/finetune` invocation writing it, recorded in the manifest. step: the manifest's step
    when there is no trainer_state (whose own step wins). extra: more manifest keys (JSON), e.g. what
    `kiln average` averaged; they may not replace a key the format writes."""
    path = Path(path)
    arch = _arch_of(model_config)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise CheckpointError(f"{tokenizer_file}: tokenizer file not found")
    if trainer_state is not None:
        _check_weights_only_safe(trainer_state, "trainer_state")
    job_json = _json_or_error(job_config, "job_config")
    extra_json = _json_or_error(dict(extra or {}), "extra")
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
            step = trainer_state.get("step")
        manifest = _manifest(tmp, arch, step, job_json, data_info, launch)
        _write_json(tmp / MANIFEST_FILE, _with_extra(manifest, extra_json, path))
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


def _data_manifest_info(data_manifest: Path | dict | None) -> dict | None:
    if data_manifest is None:
        return None
    # Another checkpoint's record, kept as is: its data may be elsewhere (or gone) by now.
    if isinstance(data_manifest, dict):
        return _json_or_error(dict(data_manifest), "data_manifest")
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


def _manifest(
    root: Path, arch: str, step: Any, job_config: Any, data_info: dict | None, launch: str | None
) -> dict:
    files = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "step": step if isinstance(step, int) else None,
        "created_ns": time.time_ns(),  # for information only: never compared (module docstring)
        "launch": launch,
        "kiln_version": _kiln_version(),
        "git_commit": _git_commit(),
        "files": files,
        "data_manifest": data_info,
        "job_config": job_config,
    }


def _with_extra(manifest: dict, extra: dict, path: Path) -> dict:
    clash = sorted(set(extra) & set(manifest))
    if clash:
        raise CheckpointError(f"{path}: extra manifest keys {clash} would replace the format's own")
    return {**manifest, **extra}


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


# ---------------------------------------------------------------- where a checkpoint lives
def _remote(where: Where) -> Location | None:
    """`where` as a Location when it is not on this machine (an object store), else None."""
    if isinstance(where, Path):  # a Path is local (and Path("s3://b/x") would read "s3:/b/x")
        return None
    loc = Location.of(where)
    return loc if loc.is_remote else None


def _local(where: Where) -> Path:
    return where if isinstance(where, Path) else Location.of(where).local_path


def _name(where: Where) -> str:
    return where.name if isinstance(where, Path) else Location.of(where).name


def _with_uri(e: CheckpointError, copy: Path, loc: Location) -> CheckpointError:
    """`e` with the cached copy's path replaced by the URI it is a copy of, so the line names what
    the user gave."""
    return CheckpointError(str(e).replace(str(copy), str(loc)))


# ---------------------------------------------------------------- loading
def read_manifest(path: Where) -> dict:
    """The checkpoint's manifest.json, parsed and shape-checked (no hashing)."""
    loc = _remote(path)
    if loc is None:
        file = _local(path) / MANIFEST_FILE
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (an incomplete save, or not a Kiln checkpoint)")
        return _parse_manifest(file.read_bytes(), str(file))
    return _parse_manifest(_remote_manifest_bytes(loc), str(loc / MANIFEST_FILE))


def _remote_manifest_bytes(loc: Location) -> bytes:
    file = loc / MANIFEST_FILE
    try:
        return file.read_bytes()
    except StorageError:
        if file.exists():
            raise  # the store failed, not the checkpoint
    raise CheckpointError(
        f"{file}: missing (an upload not finished or cut short, or not a Kiln checkpoint)"
    )


def _parse_manifest(data: bytes, file: str) -> dict:
    try:
        manifest = json.loads(data.decode("utf-8"))
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


def verify_checkpoint(path: Where) -> dict:
    """Check every file listed in the manifest exists and has the recorded sha256; returns the
    manifest. A remote checkpoint is fetched into the local cache and its copy is checked."""
    loc = _remote(path)
    return _verify_local(_local(path)) if loc is None else _fetch_verified(loc)[1]


def _verify_local(path: Path) -> dict:
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


def fetch_checkpoint(location: Where) -> Path:
    """The local directory of one specific checkpoint: a local one itself (unchecked; its loader
    verifies it), a remote one its copy in the cache, whose sha256s were checked."""
    loc = _remote(location)
    return _local(location) if loc is None else _fetch_verified(loc)[0]


# Cached copies this process has hashed, with (path, size, mtime) of their files: a copy is hashed
# again only when a file of it changed, so select → fetch → load hashes a large checkpoint once.
_VERIFIED: dict[Path, tuple] = {}


def _fetch_verified(loc: Location) -> tuple[Path, dict]:
    """(cached copy, manifest) of the remote checkpoint `loc`. The copy is keyed by the manifest's
    sha256 (a checkpoint published again under the same name is fetched again) and checked on every
    use: a copy that fails is deleted, so the next use fetches it afresh, and the checkpoint is
    reported as corrupt."""
    data = _remote_manifest_bytes(loc)
    manifest = _parse_manifest(data, str(loc / MANIFEST_FILE))  # before downloading anything
    key = hashlib.sha256(data).hexdigest()
    copy = local_copy(loc, key=key)
    try:
        copied = copy / MANIFEST_FILE
        if not copied.is_file() or sha256_file(copied) != key:
            raise CheckpointError(
                f"{copy}: changed while it was fetched (its manifest.json is not the one read "
                "first); fetch it again once its upload is complete"
            )
        if _VERIFIED.get(copy) != _stamp(copy):
            _verify_local(copy)
            _VERIFIED[copy] = _stamp(copy)
    except CheckpointError as e:
        _VERIFIED.pop(copy, None)
        shutil.rmtree(copy, ignore_errors=True)
        raise _with_uri(e, copy, loc) from None
    return copy, manifest


def _stamp(copy: Path) -> tuple:
    files = sorted(p for p in copy.rglob("*") if p.is_file())
    return tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def load_checkpoint(
    path: Where,
    registry: Mapping[str, ArchSpec] | None = None,
    *,
    build_model: bool = True,
    verify: bool = True,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Verify sha256s, rebuild the config dataclass via the arch registry, load the weights, and (by
    default) build the model and load it strictly, with tied matrices re-tied. A remote checkpoint
    (a URI) is loaded from its verified local copy (`fetch_checkpoint`), whatever `verify` says."""
    loc = _remote(path)
    if loc is None:
        return _load_local(_local(path), registry, build_model, verify, map_location)
    copy = fetch_checkpoint(loc)
    try:
        return _load_local(copy, registry, build_model, False, map_location)
    except CheckpointError as e:
        raise _with_uri(e, copy, loc) from None


def _load_local(
    path: Path,
    registry: Mapping[str, ArchSpec] | None,
    build_model: bool,
    verify: bool,
    map_location: str | torch.device,
) -> LoadedCheckpoint:
    manifest = _verify_local(path) if verify else read_manifest(path)
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
    model = (
        build_strict(model_cls, model_config, state_dict, path / MODEL_FILE)
        if build_model
        else None
    )
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


def build_strict(
    model_cls: type[nn.Module], model_config: Any, state_dict: dict[str, Tensor], where: Path | str
) -> nn.Module:
    """`model_cls(model_config)` with `state_dict` loaded strictly (a tied matrix re-tied); weights
    that do not fit are a CheckpointError naming `where`."""
    model = model_cls(model_config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit {model_cls.__name__}: {e}") from e
    return model


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


def load_trainer_state(path: Where, *, mmap: bool = False) -> dict | None:
    """trainer_state/state.pt of a checkpoint (weights_only=True), or None when it was saved without one.
    mmap: map the tensors instead of reading them (cheap, to look at which keys a checkpoint holds).
    A remote checkpoint's is read from its verified local copy (`fetch_checkpoint`)."""
    file = fetch_checkpoint(path) / TRAINER_STATE_FILE
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
def _complete_manifest(path: Path) -> dict | None:
    """The manifest of a complete local checkpoint (every listed file present at its size; sizes,
    not hashes: loading hashes), else None."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return None
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            return None
    return manifest


def _order(item: tuple[Path | str, dict]) -> tuple:
    """By the manifest's step, then created_ns (the same machine's clock within one launch), then
    name; a checkpoint saved without a step sorts before every one with a step."""
    where, manifest = item
    step = manifest.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else -1
    return (step, manifest.get("created_ns") or 0, _name(where))


def _complete_checkpoints(root: Where) -> list[tuple[Path | str, dict]]:
    """(checkpoint, manifest) of the complete checkpoints directly under `root`, oldest first."""
    loc = _remote(root)
    found = _local_complete(_local(root)) if loc is None else _remote_complete(loc)
    return sorted(found, key=_order)


def _local_complete(root: Path) -> list[tuple[Path | str, dict]]:
    if not root.is_dir():
        return []
    found: list[tuple[Path | str, dict]] = []
    for p in root.iterdir():
        manifest = None
        if p.is_dir() and not p.name.startswith("."):
            manifest = _complete_manifest(p)
        if manifest is not None:
            found.append((p, manifest))
    return found


def _remote_complete(root: Location) -> list[tuple[Path | str, dict]]:
    """From one recursive listing: the prefixes whose manifest.json is readable and lists only files
    present at their listed size (one request per manifest, none per file)."""
    by_child: dict[str, dict[str, int]] = {}
    for rel, size in _remote_sizes(root).items():
        child, _, rest = rel.partition("/")
        if rest and not child.startswith("."):
            by_child.setdefault(child, {})[rest] = size
    found: list[tuple[Path | str, dict]] = []
    for name, sizes in by_child.items():
        if MANIFEST_FILE not in sizes:
            continue  # files first, manifest last: an upload in progress or cut short
        try:
            manifest = read_manifest(root / name)
        except CheckpointError:
            continue
        if all(sizes.get(rel) == info.get("bytes") for rel, info in manifest["files"].items()):
            found.append((str(root / name), manifest))
    return found


def _remote_sizes(loc: Location) -> dict[str, int]:
    """{path relative to `loc`: size} of every file below the remote directory `loc`, from one
    recursive listing (Location.walk gives the names only)."""
    fs, path = resolve(loc.text)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except (OSError, pa.ArrowException) as e:
        raise explain(loc.text, e) from None
    prefix = path.rstrip("/") + "/"
    return {
        info.path[len(prefix) :]: int(info.size or 0)
        for info in infos
        if info.type == pafs.FileType.File
    }


def list_checkpoints(root: Where) -> list[Path | str]:
    """Complete checkpoints directly under `root` (a local directory: Paths; a URI: URIs), oldest
    first by the manifest's step. Names starting with '.' (`.tmp-*` saves in progress, `.old-*`
    being replaced) are never listed, nor a remote prefix without a complete manifest.json."""
    return [where for where, _ in _complete_checkpoints(root)]


def latest_checkpoint(root: Where) -> Path | str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def newest_valid_checkpoint(
    root: Where, warn: Callable[[str], None] = print, launch: str | None = None
) -> Path | str | None:
    """The newest complete checkpoint under `root` whose files match their sha256s (a remote one:
    its local copy, fetched into the cache); with `launch`, only those whose manifest names that
    launch. A newer one that fails the check (a flipped byte, a truncated file) is skipped with a
    warning. None when there is no such checkpoint at all; an error when there are some and none is
    intact (silently starting over would discard the run)."""
    found = [
        where
        for where, manifest in _complete_checkpoints(root)
        if launch is None or manifest.get("launch") == launch
    ]
    for where in reversed(found):
        try:
            verify_checkpoint(where)
        except CheckpointError as e:
            warn(f"[resume] warning: skipping {_name(where)}: {e}")
            continue
        return where
    if found:
        raise CheckpointError(
            f"{root}: none of the {len(found)} checkpoints is intact (see the warnings above); "
            "nothing to resume from safely"
        )
    return None


def select_checkpoint(location: Where, warn: Callable[[str], None] = print) -> Path | str:
    """The checkpoint a `--checkpoint`, `init_from` or `*_checkpoint` value means: itself when it is
    one (it has a manifest.json); for a run directory (one with `checkpoints/`) or a directory of
    checkpoints, its newest complete one whose sha256s match. A local one comes back as a Path
    (anything else local as is, for its loader to explain); a remote one as the URI of that one
    checkpoint, fetched into the cache and verified, so every reader loads the same one."""
    loc = _remote(location)
    if loc is None:
        return _select_local(_local(location), warn)
    if (loc / MANIFEST_FILE).is_file():
        verify_checkpoint(loc)
        return str(loc)
    names = loc.list()
    if MODEL_FILE in names or CONFIG_FILE in names:
        why = f"no {MANIFEST_FILE}: an upload not finished or cut short"
        raise CheckpointError(f"{loc}: holds no complete checkpoint ({why})")
    root = loc / "checkpoints" if "checkpoints" in names else loc
    newest = newest_valid_checkpoint(root, warn=warn)
    if newest is None:
        why = f"none under {root} has a complete {MANIFEST_FILE}" if names else "nothing is there"
        raise CheckpointError(f"{loc}: holds no complete checkpoint ({why})")
    return newest


def _select_local(path: Path, warn: Callable[[str], None]) -> Path:
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
    return Path(newest)


def resolve_checkpoint(path: Where, warn: Callable[[str], None] = print) -> Path:
    """The local directory of the checkpoint `path` means (`select_checkpoint`, then
    `fetch_checkpoint`: a remote one's verified copy in the cache)."""
    return fetch_checkpoint(select_checkpoint(path, warn=warn))


def clean_partial_saves(root: Path) -> list[Path]:
    """Remove `.tmp-*` directories left by saves that were killed midway (never listed, never resumed from)."""
    root = Path(root)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".tmp-")]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def prune_checkpoints(root: Where, keep_last: int) -> list[Path | str]:
    """Delete all but the newest `keep_last` complete checkpoints; returns the deleted ones.

    Only complete checkpoints are ever deleted. On an object store a prefix with files but no
    manifest may be another writer's upload in progress (its manifest comes last), e.g. a worker
    group Ray Train restarted, or a second launch writing into the same `--out` at a lower step:
    even when it is not the newest thing there, deleting it would break that upload, so it is left
    (locally, `.tmp-*` saves are clean_partial_saves' business)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = list_checkpoints(root)[:-keep_last]
    for where in doomed:
        loc = _remote(where)
        if loc is None:
            shutil.rmtree(where)
            continue
        # The manifest first, the mirror of publishing it last: a prune cut short leaves files no
        # one lists, never a checkpoint that looks complete but is not.
        (loc / MANIFEST_FILE).delete()
        loc.delete()
    return doomed


# ---------------------------------------------------------------- publishing to a URI
def publish_checkpoint(local: Path, dest: str | Location) -> None:
    """Upload the complete local checkpoint `local` to `dest` (a URI, or a local directory): every
    file, then manifest.json last, so `dest` never looks complete before it is. Nothing is done when
    `dest` already holds a complete checkpoint with the same manifest (a retried publish)."""
    local = Path(local)
    manifest = _complete_manifest(local)
    if manifest is None:
        raise CheckpointError(
            f"{local}: not a complete checkpoint (no valid {MANIFEST_FILE}, or a file it lists is "
            "missing or of another size); nothing was published"
        )
    target = Location.of(dest)
    if _holds(target, manifest):
        return
    if not target.is_remote:
        _copy_into_place(local, target.local_path)
        return
    # Another checkpoint's manifest there must not describe the new files while they arrive.
    (target / MANIFEST_FILE).delete()
    target.upload(local, last=(MANIFEST_FILE,))


def _holds(target: Location, manifest: dict) -> bool:
    """Whether `target` is a complete checkpoint whose manifest is `manifest`."""
    if not target.is_remote:
        return _complete_manifest(target.local_path) == manifest
    try:
        if read_manifest(target) != manifest:
            return False
    except CheckpointError:
        return False
    sizes = _remote_sizes(target)
    return all(sizes.get(rel) == info.get("bytes") for rel, info in manifest["files"].items())


def _copy_into_place(local: Path, path: Path) -> None:
    """A local destination gets what save_checkpoint gives: a copy renamed into place whole."""
    tmp = path.parent / f".tmp-{path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(local, tmp)
    _move_into_place(tmp, path)
