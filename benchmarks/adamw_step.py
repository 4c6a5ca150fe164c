"""One AdamW step over a model's parameters, fp32 on CPU: torch's three implementations side by side.

    .venv/bin/python benchmarks/adamw_step.py [--sizes 4x256,6x512] [--threads 2] [--steps 5] [--rounds 3]

Kiln's optimizer is `torch.optim.AdamW` over `pretrain.optim.param_groups` (weight decay off for biases and norms)
with torch's default implementation, which on CPU is the per-tensor loop. This times the optimizer step alone on a
GPT of each size (vocabulary 50257, gradients set to random values) with `foreach=False` (the loop), `foreach=True`
and `fused=True`, the three alternating within every round; ms per step is the median over rounds. The markdown
table is printed and written to benchmarks/results/adamw_step.md (see --out)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.models.gpt import GPTConfig, GPTLMHeadModel  # noqa: E402
from pretrain.optim import param_groups  # noqa: E402

IMPLEMENTATIONS = {
    "loop (Kiln today)": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def time_steps(size: str, steps: int, rounds: int) -> tuple[int, dict[str, list[float]]]:
    """(parameter count, ms per step of every implementation, one value per round)."""
    layers, width = (int(v) for v in size.split("x"))
    torch.manual_seed(0)
    model = GPTLMHeadModel(
        GPTConfig(vocab_size=50257, n_embd=width, n_layer=layers, n_head=width // 64)
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {
        name: torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, **kw)
        for name, kw in IMPLEMENTATIONS.items()
    }
    for opt in optimizers.values():
        opt.step()  # creates the moments
    ms: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            ms[name].append((time.perf_counter() - start) / steps * 1000)
    return sum(p.numel() for p in model.parameters()), ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4x256,6x512", help="comma-separated LAYERSxWIDTH")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "adamw_step.md"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start_load = os.getloadavg()
    names = list(IMPLEMENTATIONS)
    lines = [
        "| GPT size | parameters | "
        + " | ".join(f"{n} ms/step" for n in names)
        + " | loop / fused |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for size in args.sizes.split(","):
        params, ms = time_steps(size, args.steps, args.rounds)
        med = {n: statistics.median(ms[n]) for n in names}
        cells = " | ".join(f"{med[n]:.1f} ({min(ms[n]):.1f}-{max(ms[n]):.1f})" for n in names)
        lines.append(
            f"| {size} | {params / 1e6:.1f} M | {cells} | {med[names[0]] / med['fused']:.1f}x |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(
        [
            "# One AdamW step, fp32 on CPU: per-tensor loop vs foreach vs fused",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}, torch {torch.__version__}, "
            f"{args.threads} threads, {os.cpu_count()} cores",
            f"- command: `python benchmarks/adamw_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            f"- {args.rounds} rounds of {args.steps} steps each, the implementations alternating; median (min-max)",
            f"- load average at start {start_load[0]:.2f}, at end {os.getloadavg()[0]:.2f}",
            "",
            *lines,
            "",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
