"""What a training run shows on the user's console: one progress display per stage, validation results, notes.

Rank 0 appends events (JSON lines) to `<out>/logs/progress.jsonl` (cluster.callbacks.ProgressPrinter); the
driver follows that file while `trainer.fit()` runs and renders them: on a terminal one live line per stage
(carriage return), otherwise a plain line every `trainer.log_every` steps and no escape codes (a Ray job's
log, CI, `| tee`). Worker stdout does not reach the console (data_pipeline.raystart sends it, with Ray's own
output, to `<out>/logs/ray.log`), and the file, read to its end once fit() returns, loses no last line, which
Ray's log forwarding can at exit. When `<out>` is a URI, the driver and rank 0 share no directory: the events
then also travel through a `ProgressRelay` Ray actor that the driver starts and drains.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

PROGRESS_FILE = Path("logs") / "progress.jsonl"
POLL_S = 0.25  # how often the driver looks for new events
BAR_WIDTH = 24
CLEAR_TO_EOL = "\x1b[K"  # terminals only: the live line may get shorter


def progress_file(out_dir: Path) -> Path:
    return Path(out_dir) / PROGRESS_FILE


# ------------------------------------------------------------------------------------------- formatting
def duration(seconds: float) -> str:
    """45s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "tokens_per_s")


def _rate(metrics: dict[str, float]) -> str:
    rate = metrics.get("tokens_per_s")
    return "" if rate is None else f"{rate:,.0f} tokens/s"


def format_step(event: dict[str, Any]) -> str:
    """A plain progress line (logs, pipes): `[bert] step 10/400 loss 7.9 ... | 12,900 tokens/s | 6s elapsed,
    ETA 3m50s`."""
    head = f"[{event['stage']}] step {event['step']}/{event['max_steps']}"
    parts = [" ".join(p for p in (head, _metrics(event.get("metrics", {}))) if p)]
    if _rate(event.get("metrics", {})):
        parts.append(_rate(event["metrics"]))
    parts.append(
        f"{duration(event.get('elapsed', 0))} elapsed, ETA {duration(event.get('eta', 0))}"
    )
    return " | ".join(parts)


def format_bar(event: dict[str, Any], width: int) -> str:
    """The live line of a terminal, at most `width` characters: `[bert] [=====>....] 120/400 ETA 2m10s |
    12,900 tokens/s | loss 6.1 ...` (a narrow terminal loses the metrics' tail, not the ETA)."""
    step, total = event["step"], max(event["max_steps"], 1)
    filled = min(BAR_WIDTH, BAR_WIDTH * step // total)
    bar = "=" * filled + (">" if filled < BAR_WIDTH else "") + "." * (BAR_WIDTH - filled - 1)
    metrics = event.get("metrics", {})
    parts = [
        f"[{event['stage']}] [{bar[:BAR_WIDTH]}] {step}/{event['max_steps']} "
        f"ETA {duration(event.get('eta', 0))}",
        _rate(metrics),
        _metrics(metrics),
    ]
    return " | ".join(p for p in parts if p)[: max(width, 20)]


def format_validation(event: dict[str, Any]) -> str:
    shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(event.get("metrics", {}).items()))
    return f"[{event['stage']}] validation at step {event['step']}: {shown}"


