"""Greedy decoding, batched beam search and sampling for encoder-decoder models (and sampling for GPT).

Search lives outside the model (as fairseq's `search.py`): the model only has to implement the small
`Seq2SeqDecoder` protocol below, and the search reorders the model's incremental state by row index.

Conventions used throughout:
- `tgt_ids` given to `decode_step` are the tokens *not yet in the cache*: `[BOS]` on the first call
  (cache None), then the one token chosen at the previous step.
- A hypothesis' tokens are the generated tokens without `[BOS]` and without the final `[EOS]`.
- Its length |Y| for length normalisation counts the generated tokens *including* `[EOS]` (as fairseq and
  GNMT do: stopping is a decision the model is scored on); a hypothesis cut off at `max_len` has no EOS.
- `max_len` bounds the number of generated tokens, `[EOS]` included.
- Sampling (`sample_decode`, `generate_lm`) draws from softmax(filter_logits(logits / temperature, top_k, top_p));
  temperature 0 means greedy (argmax), not an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.models.gpt import GPTLMHeadModel

# What `encode` returns: a Transformer's (B,S,C) states, or a tuple of tensors with the batch in dim 0 (an LSTM's
# states plus its final (h, c)). The search only selects rows of it.
Memory = Tensor | tuple[Tensor, ...]


def select_rows(memory: Memory, rows: Tensor) -> Memory:
    """Rows `rows` of every tensor in `memory` (batch dim 0)."""
    if isinstance(memory, Tensor):
        return memory.index_select(0, rows)
    return tuple(m.index_select(0, rows) for m in memory)


class Seq2SeqDecoder(Protocol):
    """What greedy_decode / beam_search need from a model."""

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Memory:
        """(B,S) ids and mask -> memory: (B,S,C), or a tuple of tensors each with the batch in dim 0."""
        ...

    def decode_step(
        self, tgt_ids: Tensor, memory: Memory, *, src_mask: Tensor, cache: Any | None
    ) -> tuple[Tensor, Any]:
        """(N,t) new target ids -> (logits of the last position (N,V), cache including the new ids).

        The mask and the cache are keyword-only, so a caller cannot pass them in each other's place."""
        ...

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        """Row i of the returned cache is row index[i] of `cache` (index may repeat rows or drop them)."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, no [BOS], no trailing [EOS]
    score: float  # logprob after length normalisation: what hypotheses are ranked by
    logprob: float  # summed log-probabilities of the generated tokens (the [EOS] included when there is one)


def _no_penalty(length: int, alpha: float) -> float:
    return 1.0


def _average_penalty(length: int, alpha: float) -> float:
    return float(length) ** alpha


def _gnmt_penalty(length: int, alpha: float) -> float:
    # Wu et al. 2016 (GNMT), eq. 14: lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha
    return ((5.0 + length) / 6.0) ** alpha


# score(Y) = logprob(Y) / LENGTH_PENALTIES[name](|Y|, alpha); one entry per name of the job config's
# decode.length_penalty (cluster.jobs.LengthPenalty, written out there: this module imports torch)
LENGTH_PENALTIES: dict[str, Callable[[int, float], float]] = {
    "none": _no_penalty,
    "avg": _average_penalty,
    "gnmt": _gnmt_penalty,
}


def normalised_score(logprob: float, length: int, length_penalty: str, alpha: float) -> float:
    """Length-normalised score of a hypothesis of `length` generated tokens (EOS included)."""
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(
            f"length_penalty must be one of {sorted(LENGTH_PENALTIES)}, got {length_penalty!r}"
        )
    return logprob / LENGTH_PENALTIES[length_penalty](length, alpha)


@torch.no_grad()
def greedy_decode(
    model: Seq2SeqDecoder, src_ids: Tensor, src_mask: Tensor, bos_id: int, eos_id: int, max_len: int
) -> list[list[int]]:
    """Argmax decoding with the KV cache; returns per source the generated ids without [BOS]/[EOS]."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    batch = src_ids.size(0)
    memory = model.encode(src_ids, src_mask)
    inp = torch.full((batch, 1), bos_id, dtype=torch.long, device=src_ids.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    cache: Any | None = None
    for _ in range(max_len):
        logits, cache = model.decode_step(inp, memory, src_mask=src_mask, cache=cache)
        nxt = logits.argmax(dim=-1)  # (B,)
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok == eos_id:
                done[b] = True
            else:
                out[b].append(tok)
        if all(done):
            break
        # finished rows keep being fed (their output is frozen): cheaper than reindexing the cache each step
        inp = nxt.unsqueeze(1)  # (B,1)
    return out


@dataclass
class _Beams:
    """Alive beams of the still-active sources; row i*K + k is beam k of active source i."""

    src_index: list[int]  # original batch index of each active source
    tokens: Tensor  # (N*K, t) generated ids so far (cpu)
    logprob: Tensor  # (N, K) summed log-probs, -inf for empty beams
    memory: Memory  # (N*K, S, C) or a tuple of (N*K, ...) tensors
    src_mask: Tensor  # (N*K, S)
    cache: Any | None


def _check_beam_args(beam_size: int, n_best: int, max_len: int, length_penalty: str) -> None:
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size={beam_size}, got {n_best}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(
            f"length_penalty must be one of {sorted(LENGTH_PENALTIES)}, got {length_penalty!r}"
        )


def _best_possible(
    best_alive: float,
    length: int,
    max_len: int,
    penalty: Callable[[int, float], float],
    alpha: float,
) -> float:
    """Upper bound on the final score of an alive beam of `length` tokens with summed log-prob `best_alive`.

    Log-probs only fall as tokens are added, so the final logprob is <= best_alive (<= 0) and the final length
    lies in length+1..max_len; the penalty is monotone in the length, so the bound sits at one of the ends.
    """
    if best_alive == -math.inf:
        return -math.inf
    ends = (min(length + 1, max_len), max_len)
    return max(best_alive / penalty(n, alpha) for n in ends)


def _finalise(
    beams: _Beams,
    finished: list[list[Hypothesis]],
    top_lp: Tensor,
    beam_idx: Tensor,
    top_tok: Tensor,
    step: int,
    eos_id: int,
    last: bool,
    penalty: Callable[[int, float], float],
    alpha: float,
) -> None:
    """Move candidates among each source's top K that end in EOS (or every top-K one at max_len) to `finished`."""
    n, k = beams.logprob.shape
    length = step + 1
    # plain lists: element-wise tensor indexing in a Python loop costs more than the model step on small models
    lps, toks, srcs = top_lp[:, :k].tolist(), top_tok[:, :k].tolist(), beam_idx[:, :k].tolist()
    for i in range(n):
        for lp, tok, beam in zip(lps[i], toks[i], srcs[i], strict=True):
            if lp == -math.inf or not (last or tok == eos_id):
                continue
            prefix = beams.tokens[i * k + beam].tolist()
            tokens = prefix if tok == eos_id else prefix + [tok]
            finished[beams.src_index[i]].append(Hypothesis(tokens, lp / penalty(length, alpha), lp))


def _is_done(hyps: list[Hypothesis], n_best: int, bound: float) -> bool:
    if len(hyps) < n_best:
        return False
    kth = sorted((h.score for h in hyps), reverse=True)[n_best - 1]
    return kth >= bound


def _advance(
    model: Seq2SeqDecoder, beams: _Beams, inp: Tensor, first: tuple[Memory, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Score every one-token extension; return the top 2K candidates per source (logprob, beam, token).

    `first` (the unexpanded memory and mask) marks the first step: the K beams of a source are still identical
    then, so the model runs on one row per source and its logits are repeated (only beam 0 is live). That saves
    K-1 of every K first-step rows, including the cross-attention keys/values over the source; the cache is
    expanded to K rows per source when the survivors are selected.
    """
    n, k = beams.logprob.shape
    if first is None:
        logits, beams.cache = model.decode_step(
            inp, beams.memory, src_mask=beams.src_mask, cache=beams.cache
        )
    else:
        memory, src_mask = first
        logits, beams.cache = model.decode_step(inp[::k], memory, src_mask=src_mask, cache=None)
        logits = logits.repeat_interleave(k, dim=0)  # (N,V) -> (N*K,V)
    lp = F.log_softmax(logits.float(), dim=-1).cpu()  # (N*K, V)
    vocab = lp.size(-1)
    cand = (beams.logprob.unsqueeze(-1) + lp.view(n, k, vocab)).view(n, k * vocab)  # (N, K*V)
    # 2K candidates guarantee K that do not end in EOS: each beam contributes at most one EOS candidate
    top_lp, top_idx = cand.topk(min(2 * k, k * vocab), dim=-1)  # (N, 2K)
    return top_lp, top_idx // vocab, top_idx % vocab


def _select_alive(
    beams: _Beams, top_lp: Tensor, beam_idx: Tensor, top_tok: Tensor, eos_id: int
) -> Tensor:
    """Keep the K best candidates not ending in EOS; update tokens/logprob; return the cache row index."""
    n, k = beams.logprob.shape
    masked = top_lp.masked_fill(top_tok == eos_id, -math.inf)
    keep_lp, pos = masked.topk(k, dim=-1)  # (N, K); topk keeps the candidates' order, best first
    src_beam = beam_idx.gather(1, pos)  # (N, K)
    new_tok = top_tok.gather(1, pos)  # (N, K)
    rows = (torch.arange(n).unsqueeze(1) * k + src_beam).view(
        -1
    )  # (N*K,) rows of the previous step
    beams.tokens = torch.cat([beams.tokens[rows], new_tok.view(-1, 1)], dim=1)  # (N*K, t+1)
    beams.logprob = keep_lp
    return rows


def _drop_done(beams: _Beams, rows: Tensor, done: list[bool]) -> Tensor:
    """Remove sources whose search is over; return the cache rows for the sources that remain."""
    if not any(done):
        return rows
    k = beams.logprob.size(1)
    keep = [i for i, d in enumerate(done) if not d]
    keep_rows = torch.tensor([i * k + j for i in keep for j in range(k)], dtype=torch.long)
    beams.src_index = [beams.src_index[i] for i in keep]
    beams.tokens = beams.tokens[keep_rows]
    beams.logprob = beams.logprob[keep]
    device = beams.src_mask.device
    beams.memory = select_rows(beams.memory, keep_rows.to(device))
    beams.src_mask = beams.src_mask.index_select(0, keep_rows.to(device))
    return rows[keep_rows]


def _init_beams(memory: Memory, src_mask: Tensor, beam_size: int) -> _Beams:
    batch = src_mask.size(0)
    rows = torch.arange(batch, device=src_mask.device).repeat_interleave(beam_size)  # (B*K,)
    logprob = torch.full((batch, beam_size), -math.inf)
    logprob[:, 0] = (
        0.0  # all K beams start identical: expand only the first so the K survivors differ
    )
    return _Beams(
        src_index=list(range(batch)),
        tokens=torch.zeros(batch * beam_size, 0, dtype=torch.long),
        logprob=logprob,
        memory=select_rows(memory, rows),  # (B*K,S,C)
        src_mask=src_mask.index_select(0, rows),  # (B*K,S)
        cache=None,
    )


@torch.no_grad()
def beam_search(
    model: Seq2SeqDecoder,
    src_ids: Tensor,
    src_mask: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
    beam_size: int = 5,
    length_penalty: str = "gnmt",
    alpha: float = 1.0,
    n_best: int = 1,
) -> list[list[Hypothesis]]:
    """Batched beam search; per source the n_best finished hypotheses, best (highest score) first.

    A candidate ending in EOS that ranks among its source's top K leaves the beam as a finished hypothesis;
    the K best candidates not ending in EOS stay alive. A source stops when its n_best-th finished
    hypothesis scores at least the best score any alive beam could still reach (see `_best_possible`), or
    at max_len, where the top-K candidates are finished without EOS.
    """
    _check_beam_args(beam_size, n_best, max_len, length_penalty)
    penalty = LENGTH_PENALTIES[length_penalty]
    memory = model.encode(src_ids, src_mask)
    beams = _init_beams(memory, src_mask, beam_size)
    finished: list[list[Hypothesis]] = [[] for _ in range(src_ids.size(0))]
    inp = torch.full(
        (src_ids.size(0) * beam_size, 1), bos_id, dtype=torch.long, device=src_ids.device
    )
    for step in range(max_len):
        top_lp, beam_idx, top_tok = _advance(
            model, beams, inp, (memory, src_mask) if step == 0 else None
        )
        last = step == max_len - 1
        _finalise(beams, finished, top_lp, beam_idx, top_tok, step, eos_id, last, penalty, alpha)
        if last:
            break
        rows = _select_alive(beams, top_lp, beam_idx, top_tok, eos_id)
        done = [
            _is_done(
                finished[src],
                n_best,
                _best_possible(float(beams.logprob[i, 0]), step + 1, max_len, penalty, alpha),
            )
            for i, src in enumerate(beams.src_index)
        ]
        rows = _drop_done(beams, rows, done)
        if not beams.src_index:
            break
        if step == 0:
            rows = rows // beam_size  # the first step's cache has one row per source (see _advance)
        beams.cache = model.reorder_cache(beams.cache, rows.to(src_ids.device))
        inp = beams.tokens[:, -1:].to(src_ids.device)  # (N*K, 1)
    return [sorted(h, key=lambda x: x.score, reverse=True)[:n_best] for h in finished]


# ---------------------------------------------------------------- sampling
def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the first bad sampling setting (the CLI checks flags with it before loading a model)."""
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {top_p}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(N,V) logits with every token outside the top-k set and outside the nucleus set to -inf.

    top_k keeps exactly the k largest logits (ties broken by `torch.topk`); 0 keeps all. top_p keeps the smallest
    set of most probable tokens whose cumulative probability is >= top_p (Holtzman et al. 2020), computed after the
    top-k cut and renormalised over what it left; 1.0 keeps all. At least one token always survives.
    """
    check_sampling_args(1.0, top_k, top_p)
    out = logits
    if 0 < top_k < logits.size(-1):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(
            -1, logits.topk(top_k, dim=-1).indices, True
        )
        out = out.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)  # (N,V)
        probs = sorted_logits.float().softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        # a token is needed while the tokens ranked above it have not reached top_p yet; the first always is
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        out = out.masked_fill(drop, -math.inf)
    return out


def _pick(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """(N,V) logits -> (N,) next ids: argmax at temperature 0, else a draw from the filtered, tempered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(
            generator.device
        )  # a CPU generator draws for a GPU model (and the reverse)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def sample_decode(
    model: Seq2SeqDecoder,
    src_ids: Tensor,
    src_mask: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Ancestral sampling with the cache; per source the generated ids without [BOS]/[EOS].

    Each step draws from softmax(filter_logits(logits / temperature, top_k, top_p)). temperature=0 means greedy
    (argmax, the limit of temperature -> 0) and gives exactly `greedy_decode`'s output; pass a seeded `generator`
    for reproducible draws.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    batch = src_ids.size(0)
    memory = model.encode(src_ids, src_mask)
    inp = torch.full((batch, 1), bos_id, dtype=torch.long, device=src_ids.device)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    cache: Any | None = None
    for _ in range(max_len):
        logits, cache = model.decode_step(inp, memory, src_mask=src_mask, cache=cache)
        nxt = _pick(logits, temperature, top_k, top_p, generator)  # (B,)
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                done[b] = tok == eos_id
                if not done[b]:
                    out[b].append(tok)
        if all(done):
            break
        inp = nxt.unsqueeze(
            1
        )  # (B,1); finished rows keep going, their output frozen (as greedy_decode)
    return out


@torch.no_grad()
def generate_lm(
    model: GPTLMHeadModel,
    prompt_ids: Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue (B,T) prompts with a decoder-only `GPTLMHeadModel` and its KV cache; per row the new ids.

    Rows share one length T (GPT has no attention mask: left padding would be attended to). A row stops at
    eos_id (left out of its output) or after max_new_tokens. temperature 0 = greedy, as in `sample_decode`.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_ids.dim() != 2 or prompt_ids.size(1) < 1:
        raise ValueError(
            f"prompt_ids must be (B,T) with T >= 1, got shape {tuple(prompt_ids.shape)}"
        )
    positions = model.config.n_positions
    # the last new token is never fed back, so T + max_new_tokens - 1 positions are used
    if prompt_ids.size(1) + max_new_tokens - 1 > positions:
        raise ValueError(
            f"prompt length {prompt_ids.size(1)} + max_new_tokens {max_new_tokens} - 1 exceeds the "
            f"model's n_positions={positions}"
        )
    out: list[list[int]] = [[] for _ in range(prompt_ids.size(0))]
    done = [False] * prompt_ids.size(0)
    inp, cache = prompt_ids, None
    for _ in range(max_new_tokens):
        logits, cache = model(inp, past_key_values=cache, use_cache=True)  # (B,t,V)
        nxt = _pick(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                done[b] = eos_id is not None and tok == eos_id
                if not done[b]:
                    out[b].append(tok)
        if all(done):
            break
        inp = nxt.unsqueeze(1)  # (B,1)
    return out
