"""Language-model baselines on the same footing as Kiln's GPT: a Kneser–Ney n-gram LM, a character-level LSTM,
and the scoring of any text file with a GPT checkpoint.

Comparable perplexity. Each model predicts a text in its own units (words + `</s>`, characters, BPE tokens +
`[EOS]`), so perplexity per model unit is not comparable across models: a model with more, smaller units
has a lower per-unit perplexity for the same quality. What every model does compute is the total negative
log-likelihood (NLL) of the same text, and that converts into a per-word or per-character figure:

    ppl_word = exp(total NLL in nats / number of words)     ppl_char = exp(total NLL in nats / number of chars)
    nats per char = total NLL in nats / number of chars     bits per char = nats per char / ln 2

Worked example: a model that pays 6.0 nats for the two-line text "a b\\nc\\n" (3 words, 6 characters counting
both newlines) has ppl_word = exp(6/3) = 7.39 and ppl_char = exp(6/6) = 2.72, whatever its units.

The text, for every model: a file's non-blank lines, each cleaned as `kiln data prepare` cleans text (NFC,
no control characters, runs of whitespace as one space, so stripped: WikiText's lines begin and end with a
space; its blank lines only separate paragraphs), so that a GPT is scored on the very text it was prepared
from. Words are the whitespace-separated tokens of the lines; characters are the lines' characters plus one
newline per line. Every model pays for the line breaks: the n-gram predicts `</s>`, the character models
"\\n", the GPT `[EOS]` (each line is a document `[BOS] line [EOS]`, packed end to end as `kiln data prepare`
packs documents with text_unit: line; `[BOS]` is formatting and is not scored). With a char tokenizer a GPT's
units are then exactly the characters: nats per token = nats per char.

One caveat: a word-level n-gram has a closed vocabulary, so for a word it never saw it pays P(<unk>) and not
the word's spelling; on text with such words its per-character figure is flattered (metrics record them as
`oov_units`). WikiText avoids this by construction: its rare words are already the literal `<unk>` in every
split, which every model has to predict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipeline.clean import clean_text, contiguous_bounds
from data_pipeline.configlib import check_fields, from_preset
from data_pipeline.errors import DataError
from data_pipeline.readers import iter_lines
from data_pipeline.sample import sample_documents
from data_pipeline.tokenizer import load_tokenizer, special_token_ids
from finetune.models.char_rnn import (
    CharRNNConfig,
    CharRNNLM,
    CharVocab,
    State,
    detach_state,
    sample_text,
)
from finetune.models.ngram import NGramLM, Unit
from pretrain.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

Baseline = Literal["ngram", "char_lstm", "gpt"]
SPLITS = ("train", "valid", "test")
Log = Callable[[str], None]


@dataclass
class LMBaselineJob:
    """One baseline run. Text comes from train/valid/test paths, or from one file cut into contiguous train /
    valid / test line ranges (`split_path`), or by default from the built-in sample's documents (no files)."""

    model: Baseline = "ngram"  # gpt scores valid/test with `gpt_checkpoint`; it trains nothing
    train_path: str | None = field(default=None, metadata={"path": "path"})
    valid_path: str | None = field(default=None, metadata={"path": "path"})
    test_path: str | None = field(default=None, metadata={"path": "path"})
    split_path: str | None = field(default=None, metadata={"path": "path"})
    valid_fraction: float = 0.05  # of split_path's lines (and of the sample's documents)
    test_fraction: float = 0.05
    sample_docs: int = 1000  # the built-in sample has ~160 documents; all of them by default
    sample_seed: int = 0
    # n-gram
    ngram_order: int = 3
    ngram_unit: Unit = "word"
    ngram_min_count: int = 1
    # character RNN
    char_model: CharRNNConfig = field(default_factory=lambda: from_preset(CharRNNConfig, "small"))
    steps: int = 2000
    time_limit_s: float = 0.0  # stop training after this many seconds (0: run all steps)
    batch_size: int = 32  # parallel character streams (truncated backpropagation through time)
    seq_len: int = 128  # characters per backpropagation window
    lr: float = 2.0e-3  # Adam; cosine decay to lr/10 over `steps`
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 250
    eval_chars: int = (
        20000  # validation characters scored for the loss curve (the final scores use all)
    )
    sample_chars: int = 400
    sample_prompt: str = "\n"
    temperature: float = 0.8
    top_k: int | None = None
    device: str = "cpu"
    # torch intra-op threads while training and scoring (0: torch's default). Small recurrent matmuls gain
    # little from more, and on a shared CPU OpenMP spin-waiting made 2 threads 10-30x slower than 1 (measured).
    threads: int = 1
    # GPT
    gpt_checkpoint: str | None = field(default=None, metadata={"path": "checkpoint"})
    gpt_window: int | None = None  # None: the model's n_positions
    gpt_stride: int | None = (
        None  # None: half the window, so every scored token sees >= window/2 context
    )
    seed: int = 0
    save_model: bool = True
    out_dir: str = field(default="runs/lm-baseline", metadata={"path": "path"})

    def __post_init__(self) -> None:
        check_fields(self, where="")  # types and the choices of `model` and `ngram_unit`
        given = [p is not None for p in (self.train_path, self.valid_path, self.test_path)]
        if any(given) and not all(given):
            raise ValueError(
                "'train_path', 'valid_path' and 'test_path' go together: give all three or none"
            )
        if all(given) and self.split_path is not None:
            raise ValueError(
                "give either 'split_path' or 'train_path'/'valid_path'/'test_path', not both"
            )
        if not (
            0 < self.valid_fraction < 1
            and 0 < self.test_fraction < 1
            and self.valid_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                "'valid_fraction' and 'test_fraction' must be in (0, 1) and sum to less than 1"
            )
        for key in (
            "ngram_order",
            "ngram_min_count",
            "steps",
            "batch_size",
            "seq_len",
            "log_every",
            "eval_every",
            "eval_chars",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"'{key}' must be at least 1, got {getattr(self, key)}")
        if self.threads < 0 or self.time_limit_s < 0 or not self.lr > 0 or not self.grad_clip > 0:
            raise ValueError(
                "need 'threads' >= 0, 'time_limit_s' >= 0, 'lr' > 0 and 'grad_clip' > 0"
            )
        if self.model == "gpt" and not self.gpt_checkpoint:
            raise ValueError("model 'gpt' needs 'gpt_checkpoint' (a Kiln GPT checkpoint directory)")