# ---------------------------------------------------------------------------------------------- console
class Console:
    """Renders events on `stream`: a live line on a terminal (`tty`), plain lines otherwise. Thread-safe: the
    follower thread renders events while the main thread (or a signal handler on it) may print lines."""

    def __init__(
        self,
        every: int,
        stream: TextIO | None = None,
        tty: bool | None = None,
        width: int | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.every, self.width = max(1, every), width
        self._live = ""  # the live line now shown (tty), "" when none
        self._lock = threading.RLock()

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "step":
            self._step(event)
        elif kind == "validation":
            self.line(format_validation(event))
        elif kind == "note":
            self.line(str(event.get("text", "")))

    def line(self, text: str) -> None:
        """A line of its own; a live progress line is redrawn below it."""
        with self._lock:
            if self._live:
                self.stream.write("\r" + CLEAR_TO_EOL + text + "\n" + self._live)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Leave the last state of a live line on screen and move below it."""
        with self._lock:
            if self._live:
                self.stream.write("\n")
                self.stream.flush()
                self._live = ""

    def _step(self, event: dict[str, Any]) -> None:
        step, last = event["step"], event["step"] >= event["max_steps"]
        with self._lock:
            if self.tty:
                width = self.width or shutil.get_terminal_size((100, 24)).columns - 1
                self._live = format_bar(event, width)
                self.stream.write("\r" + self._live + CLEAR_TO_EOL)
            elif step % self.every == 0 or last:
                self.stream.write(format_step(event) + "\n")
            self.stream.flush()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_ACTIVE: Console | None = None


def active() -> bool:
    """True while this process follows a run's progress (the driver, inside follow_progress)."""
    return _ACTIVE is not None


def say(text: str) -> None:
    """A driver line that must not tear a live progress line (e.g. the SIGTERM notice)."""
    if _ACTIVE is not None:
        _ACTIVE.line(text)
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


# ------------------------------------------------------------------------------------- worker and driver
RELAY_NAMESPACE = "kiln"


class ProgressRelay:
    """Carries rank 0's events to the driver when they share no directory (a run whose `--out` is a
    URI): a Ray actor (`start_relay`) that rank 0 appends to and the driver drains. Calls from one
    caller run in order, so lines arrive in the order they were written."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def put(self, line: str) -> None:
        self._lines.append(line)

    def take(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines

    def ping(self) -> None:
        """Returns once every `put` sent before it has been applied (rank 0 waits on it at the end)."""


def start_relay(name: str) -> Any:
    """The relay actor, on the driver's own node: it must outlive the loss of any worker's node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(ProgressRelay)
    return actor.options(name=name, namespace=RELAY_NAMESPACE, scheduling_strategy=here).remote()


def find_relay(name: str) -> Any:
    import ray

    return ray.get_actor(name, namespace=RELAY_NAMESPACE)


class EventWriter:
    """Rank 0's side: one JSON object a line, appended and flushed at once (and sent to the relay)."""

    def __init__(self, path: Path, relay: Any = None) -> None:
        self.path, self.relay = Path(path), relay
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **event: Any) -> None:
        line = json.dumps(event)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.relay is not None:
            self.relay.put.remote(line)

    def flush(self) -> None:
        if self.relay is not None:
            import ray

            ray.get(self.relay.ping.remote())


_EVENTS: EventWriter | None = (
    None  # rank 0 of a training worker: lines travel to the driver's console
)


def send_lines_to(events: EventWriter | Path | None) -> None:
    """From now on `emit` in this process (rank 0 of a training worker) appends its lines to the run's
    progress events, which the driver shows (cluster.progress); None: back to stdout."""
    global _EVENTS
    _EVENTS = EventWriter(events) if isinstance(events, Path) else events


def emit(line: str) -> None:
    """A line for the user. On rank 0 of a training worker it becomes a note event for the driver's console
    (worker stdout goes only to the run's logs/ray.log); on the driver it is printed without tearing a live
    progress line; elsewhere it goes to the process's own stdout (Ray Train patches `print` into its logger
    and W&B wraps sys.stdout, so a `print` would be written twice)."""
    if _EVENTS is not None:
        _EVENTS.write(kind="note", text=line)
    elif active():
        say(line)
    else:
        sys.__stdout__.write(line + "\n")
        sys.__stdout__.flush()


class Follower:
    """The driver's side: reads complete lines appended to `path` after `start` (or drained from
    `relay`) and shows them."""

    def __init__(self, path: Path, console: Console, start: int = 0, relay: Any = None) -> None:
        self.path, self.console, self.offset, self.relay = Path(path), console, start, relay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop following and show what is left in the file (once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        for raw in self._relayed() if self.relay is not None else self._appended():
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # not ours (or damaged): the console shows only what it understands
            if isinstance(event, dict):
                self.console.show(event)

    def _appended(self) -> list[bytes]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for its newline
        self.offset += end
        return data[:end].splitlines()

    def _relayed(self) -> list[str]:
        import ray

        try:
            return ray.get(self.relay.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 (Ray gone at shutdown: the console just stops)
            return []


@contextmanager
def follow_progress(
    out_dir: Path,
    every: int,
    stream: TextIO | None = None,
    tty: bool | None = None,
    relay: Any = None,
) -> Iterator[Console]:
    """While inside, rank 0's events under `out_dir` (those appended from now on), or those it sends
    to `relay` (a ProgressRelay actor), show on the console."""
    global _ACTIVE
    path = progress_file(out_dir)
    console = Console(every, stream, tty)
    start = path.stat().st_size if path.is_file() else 0
    follower = Follower(path, console, start, relay=relay)
    previous, _ACTIVE = _ACTIVE, console
    follower.start()
    try:
        yield console
    except Exception as err:
        follower.stop()
        console.close()
        if not _is_user_error(
            err
        ):  # a crash: its details (tracebacks, Ray's reasons) are in the run log
            print(
                f"kiln: the workers' and Ray's own output: {Path(out_dir) / 'logs' / 'ray.log'}",
                file=sys.stderr,
                flush=True,
            )
        raise
    finally:
        follower.stop()
        console.close()
        _ACTIVE = previous


def _is_user_error(err: BaseException) -> bool:
    from cluster.rundir import user_error_types

    return isinstance(err, user_error_types())
