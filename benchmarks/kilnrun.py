"""Timing a recipe through the `kiln` CLI, as a user runs it: one command with overrides into a fresh
directory, the plain progress lines it prints parsed into tokens/s and elapsed time, and the machine's
load. Shared by benchmarks/workers_vs_threads.py and benchmarks/group_by_length.py.

The progress lines are cluster/progress.py's `format_step`, printed every `trainer.log_every` steps
when stdout is not a terminal: `[stage] step 10/60 loss 7.9 ... | 2,650 tokens/s | 6s elapsed, ETA 25s`.
Their tokens/s is already global (rank 0's tokens x world size, pretrain/module.py) and counts what the
module's `count_tokens` counts (real tokens, no padding, for translation); elapsed is measured from
`on_train_start` (cluster/callbacks.py ProgressPrinter), so start-up is outside it; ProgressPrinter is the
first callback (cluster/launch.py), so a step's checkpoint save is after its line, outside it too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILN = ROOT / ".venv" / "bin" / "kiln"
LOG_EVERY = 5  # steps between progress lines in a timing run: enough samples in a 60-step run

# Not anchored at the line's start, as workers_vs_threads.py's first pattern was not: what precedes `]`
# (the stage) is free. Lazy `.*?`: the metrics between `step N/M` and the rate may contain anything.
STEP_LINE = re.compile(r"\] step (\d+)/\d+\b(?:.*?\| ([\d,]+) tokens/s)?.*? \| (\S+) elapsed")
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


@dataclass(frozen=True)
class Progress:
    """One plain progress line."""

    step: int
    tokens_per_s: float | None  # None: the module reports no token count
    elapsed_s: float  # whole seconds (progress.duration rounds; past an hour, whole minutes)


@dataclass(frozen=True)
class Timing:
    """What one run's progress lines say about the steps after the first `skip` (warm-up excluded)."""

    rates: list[float]  # tokens/s of each logged step after `skip`
    s_per_step: float | None  # None: no logged step after `skip`
    load_start: str
    load_end: str


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews a timing."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    """CPU model and count, e.g. `AMD EPYC 7B13, 2 CPUs`."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return f"{model[1].strip() if model else 'unknown CPU'}, {os.cpu_count()} CPUs"


def torch_version() -> str:
    # From the installed metadata: importing torch only to print its version costs seconds.
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


def prepared(data: str) -> bool:
    """Whether `data` (relative to the repository, where kiln runs) holds prepared shards."""
    return (ROOT / data / "manifest.json").is_file()


def timing_overrides(data: str, steps: int) -> list[str]:
    """A short timing run of a recipe, its model, batch and cluster kept: `steps` steps, a progress line
    every LOG_EVERY, the one validation after the last step (outside every elapsed), no checkpoint
    but the last step's (after its line), no W&B."""
    return [
        f"data_dir={data}",
        f"trainer.max_steps={steps}",
        f"trainer.log_every={LOG_EVERY}",
        f"trainer.val_every={steps}",
        "trainer.checkpoint_every=0",
        "wandb.mode=disabled",
    ]


def run_kiln(command: str, config: str, overrides: list[str]) -> str:
    """`kiln <command> --config <config> <overrides>` into a temporary --out, from the repository root;
    its stdout. A failed run ends the benchmark with its command and output's tail: a number measured
    beside a failure would mislead."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        cmd = [str(KILN), command, "--config", config, *overrides, "--out", str(Path(tmp) / "run")]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


def parse_duration(text: str) -> float:
    """progress.duration's `45s`, `3m05s`, `1h02m` in seconds."""
    m = DURATION.fullmatch(text)
    if not m or not any(m.groups()):
        raise ValueError(f"not a progress duration: {text!r}")
    h, mins, s = (int(g or 0) for g in m.groups())
    return 3600.0 * h + 60.0 * mins + s


def parse_progress(stdout: str) -> list[Progress]:
    """The plain progress lines in a run's stdout, in order (validation lines and notes left out)."""
    return [
        Progress(int(m[1]), float(m[2].replace(",", "")) if m[2] else None, parse_duration(m[3]))
        for m in STEP_LINE.finditer(stdout)
    ]


def rates_after(lines: list[Progress], skip: int) -> list[float]:
    """tokens/s of the logged steps after step `skip`: start-up and warm-up left out."""
    return [p.tokens_per_s for p in lines if p.step > skip and p.tokens_per_s is not None]


def seconds_per_step(lines: list[Progress], skip: int) -> float | None:
    """Elapsed time per step over the steps after `skip`: from the last line at or before it (step 0,
    elapsed 0 when there is none: elapsed starts at the first step) to the last line. Elapsed is in
    whole seconds, so the span should be tens of seconds for a figure good to a few percent."""
    before = [p for p in lines if p.step <= skip]
    start = before[-1] if before else Progress(0, None, 0.0)
    end = lines[-1] if lines and lines[-1].step > start.step else None
    if end is None:
        return None
    return (end.elapsed_s - start.elapsed_s) / (end.step - start.step)


def measure(command: str, config: str, overrides: list[str], skip: int) -> Timing:
    """Run once (run_kiln) and time the steps after `skip`, with the load average around the run."""
    load_start = loadavg()
    lines = parse_progress(run_kiln(command, config, overrides))
    return Timing(rates_after(lines, skip), seconds_per_step(lines, skip), load_start, loadavg())