# ---------------------------------------------------------------------------------------- text and metrics
def read_text_lines(path: str | Path) -> list[str]:
    """A file's non-blank lines, cleaned as `kiln data prepare` cleans a line-document (text_unit: line), so
    that a prepared dataset of the file holds these very lines. DataError naming the file when it is missing,
    empty or not UTF-8."""
    lines = [clean_text(line, keep_newlines=False) for _, line, _ in iter_lines(str(path))]
    return [line for line in lines if line]


def text_stats(lines: list[str]) -> dict[str, int]:
    """Lines, words (whitespace tokens) and characters (each line's plus its newline) of a text."""
    return {
        "lines": len(lines),
        "words": sum(len(line.split()) for line in lines),
        "chars": sum(len(line) + 1 for line in lines),
    }


def perplexities(nll: float, units: int, lines: list[str]) -> dict[str, float | int]:
    """Per-unit, per-word and per-character perplexity of a total NLL (nats) over `lines` (module docstring)."""
    stats = text_stats(lines)
    if units < 1 or stats["words"] < 1:
        raise ValueError("perplexities: the text has no predicted units or no words")
    return {
        "nll": nll,
        "units": units,
        **stats,
        "nll_per_unit": nll / units,
        "ppl_unit": math.exp(nll / units),
        "ppl_word": math.exp(nll / stats["words"]),
        "ppl_char": math.exp(nll / stats["chars"]),
        "nats_per_char": nll / stats["chars"],
        "bits_per_char": nll / stats["chars"] / math.log(2),
    }


