"""Starting (or joining) Ray for Kiln's commands: one place that binds a local Ray to loopback and turns a failed
start into one clear line instead of Ray's traceback."""

from __future__ import annotations

import os

import ray


class RayStartError(RuntimeError):
    """Ray could not start or be reached; the message is one line saying what to try."""


def init_ray(address: str | None = None, **kwargs: object) -> None:
    """Connect to `address` (or RAY_ADDRESS) when given; otherwise start a local Ray bound to 127.0.0.1, so nothing
    beyond this machine can submit work to it. No-op when Ray is already initialised in this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # _node_ip_address alone still leaves Ray's GCS listening on every interface on Linux; Ray's
            # "local only" switch (what it uses on macOS/Windows) keeps every server on 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    except Exception as e:  # Ray raises bare Exception / ConnectionError / RuntimeError for these
        first = (str(e).splitlines() or [type(e).__name__])[0]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        hint = ("is the address right and the cluster up?" if address else
                "the machine may be overloaded (Ray's processes must start within its timeout): retry, or free CPU")
        raise RayStartError(f"could not start or reach {where}: {first}; {hint}") from None
