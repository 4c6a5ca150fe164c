"""Beam-search error analysis: is a wrong translation the search's fault or the model's?

For a source x, reference y* and the search's output ŷ at beam width B (Stahlberg & Byrne 2019, "On NMT search
errors and model errors"):
- `correct`: ŷ is the reference (same ids, or the same detokenised text);
- `search` error: the model scores the reference higher than ŷ, so a better search would have returned a better
  translation (or at least one the model likes more);
- `model` error: the model scores ŷ at least as high as the reference: no search could fix it;
- `unreachable`: the reference needs more than max_len tokens, so no search under that limit can output it.

Which score: the comparison uses the quantity beam search maximises, the length-normalised score
logprob / lp(|Y|) with the same length penalty and alpha (finetune.decode.normalised_score; |Y| counts [EOS]).
Comparing raw log-probabilities instead charges a length penalty's own preferences to the model, so both are
reported: `verdict` (normalised, the primary one) and `verdict_raw` (summed log P(y|x)). With
length_penalty="none" they coincide. Both sides are scored teacher forced by the same `score_sequences`; the
search's own log-probability of ŷ is kept as a check (`max_rescoring_diff`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.tokenizer import TranslationTokenizers, as_translation_tokenizers
from finetune.decode import LENGTH_PENALTIES, Hypothesis, beam_search, normalised_score
from finetune.evaluate import bleu
from finetune.translate import Tokenizers, encode_sources, pad_batch, source_limit

VERDICTS = ("correct", "search", "model", "unreachable")


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    src_ids: Tensor,
    src_mask: Tensor,
    tgt_ids: Sequence[Sequence[int]],
    bos_id: int,
    pad_id: int = 0,
) -> Tensor:
    """Teacher-forced summed log P(y|x) per row: (B,) float.

    Each `tgt_ids` row is the target exactly as it is scored, `y [EOS]` (the decoder sees `[BOS] y`), which is
    what beam_search's Hypothesis.logprob sums; a hypothesis cut off at max_len has no [EOS] and is scored
    without one.
    """
    if len(tgt_ids) != src_ids.size(0):
        raise ValueError(f"got {len(tgt_ids)} targets for {src_ids.size(0)} sources")
    if any(len(row) == 0 for row in tgt_ids):
        raise ValueError(
            "every target needs at least one token (an empty output is scored as [EOS] alone)"
        )
    width = max(len(row) for row in tgt_ids)
    tgt_out = torch.full((len(tgt_ids), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(tgt_ids), width), dtype=torch.bool)
    for i, row in enumerate(tgt_ids):
        tgt_out[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        real[i, : len(row)] = True
    tgt_in = torch.cat(
        [torch.full((len(tgt_ids), 1), bos_id, dtype=torch.long), tgt_out[:, :-1]], dim=1
    )  # (B,U)
    device = src_ids.device
    logits = model(src_ids, src_mask, tgt_in.to(device)).float().cpu()  # (B,U,V)
    token_lp = F.log_softmax(logits, dim=-1).gather(-1, tgt_out.unsqueeze(-1)).squeeze(-1)  # (B,U)
    return token_lp.masked_fill(~real, 0.0).sum(dim=1)


def classify(same: bool, reachable: bool, out_value: float, ref_value: float | None) -> str:
    """One verdict of VERDICTS: the output equals the reference, else whichever side the model scores higher."""
    if same:
        return "correct"
    if not reachable or ref_value is None:
        return "unreachable"
    return "search" if ref_value > out_value else "model"


@dataclass
class BeamRow:
    """Totals for one beam width."""

    beam_size: int
    bleu: float
    exact: float  # fraction of outputs equal to their reference
    counts: dict[str, int]  # verdict -> sentences, normalised-score comparison (the primary one)
    counts_raw: dict[str, int]  # the same with raw log-probabilities
    mean_logprob: float  # mean log P(ŷ|x) of the outputs
    mean_score: float  # mean normalised score of the outputs
    seconds: float  # time in beam_search


@dataclass
class BeamAnalysis:
    settings: dict[str, Any]
    rows: list[BeamRow]
    sentences: list[
        dict[str, Any]
    ]  # per source: texts, reference scores, and per beam width the output's
    max_rescoring_diff: float  # max |beam_search's logprob - score_sequences'| over all outputs
    mean_ref_logprob: float | None = None  # over reachable references
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def to_markdown(self) -> str:
        s = self.settings
        lines = [
            f"Beam-search error analysis: {s['sentences']} sentences, length penalty {s['length_penalty']} "
            f"(alpha {s['alpha']}), max_len {s['max_len']}.",
            "",
            "Errors are classified by the normalised score the search maximises (raw log-prob split in brackets); "
            "search error = the model scores the reference higher than the output.",
            "",
            "| beam | BLEU | exact | correct | search errors | model errors | unreachable | mean log P(out) | "
            "mean log P(ref) | search s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref = "n/a" if self.mean_ref_logprob is None else f"{self.mean_ref_logprob:.3f}"
        for r in self.rows:
            c, raw = r.counts, r.counts_raw
            lines.append(
                f"| {r.beam_size} | {r.bleu:.2f} | {r.exact:.3f} | {c['correct']} | {c['search']} "
                f"({raw['search']}) | {c['model']} ({raw['model']}) | {c['unreachable']} | "
                f"{r.mean_logprob:.3f} | {ref} | {r.seconds:.2f} |"
            )
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"


def _check_args(
    srcs: Sequence[str],
    refs: Sequence[str],
    beam_sizes: Sequence[int],
    length_penalty: str,
    max_len: int,
    batch_size: int,
) -> None:
    if len(srcs) != len(refs):
        raise ValueError(
            f"got {len(srcs)} sources but {len(refs)} references; they must be line-aligned"
        )
    if not srcs:
        raise ValueError("nothing to analyse: no sources")
    if not beam_sizes or any(b < 1 for b in beam_sizes):
        raise ValueError(f"beam_sizes must be widths >= 1, got {list(beam_sizes)}")
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(
            f"length_penalty must be one of {sorted(LENGTH_PENALTIES)}, got {length_penalty!r}"
        )
    if max_len < 1 or batch_size < 1:
        raise ValueError(f"max_len and batch_size must be >= 1, got {max_len} and {batch_size}")


def _target(hyp: Hypothesis, max_len: int, eos: int) -> list[int]:
    """What the search scored: y [EOS], or y alone when it was cut off at max_len (then |y| == max_len)."""
    return hyp.tokens if len(hyp.tokens) >= max_len else [*hyp.tokens, eos]


@dataclass
class _Run:
    """Everything analyze_beam needs to carry between batches."""

    model: nn.Module
    tokenizers: (
        TranslationTokenizers  # sources framed and padded by .src, outputs started/ended by .tgt
    )
    length_penalty: str
    alpha: float
    max_len: int
    sentences: list[dict[str, Any]]
    seconds: dict[int, float]
    max_diff: float = 0.0


def _score_refs(run: _Run, chunk: list[int], src_ids: Tensor, src_mask: Tensor) -> None:
    reach = [i for i, row in enumerate(chunk) if run.sentences[row]["reachable"]]
    if not reach:
        return
    sel = torch.tensor(reach, device=src_ids.device)
    tgt = run.tokenizers.tgt
    targets = [run.sentences[chunk[i]]["ref_ids"] + [tgt.eos] for i in reach]
    lps = score_sequences(
        run.model, src_ids[sel], src_mask[sel], targets, tgt.bos, tgt.pad
    ).tolist()
    for i, target, lp in zip(reach, targets, lps, strict=True):
        sent = run.sentences[chunk[i]]
        sent["ref_logprob"] = lp
        sent["ref_score"] = normalised_score(lp, len(target), run.length_penalty, run.alpha)


def _search(run: _Run, chunk: list[int], src_ids: Tensor, src_mask: Tensor, beam: int) -> None:
    tgt = run.tokenizers.tgt
    eos = tgt.eos
    start = time.perf_counter()
    found = beam_search(
        run.model,
        src_ids,
        src_mask,
        tgt.bos,
        eos,
        run.max_len,
        beam_size=beam,
        length_penalty=run.length_penalty,
        alpha=run.alpha,
    )
    run.seconds[beam] += time.perf_counter() - start
    hyps = [h[0] if h else Hypothesis([], -float("inf"), -float("inf")) for h in found]
    targets = [_target(h, run.max_len, eos) for h in hyps]
    lps = score_sequences(run.model, src_ids, src_mask, targets, tgt.bos, tgt.pad).tolist()
    for row, hyp, target, lp in zip(chunk, hyps, targets, lps, strict=True):
        run.max_diff = max(run.max_diff, abs(lp - hyp.logprob))
        sent = run.sentences[row]
        text = run.tokenizers.target.decode(hyp.tokens, skip_special_tokens=True)
        same = hyp.tokens == sent["ref_ids"] or text == sent["ref_detok"]
        score = normalised_score(lp, len(target), run.length_penalty, run.alpha)
        sent["outputs"][str(beam)] = {
            "hypothesis": text,
            "ids": hyp.tokens,
            "logprob": lp,
            "score": score,
            "verdict": classify(same, sent["reachable"], score, sent["ref_score"]),
            "verdict_raw": classify(same, sent["reachable"], lp, sent["ref_logprob"]),
        }


def _row(run: _Run, beam: int, refs: Sequence[str]) -> BeamRow:
    outs = [s["outputs"][str(beam)] for s in run.sentences]
    counts = {v: sum(o["verdict"] == v for o in outs) for v in VERDICTS}
    counts_raw = {v: sum(o["verdict_raw"] == v for o in outs) for v in VERDICTS}
    return BeamRow(
        beam_size=beam,
        bleu=bleu([o["hypothesis"] for o in outs], refs),
        exact=counts["correct"] / len(outs),
        counts=counts,
        counts_raw=counts_raw,
        mean_logprob=sum(o["logprob"] for o in outs) / len(outs),
        mean_score=sum(o["score"] for o in outs) / len(outs),
        seconds=run.seconds[beam],
    )


@torch.no_grad()
def analyze_beam(
    model: nn.Module,
    tokenizer: Tokenizers,
    srcs: Sequence[str],
    refs: Sequence[str],
    beam_sizes: Sequence[int] = (1, 3, 5, 10),
    length_penalty: str = "gnmt",
    alpha: float = 1.0,
    max_len: int = 64,
    batch_size: int = 32,
) -> BeamAnalysis:
    """Search vs model errors and BLEU per beam width (module docstring) for line-aligned sources/references."""
    _check_args(srcs, refs, beam_sizes, length_penalty, max_len, batch_size)
    pair = as_translation_tokenizers(
        tokenizer
    )  # references are target text: the target tokenizer's ids
    rows = encode_sources(pair, srcs, source_limit(model, None))
    ref_ids = [enc.ids for enc in pair.target.encode_batch(list(refs), add_special_tokens=False)]
    sentences = [
        {
            "index": i,
            "source": s,
            "reference": r,
            "ref_ids": ref_ids[i],
            "ref_detok": pair.target.decode(ref_ids[i], skip_special_tokens=True),
            "reachable": len(ref_ids[i]) + 1 <= max_len,
            "ref_logprob": None,
            "ref_score": None,
            "outputs": {},
        }
        for i, (s, r) in enumerate(zip(srcs, refs, strict=True))
    ]
    run = _Run(model, pair, length_penalty, alpha, max_len, sentences, {b: 0.0 for b in beam_sizes})
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # fewer pad positions per batch
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src_ids, src_mask = pad_batch([rows[i] for i in chunk], pair.src.pad, device)
            _score_refs(run, chunk, src_ids, src_mask)
            for beam in beam_sizes:
                _search(run, chunk, src_ids, src_mask, beam)
    finally:
        model.train(was_training)
    ref_lps = [s["ref_logprob"] for s in sentences if s["ref_logprob"] is not None]
    settings = {
        "sentences": len(srcs),
        "beam_sizes": list(beam_sizes),
        "length_penalty": length_penalty,
        "alpha": alpha,
        "max_len": max_len,
        "compare": "normalised score (verdict); raw logprob (verdict_raw)",
    }
    notes = [
        f"{sum(not s['reachable'] for s in sentences)} references are longer than max_len={max_len} tokens "
        "(with [EOS]) and are counted as unreachable, not as search or model errors."
    ]
    return BeamAnalysis(
        settings,
        [_row(run, b, refs) for b in beam_sizes],
        sentences,
        run.max_diff,
        sum(ref_lps) / len(ref_lps) if ref_lps else None,
        notes,
    )


def write_analysis(analysis: BeamAnalysis, out_dir: Path) -> list[Path]:
    """analysis.json, summary.md, bleu_vs_beam.png and errors_vs_beam.png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [
        out_dir / "analysis.json",
        out_dir / "summary.md",
        out_dir / "bleu_vs_beam.png",
        out_dir / "errors_vs_beam.png",
    ]
    files[0].write_text(analysis.to_json() + "\n", encoding="utf-8")
    files[1].write_text(analysis.to_markdown(), encoding="utf-8")
    _plot_bleu(analysis.rows, files[2])
    _plot_errors(analysis.rows, files[3])
    return files


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _plot_bleu(rows: list[BeamRow], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([str(r.beam_size) for r in rows], [r.bleu for r in rows], marker="o")
    ax.set_xlabel("beam width")
    ax.set_ylabel("BLEU (sacrebleu)")
    ax.set_title("BLEU vs beam width")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_errors(rows: list[BeamRow], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    # only the wrong outputs: next to the correct ones (often most) the split would not be visible
    colours = {"search": "tab:red", "model": "tab:blue", "unreachable": "tab:gray"}
    widths = [str(r.beam_size) for r in rows]
    panels = (
        (axes[0], "counts", "normalised score (what the search maximises)"),
        (axes[1], "counts_raw", "raw log-prob"),
    )
    for ax, attr, title in panels:
        bottom = [0.0] * len(rows)
        for verdict in colours:
            values = [getattr(r, attr)[verdict] for r in rows]
            ax.bar(widths, values, bottom=bottom, color=colours[verdict], label=verdict)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xlabel("beam width")
        ax.set_title(title, fontsize=10)
        ax.yaxis.get_major_locator().set_params(integer=True)  # counts of sentences
    axes[0].set_ylabel("wrong outputs (sentences)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    fig.suptitle(f"search vs model errors, of {sum(rows[0].counts.values())} sentences")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
