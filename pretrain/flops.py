"""Model FLOPs per token and device peaks, for model FLOPs utilisation (MFU = achieved model FLOP/s / peak).

Counting follows PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", Appendix B):
a training token costs 6N + 12·L·H·Q·T FLOPs, where N is the number of matmul parameters the token passes
through, L layers, H heads of size Q (H·Q = d, the hidden size) and T the sequence length. A multiply-add is
2 FLOPs; the backward pass is twice the forward (gradients for activations and for weights), hence 6 = 3 × 2.
12·L·H·Q·T is the attention itself: QKᵀ and attention-weighted V, 2·T·d each per token and layer, times 3.

What is counted is what Kiln computes, component by component, rather than 6 × (all parameters):
  per layer   2·(4d² + 2·d·f)     Q, K, V and output projections (4d²), the two MLP matrices (2·d·f)
              4·T·d               attention scores and weighted sum, over the full T (PaLM counts causal
                                  attention in full too, though causal kernels may skip the masked half)
  encoder     m·2·(d² + d·V)      BERT MLM head (transform + tied decoder) at the masked positions only,
                                  m = masked positions per token (~0.15), not at every position as in HF
              2·(d² + 2·d) / T    pooler + NSP classifier, once per sequence
  decoder     2·d·V               GPT LM head at every position
Embedding lookups, LayerNorm, GELU, softmax and the optimizer step are not counted (as in PaLM); they are
memory-bound and small next to the matmuls. Padding is not counted either: callers multiply by real tokens.

The fine-tuning architectures (encoder-decoders, LSTMs, ConvS2S, classifiers) are counted the same way in
finetune/flops.py.

Peaks: a table of dense tensor-core (bf16/fp16) and plain fp32 FLOP/s for NVIDIA H100/H200/A100 (datasheets,
the "with sparsity" figures halved); anything else, and every CPU, is measured once with a square matmul.
"""

from __future__ import annotations

import time

import torch

from pretrain.models.bert import BertConfig
from pretrain.models.gpt import GPTConfig

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


def transformer_layer_flops(d: int, ff: int, seq_len: int) -> float:
    """Forward FLOPs per token of one Transformer block: 4 d×d projections, 2 MLP matrices, attention over T.
    (Also the building block of the encoder-decoder counts in finetune/flops.py.)"""
    return 2.0 * (4 * d * d + 2 * d * ff) + 4.0 * seq_len * d


def encoder_flops_per_token(cfg: BertConfig, seq_len: int, masked_fraction: float = 0.15) -> float:
    """Training FLOPs per token of Kiln's BERT MLM + NSP step (MLM head at masked positions only).

    masked_fraction: masked positions / tokens in the batch (the collator masks 15% of non-special tokens)."""
    if seq_len < 1 or not 0.0 <= masked_fraction <= 1.0:
        raise ValueError(
            f"need seq_len >= 1 and 0 <= masked_fraction <= 1, got {seq_len}, {masked_fraction}"
        )
    d, V = cfg.hidden_size, cfg.vocab_size
    body = cfg.num_hidden_layers * transformer_layer_flops(d, cfg.intermediate_size, seq_len)
    mlm_head = masked_fraction * 2.0 * (d * d + d * V)
    nsp_head = 2.0 * (d * d + 2 * d) / seq_len
    return TRAIN_MULTIPLIER * (body + mlm_head + nsp_head)


def decoder_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token of Kiln's GPT causal-LM step (LM head at every position)."""
    if seq_len < 1:
        raise ValueError(f"need seq_len >= 1, got {seq_len}")
    if cfg.add_cross_attention:
        raise ValueError(
            "decoder_flops_per_token counts a decoder-only GPT; this config has cross-attention"
        )
    d = cfg.n_embd
    body = cfg.n_layer * transformer_layer_flops(d, cfg.inner_size, seq_len)
    return TRAIN_MULTIPLIER * (body + 2.0 * d * cfg.vocab_size)


# (name fragment, "bf16" | "fp32") -> dense FLOP/s of one GPU. Checked in order: the first fragment found in
# torch.cuda.get_device_name() wins, so the PCIe/NVL variants come before the SXM default of their family.
GPU_PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H100 PCIe", "bf16"): 756.5e12,
    ("H100 PCIe", "fp32"): 51.0e12,
    ("H100 NVL", "bf16"): 835.5e12,
    ("H100 NVL", "fp32"): 60.0e12,
    ("H100", "bf16"): 989.4e12,
    ("H100", "fp32"): 67.0e12,  # SXM5
    ("H200", "bf16"): 989.4e12,
    ("H200", "fp32"): 67.0e12,  # the same GH100 compute as H100 SXM5
    ("A100", "bf16"): 312.0e12,
    ("A100", "fp32"): 19.5e12,  # SXM4 and PCIe alike
}


def precision_family(precision: str) -> str:
    """Lightning precision string -> the peak that applies: "bf16" (tensor-core 16-bit) or "fp32"."""
    return "bf16" if "16" in precision else "fp32"


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """The table's peak for this GPU name and precision, or None when the GPU is not in the table."""
    family = precision_family(precision)
    for (fragment, fam), flops in GPU_PEAK_FLOPS.items():
        if fam == family and fragment in device_name:
            return flops
    return None


def measure_matmul_flops(
    n: int = 1024,
    seconds: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> float:
    """Best FLOP/s of an n×n matmul over ~`seconds`, with the current torch thread count.

    Reported as the best of short timed chunks, so a neighbour's burst on a shared machine lowers it less.
    Draws its inputs from a private generator: the global RNG (dropout, a resumed run's state) is untouched."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: thread pool, allocator, kernel selection
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        reps, start = 0, time.perf_counter()
        while reps < 1 or time.perf_counter() - start < seconds / 5:
            a @ b
            reps += 1
        sync()
        now = time.perf_counter()
        best = max(best, 2.0 * n**3 * reps / (now - start))
        if now >= deadline:
            return best


def peak_flops(configured: float | None, device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s of one device, where the number came from): the configured value, the GPU table, or a measurement."""
    if configured is not None:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = gpu_peak_flops(name, precision)
        if table is not None:
            return table, f"table ({name}, {precision_family(precision)})"
        dtype = torch.bfloat16 if precision_family(precision) == "bf16" else torch.float32
        return measure_matmul_flops(4096, 0.5, dtype, device), f"measured ({name}, 4096² {dtype})"
    return (
        measure_matmul_flops(),
        f"measured (CPU fp32 1024² matmul, {torch.get_num_threads()} threads)",
    )