def _contiguous_split(
    items: list, valid_fraction: float, test_fraction: float, where: str
) -> dict[str, list]:
    # The arithmetic of `kiln data prepare`'s split: contiguous, so both hold out the same lines.
    n = len(items)
    train_end, valid_end = contiguous_bounds(n, valid_fraction, test_fraction)
    if train_end < 1:
        raise DataError(
            f"{where}: {n} non-blank lines/documents are too few for a train/valid/test split"
        )
    return {
        "train": items[:train_end],
        "valid": items[train_end:valid_end],
        "test": items[valid_end:],
    }


def load_texts(job: LMBaselineJob) -> dict[str, list[str]]:
    """{"train"|"valid"|"test": lines}; see LMBaselineJob for where they come from."""
    paths = (job.train_path, job.valid_path, job.test_path)
    if all(p is not None for p in paths):
        return {split: read_text_lines(p) for split, p in zip(SPLITS, paths, strict=True)}  # type: ignore[arg-type]
    if job.split_path is not None:
        return _contiguous_split(
            read_text_lines(job.split_path), job.valid_fraction, job.test_fraction, job.split_path
        )
    docs = sample_documents(
        job.sample_seed, job.sample_docs
    )  # seed-shuffled: a contiguous cut is a random one
    parts = _contiguous_split(docs, job.valid_fraction, job.test_fraction, "the built-in sample")
    return {
        name: [s.strip() for d in part for s in d.split("\n") if s.strip()]
        for name, part in parts.items()
    }


def write_splits(texts: dict[str, list[str]], where: Path) -> None:
    """The text each split scored, one line per line (splits/train.txt ...): what another model
    trains on to be compared on the same held-out lines, e.g. `kiln data prepare` with
    `paths: [<out>/splits/train.txt]` for a GPT (configs/data-shakespeare-char.yaml)."""
    where.mkdir(parents=True, exist_ok=True)
    for split, lines in texts.items():
        (where / f"{split}.txt").write_text(
            "".join(f"{line}\n" for line in lines), encoding="utf-8"
        )


def format_summary(metrics: dict[str, Any]) -> str:
    """What `kiln lm-baseline` prints: one line per scored split."""
    out = []
    for split in ("valid", "test"):
        m = metrics.get(split)
        if m:
            out.append(
                f"[{metrics['model']}] {split}: {m['ppl_word']:.2f} ppl/word, {m['ppl_char']:.4f} ppl/char "
                f"({m['nats_per_char']:.4f} nats/char, {m['bits_per_char']:.4f} bits/char), "
                f"{m['ppl_unit']:.3f} ppl per {metrics['unit']} "
                f"over {m['words']:,} words"
            )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- the runner
def run_lm_baseline(
    job: LMBaselineJob, out_dir: str | Path | None = None, log: Log | None = None
) -> dict:
    """Train (or, for "gpt", only load) the baseline, score valid and test, write metrics.json (and, for the
    character RNN, loss_curve.png, samples.txt, the checkpoint); returns the metrics."""
    out = Path(out_dir if out_dir is not None else job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: print(f"[lm-baseline] {msg}", flush=True))
    texts = load_texts(job)
    log(
        f"{job.model}: "
        + ", ".join(f"{k} {text_stats(v)['words']:,} words" for k, v in texts.items())
    )
    write_splits(texts, out / "splits")
    runner = {"ngram": _run_ngram, "char_lstm": _run_char_rnn, "gpt": _run_gpt}[job.model]
    threads = torch.get_num_threads()
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    try:
        metrics = {
            "model": job.model,
            "job": dataclasses.asdict(job),
            **runner(job, texts, out, log),
        }
    finally:
        torch.set_num_threads(threads)
    metrics["train"] = {**text_stats(texts["train"]), **metrics.get("train", {})}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out / 'metrics.json'}")
    return metrics


