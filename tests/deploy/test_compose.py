"""docker-compose.yml: valid for Docker Compose v2, and shaped for `--scale broker=N`."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

from tests.deploy.dockerfile import healthcheck_argv
from tests.deploy.tools import REPO_ROOT, run, tool

#: The environment without the overrides a developer may have exported: defaults apply.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "COMPOSE_"))}


def _seconds(duration: str) -> float:
    """A compose duration ("1m30s", "30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, duration
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """The resolved services, as `docker-compose config` sees them."""
    result = run([tool("docker-compose"), "config", "--format", "json"], env=CLEAN_ENV)
    assert result.returncode == 0, result.stderr
    project: dict[str, Any] = json.loads(result.stdout)
    found: dict[str, Any] = project["services"]
    return found


def test_config_is_valid_and_quiet() -> None:
    result = run([tool("docker-compose"), "config", "-q"], env=CLEAN_ENV)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_services(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "broker", "lb"}


def test_redis_is_healthchecked_and_keeps_nothing(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    command = redis["command"]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert "volumes" not in redis


def test_broker_scales_without_host_ports(services: dict[str, Any]) -> None:
    broker = services["broker"]
    # A fixed host port would make a second replica fail to start.
    assert "ports" not in broker
    assert "container_name" not in broker
    assert broker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert broker["build"]["context"] == str(REPO_ROOT)
    assert broker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_broker_settings_come_from_the_environment(services: dict[str, Any]) -> None:
    env = services["broker"]["environment"]
    assert env["BROKER_REDIS_URL"] == "redis://redis:6379/0"
    assert env["BROKER_PORT"] == "3004"
    # Behind `lb`: metrics on their own port, the balancer's forwarded address believed.
    assert env["BROKER_METRICS_PORT"] == "9464"
    assert "172.16.0.0/12" in env["BROKER_TRUSTED_PROXIES"]
    overridden = run(
        [tool("docker-compose"), "config", "--format", "json"],
        env={**CLEAN_ENV, "BROKER_LOG_LEVEL": "debug"},
    )
    assert overridden.returncode == 0, overridden.stderr
    broker = json.loads(overridden.stdout)["services"]["broker"]
    assert broker["environment"]["BROKER_LOG_LEVEL"] == "debug"


def test_broker_gets_time_to_drain(services: dict[str, Any]) -> None:
    broker = services["broker"]
    drain = float(broker["environment"]["BROKER_DRAIN_TIMEOUT"])
    assert broker["stop_signal"] == "SIGTERM"
    assert _seconds(broker["stop_grace_period"]) >= drain + 5


def test_broker_healthcheck_is_the_images(services: dict[str, Any]) -> None:
    assert services["broker"]["healthcheck"]["test"] == ["CMD", *healthcheck_argv()]


def test_lb_publishes_3004_with_the_deploy_config(services: dict[str, Any]) -> None:
    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert [(p["published"], p["target"]) for p in lb["ports"]] == [("3004", 3004)]
    (volume,) = lb["volumes"]
    assert volume["source"] == str(REPO_ROOT / "deploy" / "nginx.conf")
    assert volume["target"] == "/etc/nginx/nginx.conf"
    assert volume["read_only"] is True
    assert lb["depends_on"]["broker"]["condition"] == "service_healthy"
