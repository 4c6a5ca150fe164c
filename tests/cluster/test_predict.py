"""`kiln predict` and `kiln evaluate --input / --src --ref`: a checkpoint scored on raw files,
tokenised with its own tokenizer, gives what the prepared-split path (`--data DIR --split`) and the
training path give on the same rows.

The data is prepared in-process by `kiln data prepare`'s own code (its Ray Data stages run here on
one block). The vocabulary is word-level with "!" at id 0, as in GPT-2's, so a real token has the
id a careless reader takes for padding. The checkpoints are tiny random models: what is compared is
the path, not the quality.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from cluster.cli import main
from cluster.evaluation import evaluate_checkpoint
from cluster.jobs import DecodeConfig
from data_pipeline import prepare as prepare_module
from data_pipeline.clean import clean_batch
from data_pipeline.config import DataConfig
from data_pipeline.configlib import from_preset
from data_pipeline.examples import BUILDERS
from data_pipeline.loader import make_loader
from data_pipeline.prepare import prepare
from data_pipeline.readers import ReadOptions
from data_pipeline.sample import LABEL_NAMES
from data_pipeline.shards import read_split, write_json, write_task
from data_pipeline.sources import read_task
from data_pipeline.tokenizer import SPECIAL_TOKENS, tokenize_batch
from finetune import predict
from finetune.models import load_finetuned
from finetune.models.classifier import (
    ClassifierConfig,
    DecoderClassifier,
    EncoderClassifier,
    GPTClassifierConfig,
    LSTMClassifier,
    LSTMClassifierConfig,
)
from finetune.models.transformer import TransformerConfig, TransformerSeq2Seq
from pretrain.checkpoint import save_checkpoint
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig

GOOD, BAD = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "dull"]
FILLER = ["!", "movie", "plot", "the", "a", "very", "?"]
WORDS = [*FILLER, *GOOD, *BAD]  # "!" is id 0, as in GPT-2
VOCAB = len(WORDS) + len(SPECIAL_TOKENS)  # specials after the words, as a release's vocabulary
SEQ_LEN = 8  # some texts are longer: every path must cut them alike
LABELS = ["neg", "pos"]
ARCHES = ["bert_classifier", "gpt_classifier", "lstm_classifier"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate([*WORDS, *SPECIAL_TOKENS])}, "[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def labelled_texts(n: int) -> list[tuple[str, str]]:
    """2-10 words, every other one a sentiment word; many hold "!"; all distinct."""
    rng, rows = random.Random(0), []
    for i in range(n):
        label = i % 2
        words = [
            rng.choice(GOOD if label else BAD) if j % 2 else rng.choice(FILLER)
            for j in range(2 + i % 9)
        ]
        rows.append((" ".join(words), LABELS[label]))
    return list(dict.fromkeys(rows))


# ----------------------------------------------------- `kiln data prepare`, Ray stages in-process
class _Batches:
    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def iter_batches(self, **kwargs: object) -> list[pa.Table]:
        return [self.table]


def prepare_in_process(cfg: DataConfig, out: Path) -> dict:
    """prepare() with its Ray Data stages (read_task, clean_batch, tokenize_batch) run here."""

    def cleaned(
        cfg: DataConfig, kind: str, inputs: dict, tok: Tokenizer, target: Tokenizer | None
    ) -> _Batches:
        opts = ReadOptions.from_config(cfg, kind)
        task = {"path": [cfg.paths[0]], "partner": [""]}
        raw = pa.concat_tables(read_task(task, opts, "files", {}))
        batch = clean_batch(
            raw,
            kind,
            cfg.min_chars,
            cfg.max_chars,
            cfg.seed,
            cfg.validation_fraction,
            cfg.test_fraction,
        )
        return _Batches(tokenize_batch(batch, tok.to_str(), kind, False, False))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(prepare_module, "_quiet_ray_data", contextlib.nullcontext)
        m.setattr(prepare_module, "_cleaned", cleaned)
        return prepare(cfg, out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_tokenizer().save(str(root / "words.json"))
    tsv = root / "reviews.tsv"
    rows = "".join(f"{t}\t{y}\n" for t, y in labelled_texts(90))
    tsv.write_text(f"text\tlabel\n{rows}", encoding="utf-8")
    cfg = DataConfig(
        source="labelled",
        paths=[str(tsv)],
        tasks=["classification"],
        tokenizer_path=str(root / "words.json"),
        seq_len=SEQ_LEN,
        validation_fraction=0.1,
        test_fraction=0.3,
    )
    prepare_in_process(cfg, root / "prepared")
    return root / "prepared"


def classifier(arch: str) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    head = {"num_labels": 2, "label_names": LABELS}
    if arch == "bert_classifier":
        bert = from_preset(
            BertConfig,
            "tiny",
            vocab_size=VOCAB,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        config = ClassifierConfig(encoder=bert, **head)
        return EncoderClassifier(config), config
    if arch == "gpt_classifier":
        gpt = from_preset(
            GPTConfig, "tiny", vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        config = GPTClassifierConfig(decoder=gpt, **head)
        return DecoderClassifier(config), config
    config = from_preset(LSTMClassifierConfig, "tiny", vocab_size=VOCAB, pad_id=len(WORDS), **head)
    return LSTMClassifier(config), config


@pytest.fixture(scope="module")
def checkpoints(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per classifier, recording the data it was 'trained' on, as training does."""
    root, out = tmp_path_factory.mktemp("ckpt"), {}
    for arch in ARCHES:
        model, config = classifier(arch)
        out[arch] = save_checkpoint(
            root / arch, model, config, data_dir / "tokenizer.json", data_manifest=data_dir
        )
    return out