def _run_ngram(job: LMBaselineJob, texts: dict[str, list[str]], out: Path, log: Log) -> dict:
    start = time.perf_counter()
    lm = NGramLM(job.ngram_order, job.ngram_unit, job.ngram_min_count).fit(texts["train"])
    fit_s = time.perf_counter() - start
    log(
        f"fitted order-{lm.order} {lm.unit} KN model in {fit_s:.1f} s (vocabulary {lm.vocab_size:,})"
    )
    result: dict[str, Any] = {
        "unit": f"{lm.unit} (+ </s> per line)",
        "vocab_size": lm.vocab_size,
        "discounts": lm.discounts,
        "train": {"seconds": fit_s},
    }
    for split in ("valid", "test"):
        start = time.perf_counter()
        result[split] = {
            **perplexities(*lm.score_lines(texts[split]), texts[split]),
            "oov_units": lm.count_oov(texts[split]),
            "seconds": time.perf_counter() - start,
        }
    if job.save_model:
        lm.save(out / "ngram.json")
    return result


def _run_gpt(job: LMBaselineJob, texts: dict[str, list[str]], out: Path, log: Log) -> dict:
    result: dict[str, Any] = {"unit": "token (+ [EOS] per line)", "checkpoint": job.gpt_checkpoint}
    for split in ("valid", "test"):
        result[split] = gpt_lines_perplexity(
            job.gpt_checkpoint,
            texts[split],
            window=job.gpt_window,  # type: ignore[arg-type]
            stride=job.gpt_stride,
            device=job.device,
            log=log,
        )
    return result


# ---------------------------------------------------------------------------------------- character RNN
def _run_char_rnn(job: LMBaselineJob, texts: dict[str, list[str]], out: Path, log: Log) -> dict:
    joined = {
        k: "\n" + "\n".join(v) + "\n" for k, v in texts.items()
    }  # a leading "\n": the first char's context
    vocab = CharVocab.from_text(joined["train"])
    config = dataclasses.replace(job.char_model, vocab_size=len(vocab))
    torch.manual_seed(job.seed)
    model = CharRNNLM(config).to(job.device)
    ids = {k: torch.tensor(vocab.encode(v), dtype=torch.long) for k, v in joined.items()}
    start = time.perf_counter()
    curve = _train_char_rnn(job, model, ids["train"], ids["valid"][: job.eval_chars + 1], log)
    train_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "unit": "char",
        "vocab_size": len(vocab),
        "char_model": dataclasses.asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": {"seconds": train_s, "steps": len(curve["train"])},
    }
    for split in ("valid", "test"):
        nll, n = stream_nll(model, ids[split].to(job.device))
        result[split] = perplexities(nll, n, texts[split])
    _plot_curve(
        curve, out / "loss_curve.png", f"char {config.cell.upper()} {config.layers}x{config.hidden}"
    )
    gen = torch.Generator().manual_seed(job.seed)
    samples = [
        sample_text(
            model,
            vocab,
            job.sample_prompt,
            job.sample_chars,
            temperature=job.temperature,
            top_k=job.top_k,
            generator=gen,
        )
        for _ in range(3)
    ]
    (out / "samples.txt").write_text("\n\n=====\n\n".join(samples) + "\n", encoding="utf-8")
    if job.save_model:
        vocab.save(out / "char_vocab.json")
        save_checkpoint(
            out / "checkpoint", model, config, job_config=dataclasses.asdict(job), overwrite=True
        )
    return result


