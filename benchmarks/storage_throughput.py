"""The same GPT pretraining run reading its shards from a local directory and from loopback S3.

    .venv/bin/python benchmarks/storage_throughput.py [--data runs/wikitext2]
        [--config configs/mini-gpt-wikitext2.yaml] [--steps 60] [--skip 10] [--rounds 2]

The prepared data dir (`kiln data prepare --config configs/data-wikitext2.yaml --out runs/wikitext2`)
is uploaded to a SeaweedFS server on loopback (tests/s3_testlib.py's `S3Server`, the one the tests
use). Each round runs `kiln pretrain` twice, alternating: `local` with data_dir and --out in a temp
directory, `s3` with both under s3://kiln/ (a run writes where it reads). Both runs get the same
environment (the server's AWS_* variables, a fresh KILN_CACHE each). Throughput is the median of the
tokens/s that the progress lines report after the first --skip steps (start-up excluded); the ratio
S3 / local is the issue's goal (>= 0.95). Peak RSS per rank: every 0.5 s the RSS of the run's Ray
Train worker processes (descendants of the `kiln` process whose command line names RayTrainWorker),
the maximum of each worker, then the maximum over ranks and rounds. Writes
benchmarks/results/storage_throughput.md (see --results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # data_pipeline, runnable from anywhere
sys.path.insert(0, str(ROOT / "tests"))  # s3_testlib: the tests' loopback S3 server

from s3_testlib import BUCKET, S3Server  # noqa: E402

from data_pipeline.storage import Location  # noqa: E402

RATE = re.compile(r"\] step (\d+)/\d+ .*\| ([\d,]+) tokens/s")
SAMPLE_S = 0.5
LAYOUTS = ("local", "s3")

try:
    import psutil

    GONE: tuple[type[Exception], ...] = (OSError, ValueError, psutil.Error)
except ImportError:  # the /proc fallback below reads the same numbers
    psutil = None
    GONE = (OSError, ValueError)


@dataclass
class Result:
    rates: list[float] = field(default_factory=list)  # median tokens/s of each round
    peak_mib: list[float] = field(default_factory=list)  # max RSS over ranks, each round


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command in /proc/<pid>/stat may hold spaces or ")": ppid is the 2nd field after it.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except GONE:
            return []
    children, found, todo = _proc_children(), [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _worker_rss(pid: int) -> int | None:
    """RSS in bytes of `pid` if it is a Ray Train worker (gone or another process: None)."""
    try:
        if psutil is not None:
            proc = psutil.Process(pid)
            if "RayTrainWorker" not in " ".join(proc.cmdline()):
                return None
            return proc.memory_info().rss
        if b"RayTrainWorker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except GONE:  # the process ended between listing and reading
        return None
    return None


def sample(pid: int, peaks: dict[int, int]) -> None:
    """Raise `peaks[worker pid]` to each Ray Train worker's current RSS (workers of `pid` only:
    another job's Ray workers on this machine are not ours)."""
    for child in _descendants(pid):
        rss = _worker_rss(child)
        if rss is not None:
            peaks[child] = max(peaks.get(child, 0), rss)


