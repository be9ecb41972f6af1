"""deploy/k8s: schema-valid manifests (kubernetes-validate --strict) that fit together."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.tools import REPO_ROOT, run, tool

# PyYAML (a dependency of kubernetes-validate) ships no type hints and types-PyYAML is not
# a test dependency: its functions are Any here, and the values are checked below.
yaml = importlib.import_module("yaml")

K8S = REPO_ROOT / "deploy" / "k8s"
#: The oldest Kubernetes we support (autoscaling/v2 and policy/v1 are GA long before) and a
#: recent one; both schemas ship inside kubernetes-validate.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> dict[str, Any]:
    (document,) = yaml.safe_load_all(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _kind(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = (
        doc
        for doc in map(_load, MANIFESTS)
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    )
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_validate_strict(manifest: Path, version: str) -> None:
    result = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, manifest])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr


def test_kubernetes_validate_is_really_strict(tmp_path: Path) -> None:
    service = _load(K8S / "service.yaml")
    service["spec"]["portz"] = []
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(service), encoding="utf-8")
    result = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[0], bad])
    assert result.returncode != 0


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization, "namespace-agnostic: kubectl -n picks it"
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    assert all("namespace" not in _load(p)["metadata"] for p in MANIFESTS)


def test_deployment_probes_and_drain() -> None:
    deployment = _kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 3
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == 3004

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    config = _kind("ConfigMap")["data"]
    drain = float(config["BROKER_DRAIN_TIMEOUT"])
    # The grace period covers the preStop sleep and then the whole drain, with room to spare.
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def test_deployment_is_locked_down() -> None:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    # Service links would put BROKER_PORT=tcp://... into the pod: the node's own setting.
    assert pod["enableServiceLinks"] is False


def test_deployment_settings() -> None:
    template = _kind("Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    (source,) = container["envFrom"]
    config = _kind("ConfigMap")
    assert source["configMapRef"]["name"] == config["metadata"]["name"]
    assert config["data"]["BROKER_REDIS_URL"] == "redis://redis:6379/0"
    assert all(key.startswith("BROKER_") for key in config["data"])
    (node_id,) = (e for e in container["env"] if e["name"] == "BROKER_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    # /metrics on its own listener, declared as a container port, never the client port.
    assert annotations["prometheus.io/port"] == config["data"]["BROKER_METRICS_PORT"] == "9464"
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in container["ports"]
    assert config["data"]["BROKER_TRUSTED_PROXIES"]


def test_selectors_fit_together() -> None:
    deployment = _kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = _kind("Service", "connection-broker")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["port"] == 3004
    assert _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    hpa = _kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_redis_statefulset_and_headless_service() -> None:
    statefulset = _kind("StatefulSet", "redis")
    service = _kind("Service", "redis")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
