"""Text in, text out: tokenise sources as the data pipeline does, beam-search, detokenise, score.

Sources are encoded as `src [EOS]` and the decoder starts from `[BOS]` (docs/design.md, translation rows),
with the one shared tokenizer. A model trained with a target vocabulary of its own gets a
`TranslationTokenizers` instead (data_pipeline.tokenizer.load_translation_tokenizers reads it from a checkpoint):
sources are encoded and framed by the source tokenizer (`[CLS] src [SEP]`), outputs start from and stop at the
target tokenizer's specials and are detokenised by it. Special-token ids are read from the tokenizers (and must
exist there), not assumed, so a user-supplied tokenizer with the Kiln specials works the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from data_pipeline.tokenizer import TranslationTokenizers, as_translation_tokenizers
from finetune.decode import LENGTH_PENALTIES, beam_search, check_sampling_args, sample_decode
from finetune.evaluate import bleu, chrf, copy_source_bleu

PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
Tokenizers = Tokenizer | TranslationTokenizers  # one shared tokenizer, or a source and a target one


def special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(
            f"tokenizer has no {token} token; Kiln tokenizers define [PAD] [UNK] [CLS] [SEP] [MASK] "
            "[BOS] [EOS] (docs/design.md)"
        )
    return token_id


def encode_sources(
    tokenizer: Tokenizers, texts: Sequence[str], max_src_len: int
) -> list[list[int]]:
    """`src [EOS]` per text (`[CLS] src [SEP]` with a source tokenizer of its own), the source truncated so that
    the whole row has at most max_src_len ids."""
    pair = as_translation_tokenizers(tokenizer)
    head = [] if pair.src.bos is None else [pair.src.bos]
    if max_src_len < len(head) + 2:
        raise ValueError(
            f"max_src_len must be >= {len(head) + 2} (one token + the specials), got {max_src_len}"
        )
    encoded = pair.source.encode_batch(list(texts), add_special_tokens=False)
    return [head + enc.ids[: max_src_len - len(head) - 1] + [pair.src.eos] for enc in encoded]


def pad_batch(
    rows: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest row: (ids (B,S), mask (B,S) with 1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def source_limit(model: nn.Module, max_src_len: int | None) -> int:
    """The encoder's position table bounds the source length whatever the caller asks for."""
    config = getattr(model, "config", None)
    encoder = getattr(config, "encoder", None)
    # the warm-started model's BERT encoder, or a scratch model's own table (LSTMs have none)
    limit = getattr(encoder, "max_position_embeddings", None) or getattr(
        config, "max_positions", None
    )
    if max_src_len is None:
        return limit if limit is not None else 512
    return min(max_src_len, limit) if limit is not None else max_src_len


@torch.no_grad()
def translate_texts(
    model: nn.Module,
    tokenizer: Tokenizers,
    texts: Sequence[str],
    beam_size: int = 5,
    length_penalty: str = "gnmt",
    alpha: float = 1.0,
    max_len: int = 64,
    batch_size: int = 32,
    max_src_len: int | None = None,
) -> list[str]:
    """Translate `texts` (in order) with batched beam search; returns detokenised strings.

    Texts are batched by length (fewer pad positions) and the results put back in input order. The model is
    put in eval mode for the call and returned to its previous mode afterwards.
    """
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(
            f"length_penalty must be one of {sorted(LENGTH_PENALTIES)}, got {length_penalty!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not texts:
        return []
    device = next(model.parameters()).device
    pair = as_translation_tokenizers(tokenizer)
    rows = encode_sources(pair, texts, source_limit(model, max_src_len))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    outputs: list[str] = [""] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src_ids, src_mask = pad_batch([rows[i] for i in chunk], pair.src.pad, device)
            hyps = beam_search(
                model,
                src_ids,
                src_mask,
                pair.tgt.bos,
                pair.tgt.eos,
                max_len,
                beam_size=beam_size,
                length_penalty=length_penalty,
                alpha=alpha,
            )
            for i, best in zip(chunk, hyps, strict=True):
                tokens = best[0].tokens if best else []
                outputs[i] = pair.target.decode(tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def sample_texts(
    model: nn.Module,
    tokenizer: Tokenizers,
    texts: Sequence[str],
    max_len: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """One draw per text (in order) from the tempered, top-k / top-p filtered model distribution; detokenised.
    The same seed gives the same draws."""
    check_sampling_args(temperature, top_k, top_p)
    if not texts:
        return []
    device = next(model.parameters()).device
    pair = as_translation_tokenizers(tokenizer)
    rows = encode_sources(pair, texts, source_limit(model, None))
    generator = torch.Generator().manual_seed(seed)
    outputs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            src_ids, src_mask = pad_batch(rows[start : start + batch_size], pair.src.pad, device)
            ids = sample_decode(
                model,
                src_ids,
                src_mask,
                pair.tgt.bos,
                pair.tgt.eos,
                max_len,
                temperature,
                top_k,
                top_p,
                generator,
            )
            outputs += pair.target.decode_batch(ids, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def evaluate_translation(
    model: nn.Module,
    tokenizer: Tokenizers,
    srcs: Sequence[str],
    refs: Sequence[str],
    beam_size: int = 5,
    length_penalty: str = "gnmt",
    alpha: float = 1.0,
    max_len: int = 64,
    batch_size: int = 32,
) -> tuple[dict[str, float], list[str]]:
    """BLEU and chrF of the model's translations, next to the copy-the-source baseline; plus the hypotheses."""
    hyps = translate_texts(
        model, tokenizer, srcs, beam_size, length_penalty, alpha, max_len, batch_size
    )
    scores = {
        "bleu": bleu(hyps, refs),
        "chrf": chrf(hyps, refs),
        "copy_source_bleu": copy_source_bleu(srcs, refs),
    }
    return scores, hyps