def stop(proc: subprocess.Popen) -> None:
    """End our `kiln` process: SIGINT first, so that it shuts its Ray instance down."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(args: argparse.Namespace, data: str, out: str, env: dict[str, str], log: Path) -> tuple:
    """(tokens/s of each logged step after `args.skip`, peak RSS in MiB of each worker) of one run."""
    cmd = [
        str(ROOT / ".venv" / "bin" / "kiln"),
        "pretrain",
        "--config",
        args.config,
        f"data_dir={data}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_every={100 * args.steps}",  # no validation pass inside the measured steps
        "trainer.log_every=1",
        "wandb.mode=disabled",
        "--out",
        out,
    ]
    peaks: dict[int, int] = {}
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                sample(proc.pid, peaks)
                time.sleep(SAMPLE_S)
        finally:
            stop(proc)
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{text[-3000:]}")
    rates = [(int(m[1]), float(m[2].replace(",", ""))) for m in RATE.finditer(text)]
    # The logged rate is already global: rank 0's tokens x world size (pretrain/module.py).
    kept = [r for step, r in rates if step > args.skip]
    if not kept:
        sys.exit(f"{' '.join(cmd)}: no tokens/s line after step {args.skip} in {log}")
    return kept, [rss / 2**20 for rss in peaks.values()]


def upload(server_env: dict[str, str], data: Path, uri: str) -> None:
    """Copy the prepared dir to `uri`, every manifest after the shards it lists (as prepare does)."""
    os.environ.update(server_env)  # the storage layer reads the endpoint and keys from here
    files = [p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()]
    manifests = sorted(f for f in files if f.endswith("/manifest.json"))
    Location.of(uri).upload(data, last=(*manifests, "manifest.json"))


def measure(args: argparse.Namespace, tmp: Path, server: S3Server) -> dict[str, Result]:
    data = (ROOT / args.data).resolve()
    bench = f"s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    upload(server.env(), data, f"{bench}/data")
    print(f"uploaded {data} to {bench}/data in {time.perf_counter() - started:.1f} s", flush=True)
    results = {name: Result() for name in LAYOUTS}
    for r in range(args.rounds):
        for name in LAYOUTS:
            env = {**os.environ, **server.env(), "KILN_CACHE": str(tmp / f"cache-{name}-{r}")}
            if name == "local":
                where = (str(data), str(tmp / f"run-local-{r}"))
            else:
                where = (f"{bench}/data", f"{bench}/run-s3-{r}")
            rates, peaks = run(args, *where, env, tmp / f"{name}-{r}.log")
            results[name].rates.append(statistics.median(rates))
            results[name].peak_mib.append(max(peaks, default=float("nan")))
            print(
                f"round {r} {name}: {results[name].rates[-1]:,.0f} tokens/s, peak RSS per rank "
                f"{results[name].peak_mib[-1]:,.0f} MiB ({len(peaks)} workers seen)",
                flush=True,
            )
    return results


def report(args: argparse.Namespace, results: dict[str, Result], start_load: str) -> list[str]:
    local, s3 = (statistics.median(results[n].rates) for n in LAYOUTS)
    where = {"local": "local directory", "s3": "loopback S3 (SeaweedFS)"}
    rows = [
        f"| {where[name]} | {', '.join(f'{x:,.0f}' for x in res.rates)} | "
        f"{statistics.median(res.rates):,.0f} | {max(res.peak_mib):,.0f} |"
        for name, res in results.items()
    ]
    return [
        "# Training data from a local directory vs loopback S3",
        "",
        f"- {dt.datetime.now():%Y-%m-%d %H:%M}, `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- `pretrain --config {args.config}` on `{args.data}`, {args.steps} steps per run, "
        f"data_dir and --out on the same storage; tokens/s = median over logged steps after step "
        f"{args.skip}; median over {args.rounds} rounds, layouts alternating",
        "- peak RSS per rank: the highest RSS of any Ray Train worker, sampled every "
        f"{SAMPLE_S} s, over all rounds",
        f"- load average at start / end: {start_load} / {loadavg()}; {os.cpu_count()} CPUs",
        "",
        "| data | tokens/s per round | median | peak RSS per rank (MiB) |",
        "|---|---|---|---|",
        *rows,
        "",
        f"S3 / local = **{s3 / local:.2f}** (goal >= 0.95)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/wikitext2", help="a prepared data dir")
    parser.add_argument("--config", default="configs/mini-gpt-wikitext2.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="logged steps <= this are warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks/results/storage_throughput.md"
    )
    args = parser.parse_args(argv)
    if not (ROOT / args.data / "manifest.json").is_file():
        print(
            f"{args.data}: no prepared data (kiln data prepare --config "
            "configs/data-wikitext2.yaml --out runs/wikitext2)",
            file=sys.stderr,
        )
        return 2
    start_load = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    server = S3Server(tmp / "s3")
    try:
        server.start()
        results = measure(args, tmp, server)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = report(args, results, start_load)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
