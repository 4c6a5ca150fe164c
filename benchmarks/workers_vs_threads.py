"""2 Ray workers x 1 thread against 1 worker x 2 threads, same recipe and global batch, on this machine.

    .venv/bin/python benchmarks/workers_vs_threads.py [--config configs/translation-scratch.yaml]
        [--data runs/multi30k] [--steps 60] [--rounds 2]

Runs `kiln finetune` (or `kiln pretrain` with --command pretrain) twice per round, alternating: A with
cluster.num_workers=2, cpus_per_worker=1, batch b; B with num_workers=1, cpus_per_worker=2, batch 2b;
the global batch and the schedule are the same. Throughput is the median of the tokens/s that the
progress lines report after the first --skip logged steps (start-up, warm-up and the first validation
excluded); the ratio B / A says which layout a recipe on 2 cores should choose. Writes
benchmarks/results/workers_vs_threads.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kilnrun import loadavg, measure, prepared, timing_overrides  # noqa: E402


def run(args: argparse.Namespace, workers: int, batch: int) -> list[float]:
    """tokens/s of each logged step after the first `args.skip`, for one layout."""
    layout = [
        f"trainer.batch_size={batch}",
        f"cluster.num_workers={workers}",
        f"cluster.cpus_per_worker={2 // workers}",
    ]
    # The logged rate is already global: rank 0's tokens x world size (pretrain/module.py).
    return measure(
        args.command, args.config, timing_overrides(args.data, args.steps) + layout, args.skip
    ).rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", choices=("finetune", "pretrain"), default="finetune")
    parser.add_argument("--config", default="configs/translation-scratch.yaml")
    parser.add_argument("--data", default="runs/multi30k")
    parser.add_argument("--batch", type=int, default=64, help="per worker with 2 workers")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="logged steps <= this are warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/workers_vs_threads.md"
    )
    args = parser.parse_args(argv)
    if not prepared(args.data):
        print(f"{args.data}: no prepared data (see --help)", file=sys.stderr)
        return 2
    start_load, rates = loadavg(), {"2x1": [], "1x2": []}
    for r in range(args.rounds):
        for name, workers, batch in (("2x1", 2, args.batch), ("1x2", 1, 2 * args.batch)):
            rates[name].append(statistics.median(run(args, workers, batch)))
            print(f"round {r} {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    a, b = statistics.median(rates["2x1"]), statistics.median(rates["1x2"])
    lines = [
        "# 2 workers x 1 thread vs 1 worker x 2 threads",
        "",
        f"- {dt.datetime.now():%Y-%m-%d %H:%M}, `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- `{args.command} --config {args.config}`, global batch {2 * args.batch}, {args.steps} steps "
        f"per run, tokens/s = median over logged steps after step {args.skip}; median over "
        f"{args.rounds} rounds, layouts alternating",
        f"- load average at start / end: {start_load} / {loadavg()}; {os.cpu_count()} CPUs",
        "",
        "| layout | tokens/s per round | median |",
        "|---|---|---|",
        f"| 2 workers x 1 thread, batch {args.batch} each | "
        f"{', '.join(f'{x:,.0f}' for x in rates['2x1'])} | {a:,.0f} |",
        f"| 1 worker x 2 threads, batch {2 * args.batch} | "
        f"{', '.join(f'{x:,.0f}' for x in rates['1x2'])} | {b:,.0f} |",
        "",
        f"1 x 2 / 2 x 1 = **{b / a:.2f}**",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
