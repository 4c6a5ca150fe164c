"""Import a released Hugging Face checkpoint (`hf:<directory or hub name>`) as a Kiln model and tokenizer.

    imported = import_hf("path/to/all-MiniLM-L6-v2", "bert")   # BertForPreTraining + tokenizer + what is new
    save_imported_checkpoint(imported, Path("runs/imported/minilm"))  # a normal Kiln checkpoint directory

What is read from the directory (a sentence-transformers repository may name a subfolder in modules.json):
  config.json  -> BertConfig / GPTConfig; keys that change the maths (relative positions, another activation)
                  are refused by name, the many bookkeeping keys HF writes are ignored
  weights      -> model.safetensors or its sharded index; pytorch_model.bin(.index.json) only through
                  torch.load(weights_only=True), so a pickle can never run code
  tokenizer    -> tokenizer.json, else vocab.txt, else vocab.json + merges.txt, loaded as `kiln data prepare`
                  loads `data.tokenizer_path` (data_pipeline.tokenizer.load_tokenizer)

This is `pretrain.hf_export` run backwards with its key tables: the file's names are brought to those of HF's
BertForPreTraining / GPT2LMHeadModel (the layout decides the prefix), checked against the key map of this
config.json and converted by `hf_to_kiln_state_dict`. Two things are added, and listed in `new_tensors`:
  - heads the release does not ship (a `BertModel` has no MLM/NSP heads, a `BertForMaskedLM` no pooler or
    NSP head), initialised fresh as the model's own init would;
  - rows for the Kiln special tokens a released vocabulary lacks (appended after it, docs/design.md) where
    they fall beyond the embedding matrix (and the MLM output bias).
Every other tensor must be present with the shape config.json implies.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from data_pipeline.configlib import ConfigError, from_dict
from data_pipeline.errors import DataDirError
from data_pipeline.tokenizer import SPECIAL_TOKENS, TARGET_TOKENIZER_FILE, load_tokenizer
from pretrain.checkpoint import TOKENIZER_FILE, CheckpointError, save_checkpoint
from pretrain.hf_export import (
    HF_BUFFER_SUFFIXES,
    HF_FAMILIES,
    expand_key_map,
    hf_to_kiln_state_dict,
    kiln_to_hf_state_dict,
    parse_config,
)
from pretrain.models.bert import BertConfig, BertForPreTraining
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.models.meta import build_on_meta

HF_PREFIX = "hf:"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)  # in order of preference
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")  # load_tokenizer's order
_SHOW = 8  # how many offending names an error lists
_HUB_NAME = re.compile(
    r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$"
)  # "gpt2", "sentence-transformers/all-MiniLM-L6-v2"
_DISPLAY = {"bert": "BERT", "gpt": "GPT-2"}
_TF_LAYER_NORM = {"gamma": "weight", "beta": "bias"}


@dataclass(frozen=True)
class Layout:
    """One way a release stores a family's tensors: the body under `prefix`, heads under `heads`."""

    name: str
    prefix: str
    heads: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportFamily:
    model_types: tuple[str, ...]  # config.json model_type values of this family
    body: str  # where the body sits in the export names (HF BertForPreTraining / GPT2LMHeadModel)
    marker: str  # a body tensor every checkpoint of the family has: it identifies the layout
    layouts: tuple[Layout, ...]
    fresh_ok: tuple[
        str, ...
    ]  # export-name prefixes that may be absent (heads): initialised fresh, reported
    vocab_rows: tuple[
        str, ...
    ]  # tensors with one row per token: grown when appended special tokens need rows
    parse: Callable[[dict, str], Any]  # config.json mapping -> Kiln config
    model_cls: type[nn.Module]


@dataclass
class ImportedModel:
    source: str  # as given, without "hf:"
    path: Path  # the local directory config.json was read from
    arch: str  # "bert" | "gpt"
    config: BertConfig | GPTConfig  # vocab_size includes any rows grown for appended special tokens
    model: nn.Module  # BertForPreTraining | GPTLMHeadModel, in eval mode
    tokenizer: Tokenizer  # no padding, truncation or post-processor; Kiln special tokens present
    layout: str  # which layout the weights were stored in, e.g. "BertModel"
    new_tensors: list[str] = field(
        default_factory=list
    )  # Kiln names (or row ranges) initialised fresh
    hf_config: dict = field(default_factory=dict)  # config.json as read


