"""Starting (or joining) Ray for Kiln's commands: one place that binds a local Ray to loopback, turns a failed
start into one clear line instead of Ray's traceback, and keeps Ray's own output off the user's console.

Ray's output reaches a driver two ways: its Python loggers ("ray", and "ray.data" with a console handler of its
own) and the workers' stdout/stderr, which Ray's log monitor forwards (`log_to_driver`). Both go to the run log
(`<out>/logs/ray.log` once a command names its run directory; held in memory until then); `kiln --verbose`
(KILN_VERBOSE=1) shows them on the console as well, as Ray would.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import ray

VERBOSE_ENV = "KILN_VERBOSE"
RAY_LOGGERS = (
    "ray",
    "ray.data",
)  # the loggers with console handlers of their own; the rest propagate to "ray"
PENDING_LINES = 20_000  # what the run log keeps in memory before it has a file


class RayStartError(RuntimeError):
    """Ray could not start or be reached; the message is one line saying what to try."""


def verbose() -> bool:
    """True when the user asked for Ray's and W&B's own output (`kiln --verbose`)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class RunLog:
    """Appends lines to one file, switchable (each training stage logs into its own run directory); lines
    written before a file is named are kept (the last PENDING_LINES) and written to the first one."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._file: Any = None
        self._pending: collections.deque[str] = collections.deque(maxlen=PENDING_LINES)
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            if self._file is None:
                self._pending.append(line)
            else:
                self._file.write(line.rstrip("\n") + "\n")
                self._file.flush()

    def to(self, path: Path) -> None:
        """From now on, append to `path` (its directory is created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._file is not None:
                self._file.close()
            self.path, self._file = path, open(path, "a", encoding="utf-8")  # noqa: SIM115 — kept open
            self._file.writelines(line.rstrip("\n") + "\n" for line in self._pending)
            self._file.flush()
            self._pending.clear()


RUN_LOG = RunLog()


def log_to(path: Path) -> Path:
    """Send Ray's output (driver loggers and forwarded worker output) to `path` from now on; returns it."""
    RUN_LOG.to(path)
    return Path(path)


def keep_ray_log(path: Path) -> None:
    """`log_to(path)` if this process started or joined Ray (else there is nothing of Ray's to keep)."""
    if ray.is_initialized():
        log_to(path)


class _RunLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            RUN_LOG.write(self.format(record))
        except Exception:  # noqa: BLE001 — logging must never break the run
            self.handleError(record)


def route_ray_loggers() -> None:
    """Ray's driver-side loggers write to the run log; their console handlers stay only with --verbose.
    Imports ray.data first: it installs its console handler when imported."""
    import ray.data  # noqa: F401

    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _RunLogHandler) for h in logger.handlers):
            handler = _RunLogHandler()
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        if not verbose():
            for handler in list(logger.handlers):
                if type(handler) is not _RunLogHandler and not isinstance(
                    handler, logging.FileHandler
                ):
                    logger.removeHandler(handler)  # a console handler (Ray's PlainRayHandler)
    logging.getLogger("ray").setLevel(logging.INFO)


def _worker_lines(data: dict[str, Any]) -> None:
    """Ray's log monitor's batch of one process's output, as lines of the run log, prefixed as Ray prints them
    (of the autoscaler's, like Ray, only its events: it also dumps the cluster status every few seconds)."""
    pid, lines = data.get("pid"), data.get("lines", [])
    if pid in ("autoscaler", "raylet"):
        prefix = f"({pid})"
        if pid == "autoscaler":
            from ray._private.worker import filter_autoscaler_events

            lines = list(filter_autoscaler_events(lines))
    else:
        who = data.get("actor_name") or data.get("task_name")
        prefix = f"({who} pid={pid})" if who else f"(pid={pid})"
    for line in lines:
        RUN_LOG.write(f"{prefix} {line}")


