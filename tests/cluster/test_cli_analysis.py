"""`kiln analyze-beam`, `kiln attention` and `kiln translate --sample` on a tiny translation checkpoint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from cluster.cli import build_parser, main
from data_pipeline.configlib import from_preset
from finetune.decode import greedy_decode
from finetune.models.seq2seq import Seq2SeqConfig, WarmStartedSeq2Seq
from finetune.translate import encode_sources, pad_batch
from pretrain.checkpoint import save_checkpoint
from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig

SPECIALS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[BOS]",
    "[EOS]",
]  # ids 0..6 (docs/design.md)
WORDS = [str(d) for d in range(10)]
SRCS = ["1 2 3", "4 5", "6 7 8 9", "0 1"]
REFS = ["3 2 1", "5 4", "9 8 7 6", "1 0"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP spin-waiting makes them
    many times slower (as tests/finetune/conftest.py measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_analysis")
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(root / "tokenizer.json"))
    vocab = len(SPECIALS) + len(WORDS)
    torch.manual_seed(0)
    config = (
        Seq2SeqConfig(  # a wide init: peaked distributions, outputs that differ and sometimes stop
            encoder=from_preset(BertConfig, "tiny", vocab_size=vocab, initializer_range=0.3),
            decoder=from_preset(
                GPTConfig, "tiny", vocab_size=vocab, add_cross_attention=True, initializer_range=0.3
            ),
        )
    )
    return save_checkpoint(root / "mt", WarmStartedSeq2Seq(config), config, root / "tokenizer.json")


def kiln(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def lines_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_help_documents_the_new_commands_and_flags() -> None:
    text = build_parser().format_help()
    assert "analyze-beam" in text and "attention" in text
    for command, flags in [
        ("analyze-beam", ["--beams", "--limit", "--data", "--src", "--ref"]),
        ("attention", ["--src", "TEXT"]),
        ("translate", ["--sample", "--temperature", "--top-k", "--top-p", "--seed"]),
    ]:
        sub = build_parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001 — argparse has no API
        assert all(flag in sub.format_help() for flag in flags), command


def test_analyze_beam_from_files(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, ref = lines_file(tmp_path / "src.txt", SRCS), lines_file(tmp_path / "ref.txt", REFS)
    out = tmp_path / "analysis"
    code, stdout, err = kiln(
        capsys,
        "analyze-beam",
        "--checkpoint",
        str(checkpoint),
        "--src",
        str(src),
        "--ref",
        str(ref),
        "--beams",
        "1,2",
        "--limit",
        "3",
        "--max-len",
        "8",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "| beam | BLEU |" in stdout and "| 2 |" in stdout
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["settings"]["beam_sizes"] == [1, 2] and doc["settings"]["max_len"] == 8
    assert [s["source"] for s in doc["sentences"]] == SRCS[:3]
    assert all(sum(row["counts"].values()) == 3 for row in doc["rows"])
    for name in ("summary.md", "bleu_vs_beam.png", "errors_vs_beam.png"):
        assert (out / name).stat().st_size > 0


def test_analyze_beam_reads_a_prepared_split(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    split = tmp_path / "data" / "translation" / "validation"
    split.mkdir(parents=True)
    pq.write_table(pa.table({"src_text": SRCS, "tgt_text": REFS}), split / "part-00000.parquet")
    code, out, _ = kiln(
        capsys,
        "analyze-beam",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(tmp_path / "data"),
        "--split",
        "validation",
        "--beams",
        "3",
        "--max-len",
        "6",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0
    doc = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert [s["reference"] for s in doc["sentences"]] == REFS and doc["rows"][0]["beam_size"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--beams", "1,x"], "--beams '1,x'"),
        (["--beams", "0,3"], "widths >= 1"),
        (
            ["--data", "DATA", "--src", "SRC", "--ref", "REF"],
            "either --data DIR or --src FILE --ref FILE",
        ),
        (["--src", "SRC"], "--src and --ref go together"),
        (["--src", "SRC", "--ref", "SHORT"], "has 4 lines but --ref"),
        (["--src", "SRC", "--ref", "MISSING"], "--ref"),
        (["--data", "EMPTY"], "no shards"),
    ],
)
def test_analyze_beam_input_errors_are_one_line_exit_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    paths = {
        "SRC": lines_file(tmp_path / "s.txt", SRCS),
        "REF": lines_file(tmp_path / "r.txt", REFS),
        "SHORT": lines_file(tmp_path / "short.txt", REFS[:2]),
        "MISSING": tmp_path / "nope.txt",
        "DATA": tmp_path,
        "EMPTY": tmp_path,
    }
    argv = [str(paths.get(a, a)) for a in extra]
    code, _, err = kiln(
        capsys, "analyze-beam", "--checkpoint", str(checkpoint), *argv, "--out", str(tmp_path / "o")
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_missing_checkpoint_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = kiln(
        capsys, "attention", "--checkpoint", str(tmp_path / "none"), "1 2", "--out", str(tmp_path)
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "none") in err


def test_attention_writes_one_png_per_sentence(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = kiln(
        capsys,
        "attention",
        "--checkpoint",
        str(checkpoint),
        "1 2 3",
        "4 5 6 7",
        "--beam",
        "2",
        "--max-len",
        "6",
        "--out",
        str(tmp_path / "maps"),
    )
    assert code == 0
    written = [Path(line) for line in out.splitlines()]
    assert [p.name for p in written] == ["attention_000.png", "attention_001.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    src = lines_file(tmp_path / "src.txt", ["1 2", "", "3 4", "5"])
    code, out, _ = kiln(
        capsys,
        "attention",
        "--checkpoint",
        str(checkpoint),
        "--src",
        str(src),
        "--limit",
        "2",
        "--max-len",
        "4",
        "--out",
        str(tmp_path / "maps2"),
    )
    assert code == 0 and len(out.splitlines()) == 2  # blank lines skipped, then the first two
    code, _, err = kiln(
        capsys, "attention", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "maps3")
    )
    assert code == 2 and "sentences as arguments or --src" in err


def test_translate_sample_is_seeded_and_temperature_zero_is_greedy(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = lines_file(tmp_path / "in.txt", SRCS)
    base = [
        "translate",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(src),
        "--max-len",
        "8",
        "--sample",
    ]
    first = kiln(capsys, *base, "--temperature", "1.5", "--seed", "1")
    assert first[0] == 0 and len(first[1].splitlines()) == len(SRCS)
    assert kiln(capsys, *base, "--temperature", "1.5", "--seed", "1") == first
    assert kiln(capsys, *base, "--temperature", "1.5", "--seed", "2")[1] != first[1]
    code, out, _ = kiln(capsys, *base, "--temperature", "0")
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    from finetune.models import load_finetuned

    model = load_finetuned(checkpoint).model.eval()
    ids, mask = pad_batch(encode_sources(tok, SRCS, 128), 0, torch.device("cpu"))
    want = tok.decode_batch(greedy_decode(model, ids, mask, 5, 6, 8), skip_special_tokens=True)
    assert code == 0 and out.splitlines() == want


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "0.9"], "only apply with --sample"),
        (["--sample", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--sample", "--temperature", "-1"], "temperature"),
    ],
)
def test_translate_sampling_flag_errors(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], message: str
) -> None:
    src = lines_file(tmp_path / "in.txt", SRCS[:1])
    code, _, err = kiln(
        capsys, "translate", "--checkpoint", str(checkpoint), "--input", str(src), *flags
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_length_penalty_names_the_penalty_and_alpha_sets_its_strength(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, ref = lines_file(tmp_path / "src.txt", SRCS), lines_file(tmp_path / "ref.txt", REFS)
    base = [
        "analyze-beam",
        "--checkpoint",
        str(checkpoint),
        "--src",
        str(src),
        "--ref",
        str(ref),
        "--beams",
        "2",
        "--max-len",
        "6",
    ]
    assert kiln(capsys, *base, "--out", str(tmp_path / "default"))[0] == 0
    avg = ["--length-penalty", "avg", "--alpha", "0.5", "--out", str(tmp_path / "avg")]
    assert kiln(capsys, *base, *avg)[0] == 0
    settings = [
        json.loads((tmp_path / run / "analysis.json").read_text())["settings"]
        for run in ("default", "avg")
    ]
    assert [(s["length_penalty"], s["alpha"]) for s in settings] == [("gnmt", 0.6), ("avg", 0.5)]
    import cluster.evaluation

    seen = {}

    def translate_lines(*args: object, **kwargs: object) -> list[str]:
        seen.update(args=args[2:], **kwargs)
        return []

    monkeypatch.setattr(cluster.evaluation, "translate_lines", translate_lines)
    code, _, _ = kiln(
        capsys,
        "translate",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(src),
        "--beam",
        "3",
        "--length-penalty",
        "none",
        "--alpha",
        "3",
        "--max-len",
        "8",
    )
    assert code == 0 and seen == {"args": (3, 3.0, 8), "length_penalty": "none"}


@pytest.mark.parametrize("command", ["translate", "analyze-beam", "attention"])
def test_the_old_length_penalty_number_points_at_alpha(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    argv = [command, "--checkpoint", "nowhere", "--out", "never-written", "--length-penalty"]
    code, _, err = kiln(capsys, *argv, "0.6")
    assert code == 2
    assert err == (
        "kiln: error: --length-penalty names the penalty (none, avg, gnmt); "
        "the GNMT strength is --alpha 0.6\n"
    )
    code, _, err = kiln(capsys, *argv, "cubic")
    assert code == 2 and err == "kiln: error: --length-penalty 'cubic': choose none, avg or gnmt\n"


def test_the_cli_names_the_decoder_s_length_penalties() -> None:
    from cluster.cli import LENGTH_PENALTIES
    from finetune.decode import LENGTH_PENALTIES as DECODER

    assert set(LENGTH_PENALTIES) == set(DECODER)
    for command in ("translate", "analyze-beam", "attention"):
        args = build_parser().parse_args([command, "--checkpoint", "c", "--out", "o"])
        # unset: the checkpoint's recipe decode, else gnmt / 0.6 (tests/cluster/test_predict.py)
        assert (args.length_penalty, args.alpha) == (None, None)
