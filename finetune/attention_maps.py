"""Cross-attention heatmaps: where the decoder looks in the source while it writes each target token.

`attention_maps` translates each chosen sentence with beam search, then runs the model's
`cross_attention(src, src_mask, [BOS] + output)` (teacher forced on its own output) and draws one PNG per
sentence. Row u is the decoder step that *predicts* target token u, so rows are labelled with the predicted
tokens `y [EOS]`; columns are the source tokens `src [EOS]`. Every translation architecture with attention
implements `cross_attention` (for multi-layer models: the last decoder layer, averaged over heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from data_pipeline.tokenizer import as_translation_tokenizers
from finetune.decode import beam_search
from finetune.translate import Tokenizers, encode_sources, pad_batch, source_limit


def _labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable label per id: the token decoded on its own (byte-level BPE pieces such as "onziÃ¨me" become
    "onzième"), a leading space shown as "▁", special tokens by name."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i], skip_special_tokens=False)
        if not text.strip():
            text = tokenizer.id_to_token(i) or f"<{i}>"
        labels.append("▁" + text.lstrip() if text[:1].isspace() else text)
    return labels


def plot_attention(
    weights: Tensor | Any,
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """Heatmap PNG of (U,S) attention weights: rows labelled tgt_tokens, columns src_tokens; returns path."""
    w = torch.as_tensor(weights, dtype=torch.float32).detach().cpu()
    if w.dim() != 2 or w.shape != (len(tgt_tokens), len(src_tokens)):
        raise ValueError(
            f"weights of shape {tuple(w.shape)} do not match {len(tgt_tokens)} target x "
            f"{len(src_tokens)} source labels"
        )
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    # about a third of an inch per token, within limits a viewer can still open
    fig, ax = plt.subplots(
        figsize=(min(2 + 0.35 * len(src_tokens), 30), min(1.5 + 0.35 * len(tgt_tokens), 30))
    )
    image = ax.imshow(
        w.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-6), aspect="auto"
    )
    ax.set_xticks(range(len(src_tokens)), labels=list(src_tokens), rotation=90, fontsize=8)
    ax.set_yticks(range(len(tgt_tokens)), labels=list(tgt_tokens), fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("predicted target")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _require_attention(model: nn.Module, src_ids: Tensor, src_mask: Tensor, bos: int) -> None:
    """ValueError unless the model can return attention weights; probed on one step so it fails before any search.

    A model may lack the method, or have it and refuse (the plain LSTM raises ValueError; NotImplementedError is
    turned into ValueError here)."""
    if not callable(getattr(model, "cross_attention", None)):
        raise ValueError(
            f"{type(model).__name__} has no cross_attention(src_ids, src_mask, tgt_in): attention maps "
            "need an architecture with attention over the source (not the plain LSTM encoder-decoder)"
        )
    tgt_in = torch.full((src_ids.size(0), 1), bos, dtype=torch.long, device=src_ids.device)
    try:
        model.cross_attention(src_ids, src_mask, tgt_in)
    except NotImplementedError as e:
        raise ValueError(f"{type(model).__name__} has no attention over the source: {e}") from e


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    tokenizer: Tokenizers,
    srcs: Sequence[str],
    out_dir: Path,
    beam_size: int = 5,
    length_penalty: str = "gnmt",
    alpha: float = 1.0,
    max_len: int = 64,
) -> list[Path]:
    """Translate each source, plot its cross-attention on its own output; one `attention_NNN.png` per source.

    Raises ValueError for a model without `cross_attention`, or whose `cross_attention` refuses (ValueError or
    NotImplementedError, as the plain LSTM encoder-decoder does), before translating anything.
    """
    if not srcs:
        raise ValueError("no sentences to plot")
    pair = as_translation_tokenizers(tokenizer)  # columns label source tokens, rows target tokens
    pad, bos, eos = pair.src.pad, pair.tgt.bos, pair.tgt.eos
    device = next(model.parameters()).device
    rows = encode_sources(pair, srcs, source_limit(model, None))
    out_dir = Path(out_dir)
    paths: list[Path] = []
    was_training = model.training
    model.eval()
    try:
        _require_attention(model, *pad_batch(rows[:1], pad, device), bos)
        for i, (text, row) in enumerate(zip(srcs, rows, strict=True)):
            src_ids, src_mask = pad_batch([row], pad, device)
            [[best]] = beam_search(
                model,
                src_ids,
                src_mask,
                bos,
                eos,
                max_len,
                beam_size=beam_size,
                length_penalty=length_penalty,
                alpha=alpha,
            )
            tgt_in = torch.tensor([[bos, *best.tokens]], dtype=torch.long, device=device)  # (1,U)
            weights = model.cross_attention(src_ids, src_mask, tgt_in)[0]  # (U,S)
            # the last row predicts [EOS], unless the output was cut off at max_len
            predicted = _labels(pair.target, best.tokens) + (
                ["[EOS]"] if len(best.tokens) < max_len else ["(cut)"]
            )
            title = f"{text}\n→ {pair.target.decode(best.tokens, skip_special_tokens=True)}"
            paths.append(
                plot_attention(
                    weights,
                    _labels(pair.source, row),
                    predicted,
                    out_dir / f"attention_{i:03d}.png",
                    title,
                )
            )
    finally:
        model.train(was_training)
    return paths