def _train_char_rnn(
    job: LMBaselineJob, model: CharRNNLM, train: Tensor, valid: Tensor, log: Log
) -> dict:
    """Truncated BPTT over `batch_size` contiguous streams of the training text, the state carried from one
    window to the next (as scoring carries it); returns the loss curve (nats per character)."""
    B, T = job.batch_size, job.seq_len
    L = (train.numel() - 1) // B
    if L < 2:
        where = job.train_path or job.split_path or "the built-in sample"
        raise DataError(
            f"{where}: the training text ({train.numel()} chars) is too short for batch_size {B}"
        )
    xs = (
        train[: B * L].view(B, L).to(job.device)
    )  # (B, L): stream b is one contiguous stretch of the text
    ys = train[1 : B * L + 1].view(B, L).to(job.device)  # (B, L): the next character
    opt = torch.optim.Adam(model.parameters(), lr=job.lr)
    curve: dict[str, list] = {"train": [], "valid": []}
    state: State | None = None
    pos, start = 0, time.perf_counter()
    model.train()
    for step in range(1, job.steps + 1):
        # Cosine decay to lr/10 over the run, whichever of the step and time budgets is closer to its end, so
        # that a run stopped by time_limit_s has annealed too.
        elapsed = time.perf_counter() - start
        progress = max(
            (step - 1) / job.steps, elapsed / job.time_limit_s if job.time_limit_s else 0.0
        )
        for group in opt.param_groups:
            group["lr"] = job.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
        if pos >= L:  # a new pass over the text starts from a zero state
            pos, state = 0, None
        logits, state = model(xs[:, pos : pos + T], state)  # (B, t, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ys[:, pos : pos + T].flatten())
        state, pos = detach_state(state), pos + T
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.grad_clip)
        opt.step()
        curve["train"].append(loss.item())
        elapsed = time.perf_counter() - start
        out_of_time = 0 < job.time_limit_s <= elapsed
        if step % job.eval_every == 0 or step == job.steps or out_of_time:
            nll, n = stream_nll(model, valid.to(job.device))
            curve["valid"].append((step, nll / n))
            model.train()
        if step % job.log_every == 0 or step == job.steps or out_of_time:
            window = curve["train"][-job.log_every :]
            log(
                f"step {step}/{job.steps} train {sum(window) / len(window):.4f} nats/char, valid "
                f"{curve['valid'][-1][1] if curve['valid'] else float('nan'):.4f}, {elapsed:.0f} s"
            )
        if out_of_time:
            log(f"time limit {job.time_limit_s:.0f} s reached after {step} steps")
            break
    return curve