# ---------------------------------------------------------------- config.json -> Kiln config
# The config.json keys Kiln reads (HF and Kiln name them alike); the dataclass checks their types.
_BERT_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "pad_token_id",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "initializer_range",
)
_BERT_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# key -> (accepted values, why). A key config.json leaves out takes HF's default, which is accepted.
_BERT_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "position_embedding_type": (("absolute",), "Kiln's BERT has absolute position embeddings only"),
    "hidden_act": (("gelu",), "Kiln's BERT uses the exact (erf) GELU"),
    "is_decoder": ((False,), "Kiln's BERT is a bidirectional encoder"),
    "add_cross_attention": ((False,), "Kiln's BERT has no cross-attention"),
}
_GPT_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",  # null: 4 * n_embd
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "layer_norm_epsilon",
    "initializer_range",
    "add_cross_attention",
)
_GPT_REQUIRED = ("vocab_size", "n_embd", "n_layer", "n_head")
_GPT_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    # gelu_pytorch_tanh is the same tanh approximation as gelu_new, computed by PyTorch's kernel.
    "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "Kiln's GPT-2 uses the tanh GELU"),
    "scale_attn_weights": ((True,), "Kiln's attention always scales by 1/sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": ((False,), "Kiln's attention has no per-layer scaling"),
}


def _refuse(hf: dict, where: str, refused: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    for key, (accepted, why) in refused.items():
        if key in hf and hf[key] not in accepted:
            raise CheckpointError(
                f"{where}: key {key!r} is {hf[key]!r}, which Kiln cannot import ({why}; "
                f"accepted: {', '.join(map(repr, accepted))})"
            )


def _build_config(
    cls: type, hf: dict, where: str, keys: tuple[str, ...], required: tuple[str, ...]
) -> Any:
    """HF's config.json -> the Kiln config: the keys Kiln reads, built (and type-checked) by
    configlib. A key that is absent or null keeps Kiln's default, which is HF's for every key here."""
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing key(s) {missing}")
    try:
        return from_dict(cls, {k: hf[k] for k in keys if hf.get(k) is not None}, where)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None  # one line that starts with the file


def _bert_config(hf: dict, where: str) -> BertConfig:
    _refuse(hf, where, _BERT_REFUSED)
    return _build_config(BertConfig, hf, where, _BERT_KEYS, _BERT_REQUIRED)


def _gpt_config(hf: dict, where: str) -> GPTConfig:
    _refuse(hf, where, _GPT_REFUSED)
    return _build_config(GPTConfig, hf, where, _GPT_KEYS, _GPT_REQUIRED)


# ---------------------------------------------------------------- the family registry
IMPORT_FAMILIES: dict[str, ImportFamily] = {
    "bert": ImportFamily(
        model_types=("bert",),
        body="bert.",
        marker="embeddings.word_embeddings.weight",
        layouts=(
            Layout("BertForPreTraining/BertForMaskedLM", "bert.", heads=("cls.",)),
            Layout("BertModel", ""),
            # A whole SentenceTransformer's state dict: module 0 is the Transformer, whose HF model is its
            # `model` attribute since sentence-transformers 6 and `auto_model` before.
            Layout("sentence-transformers", "0.model."),
            Layout("sentence-transformers (< 6)", "0.auto_model."),
        ),
        fresh_ok=("cls.", "bert.pooler."),
        vocab_rows=("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"),
        parse=_bert_config,
        model_cls=BertForPreTraining,
    ),
    "gpt": ImportFamily(
        model_types=("gpt2",),
        body="transformer.",
        marker="wte.weight",
        layouts=(
            Layout("GPT2LMHeadModel", "transformer.", heads=("lm_head.",)),
            Layout("GPT2Model", ""),
        ),
        fresh_ok=(),  # the LM head is the token-embedding matrix: nothing of GPT-2 is optional
        vocab_rows=("transformer.wte.weight",),
        parse=_gpt_config,
        model_cls=GPTLMHeadModel,
    ),
}


def _check_model_type(hf: dict, where: str, arch: str) -> None:
    model_type = hf.get("model_type")
    if (
        model_type is None
    ):  # configs written before model_type existed: the class name tells the family
        names = hf.get("architectures") or []
        first = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
        model_type = (
            "bert" if first.startswith("Bert") else "gpt2" if first.startswith("GPT2") else None
        )
    owner = next((a for a, f in IMPORT_FAMILIES.items() if model_type in f.model_types), None)
    if owner is None:
        raise CheckpointError(
            f"{where}: key 'model_type' is {model_type!r}; Kiln imports 'bert' (BERT) and "
            "'gpt2' (GPT-2) checkpoints only"
        )
    if owner != arch:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is a {_DISPLAY[owner]} checkpoint, but a "
            f"{_DISPLAY[arch]} checkpoint is needed here"
        )


