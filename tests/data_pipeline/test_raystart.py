"""A Ray that cannot start is one clear line (the CLI's exit 2), and a local Ray is bound to loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_pipeline import raystart
from data_pipeline.raystart import RayStartError, init_ray


def test_failed_start_is_one_line_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(**kwargs: object) -> None:
        raise Exception(
            "The current node timed out during startup. This could happen because ...\nmore"
        )

    monkeypatch.setattr(raystart.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(raystart.ray, "init", boom)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RayStartError) as info:
        init_ray()
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "could not start or reach a local Ray instance: The current"
    )
    assert "overloaded" in message
    with pytest.raises(
        RayStartError, match=r"the Ray cluster at ray://10.0.0.1:10001: .* is the address right"
    ):
        init_ray("ray://10.0.0.1:10001")


def test_local_ray_binds_loopback_and_address_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(raystart.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(raystart.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(raystart, "_use_token_auth", lambda: None)  # tested below
    init_ray(log_to_driver=False)
    assert calls[-1]["_node_ip_address"] == "127.0.0.1" and calls[-1]["log_to_driver"] is False
    assert raystart.os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # Ray's local-only mode
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    init_ray()
    # INFO: Ray's start-up lines reach the run log (raystart's handler); worker output forwarded, and routed.
    assert calls[-1] == {
        "address": "http://127.0.0.1:8265",
        "logging_level": 20,
        "log_to_driver": True,
    }


def test_a_local_ray_asks_for_token_auth_itself_so_ray_does_not_warn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    raystart._use_token_auth()
    assert raystart.os.environ["RAY_AUTH_MODE"] == "disabled"  # the user's choice stands
    monkeypatch.delenv("RAY_AUTH_MODE")
    try:
        raystart._use_token_auth()
        assert raystart.os.environ["RAY_AUTH_MODE"] == "token"
        assert get_authentication_mode() == AuthenticationMode.TOKEN  # Ray's cached config re-read
    finally:
        monkeypatch.undo()  # the environment as it was, and Ray's config cache re-read from it: a cache left
        Config.initialize(
            ""
        )  # saying "no auth" beside RAY_AUTH_MODE=token fails every later local start


def test_a_local_start_rereads_rays_config_when_the_environment_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray reads RAY_AUTH_MODE into its config cache once; the GCS it starts reads the environment. A cache
    that disagrees made every later local start fail after 20 s ("Failed to start GCS", seen in CI)."""
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    Config.initialize("")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # changed after Ray read it
    try:
        raystart._use_token_auth()
        assert get_authentication_mode() == AuthenticationMode.TOKEN
    finally:
        monkeypatch.undo()
        Config.initialize("")


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:6379", True),
        ("localhost:6379", True),
        ("10.0.0.5:6379", False),
        ("ray://127.0.0.1:10001", False),
    ],
)
def test_joining_a_loopback_head_keeps_the_driver_on_loopback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, address: str, loopback: bool
) -> None:
    """`kiln cluster up` binds every server to 127.0.0.1: a driver that took the routable address as its node
    address would wait forever for a raylet there (seen joining through RAY_ADDRESS)."""
    from data_pipeline import raystart

    monkeypatch.setenv(
        "HOME", str(tmp_path)
    )  # no ~/.ray/auth_token: token mode left as the user set it
    for var in (
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
    ):
        monkeypatch.setenv(var, "")  # recorded, so whatever the test sets is undone afterwards
        monkeypatch.delenv(var)
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # as Ray sets it on Linux
    kwargs: dict = {}
    raystart._join_as_kiln_cluster_up_expects(address, kwargs)
    assert ray_constants.ENABLE_RAY_CLUSTER is not loopback
    assert (kwargs.get("_node_ip_address") == "127.0.0.1") is loopback
    assert (os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0") is loopback
    assert "RAY_AUTH_MODE" not in os.environ
