"""`init_from` in a pretraining job: continued pretraining from a Kiln or an imported (`hf:`) checkpoint.

No Ray: the driver-side `preflight` and the worker-side `build_pretrain` are called directly, on a data directory
written by the shard writer with the imported checkpoint's tokenizer (what `data.tokenizer_path=<dir>` produces).
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from cluster.jobs import PretrainJob, TrainerConfig
from cluster.tasks import build_pretrain, count_parameters, preflight
from data_pipeline.configlib import from_preset
from data_pipeline.examples import BUILDERS
from data_pipeline.shards import write_json, write_task
from pretrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel
from pretrain.models.meta import num_parameters
from pretrain.optim import OptimConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB_TXT = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A released BERT (BertForPreTraining, heads included) with a vocab.txt, as on the Hub."""
    directory = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB_TXT),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    transformers.BertForPreTraining(config).save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB_TXT) + "\n", encoding="utf-8")
    return directory


def mlm_rows(n: int, start: int, vocab: int) -> list[dict]:
    rng = random.Random(start)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 6), rng.randint(2, 6)
        seg_a, seg_b = ([rng.randrange(5, vocab) for _ in range(n)] for n in (a, b))
        ids = [2, *seg_a, 3, *seg_b, 3]
        rows.append(
            {
                "sample_id": start + i,
                "input_ids": ids,
                "token_type_ids": [0] * (a + 2) + [1] * (b + 1),
                "next_sentence_label": i % 2,
            }
        )
    return rows


def data_dir(root: Path, tokenizer_file: Path) -> Path:
    """A prepared mlm_nsp data directory tokenized with `tokenizer_file`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    builder = BUILDERS["mlm_nsp"]
    splits = {"train": mlm_rows(24, 0, 13), "validation": mlm_rows(8, 24, 13)}
    write_task(root / "mlm_nsp", "mlm_nsp", builder.schema, splits, 10, builder.token_columns)
    specials = {
        t: tok.token_to_id(t)
        for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]")
    }
    write_json(
        root / "manifest.json",
        {
            "tasks": {"mlm_nsp": {}},
            "special_tokens": specials,
            "vocab_size": vocab,
            "config": {"seq_len": SEQ_LEN},
        },
    )
    tok.save(str(root / "tokenizer.json"))
    return root


def job(data: Path, init_from: str, **trainer: int) -> PretrainJob:
    return PretrainJob(
        data_dir=str(data),
        task="mlm_nsp",
        init_from=init_from,
        trainer=TrainerConfig(batch_size=4, max_steps=5, **trainer),
        optim=OptimConfig(lr=1e-3),
    )


def test_hf_release_is_imported_once_and_training_starts_from_its_weights(
    release: Path, tmp_path: Path
) -> None:
    # The data must be tokenized with the imported vocabulary: import once to get its tokenizer.json.
    from pretrain.hf_import import import_hf, save_imported_checkpoint

    imported = save_imported_checkpoint(import_hf(f"hf:{release}", "bert"), tmp_path / "tok_source")
    data = data_dir(tmp_path / "data", imported / "tokenizer.json")
    ready = preflight(job(data, f"hf:{release}"), tmp_path / "run")
    assert ready.init_from == str(tmp_path / "run" / "imported" / "init_from")
    assert (
        ready.model.hidden_size == 32 and ready.model.num_hidden_layers == 2
    )  # the release's, not the preset's
    assert ready.model.vocab_size == len(VOCAB_TXT) + 2  # Kiln's [BOS]/[EOS] appended
    parts = build_pretrain(ready, 0, 1)
    assert count_parameters(ready) == num_parameters(parts.module.model)
    want = load_checkpoint(Path(ready.init_from)).state_dict
    got = parts.module.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    hf = transformers.BertForPreTraining.from_pretrained(release)
    torch.testing.assert_close(
        got["bert.encoder.layer.1.output.dense.weight"],
        hf.state_dict()["bert.encoder.layer.1.output.dense.weight"],
    )
    # ... and it trains: a few steps on the released weights lower the loss on a fixed batch.
    batch = next(iter(parts.train_loader))
    opt = torch.optim.AdamW(parts.module.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = parts.module.compute(batch, "train")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # the job's nsp_weight reaches the module it builds
    assert build_pretrain(dataclasses.replace(ready, nsp_weight=0.0), 0, 1).module.nsp_weight == 0


def test_wrong_family_and_wrong_vocabulary_fail_before_training(
    release: Path, tmp_path: Path
) -> None:
    from pretrain.hf_import import import_hf, save_imported_checkpoint

    imported = save_imported_checkpoint(import_hf(f"hf:{release}", "bert"), tmp_path / "bert")
    data = data_dir(tmp_path / "data", imported / "tokenizer.json")
    gpt_cfg = from_preset(GPTConfig, "tiny", vocab_size=len(VOCAB_TXT) + 2, n_positions=32)
    gpt = save_checkpoint(
        tmp_path / "gpt", GPTLMHeadModel(gpt_cfg), gpt_cfg, imported / "tokenizer.json"
    )
    with pytest.raises(
        CheckpointError, match=r"gpt/config.json: arch is 'gpt', but a 'bert' checkpoint is needed"
    ):
        preflight(job(data, str(gpt)), tmp_path / "run1")
    # Data tokenized with another vocabulary: every id would mean another token.
    other = tmp_path / "other_tok.json"
    doc = json.loads((imported / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    other.write_text(json.dumps(doc))
    mismatched = data_dir(tmp_path / "data2", other)
    with pytest.raises(CheckpointError, match=r"'init_from': .* differ \(2 tokens have other ids"):
        preflight(job(mismatched, str(imported)), tmp_path / "run2")