def _stdstream_dispatcher() -> Any:
    """Ray's driver-side fan-out of forwarded worker output (no public API; None if this Ray lacks it)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    has = all(
        hasattr(global_worker_stdstream_dispatcher, m) for m in ("add_handler", "remove_handler")
    )
    return global_worker_stdstream_dispatcher if has else None


def route_worker_output() -> None:
    """Forwarded worker output goes to the run log; Ray's printer of it stays only with --verbose."""
    dispatcher = _stdstream_dispatcher()
    if dispatcher is None:
        return
    dispatcher.remove_handler("kiln_run_log")
    dispatcher.add_handler("kiln_run_log", _worker_lines)
    if not verbose():
        dispatcher.remove_handler("ray_print_logs")
    elif not _isatty(sys.stdout):
        os.environ.setdefault(
            "RAY_COLOR_PREFIX", "0"
        )  # Ray's printer: no colour codes into a pipe or log


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _use_token_auth() -> None:
    """A new local Ray turns token authentication on by default and says so in a WARNING on every start;
    asking for it explicitly (RAY_AUTH_MODE=token, what Ray itself sets) keeps the protection, not the line.
    An explicit RAY_AUTH_MODE of the user's wins.

    Either way Ray's config cache is re-read from the environment: Ray reads RAY_AUTH_MODE once, at import,
    while the servers it starts read the environment. When the two disagree (the variable changed in this
    process since), the driver sends no token to a GCS that wants one and the start fails after 20 s as
    "Failed to start GCS" with no error lines (seen in CI after a test had changed the variable)."""
    ours = "RAY_AUTH_MODE" not in os.environ
    if ours:
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config

        Config.initialize("")  # re-read, as Ray does at import
    except (ImportError, AttributeError):
        if ours:
            del os.environ["RAY_AUTH_MODE"]  # leave it to Ray's own default (and its warning)


LOOPBACK_HOSTS = ("127.", "localhost")


def _join_as_kiln_cluster_up_expects(address: str, kwargs: dict[str, Any]) -> None:
    """Joining a head on this machine's loopback (`kiln cluster up`, the default): on Linux Ray takes the
    machine's routable address as this driver's node address and then waits forever for a raylet there,
    while the head's servers listen on 127.0.0.1 only; Ray's single-machine mode keeps the driver on
    loopback too. The head authenticates with a token (`kiln cluster up`), which a client sends only in
    token mode: turn it on when a token is there and the user said nothing."""
    host = address.rsplit(":", 1)[0]
    if "://" not in address and host.startswith(
        LOOPBACK_HOSTS
    ):  # a GCS address, not ray:// (Ray Client)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
            # Ray read the variable into this constant when it was imported (before this call); its
            # services module looks the constant up each time it turns 127.0.0.1 into "this node's" IP.
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token or (Path.home() / ".ray" / "auth_token").is_file():
        _use_token_auth()


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Connect to `address` (or RAY_ADDRESS) when given; otherwise start a local Ray bound to 127.0.0.1, so nothing
    beyond this machine can submit work to it. No-op when Ray is already initialised in this process.

    Ray's own output goes to the run log (see the module docstring); an explicit `log_to_driver=False` (no worker
    output wanted at all) is honoured unless --verbose asks to see everything."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    route_ray_loggers()
    kwargs.setdefault("log_to_driver", _stdstream_dispatcher() is not None or verbose())
    if verbose():
        kwargs["log_to_driver"] = True
    # ray.init's logging setup keeps the "ray" logger's handlers (setting their format and level); its
    # configure_logging=False would remove them, leaving WARNINGs to Python's last-resort stderr handler.
    kwargs.setdefault("logging_level", logging.INFO)
    try:
        if address:
            _join_as_kiln_cluster_up_expects(address, kwargs)
            ray.init(address=address, **kwargs)
        else:
            # _node_ip_address alone still leaves Ray's GCS listening on every interface on Linux; Ray's
            # "local only" switch (what it uses on macOS/Windows) keeps every server on 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            _use_token_auth()
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    except Exception as e:  # Ray raises bare Exception / ConnectionError / RuntimeError for these
        first = (str(e).splitlines() or [type(e).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = (
            "is the address right and the cluster up?"
            if address
            else "the machine may be overloaded (Ray's processes must start within its timeout): retry, or free CPU"
        )
        raise RayStartError(f"could not start or reach {where}: {first}; {hint}") from None
    if kwargs["log_to_driver"]:
        route_worker_output()