# ---------------------------------------------------------------- where the files are
def resolve_source(source: str) -> Path:
    """A local directory as is; a hub name (`org/name`) through `huggingface_hub.snapshot_download`."""
    name = source.removeprefix(HF_PREFIX)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"hf:{name}: is a file; pass the model directory")
    if not _HUB_NAME.match(name):
        raise CheckpointError(f"hf:{name}: no such directory")
    return _download(name)


def _download(repo_id: str) -> Path:
    where = f"hf:{repo_id}: not a local directory, and"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(
            f"{where} the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set); "
            "download the model elsewhere and pass its local path (hf:/path/to/model)"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{where} huggingface_hub is not installed; pass a local path"
        ) from None
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if not any(path.rglob("*.safetensors")):  # an older release: pickled weights only
            snapshot_download(repo_id, allow_patterns=["*pytorch_model*.bin"])
    except Exception as e:  # huggingface_hub raises many types; all mean the same to the caller
        unreachable = (
            type(e).__name__ == "LocalEntryNotFoundError"
        )  # no connection and nothing cached
        reason = (
            "the Hugging Face Hub is unreachable"
            if unreachable
            else f"the download failed ({type(e).__name__})"
        )
        raise CheckpointError(
            f"{where} {reason}: {_first_line(e)}; pass a local path (hf:/path/to/model)"
        ) from None
    return path


def _first_line(e: Exception) -> str:
    """Errors here are one line: libraries' multi-line messages are cut to their first."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def model_dir(root: Path) -> Path:
    """The directory holding config.json; an older sentence-transformers repository names it in modules.json."""
    if (root / "config.json").is_file():
        return root
    modules = root / "modules.json"
    if modules.is_file():
        entries = _read_json(modules)
        for entry in (
            (e for e in entries if isinstance(e, dict)) if isinstance(entries, list) else ()
        ):
            sub = root / str(entry.get("path", ""))
            if (
                str(entry.get("type", "")).endswith("models.Transformer")
                and (sub / "config.json").is_file()
            ):
                return sub
    raise CheckpointError(f"{root}: no config.json (not a Hugging Face model directory)")


# ---------------------------------------------------------------- weights
def read_hf_weights(directory: Path) -> tuple[dict[str, Tensor], Path]:
    """Every tensor of the directory's weights, and the file they were found through."""
    for name in WEIGHT_FILES:
        file = directory / name
        if file.is_file():
            shards = _shards(file) if name.endswith(".index.json") else [file]
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_read_weight_file(shard))
            return state, file
    raise CheckpointError(f"{directory}: no weights (looked for {', '.join(WEIGHT_FILES)})")


def _shards(index: Path) -> list[Path]:
    doc = _read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: needs a non-empty 'weight_map' of tensor name -> shard file"
        )
    names = list(dict.fromkeys(str(v) for v in weight_map.values()))
    outside = [
        n for n in names if Path(n).name != n
    ]  # a shard is a sibling file, never a path elsewhere
    if outside:
        raise CheckpointError(
            f"{index}: 'weight_map' names files outside the directory: {outside[:_SHOW]}"
        )
    absent = [n for n in names if not (index.parent / n).is_file()]
    if absent:
        raise CheckpointError(f"{index}: shard file(s) missing: {absent[:_SHOW]}")
    return [index.parent / n for n in names]


