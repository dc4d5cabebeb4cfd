"""The deployment files: Kubernetes manifests valid against the Kubernetes schemas (offline), probes and
ports that match the server, AOF on for Redis, and a Dockerfile that installs and starts coserve the
way the README and Makefile do."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from coserve.server import app as server_app
from coserve.server.metrics import Metrics
from coserve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "InferencePool"}  # CRDs: not in the Kubernetes schemas
K8S_VERSION = "1.31"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in documents(path):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_is_valid(name):
    doc = manifests()[name]
    if doc["kind"] in CUSTOM_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["apiVersion"].count("/") == 1 and doc["spec"]
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema violation


def test_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    for extra in ("hpa.yaml", "inferencepool.yaml"):
        assert (K8S / extra).is_file()


def test_probes_ports_and_drain_match_the_server():
    m = manifests()
    pod = m["Deployment/coserve"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = m["ConfigMap/coserve-config"]["data"]
    source = inspect.getsource(server_app.create_app)
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"]["path"] == path and container[probe]["httpGet"]["port"] == "http"
        assert f'@app.get("{path}")' in source
    port = container["ports"][0]
    assert port["name"] == "http" and port["containerPort"] == int(config["COSERVE_PORT"]) == 8000
    assert ServeSettings.model_fields["port"].default == 8000
    assert m["Service/coserve"]["spec"]["ports"][0]["targetPort"] == "http"
    assert pod["terminationGracePeriodSeconds"] > float(config["COSERVE_SHUTDOWN_TIMEOUT"])
    mounts = {v["mountPath"] for v in container["volumeMounts"]}
    assert {"/dev/shm", "/models", "/data"} <= mounts
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert container["envFrom"][1] == {"secretRef": {"name": "coserve-keys"}}
    assert "COSERVE_API_KEYS" in m["Secret/coserve-keys"]["stringData"]
    for key in config:  # every setting the ConfigMap sets is a real `coserve serve` setting
        assert key.removeprefix("COSERVE_").lower() in ServeSettings.model_fields, key
    assert config["COSERVE_REDIS_URL"].startswith("redis://coserve-redis:6379")


def test_autoscaling_reads_a_metric_the_server_exports():
    exported = Metrics("m").render().decode()
    query = manifests()["ScaledObject/coserve"]["spec"]["triggers"][0]["metadata"]["query"]
    assert "vllm:num_requests_waiting" in query and "vllm:num_requests_waiting" in exported
    assert yaml.safe_load((K8S / "hpa.yaml").read_text())["spec"]["scaleTargetRef"]["name"] == "coserve"


def test_redis_keeps_an_append_only_file():
    redis = manifests()["StatefulSet/coserve-redis"]["spec"]
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "everysec"
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    command = compose["services"]["redis"]["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data" in compose["volumes"]
    assert compose["services"]["coserve"]["environment"]["COSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert compose["services"]["coserve"]["ports"] == ["8000:8000"]


def test_dockerfile_installs_and_starts_like_the_readme():
    docker = (ROOT / "Dockerfile").read_text()
    make = (ROOT / "Makefile").read_text()
    torch_first = docker.index('"${TORCH_SPEC}"'), docker.index("pip install .")
    assert torch_first[0] < torch_first[1]  # torch before the project, as `make serve` does
    assert 'TORCH_SPEC="torch==2.13.0"' in docker and "torch==2.13.0" in make
    assert re.search(r'^ENTRYPOINT \["coserve", "serve"\]$', docker, re.M)
    assert re.search(r"^EXPOSE 8000$", docker, re.M) and "/health" in docker.split("HEALTHCHECK", 1)[1]
    assert re.search(r"^USER coserve$", docker, re.M)
    assert "ARG BASE_IMAGE" in docker  # a CUDA base image is a build argument
    readme = (ROOT / "README.md").read_text()
    assert "docker build" in readme and "docker compose -f deploy/compose.yaml up" in readme
    assert "kubectl apply -k deploy/k8s" in readme