@torch.no_grad()
def stream_nll(
    model: CharRNNLM, ids: Tensor, *, streams: int = 32, chunk: int = 256, burn_in: int = 512
) -> tuple[float, int]:
    """(total NLL in nats, count) of ids[1:] given everything before, ids[0] being context only.

    For speed the text is cut into up to `streams` contiguous segments scored side by side; each segment but
    the first starts from a zero state `burn_in` characters early (those are read, not scored), so a
    segment's first characters see `burn_in` characters of context rather than the whole text before them.
    """
    n = ids.numel() - 1
    if n < 1:
        raise ValueError("stream_nll: nothing to score")
    streams = max(1, min(streams, n // 1024))  # segments of >= 1024 scored characters
    bounds = [
        1 + round(s * n / streams) for s in range(streams + 1)
    ]  # targets [bounds[s], bounds[s+1])
    rows = [(max(0, a - 1 - burn_in), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    width = max(b - 1 - u for u, _, b in rows)
    x = torch.zeros(streams, width, dtype=torch.long, device=ids.device)  # (S, W)
    y = torch.zeros_like(x)
    scored = torch.zeros(streams, width, dtype=torch.bool, device=ids.device)
    for r, (u, a, b) in enumerate(rows):  # column c holds input ids[u + c], target ids[u + c + 1]
        x[r, : b - 1 - u], y[r, : b - 1 - u] = ids[u : b - 1], ids[u + 1 : b]
        scored[r, a - 1 - u : b - 1 - u] = True
    was_training = model.training
    model.eval()
    total, state = torch.zeros((), dtype=torch.float64, device=ids.device), None
    for c in range(0, width, chunk):
        logits, state = model(x[:, c : c + chunk], state)  # (S, t, V)
        nll = F.cross_entropy(
            logits.transpose(1, 2), y[:, c : c + chunk], reduction="none"
        )  # (S, t)
        total += (nll * scored[:, c : c + chunk]).sum(dtype=torch.float64)
    model.train(was_training)
    return float(total), n


def _plot_curve(curve: dict, file: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = curve["train"]
    k = max(1, len(train) // 100)  # a running mean over ~1% of the steps, so the trend is readable
    smooth = [
        sum(train[max(0, i - k + 1) : i + 1]) / len(train[max(0, i - k + 1) : i + 1])
        for i in range(len(train))
    ]
    ax.plot(range(1, len(train) + 1), smooth, label="train (running mean)")
    if curve["valid"]:
        steps, losses = zip(*curve["valid"], strict=True)
        ax.plot(steps, losses, "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats per character)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- GPT
def gpt_text_perplexity(
    checkpoint_dir: str | Path,
    text_path: str | Path,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    log: Log | None = None,
) -> dict:
    """Score a text file (its non-blank lines, see the module docstring) with a Kiln GPT checkpoint; the same
    per-unit / per-word / per-char perplexities as the baselines, plus the checkpoint and window used."""
    lines = read_text_lines(text_path)
    return {
        "text_path": str(text_path),
        **gpt_lines_perplexity(
            checkpoint_dir,
            lines,
            window=window,
            stride=stride,
            batch_size=batch_size,
            device=device,
            log=log,
        ),
    }


def gpt_lines_perplexity(
    checkpoint_dir: str | Path,
    lines: list[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    log: Log | None = None,
) -> dict:
    """`[BOS] line [EOS]` per line, packed; sliding windows of at most n_positions tokens, advanced by
    `stride`, each scoring only the tokens the previous windows did not (so every token is scored once, with
    at least window - stride tokens of context once the first window is full)."""
    ckpt = load_checkpoint(checkpoint_dir)
    if ckpt.arch != "gpt" or ckpt.model is None:
        raise CheckpointError(
            f"{checkpoint_dir}: a GPT checkpoint is needed, this one is {ckpt.arch!r}"
        )
    if ckpt.tokenizer_file is None:
        raise CheckpointError(f"{checkpoint_dir}: no tokenizer.json in the checkpoint directory")
    tok = load_tokenizer(ckpt.tokenizer_file)
    special = special_token_ids(tok)
    bos, eos = special["[BOS]"], special["[EOS]"]
    ids: list[int] = []
    for enc in tok.encode_batch(lines, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    n_pos = ckpt.model_config.n_positions
    window = min(window or n_pos, n_pos)
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise ValueError(f"gpt perplexity: need 1 <= stride <= window ({window}), got {stride}")
    model = ckpt.model.to(device).eval()
    nll, units = _score_windows(
        model,
        torch.tensor(ids, dtype=torch.long),
        window,
        stride,
        bos,
        batch_size,
        log or (lambda msg: None),
    )
    return {
        "checkpoint": str(checkpoint_dir),
        "window": window,
        "stride": stride,
        **perplexities(nll, units, lines),
    }


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target): inputs ids[begin:end-1] (at most `window`) score targets first..end-1."""
    out, done, begin = [], 1, 0
    while done < n:
        end = min(begin + window + 1, n)
        out.append((begin, end, done))
        done, begin = end, begin + stride
    return out


@torch.no_grad()
def _score_windows(
    model: torch.nn.Module,
    ids: Tensor,
    window: int,
    stride: int,
    bos: int,
    batch_size: int,
    log: Log,
) -> tuple[float, int]:
    spans = _windows(ids.numel(), window, stride)
    device = next(model.parameters()).device
    total, units = 0.0, 0
    for i in range(0, len(spans), batch_size):
        batch = spans[i : i + batch_size]
        width = max(end - 1 - begin for begin, end, _ in batch)
        x = torch.zeros(
            len(batch), width, dtype=torch.long
        )  # (B, W); padding after the end is never attended
        y = torch.full((len(batch), width), -100, dtype=torch.long)  # -100: not scored here
        for r, (begin, end, first) in enumerate(batch):
            x[r, : end - 1 - begin] = ids[begin : end - 1]
            target = ids[first:end].clone()
            target[target == bos] = -100  # a document start is formatting, not text
            y[r, first - 1 - begin : end - 1 - begin] = target
        logits, _ = model(x.to(device))  # (B, W, V)
        y = y.to(device)
        total += float(
            F.cross_entropy(logits.float().transpose(1, 2), y, reduction="sum", ignore_index=-100)
        )
        units += int((y != -100).sum())
        if (i // batch_size + 1) % 50 == 0:
            log(f"gpt: scored {units:,} tokens ({i + len(batch)}/{len(spans)} windows)")
    return total, units