def _read_weight_file(file: Path) -> dict[str, Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(
            file, map_location="cpu", weights_only=True
        )  # never unpickle arbitrary objects
    except Exception as e:  # safetensors and the restricted unpickler raise several types
        raise CheckpointError(f"{file}: cannot read weights: {_first_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return state


def _detect_layout(arch: str, weights: dict[str, Tensor], where: str) -> Layout:
    family = IMPORT_FAMILIES[arch]
    for layout in family.layouts:
        if layout.prefix + family.marker in weights:
            return layout
    for other, fam in IMPORT_FAMILIES.items():
        if other != arch and any(lay.prefix + fam.marker in weights for lay in fam.layouts):
            raise CheckpointError(
                f"{where}: holds {_DISPLAY[other]} weights, but a {_DISPLAY[arch]} checkpoint "
                "is needed here"
            )
    known = [lay.prefix + family.marker for lay in family.layouts]
    raise CheckpointError(
        f"{where}: not a known {_DISPLAY[arch]} layout (looked for one of {known}); "
        f"the file has e.g. {sorted(weights)[:_SHOW]}"
    )


def canonical_names(
    arch: str, weights: dict[str, Tensor], where: str
) -> tuple[Layout, dict[str, Tensor], dict[str, str]]:
    """The layout, the tensors under HF export names, and export name -> the name in the file (for errors)."""
    family, layout = IMPORT_FAMILIES[arch], _detect_layout(arch, weights, where)
    state: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for file_name, tensor in weights.items():
        # Checkpoints converted from TensorFlow (bert-base-uncased among them) name LayerNorm parameters
        # gamma/beta; transformers renames them on load, and so does this.
        name = re.sub(
            r"LayerNorm\.(gamma|beta)$", lambda m: f"LayerNorm.{_TF_LAYER_NORM[m[1]]}", file_name
        )
        if name.startswith(layout.heads):  # str.startswith(()) is False: a layout without heads
            key = name
        elif name.startswith(layout.prefix):
            key = family.body + name[len(layout.prefix) :]
        else:
            key = (
                name  # belongs to no part of the family: reported as unexpected under its own name
            )
        state[key], origin[key] = tensor, file_name
    for alias, source in HF_FAMILIES[arch].hf_tied.items():
        if (
            alias in state and source not in state
        ):  # a release that kept the other name of a tied pair
            state[source], origin[source] = state.pop(alias), origin.pop(alias)
    return layout, state, origin


def _expected_shapes(arch: str, config: Any) -> dict[str, tuple[int, ...]]:
    """HF export name -> shape (Conv1D weights transposed), from a model built on the meta device."""
    kiln = build_on_meta(IMPORT_FAMILIES[arch].model_cls, config).state_dict()
    return {
        r.hf: tuple(reversed(kiln[r.kiln].shape)) if r.transpose else tuple(kiln[r.kiln].shape)
        for r in expand_key_map(arch, parse_config(arch, config))
    }


def check_tensors(
    arch: str, config: Any, state: dict[str, Tensor], origin: dict[str, str], where: str
) -> list[str]:
    """Names, ties and shapes against the key map of this config; returns the absent heads (export names)."""
    family, hf_family = IMPORT_FAMILIES[arch], HF_FAMILIES[arch]
    shapes = _expected_shapes(arch, config)
    for alias, source in hf_family.hf_tied.items():
        if alias in state and source in state and not torch.equal(state[alias], state[source]):
            raise CheckpointError(
                f"{where}: {origin[alias]!r} differs from {origin[source]!r}; Kiln ties them "
                "(an untied checkpoint, tie_word_embeddings=false, cannot be imported)"
            )
    present = {
        k
        for k in state
        if k not in hf_family.hf_tied and (k in shapes or not k.endswith(HF_BUFFER_SUFFIXES))
    }
    unexpected = sorted(origin[k] for k in present - shapes.keys())
    missing = [k for k in shapes if k not in present]
    fresh = [k for k in missing if k.startswith(family.fresh_ok)]
    absent = [origin.get(k, k) for k in missing if k not in fresh]
    if unexpected or absent:
        raise CheckpointError(
            f"{where}: tensors do not match a {_DISPLAY[arch]} of this config.json: missing "
            f"{len(absent)} {absent[:_SHOW]}, unexpected {len(unexpected)} {unexpected[:_SHOW]}"
        )
    wrong = [
        f"{origin[k]}: {tuple(state[k].shape)} in the file vs {shapes[k]} from config.json"
        for k in shapes
        if k in present and tuple(state[k].shape) != shapes[k]
    ]
    if wrong:
        raise CheckpointError(
            f"{where}: {len(wrong)} tensor shape(s) differ from config.json: {wrong[:_SHOW]}"
        )
    return fresh


# ---------------------------------------------------------------- tokenizer
def load_hf_tokenizer(directory: Path) -> tuple[Tokenizer, Path]:
    """The release's tokenizer exactly as `kiln data prepare` loads it (padding and truncation removed)."""
    file = next((directory / n for n in TOKENIZER_FILES if (directory / n).is_file()), None)
    if file is None:
        raise CheckpointError(
            f"{directory}: no tokenizer ({', '.join(TOKENIZER_FILES)} + merges.txt)"
        )
    try:
        tok = load_tokenizer(directory)
    except (
        Exception
    ) as e:  # DataError, or the bare Exception tokenizers raises for a malformed tokenizer.json
        raise CheckpointError(f"{file}: cannot load the tokenizer: {_first_line(e)}") from None
    return tok, file


def rows_needed(tok: Tokenizer, rows: int, tok_file: Path, config_file: Path) -> int:
    """Embedding rows the tokenizer needs. Every released token must have a row; the Kiln special tokens
    appended after the vocabulary may need new ones."""
    vocab = tok.get_vocab(with_added_tokens=True)
    beyond = sorted((i, t) for t, i in vocab.items() if i >= rows and t not in SPECIAL_TOKENS)
    if beyond:
        raise CheckpointError(
            f"{tok_file}: the tokenizer has tokens up to id {beyond[-1][0]} (e.g. {beyond[0][1]!r} "
            f"= {beyond[0][0]}), but {config_file} has vocab_size {rows} (embedding rows): this "
            "tokenizer does not belong to these weights"
        )
    return max(rows, max(vocab.values()) + 1)


# ---------------------------------------------------------------- import
def import_hf(source: str, expected_family: str, *, seed: int = 0) -> ImportedModel:
    """Read a Hugging Face model directory (or hub name) as a Kiln `expected_family` ("bert" | "gpt") model.

    Raises CheckpointError, naming the file and key, for anything that would not reproduce the release:
    another family, an unsupported config key, missing/unexpected/misshapen tensors, a tokenizer larger
    than the embedding matrix. `seed` seeds the fresh heads and rows (the global RNG is left untouched)."""
    if expected_family not in IMPORT_FAMILIES:
        raise CheckpointError(
            f"expected_family {expected_family!r}: Kiln imports {sorted(IMPORT_FAMILIES)}"
        )
    family = IMPORT_FAMILIES[expected_family]
    directory = model_dir(resolve_source(source))
    config_file = directory / "config.json"
    hf_cfg = _read_json(config_file)
    if not isinstance(hf_cfg, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    _check_model_type(hf_cfg, str(config_file), expected_family)
    config = family.parse(hf_cfg, str(config_file))
    weights, weights_file = read_hf_weights(directory)
    layout, state, origin = canonical_names(expected_family, weights, str(weights_file))
    fresh = check_tensors(expected_family, config, state, origin, str(weights_file))
    tokenizer, tok_file = load_hf_tokenizer(directory)
    rows = rows_needed(tokenizer, config.vocab_size, tok_file, config_file)
    model, new = _assemble(
        expected_family,
        replace(config, vocab_size=rows),
        state,
        fresh,
        config.vocab_size,
        seed,
        str(weights_file),
    )
    return ImportedModel(
        source=source.removeprefix(HF_PREFIX),
        path=directory,
        arch=expected_family,
        config=model.config,
        model=model,
        tokenizer=tokenizer,
        layout=layout.name,
        new_tensors=new,
        hf_config=hf_cfg,
    )


def _assemble(
    arch: str,
    config: Any,
    state: dict[str, Tensor],
    fresh: list[str],
    loaded_rows: int,
    seed: int,
    where: str,
) -> tuple[nn.Module, list[str]]:
    """The Kiln model: the release's tensors, fresh ones for the absent heads and the grown vocabulary rows."""
    family = IMPORT_FAMILIES[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.model_cls(config)  # its own init is what a fresh head gets
    init = kiln_to_hf_state_dict(arch, config, model.state_dict())
    to_kiln = {r.hf: r.kiln for r in expand_key_map(arch, parse_config(arch, config))}
    # Tied aliases were checked equal to their sources; dropped, since the sources may grow below.
    merged = {k: v for k, v in state.items() if k not in HF_FAMILIES[arch].hf_tied}
    merged.update({name: init[name] for name in fresh})
    new = [to_kiln[name] for name in fresh]
    for name in family.vocab_rows:
        rows = init[name].size(0)
        if name in state and rows > loaded_rows:
            merged[name] = torch.cat(
                [state[name].to(init[name].dtype), init[name][loaded_rows:]]
            )  # (V+n, ...)
            new.append(f"{to_kiln[name]}[{loaded_rows}:{rows}]")
    model.load_state_dict(hf_to_kiln_state_dict(arch, config, merged, where), strict=True)
    return model.eval(), new


def save_imported_checkpoint(
    imported: ImportedModel, out_dir: Path, *, overwrite: bool = False
) -> Path:
    """Write `imported` as a Kiln checkpoint directory (model.safetensors, config.json, tokenizer.json,
    manifest.json); its manifest's job_config records where it came from and what was initialised fresh."""
    provenance = {
        "imported_from": {
            "source": imported.source,
            "path": str(imported.path),
            "layout": imported.layout,
            "new_tensors": imported.new_tensors,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / TOKENIZER_FILE
        imported.tokenizer.save(str(tok_file))
        return save_checkpoint(
            Path(out_dir),
            imported.model,
            imported.config,
            tok_file,
            job_config=provenance,
            overwrite=overwrite,
        )


# ---------------------------------------------------------------- does the data speak the checkpoint's vocabulary?
def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """Why `a` and `b` would give different ids for the same text, or None when they would not."""
    va, vb = a.get_vocab(with_added_tokens=True), b.get_vocab(with_added_tokens=True)
    if len(va) != len(vb):
        return f"vocabularies of {len(va)} and {len(vb)} tokens"
    moved = sorted(t for t, i in va.items() if vb.get(t) != i)
    if moved:
        return f"{len(moved)} tokens have other ids, e.g. {moved[:3]}"
    ja, jb = json.loads(a.to_str()), json.loads(b.to_str())
    for part in ("normalizer", "pre_tokenizer", "model", "padding", "truncation"):
        if ja.get(part) != jb.get(part):
            return f"their {part} differs"
    return None


def check_tokenizer_matches_data(
    checkpoint: Path, data_dir: Path, key: str, target: bool = False
) -> None:
    """The prepared data must be tokenized with the checkpoint's vocabulary, or every id means another token.
    target: compare with the data's target-side tokenizer (target_tokenizer.json, where translation data has one)."""
    data_name, data_key = TOKENIZER_FILE, "data.tokenizer_path"
    if target and (Path(data_dir) / TARGET_TOKENIZER_FILE).is_file():
        data_name, data_key = TARGET_TOKENIZER_FILE, "data.target_tokenizer_path"
    ckpt_file, data_file = Path(checkpoint) / TOKENIZER_FILE, Path(data_dir) / data_name
    if not ckpt_file.is_file():
        return  # a checkpoint saved without its tokenizer: nothing to compare against
    if not data_file.is_file():
        raise DataDirError(
            f"{data_file}: missing; the data directory was not written by `kiln data prepare`"
        )
    same_bytes = ckpt_file.read_bytes() == data_file.read_bytes()
    diff = (
        None
        if same_bytes
        else tokenizer_difference(*(Tokenizer.from_file(str(f)) for f in (ckpt_file, data_file)))
    )
    if diff is not None:
        raise CheckpointError(
            f"'{key}': {ckpt_file} and {data_file} differ ({diff}), so the data's token ids do not mean what the "
            f"checkpoint learned. Prepare the data with the checkpoint's vocabulary: `kiln data prepare` with "
            f"{data_key}={Path(checkpoint)}, and point data_dir at the result"
        )
