"""deploy/ is checked, not just shipped: every manifest parses and passes its schema (Kubernetes 1.37 with
kubernetes-validate --strict, the Compose specification with check-jsonschema), the units pass
`systemd-analyze verify`, and the fields the topology relies on are there (probes, HPA, PDB, a standby
learner, a non-root image). What cannot be run here (an image build, a cluster) is said in docs/deploy.md."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kassa.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is required (pip install -e '.[dev]')", pytrace=False)
    return found


def _k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def test_kubernetes_manifests_pass_the_1_37_schema_strictly() -> None:
    files = [str(K8S / n) for n in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]]
    out = subprocess.run([_bin("kubernetes-validate"), "--strict", "-k", "1.37.0", *files], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_serve_deployment_has_probes_resources_hpa_and_pdb() -> None:
    docs = _k8s_docs()
    serve = _one(docs, "Deployment", "kassa-serve")
    pod = serve["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    hpa = _one(docs, "HorizontalPodAutoscaler", "kassa-serve")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "kassa-serve" and hpa["spec"]["minReplicas"] >= 2
    pdb = _one(docs, "PodDisruptionBudget", "kassa-serve")
    assert pdb["spec"]["selector"]["matchLabels"] == serve["spec"]["selector"]["matchLabels"]
    service = _one(docs, "Service", "kassa")
    assert service["spec"]["selector"] == serve["spec"]["selector"]["matchLabels"]


def test_learner_runs_with_a_standby_and_every_role_reads_the_configmap_and_secret() -> None:
    docs = _k8s_docs()
    learn = _one(docs, "Deployment", "kassa-learn")
    assert learn["spec"]["replicas"] == 2
    assert learn["spec"]["template"]["spec"]["containers"][0]["args"] == ["learn"]
    config = yaml.safe_load(_one(docs, "ConfigMap", "kassa-config")["data"]["kassa.yaml"])
    assert config["roles"]["lease"] == "redis" and config["roles"]["learner"] == "external"
    secret = _one(docs, "Secret", "kassa-keys")
    for name in ("kassa-serve", "kassa-learn", "kassa-stream"):
        container = _one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
        assert any(m["mountPath"] == "/etc/kassa" for m in container["volumeMounts"])


def test_the_shipped_settings_load() -> None:
    settings = load_settings(DEPLOY / "kassa.yaml")
    assert settings.roles.learner == "external" and settings.roles.lease == "redis"
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["kassa.yaml"]
    assert yaml.safe_load(configmap) == yaml.safe_load((DEPLOY / "kassa.yaml").read_text())


def test_compose_file_passes_the_compose_spec_and_has_every_role_and_service() -> None:
    out = subprocess.run([_bin("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(DEPLOY / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert services["serve"]["deploy"]["replicas"] == 2 and services["learn"]["deploy"]["replicas"] == 2
    assert services["serve"]["command"] == ["serve"] and services["learn"]["command"] == ["learn"]
    assert "stream" in services and "redis" in services and "postgres" in services
    assert "-js" in services["nats"]["command"]


def test_compose_roles_keep_their_metadata_in_the_postgres_compose_starts() -> None:
    # compose.yaml started PostgreSQL (and asked for its password) but no Kassa role was told about it: every role
    # kept catalog, keys and model registry in SQLite on the shared volume and the database stayed empty.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    pg = compose["services"]["postgres"]["environment"]
    for name in ("serve", "learn", "stream"):
        service = compose["services"][name]
        assert "postgres" in service["depends_on"], name
        url = service["environment"].get("KASSA_METADATA__URL")
        assert url is not None, f"{name}: no KASSA_METADATA__URL"
        url = url.replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}", "pw")  # compose's interpolation
        settings = load_settings(DEPLOY / "kassa.yaml", **{"metadata.url": url})
        assert settings.metadata_url == (f"postgresql+psycopg://{pg['POSTGRES_USER']}:pw@postgres:5432/"
                                         f"{pg['POSTGRES_DB']}"), name


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is required (Debian: systemd)", pytrace=False)
    kassa = _bin("kassa")  # verify checks that ExecStart exists: point it at this environment's kassa
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        name = unit.name.replace("@.service", "@a.service")  # an instance of the template
        (tmp_path / name).write_text(unit.read_text().replace("/opt/kassa/bin/kassa", kassa))
        units.append(str(tmp_path / name))
    assert len(units) == 3
    out = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr.strip(), out.stdout + out.stderr


def test_systemd_counts_a_stop_as_a_clean_exit() -> None:
    """`systemctl stop` sends SIGTERM, after which `kassa serve` and `kassa stream` exit 143 once they have shut down
    cleanly (README, "Exit codes and signals"; tests/test_packaging.py and tests/test_roles.py send the signal): a unit
    without `SuccessExitStatus=143` was left `failed` by every stop and every deploy."""
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        service = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line
                       and not line.startswith("#"))
        assert "143" in service.get("SuccessExitStatus", "").split(), unit.name


def test_image_is_python_3_11_slim_and_runs_as_a_non_root_user() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(f == "python:3.11-slim" for f in froms)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert not any(line.startswith("ADD ") for line in lines)
    assert any(line.startswith("ENTRYPOINT") and "kassa" in line for line in lines)
