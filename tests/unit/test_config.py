"""Sidecar settings: precedence, validation, and what Kubernetes injects that is not a setting."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from engram_contract.errors import ConfigError
from engram_sidecar.config import load_config


def test_config_flags_override_env_override_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node: from-file\nhttp_port: 1\nbatch_max_entries: 7\n")
    cfg = load_config(
        flags={"http_port": "3"},
        env={"ENGRAM_HTTP_PORT": "2", "ENGRAM_NODE": "n-env"},
        config_file=f,
    )
    assert (cfg.node, cfg.http_port, cfg.batch_max_entries) == ("n-env", 3, 7)


def test_config_unknown_env_setting_is_an_error() -> None:
    with pytest.raises(ConfigError, match="ENGRAM_BOGUS"):
        load_config(env={"ENGRAM_NODE": "n0", "ENGRAM_BOGUS": "1"})


def test_config_ignores_kubernetes_service_link_variables() -> None:
    env = {
        "ENGRAM_NODE": "n0",
        # What Kubernetes injects for a Service named engram-replication:
        "ENGRAM_REPLICATION_PORT": "tcp://10.0.0.7:7070",
        "ENGRAM_REPLICATION_SERVICE_HOST": "10.0.0.7",
        "ENGRAM_REPLICATION_SERVICE_PORT": "7070",
        "ENGRAM_REPLICATION_SERVICE_PORT_REPLICATION": "7070",
        "ENGRAM_REPLICATION_PORT_7070_TCP": "tcp://10.0.0.7:7070",
        "ENGRAM_REPLICATION_PORT_7070_TCP_PROTO": "tcp",
        "ENGRAM_REPLICATION_PORT_7070_TCP_PORT": "7070",
        "ENGRAM_REPLICATION_PORT_7070_TCP_ADDR": "10.0.0.7",
    }
    cfg = load_config(env=env)
    assert cfg.replication_port == 7070  # the default, not the injected URL


def test_config_real_replication_port_env_still_applies() -> None:
    cfg = load_config(env={"ENGRAM_NODE": "n0", "ENGRAM_REPLICATION_PORT": "9000"})
    assert cfg.replication_port == 9000


def test_config_empty_yaml_text_value_is_empty_not_none(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node: n0\nadvertise_address:\n")
    cfg = load_config(env={}, config_file=f)
    assert cfg.advertise_address == ""
    assert cfg.address == f"{cfg.replication_host}:{cfg.replication_port}"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"ENGRAM_NODE": "N0"}, "node"),
        ({"ENGRAM_NODE": "n0", "ENGRAM_FSYNC": "sometimes"}, "fsync"),
        ({"ENGRAM_NODE": "n0", "ENGRAM_HTTP_PORT": "70000"}, "http_port"),
        ({"ENGRAM_NODE": "n0", "ENGRAM_BATCH_MAX_ENTRIES": "x"}, "batch_max_entries"),
        ({"ENGRAM_NODE": "n0", "ENGRAM_LAG_CRITICAL_SECONDS": "0.5"}, "lag_critical_seconds"),
        ({}, "node is required"),
    ],
)
def test_config_invalid_values_name_the_setting(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(env=env)


def test_config_bad_yaml_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(env={}, config_file=f)


def test_config_event_loop_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    from engram_sidecar import config as config_module
    from engram_sidecar import eventloop

    env = {"ENGRAM_NODE": "n0"}
    assert load_config(env=env).event_loop == "auto"
    with pytest.raises(ConfigError, match="event_loop"):
        load_config(env={**env, "ENGRAM_EVENT_LOOP": "trio"})
    assert eventloop.choose("asyncio") == ("asyncio", None)
    name, factory = eventloop.choose("auto")
    assert name in ("uvloop", "asyncio") and (factory is None) == (name == "asyncio")
    # Whatever it picks runs coroutines to completion.
    assert eventloop.run(asyncio.sleep(0, "done"), "auto") == "done"
    # Without uvloop installed: auto falls back, an explicit uvloop is a configuration error.
    real = config_module.importlib.util.find_spec
    monkeypatch.setattr(
        config_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvloop" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        load_config(env={**env, "ENGRAM_EVENT_LOOP": "uvloop"})
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert eventloop.choose("auto") == ("asyncio", None)