def training_path(checkpoint: Path, data_dir: Path, split: str) -> dict[str, list[float]]:
    """text -> label probabilities, the rows batched as training and validation batch them."""
    model = load_finetuned(checkpoint).model.eval()
    loader = make_loader(
        data_dir, "classification", split, batch_size=5, shuffle=False, drop_last=False
    )
    columns = read_split(data_dir / "classification", split, ["sample_id", "text"]).to_pydict()
    texts = dict(zip(columns["sample_id"], columns["text"], strict=True))
    out = {}
    with torch.no_grad():
        for batch in loader:
            probs = model(batch["input_ids"], batch["attention_mask"]).softmax(-1)
            out.update(
                {texts[int(s)]: p.tolist() for s, p in zip(batch["sample_id"], probs, strict=True)}
            )
    return out


def test_the_fixture_has_id_0_as_a_real_token_and_truncated_rows(data_dir: Path) -> None:
    split = read_split(data_dir / "classification", "test", ["input_ids"])
    assert any(0 in row[1:-1] for row in split.column("input_ids").to_pylist())  # "!" in a text
    manifest = json.loads((data_dir / "classification" / "manifest.json").read_text())
    assert manifest["counters"]["test"]["truncated"] > 0


# ----------------------------------------------------- the defect: pad and mask as training does
@pytest.mark.parametrize("arch", ARCHES)
def test_evaluate_pads_and_masks_as_training_does(
    arch: str, checkpoints: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    """Evaluation used to pad with 0 and mask `ids != 0`: with "!" at id 0 the BERT classifier
    read another input than in training, and the GPT and LSTM classifiers refused the mask."""
    metrics = evaluate_checkpoint(checkpoints[arch], data_dir, "test", DecodeConfig(), tmp_path)
    expected = training_path(checkpoints[arch], data_dir, "test")
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(expected) == metrics["examples"]
    for row in rows:
        probs = expected[row["text"]]
        assert row["predicted"] == LABELS[max(range(2), key=probs.__getitem__)]
        assert row["confidence"] == pytest.approx(max(probs), abs=1e-5)
    right = sum(r["predicted"] == r["label"] for r in rows)
    assert metrics["accuracy"] == pytest.approx(right / len(rows))


# ----------------------------------------------------- kiln predict
def kiln(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`kiln ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


@pytest.mark.parametrize("arch", ARCHES)
def test_predict_labels_raw_lines_as_training_scores_them(
    arch: str,
    checkpoints: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    expected = training_path(checkpoints[arch], data_dir, "test")
    texts = list(expected)
    # raw: doubled spaces and a tab, cleaned as `kiln data prepare` cleans them; a blank line
    raw = [t.replace(" ", "  ", 1).replace(" ", "\t", 1) for t in texts]
    (tmp_path / "texts.txt").write_text("\n".join([raw[0], "", *raw[1:]]) + "\n")
    code, out, err = kiln(
        capsys,
        "predict",
        "--checkpoint",
        str(checkpoints[arch]),
        "--input",
        str(tmp_path / "texts.txt"),
        "--out",
        str(tmp_path / "labels.jsonl"),
    )
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, *range(3, len(texts) + 2)]
    assert [r["text"] for r in rows] == texts
    for row in rows:
        probs = row["probabilities"]
        assert list(probs) == LABELS and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert row["label"] == max(probs, key=probs.__getitem__)
        assert list(probs.values()) == pytest.approx(expected[row["text"]], abs=1e-5)


def test_predict_reads_a_named_column_and_writes_tsv(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = str(checkpoints["bert_classifier"])
    csv = tmp_path / "in.csv"
    csv.write_text('id,sentence\n1,"good movie !"\n2,"the plot , very dull"\n')
    code, _, err = kiln(
        capsys,
        "predict",
        "--checkpoint",
        ckpt,
        "--input",
        str(csv),
        "--column",
        "sentence",
        "--out",
        str(tmp_path / "out.tsv"),
    )
    assert (code, err) == (0, "")
    header, *lines = (tmp_path / "out.tsv").read_text(encoding="utf-8").splitlines()
    assert header.split("\t") == ["line", "text", "label", "prob_neg", "prob_pos"]
    rows = [line.split("\t") for line in lines]
    assert [r[:2] for r in rows] == [["2", "good movie !"], ["3", "the plot , very dull"]]
    for row in rows:
        assert row[2] in LABELS and float(row[3]) + float(row[4]) == pytest.approx(1.0, abs=1e-5)
    # the same texts by key from JSONL: the same answers, here TSV on stdout
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"sentence": "good movie !"}\n{"sentence": "the plot , very dull"}\n')
    code, out, _ = kiln(
        capsys, "predict", "--checkpoint", ckpt, "--input", str(jsonl), "--column", "sentence"
    )
    assert code == 0 and [r.split("\t")[1:] for r in out.splitlines()[1:]] == [r[1:] for r in rows]


def test_predict_reads_stdin(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("good movie\n\nbad plot !\n"))
    code, out, err = kiln(capsys, "predict", "--checkpoint", str(checkpoints["gpt_classifier"]))
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.startswith("line\ttext\tlabel\t")
    assert [r.split("\t")[:2] for r in rows] == [["1", "good movie"], ["3", "bad plot !"]]


# ----------------------------------------------------- kiln evaluate --input
@pytest.mark.parametrize("arch", ARCHES)
def test_evaluate_a_raw_labelled_file_equals_the_prepared_split(
    arch: str,
    checkpoints: dict[str, Path],
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    prepared = evaluate_checkpoint(
        checkpoints[arch], data_dir, "test", DecodeConfig(), tmp_path / "prepared"
    )
    split = read_split(data_dir / "classification", "test", ["text", "label"]).to_pydict()
    # an "official dev set": columns of its own, the text not yet cleaned
    rows = zip(split["text"], split["label"], strict=True)
    dev = tmp_path / "dev.tsv"
    dev.write_text(
        "gold\tsentence\n" + "".join(f"{LABELS[y]}\t {t.replace(' ', '  ')}\n" for t, y in rows)
    )
    code, out, err = kiln(
        capsys,
        "evaluate",
        "--checkpoint",
        str(checkpoints[arch]),
        "--input",
        str(dev),
        "--text-column",
        "sentence",
        "--label-column",
        "gold",
        "--out",
        str(tmp_path / "raw"),
    )
    assert (code, err) == (0, "")
    metrics = json.loads(out)
    for key in ("accuracy", "macro_f1", "mcc", "examples", "split_majority_rate", "uniform_chance"):
        assert metrics[key] == pytest.approx(prepared[key]), key
    predictions = [(tmp_path / d / "predictions.jsonl").read_text() for d in ("prepared", "raw")]
    assert sorted(predictions[0].splitlines()) == sorted(predictions[1].splitlines())
    assert json.loads((tmp_path / "raw" / "metrics.json").read_text()) == metrics


# ----------------------------------------------------- kiln evaluate --src --ref
PAIRS = [
    ("good movie", "movie good"),
    ("bad plot", "plot bad"),
    ("the movie", "movie the"),
    ("a very good plot !", "! plot good very a"),
    ("dull", "dull"),
]


@pytest.fixture(scope="module")
def translation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a data dir with a translation test split, a tiny random Transformer checkpoint)."""
    root = tmp_path_factory.mktemp("mt")
    tok = make_tokenizer()
    tok.save(str(root / "tokenizer.json"))
    special = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    bos, eos = special["[BOS]"], special["[EOS]"]
    rows = [
        {
            "sample_id": i,
            "src_ids": [*tok.encode(s).ids, eos],
            "tgt_ids": [bos, *tok.encode(t).ids, eos],
            "src_text": s,
            "tgt_text": t,
        }
        for i, (s, t) in enumerate(PAIRS)
    ]
    builder = BUILDERS["translation"]
    write_task(
        root / "data" / "translation",
        "translation",
        builder.schema,
        {"test": rows},
        16,
        builder.token_columns,
    )
    write_json(
        root / "data" / "manifest.json",
        {
            "tasks": {"translation": {}},
            "special_tokens": special,
            "vocab_size": tok.get_vocab_size(),
        },
    )
    torch.manual_seed(0)
    config = from_preset(
        TransformerConfig,
        "tiny",
        vocab_size=tok.get_vocab_size(),
        pad_id=special["[PAD]"],
        max_positions=64,
    )
    ckpt = save_checkpoint(
        root / "ckpt", TransformerSeq2Seq(config), config, root / "tokenizer.json"
    )
    return root / "data", ckpt


def test_evaluate_raw_parallel_files_equals_the_prepared_split(
    translation: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, ckpt = translation
    prepared = evaluate_checkpoint(
        ckpt, data, "test", DecodeConfig(beam_size=2), tmp_path / "prepared"
    )
    (tmp_path / "src.txt").write_text("".join(f"{s}\n" for s, _ in PAIRS))
    (tmp_path / "ref.txt").write_text("".join(f"  {t}\n" for _, t in PAIRS))  # cleaned alike
    code, out, err = kiln(
        capsys,
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--src",
        str(tmp_path / "src.txt"),
        "--ref",
        str(tmp_path / "ref.txt"),
        "--beam",
        "2",
        "--out",
        str(tmp_path / "raw"),
    )
    assert (code, err) == (0, "")
    assert json.loads(out) == prepared and prepared["sentences"] == len(PAIRS)
    predictions = [(tmp_path / d / "predictions.jsonl").read_text() for d in ("prepared", "raw")]
    assert predictions[0] == predictions[1]


def test_evaluate_decodes_as_the_recipe_did_unless_told(
    translation: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset --length-penalty / --alpha mean the fine-tuning job's own `decode` (its manifest's job
    config); given ones win, one at a time; a checkpoint without a job config decodes with the defaults."""
    import cluster.evaluation as evaluation

    data, plain = translation
    loaded = load_finetuned(plain)
    recipe = {"decode": {"beam_size": 5, "length_penalty": "avg", "alpha": 1.4, "max_len": 64}}
    tuned = save_checkpoint(
        tmp_path / "tuned", loaded.model, loaded.model_config, loaded.tokenizer_file, recipe
    )
    seen: list[DecodeConfig] = []
    translation_scores = evaluation._translation

    def recording(model, checkpoint, srcs, refs, decode):  # noqa: ANN001, ANN202
        seen.append(decode)
        return translation_scores(model, checkpoint, srcs, refs, decode)

    monkeypatch.setattr(evaluation, "_translation", recording)
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("".join(f"{s}\n" for s, _ in PAIRS))
    ref.write_text("".join(f"{t}\n" for _, t in PAIRS))
    files = ["--src", str(src), "--ref", str(ref)]
    runs = [
        (
            [str(tuned), "--data", str(data)],
            DecodeConfig(beam_size=3, length_penalty="avg", alpha=1.4),
        ),
        (
            [str(tuned), *files, "--alpha", "0.2"],
            DecodeConfig(beam_size=3, length_penalty="avg", alpha=0.2),
        ),
        ([str(tuned), *files, "--length-penalty", "none"], DecodeConfig(3, "none", alpha=1.4)),
        ([str(plain), "--data", str(data)], DecodeConfig(beam_size=3)),  # gnmt, 0.6
    ]
    for flags, expected in runs:
        code, out, err = kiln(capsys, "evaluate", "--checkpoint", *flags, "--beam", "3")
        assert (code, err) == (0, ""), flags
        assert seen.pop() == expected, flags
        printed = json.loads(out)
        assert (printed["length_penalty"], printed["alpha"]) == (
            expected.length_penalty,
            expected.alpha,
        )
    code, _, err = kiln(
        capsys, "evaluate", "--checkpoint", str(tuned), *files, "--length-penalty", "0.6"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--alpha" in err


def test_translate_analyze_beam_and_attention_decode_as_the_recipe_did_unless_told(
    translation: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kiln translate`, `kiln analyze-beam` and `kiln attention` take an unset --length-penalty /
    --alpha from the checkpoint's recipe, as `kiln evaluate` does: a recipe tuned to alpha 1.4 is
    not decoded at 0.6 by the command a user translates with."""
    import cluster.evaluation as evaluation
    import finetune.analysis
    import finetune.attention_maps

    _, plain = translation
    loaded = load_finetuned(plain)
    recipe = {"decode": {"beam_size": 5, "length_penalty": "avg", "alpha": 1.4, "max_len": 64}}
    tuned = save_checkpoint(
        tmp_path / "tuned", loaded.model, loaded.model_config, loaded.tokenizer_file, recipe
    )
    seen: list[tuple[str, float]] = []

    def translate_texts(*args: object, length_penalty: str, alpha: float, **kw: object) -> list:
        seen.append((length_penalty, alpha))
        return []

    def analyze_beam(model, tok, srcs, refs, beams, length_penalty, alpha, max_len):  # noqa: ANN001, ANN202
        seen.append((length_penalty, alpha))
        return SimpleNamespace(to_markdown=str)

    def attention_maps(model, tok, texts, out, beam, length_penalty, alpha, max_len):  # noqa: ANN001, ANN202
        seen.append((length_penalty, alpha))
        return []

    monkeypatch.setattr(evaluation, "translate_texts", translate_texts)
    monkeypatch.setattr(finetune.analysis, "analyze_beam", analyze_beam)
    monkeypatch.setattr(finetune.analysis, "write_analysis", lambda result, out: [])
    monkeypatch.setattr(finetune.attention_maps, "attention_maps", attention_maps)
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{s}\n" for s, _ in PAIRS))
    ref = tmp_path / "ref.txt"
    ref.write_text("".join(f"{t}\n" for _, t in PAIRS))
    commands = [
        ["translate", "--input", str(src)],
        ["analyze-beam", "--src", str(src), "--ref", str(ref), "--out", str(tmp_path / "ab")],
        ["attention", "--src", str(src), "--out", str(tmp_path / "maps")],
    ]
    for command in commands:
        for ckpt, flags, expected in [
            (tuned, [], ("avg", 1.4)),
            (tuned, ["--alpha", "0.2"], ("avg", 0.2)),
            (tuned, ["--length-penalty", "none"], ("none", 1.4)),
            (plain, [], ("gnmt", 0.6)),  # no recipe recorded: the defaults
        ]:
            code, _, err = kiln(
                capsys, *command[:1], "--checkpoint", str(ckpt), *command[1:], *flags
            )
            assert (code, err) == (0, ""), (command, flags)
            assert seen.pop() == expected, (command, flags)


def test_the_readme_example_files_are_a_dev_set_for_the_sample() -> None:
    """README's `kiln evaluate` / `kiln predict` lines read docs/examples/ with checkpoints trained on
    the built-in sample: its labels, line-aligned number pairs."""
    examples = Path(__file__).resolve().parents[2] / "docs" / "examples"
    rows = predict.read_labelled(examples / "domains.tsv", "text", "label", LABEL_NAMES)
    assert {r.label for r in rows} == set(LABEL_NAMES)
    srcs, refs = predict.read_parallel(examples / "numbers.en", examples / "numbers.fr")
    assert len(srcs) == len(refs) > 1 and all(srcs) and all(refs)


# ----------------------------------------------------- bad input: one line (file:line), exit 2
def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_bad_inputs_exit_2_with_one_line(
    checkpoints: dict[str, Path],
    translation: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    cls, mt = str(checkpoints["bert_classifier"]), str(translation[1])
    empty = write(tmp_path / "empty.tsv", "")
    dev = write(tmp_path / "dev.tsv", "text\tlabel\ngood movie\tpos\nbad plot\tmeh\n")
    src = write(tmp_path / "src.txt", "good\nbad\nthe movie\n")
    ref = write(tmp_path / "ref.txt", "good\nbad\n")
    evaluate, predict = ["evaluate", "--checkpoint", cls], ["predict", "--checkpoint", cls]
    cases = [
        ([*evaluate, "--input", empty], f"{empty}: file is empty"),
        (
            [*evaluate, "--input", dev],
            f"{dev}:3: label 'meh' is not one of the checkpoint's labels ['neg', 'pos']",
        ),
        (
            [*evaluate, "--input", dev, "--text-column", "sentence"],
            f"{dev}:1: no column 'sentence' (--text-column)",
        ),
        (
            ["evaluate", "--checkpoint", mt, "--src", src, "--ref", ref],
            f"{ref}:3: file ends here but {src} has 3 lines",
        ),
        (["evaluate", "--checkpoint", mt, "--src", src], "--src and --ref go together"),
        (evaluate, "give one of --data DIR"),
        ([*evaluate, "--input", dev, "--data", str(tmp_path)], "give one of --data DIR"),
        ([*evaluate, "--src", src, "--ref", ref], "does not translate"),
        (["evaluate", "--checkpoint", mt, "--input", dev], "score it with --src FILE --ref FILE"),
        ([*evaluate, "--data", str(tmp_path), "--text-column", "x"], "--text-column applies"),
        ([*predict, "--input", empty], f"{empty}: file is empty"),
        (
            [*predict, "--input", dev, "--column", "sentence"],
            f"{dev}:1: no column 'sentence' (--column)",
        ),
        ([*predict, "--input", src, "--column", "text"], f"{src}: --column 'text' needs"),
        ([*predict, "--input", src, "--out", str(tmp_path / "x.csv")], ".tsv or .jsonl"),
        (["predict", "--checkpoint", mt, "--input", src], "is not a classifier"),
    ]
    for args, message in cases:
        code, out, err = kiln(capsys, *args)
        assert code == 2 and err.startswith("kiln: error: ") and message in err, (args, err)
        assert err.count("\n") == 1 and out == "", (args, err)
