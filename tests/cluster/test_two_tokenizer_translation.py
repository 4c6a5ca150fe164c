"""Translation from two different released checkpoints: a BERT encoder (WordPiece vocab.txt) and a GPT-2 decoder
(byte-level BPE vocab.json + merges.txt), each with its own tokenizer, through the path the CLI takes minus Ray:
`kiln data prepare` with data.target_tokenizer_path (its Ray stages run in-process on the same UDFs) → preflight
imports both `hf:` directories → the task registry's model and loaders → training steps → a checkpoint carrying
both tokenizers → translate / evaluate → `kiln export --format hf` → transformers' EncoderDecoderModel.

Both releases are tiny random `transformers` models made here, with tokenizers built here (no network).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from num2words import num2words
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cluster import evaluation
from cluster.config import load_config
from cluster.evaluation import evaluate_checkpoint, translate_lines, translation_model
from cluster.jobs import DecodeConfig, FinetuneJob
from cluster.tasks import TASKS, preflight
from data_pipeline import prepare as prepare_module
from data_pipeline.clean import clean_batch
from data_pipeline.config import DataConfig
from data_pipeline.configlib import from_preset
from data_pipeline.errors import DataError
from data_pipeline.loader import make_loader
from data_pipeline.prepare import prepare
from data_pipeline.shards import read_manifest, read_split, sha256_file
from data_pipeline.tokenizer import END_OF_TEXT, load_translation_tokenizers, tokenize_batch
from finetune.analysis import analyze_beam
from finetune.attention_maps import attention_maps
from finetune.evaluate import bleu
from finetune.translate import encode_sources, translate_texts
from pretrain.checkpoint import CheckpointError, save_checkpoint, verify_checkpoint
from pretrain.hf_export import export_hf
from pretrain.models.gpt import GPTConfig, GPTLMHeadModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[2]
N_PAIRS = 60  # ~48 land in train at the 0.1 / 0.1 split fractions
# "two thousand, three hundred and forty-five" -> "deux mille trois cent quarante-cinq": targets long enough to have
# the 4-grams BLEU counts
PAIRS = [
    (num2words(n), num2words(n, lang="fr"))
    for n in random.Random(0).sample(range(1000, 10000), N_PAIRS)
]
BERT_SPECIALS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
]  # a released vocab.txt's; Kiln appends [BOS] [EOS]
MAX_STEPS = (
    300  # the overfit gets there in far fewer; the bound keeps a regression from hanging the suite
)


# ---------------------------------------------------------------- two releases, made here
def save_bert_release(directory: Path) -> Path:
    words = sorted(
        {w for en, _ in PAIRS for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(en)}
    )
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(BERT_SPECIALS + words) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(BERT_SPECIALS) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def byte_level_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style tokenizer: byte-level BPE whose one special token is <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tok


def save_gpt2_release(directory: Path, texts: list[str], vocab_size: int = 320) -> Path:
    directory.mkdir(parents=True)
    tok = byte_level_bpe(texts, vocab_size)
    tok.model.save(str(directory))  # vocab.json + merges.txt, as GPT-2 releases ship them
    eot = tok.token_to_id(END_OF_TEXT)
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("releases")
    return save_bert_release(root / "bert"), save_gpt2_release(
        root / "gpt2", [fr for _, fr in PAIRS]
    )


# ---------------------------------------------------------------- `kiln data prepare`, its Ray stages in-process
class _Batches:
    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def iter_batches(self, **kwargs: object) -> list[pa.Table]:
        return [self.table]


def prepare_in_process(cfg: DataConfig, out: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """prepare() with the two Ray Data map_batches stages (clean_batch, tokenize_batch) run here on one block."""

    def cleaned(
        cfg: DataConfig, kind: str, inputs: dict, tok: Tokenizer, target: Tokenizer | None
    ) -> _Batches:
        src, tgt = zip(*PAIRS, strict=True)
        raw = pa.table(
            {
                "src": list(src),
                "tgt": list(tgt),
                "origin": [f"pairs.tsv:{i + 1}" for i in range(len(src))],
                "replaced": [0] * len(src),
                "error": [""] * len(src),
            }
        )
        batch = clean_batch(
            raw,
            kind,
            cfg.min_chars,
            cfg.max_chars,
            cfg.seed,
            cfg.validation_fraction,
            cfg.test_fraction,
        )
        return _Batches(
            tokenize_batch(
                batch,
                tok.to_str(),
                kind,
                False,
                False,
                target.to_str() if target is not None else None,
            )
        )

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_quiet_ray_data", contextlib.nullcontext)
        m.setattr(prepare_module, "_cleaned", cleaned)
        return prepare(cfg, out)


def data_config(tsv: Path, bert: Path, gpt2: Path | None, **changes: object) -> DataConfig:
    return DataConfig(
        source="parallel",
        paths=[str(tsv)],
        tasks=["translation"],
        tokenizer_path=str(bert),
        target_tokenizer_path=str(gpt2) if gpt2 else None,
        max_src_len=32,
        max_tgt_len=32,
        validation_fraction=0.1,
        test_fraction=0.1,
        **changes,
    )


@pytest.fixture(scope="module")
def data_dir(releases: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tsv = root / "pairs.tsv"
    tsv.write_text("".join(f"{en}\t{fr}\n" for en, fr in PAIRS), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        prepare_in_process(data_config(tsv, *releases), root / "out", mp)
    return root / "out"


def test_prepare_frames_each_side_with_its_own_tokenizer(
    data_dir: Path, releases: tuple[Path, Path]
) -> None:
    top = read_manifest(data_dir / "manifest.json")
    pair = load_translation_tokenizers(data_dir)
    assert not pair.shared
    assert top["target_tokenizer"] == {
        "file": "target_tokenizer.json",
        "kind": "loaded",
        "loaded_from": str(releases[1]),
        "sha256": sha256_file(data_dir / "target_tokenizer.json"),
    }
    assert top["target_vocab_size"] == pair.target.get_vocab_size() != top["vocab_size"]
    eot, cls, sep, pad = (
        pair.target.token_to_id(END_OF_TEXT),
        *(pair.source.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")),
    )
    assert top["translation_specials"] == {
        "source": {"bos": cls, "eos": sep, "pad": pad},
        "target": {"bos": eot, "eos": eot, "pad": eot},
    }
    rows = read_split(data_dir / "translation", "train").to_pylist()
    assert len(rows) > 40
    for row in rows[:10]:
        src, tgt = row["src_ids"], row["tgt_ids"]
        assert src[0] == cls and src[-1] == sep and tgt[0] == eot and tgt[-1] == eot
        assert pair.source.decode(src[1:-1]) == pair.source.decode(
            pair.source.encode(row["src_text"]).ids
        )
        assert pair.target.decode(tgt[1:-1]) == row["tgt_text"]  # byte-level BPE: exact round trip
    # Batches: the decoder input is padded with <|endoftext|> (== its EOS), yet no mask is read from ids: the source
    # mask comes from lengths and every padded target position is -100.
    batch = next(iter(make_loader(data_dir, "translation", "train", 8, shuffle=False)))
    lengths = batch["src_mask"].sum(1)
    assert all(batch["src_ids"][i, n - 1] == sep for i, n in enumerate(lengths.tolist()))
    tgt_len = (batch["tgt_out"] != -100).sum(1)
    assert all((batch["tgt_in"][i, n:] == eot).all() for i, n in enumerate(tgt_len.tolist()))
    assert all(batch["tgt_out"][i, n - 1] == eot for i, n in enumerate(tgt_len.tolist()))


def test_target_tokenizer_path_is_refused_where_it_means_nothing(
    releases: tuple[Path, Path], tmp_path: Path
) -> None:
    tsv = tmp_path / "p.tsv"
    with pytest.raises(
        DataError, match=r"^target_tokenizer_path: only the translation task has a target side"
    ):
        DataConfig(tasks=["translation", "clm"], tokenizer_path="a", target_tokenizer_path="b")
    with pytest.raises(DataError, match=r"^target_tokenizer_path: needs tokenizer_path too"):
        DataConfig(
            source="parallel", paths=[str(tsv)], tasks=["translation"], target_tokenizer_path="b"
        )
    tsv.write_text("one\tun\n", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{tmp_path / 'nowhere'}: no such file or directory (target_tokenizer_path)"
        ),
    ):
        prepare(data_config(tsv, releases[0], tmp_path / "nowhere"), tmp_path / "out")


# ---------------------------------------------------------------- fine-tuning through the task registry
def finetune_job(data_dir: Path, releases: tuple[Path, Path], *overrides: str) -> FinetuneJob:
    return load_config(
        FinetuneJob,
        ROOT / "configs" / "translation.yaml",
        [
            f"data_dir={data_dir}",
            f"encoder_checkpoint=hf:{releases[0]}",
            f"decoder_checkpoint=hf:{releases[1]}",
            "trainer.batch_size=16",
            f"trainer.max_steps={MAX_STEPS}",
            "optim.lr=3e-3",
            "optim.warmup_steps=10",
            "label_smoothing=0.0",
            *overrides,
        ],
    )


def iter_forever(loader: object) -> object:
    while True:
        yield from loader  # type: ignore[misc]


@pytest.fixture(scope="module")
def trained(
    data_dir: Path, releases: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The warm model trained on the train split until it translates it (BLEU > 90) or MAX_STEPS; its checkpoint."""
    run = tmp_path_factory.mktemp("run")
    job = preflight(finetune_job(data_dir, releases), run)
    torch.manual_seed(0)
    parts = TASKS["translation"](job, 0, 1)
    model = parts.module.model
    pair = load_translation_tokenizers(data_dir)
    train = read_split(data_dir / "translation", "train").to_pylist()
    srcs, refs = [r["src_text"] for r in train], [r["tgt_text"] for r in train]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses, scores = [], []
    for step, batch in zip(range(1, MAX_STEPS + 1), iter_forever(parts.train_loader), strict=False):
        model.train()
        loss = parts.module.compute(batch, "train")["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            scores.append(bleu(translate_texts(model, pair, srcs, beam_size=1, max_len=32), refs))
            if scores[-1] > 90:
                break
    ckpt = save_checkpoint(run / "ckpt", model, parts.model_config, data_dir / "tokenizer.json")
    return {
        "job": job,
        "parts": parts,
        "losses": losses,
        "scores": scores,
        "ckpt": ckpt,
        "srcs": srcs,
        "refs": refs,
    }


def test_two_releases_build_train_and_overfit(trained: dict, releases: tuple[Path, Path]) -> None:
    job, parts = trained["job"], trained["parts"]
    assert job.encoder_checkpoint.endswith("imported/encoder") and job.decoder_checkpoint.endswith(
        "imported/decoder"
    )
    config = parts.model_config
    bert_rows = len((releases[0] / "vocab.txt").read_text().split())
    assert config.encoder.vocab_size == bert_rows + 2  # + the appended [BOS] [EOS]
    assert config.decoder.vocab_size != config.encoder.vocab_size
    assert any(".crossattention." in n for n in parts.new_tensors)
    losses = trained["losses"]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    assert trained["scores"][-1] > 90, trained["scores"]  # overfits the ~48 train pairs


def test_checkpoint_translates_and_evaluates_with_both_tokenizers(
    trained: dict, data_dir: Path, tmp_path: Path
) -> None:
    ckpt = trained["ckpt"]
    files = verify_checkpoint(ckpt)["files"]
    assert files["target_tokenizer.json"]["sha256"] == sha256_file(
        data_dir / "target_tokenizer.json"
    )
    model, pair = translation_model(ckpt)
    assert not pair.shared and pair.source.token_to_id(END_OF_TEXT) is None
    # sources through the source (WordPiece, uncased) tokenizer, framed as BERT was trained
    [row] = encode_sources(pair, ["Twenty-One"], 24)
    assert row == [pair.source.token_to_id(t) for t in ("[CLS]", "twenty", "-", "one", "[SEP]")]
    srcs, refs = trained["srcs"][:12], trained["refs"][:12]
    out = translate_lines(ckpt, srcs, beam=3, alpha=0.6, max_len=32)  # `kiln translate`
    assert bleu(out, refs) > 80 and all(END_OF_TEXT not in o for o in out)
    # `kiln analyze-beam` and `kiln attention`: references scored as target ids, columns labelled by source tokens
    analysis = analyze_beam(model, pair, srcs[:4], refs[:4], beam_sizes=(1, 2), max_len=32)
    assert (
        analysis.rows[0].bleu > 50
        and analysis.sentences[0]["ref_ids"] == pair.target.encode(refs[0]).ids
    )
    assert (
        analysis.max_rescoring_diff < 1e-3
    )  # search and rescoring agree on the target-side framing
    [png] = attention_maps(model, pair, srcs[:1], tmp_path / "attention", beam_size=2, max_len=32)
    assert png.is_file()
    metrics = evaluate_checkpoint(
        ckpt, data_dir, "test", DecodeConfig(beam_size=2, max_len=32), tmp_path / "eval"
    )
    assert metrics["sentences"] > 0 and 0.0 <= metrics["bleu"] <= 100.0
    first = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert set(first) == {"source", "reference", "hypothesis"}
    # `kiln evaluate --src --ref`: the same pairs as raw files, through both of the checkpoint's tokenizers
    test = read_split(data_dir / "translation", "test").to_pydict()
    for name, column in (("src.txt", "src_text"), ("ref.txt", "tgt_text")):
        (tmp_path / name).write_text("".join(f"{t}\n" for t in test[column]), encoding="utf-8")
    raw = evaluation.evaluate_parallel_files(
        ckpt, tmp_path / "src.txt", tmp_path / "ref.txt", DecodeConfig(beam_size=2, max_len=32)
    )
    assert raw == metrics


def test_export_is_an_encoder_decoder_with_gpt2s_vocabulary(
    trained: dict, releases: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, out = trained["ckpt"], tmp_path / "hf"
    export_hf(ckpt, out)
    model, pair = translation_model(ckpt)
    hf = transformers.EncoderDecoderModel.from_pretrained(out).eval()
    eot = pair.target.token_to_id(END_OF_TEXT)
    assert (
        hf.config.decoder.vocab_size
        == model.config.decoder.vocab_size
        == pair.target.get_vocab_size()
    )
    assert hf.config.encoder.vocab_size == pair.source.get_vocab_size()
    assert (hf.config.decoder_start_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (
        eot,
        eot,
        eot,
    )
    src_tok = transformers.AutoTokenizer.from_pretrained(out)
    tgt_tok = transformers.AutoTokenizer.from_pretrained(out / "decoder_tokenizer")
    assert tgt_tok.eos_token == tgt_tok.bos_token == tgt_tok.pad_token == END_OF_TEXT
    srcs = trained["srcs"][:4]
    rows = encode_sources(pair, srcs, 24)
    assert [src_tok.encode(s, add_special_tokens=False) for s in srcs] == [r[1:-1] for r in rows]
    width = max(map(len, rows))
    src = torch.tensor([r + [pair.src.pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    refs = [tgt_tok.encode(r, add_special_tokens=False) for r in trained["refs"][:4]]
    assert refs == [pair.target.encode(r).ids for r in trained["refs"][:4]]
    u = max(map(len, refs)) + 1
    tgt_in = torch.tensor([[eot, *r] + [eot] * (u - 1 - len(r)) for r in refs])
    with torch.no_grad():
        got = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
        torch.testing.assert_close(got, model(src, mask, tgt_in), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input, before any training step
def test_a_decoder_that_does_not_speak_the_target_tokenizer_is_refused(
    data_dir: Path, releases: tuple[Path, Path], tmp_path: Path
) -> None:
    other = save_gpt2_release(
        tmp_path / "other_gpt2", ["completely different text", "nothing french here"], 300
    )
    job = finetune_job(data_dir, (releases[0], other))
    with pytest.raises(
        CheckpointError,
        match=r"'decoder_checkpoint': .* differ .* `kiln data prepare` with "
        r"data\.target_tokenizer_path=",
    ):
        preflight(job, tmp_path / "run")
    # the worker-side build checks too: a Kiln GPT saved without a tokenizer, with fewer rows than the target's
    ready = preflight(finetune_job(data_dir, releases), tmp_path / "run2")
    small = from_preset(GPTConfig, "tiny", vocab_size=50, n_positions=32)
    kiln_gpt = save_checkpoint(tmp_path / "small_gpt", GPTLMHeadModel(small), small)
    with pytest.raises(
        CheckpointError,
        match=r"'decoder_checkpoint': .* has 50 embedding rows, but the data's "
        r"target tokenizer has \d+ tokens",
    ):
        TASKS["translation"](dataclasses.replace(ready, decoder_checkpoint=str(kiln_gpt)), 0, 1)


def test_scratch_models_refuse_two_vocabularies(data_dir: Path, tmp_path: Path) -> None:
    job = load_config(
        FinetuneJob,
        None,
        [f"data_dir={data_dir}", "task=translation", "model.arch=lstm", "model.preset=tiny"],
    )
    with pytest.raises(
        CheckpointError, match=r"'model.arch': lstm trains one vocabulary for source and target"
    ):
        preflight(job, tmp_path / "run")
