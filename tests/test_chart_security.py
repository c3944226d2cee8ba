"""The chart is secure by default: try to get past each closure on the rendered objects.

- NetworkPolicy: evaluated here (selectors, named ports) against the Pods KubeRay makes from the
  RayService: from outside the release only the serve port answers (and metrics, to Prometheus);
  the operator reaches the dashboard and nothing else; Ray pods reach each other.
- The dashboard is not bound to 0.0.0.0 unless a value says so; Ray token auth is on.
- Every container (the chart's and the ones KubeRay adds) is non-root, unprivileged, on a
  read-only root with writable scratch; only the autoscaler sidecar holds an API token.
- checkov (deploy/checkov_scan.py): 0 failed checks but the README's skip list, over every value set.
"""

from __future__ import annotations

import concurrent.futures
import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
import checkov_scan  # noqa: E402
from render import render  # noqa: E402
from test_docker import instructions  # noqa: E402
from test_helm import VALUE_SETS, values_for  # noqa: E402

# checkov_result (module-scoped) runs checkov, ~8 s: under `make unit -n 2` the module stays on one
# worker, or each worker that gets one of its two tests runs it.
pytestmark = pytest.mark.xdist_group("checkov")

NAMESPACE = "serving"
SERVE_PORT = 8000
# Ports a Ray pod listens on (GCS, Ray Client, dashboard, metrics, dashboard agent, runtime env
# agent, object manager, node manager, a worker port) besides serve.
RAY_PORTS = [6379, 10001, 8265, 8080, 52365, 52367, 8076, 8077, 10002, 19999]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {key: render(values_for(key)) for key in VALUE_SETS}


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def rayservice(objects):
    (rs,) = of_kind(objects, "RayService")
    return rs


def pods(objects) -> list[dict[str, Any]]:
    return of_kind(checkov_scan.kuberay_objects(rayservice(objects)), "Pod")


# --- a NetworkPolicy evaluator (ingress), as the Kubernetes API documents the semantics ---------


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], source: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        return source.get("external", False)
    if source.get("external"):
        return False
    ns_ok = selects(peer["namespaceSelector"], source["ns_labels"]) if "namespaceSelector" in peer else source["namespace"] == NAMESPACE
    pod_ok = selects(peer["podSelector"], source["labels"]) if "podSelector" in peer else True
    return ns_ok and pod_ok


def port_matches(rule_port: dict[str, Any], pod: dict[str, Any], port: int) -> bool:
    wanted = rule_port.get("port")
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if wanted is None:
        return True
    if isinstance(wanted, int):
        return wanted == port
    named = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if "name" in p}
    return named.get(wanted) == port


def reachable(policies: list[dict[str, Any]], pod: dict[str, Any], port: int, source: dict[str, Any]) -> bool:
    """May `source` open a TCP connection to `pod`:`port`?"""
    labels = pod["metadata"]["labels"]
    selecting = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], labels)]
    if not selecting:
        return True  # a pod no policy selects accepts everything
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            ports_ok = not rule.get("ports") or any(port_matches(rp, pod, port) for rp in rule["ports"])
            from_ok = not rule.get("from") or any(peer_matches(peer, source) for peer in rule["from"])
            if ports_ok and from_ok:
                return True
    return False


def source(namespace: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"namespace": namespace, "ns_labels": {"kubernetes.io/metadata.name": namespace}, "labels": labels or {}}


ATTACKERS = {
    "pod in another namespace": source("team-x", {"app": "notebook"}),
    "other pod in the release's namespace": source(NAMESPACE, {"app": "debug"}),
    "pod named like the release elsewhere": source("team-x", {"app.kubernetes.io/name": "serving", "app.kubernetes.io/instance": "serving"}),
    "outside the cluster": {"external": True},
}
OPERATOR = source("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
PROMETHEUS = source("monitoring", {"app.kubernetes.io/name": "prometheus"})


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_only_the_serve_port_is_reachable_from_outside_the_release(rendered, key):
    policies = of_kind(rendered[key], "NetworkPolicy")
    assert policies, "the chart must render NetworkPolicies by default"
    for pod in pods(rendered[key]):
        for who, attacker in ATTACKERS.items():
            assert reachable(policies, pod, SERVE_PORT, attacker), (pod["metadata"]["name"], who)  # serveFrom: [] = anyone
            for port in RAY_PORTS:
                assert not reachable(policies, pod, port, attacker), f"{who} reaches {pod['metadata']['name']}:{port}"


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_ray_pods_reach_each_other_and_the_operator_only_the_dashboard(rendered, key):
    policies = of_kind(rendered[key], "NetworkPolicy")
    ray_pods = pods(rendered[key])
    head = next(p for p in ray_pods if p["metadata"]["labels"]["ray.io/node-type"] == "head")
    for peer in ray_pods:
        me = source(NAMESPACE, peer["metadata"]["labels"])
        for target in ray_pods:
            for port in RAY_PORTS + [SERVE_PORT]:
                assert reachable(policies, target, port, me), (peer["metadata"]["name"], target["metadata"]["name"], port)
    assert reachable(policies, head, 8265, OPERATOR)
    for port in [p for p in RAY_PORTS if p != 8265]:
        assert not reachable(policies, head, port, OPERATOR), port
    for worker in [p for p in ray_pods if p is not head]:
        assert not reachable(policies, worker, 8265, OPERATOR)
    # Prometheus scrapes Ray's metrics port and nothing else of Ray's
    assert reachable(policies, head, 8080, PROMETHEUS)
    assert not reachable(policies, head, 6379, PROMETHEUS)


def test_every_port_the_services_publish_is_closed_but_serve(rendered):
    objects = rendered["all-features"]
    policies = of_kind(objects, "NetworkPolicy")
    ray_pods = pods(objects)
    (head_svc,) = of_kind(checkov_scan.kuberay_objects(rayservice(objects)), "Service")
    head = next(p for p in ray_pods if selects({"matchLabels": head_svc["spec"]["selector"]}, p["metadata"]["labels"]))
    published = {p["name"]: p["port"] for p in head_svc["spec"]["ports"]}
    # GCS and Ray Client are not published; the dashboard is (KubeRay finds it there) but closed
    assert set(published) == {"dashboard", "metrics", "serve"}
    attacker = ATTACKERS["pod in another namespace"]
    assert [n for n, port in published.items() if reachable(policies, head, port, attacker)] == ["serve"]
    serve_svc = rayservice(objects)["spec"]["serveService"]
    assert [p["targetPort"] for p in serve_svc["spec"]["ports"]] == [SERVE_PORT]
    ingress = of_kind(objects, "Ingress")[0]
    assert {p["backend"]["service"]["port"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]} == {"serve"}


def test_the_evaluator_sees_an_open_cluster(rendered):
    """Without the chart's policies the same attacks succeed (the evaluator can say yes)."""
    objects = render({"networkPolicy": {"enabled": False}})
    assert not of_kind(objects, "NetworkPolicy")
    head = pods(objects)[0]
    assert reachable([], head, 6379, ATTACKERS["pod in another namespace"])
    # and a policy that forgets the port restriction is caught
    loose = copy.deepcopy(of_kind(rendered["default"], "NetworkPolicy"))
    for p in loose:
        for rule in p["spec"]["ingress"]:
            rule.pop("ports", None)
    assert reachable(loose, head, 6379, ATTACKERS["pod in another namespace"])


def test_network_policy_peers_follow_the_values():
    # Helm merges maps: the default operator label is dropped with null, as values.yaml says
    values = {"networkPolicy": {"operator": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-ops"}},
                                             "podSelector": {"matchLabels": {"app": "op", "app.kubernetes.io/name": None}}},
                                "serveFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}],
                                "metricsFrom": []}}
    objects = render(values)
    policies = of_kind(objects, "NetworkPolicy")
    head = pods(objects)[0]
    assert reachable(policies, head, 8265, source("ray-ops", {"app": "op"}))
    assert not reachable(policies, head, 8265, OPERATOR)
    assert reachable(policies, head, SERVE_PORT, source("ingress"))
    assert not reachable(policies, head, SERVE_PORT, ATTACKERS["pod in another namespace"])
    assert not reachable(policies, head, 8080, PROMETHEUS)


# --- the dashboard bind and Ray token auth -----------------------------------------------


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_dashboard_listens_on_the_pod_address_only(rendered, key):
    cluster = rayservice(rendered[key])["spec"]["rayClusterConfig"]
    host = cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"]
    assert host == "$RAY_POD_IP"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    assert env["RAY_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # KubeRay runs rayStartParams through bash -c: the variable is expanded there
    (pod,) = [p for p in pods(rendered[key]) if p["metadata"]["labels"]["ray.io/node-type"] == "head"]
    assert pod["spec"]["containers"][0]["command"][:2] == ["/bin/bash", "-c"]
    assert "--dashboard-host=$RAY_POD_IP" in pod["spec"]["containers"][0]["args"][0]


def test_only_a_value_opens_the_dashboard():
    opened = render({"head": {"rayStartParams": {"dashboard-host": "0.0.0.0"}}})
    assert rayservice(opened)["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_ray_token_auth_is_on(rendered, key):
    cluster = rayservice(rendered[key])["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    for pod in pods(rendered[key]):
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            if container["name"] == "provision-models":
                continue  # no Ray client: it only fetches weights
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", (pod["metadata"]["name"], container["name"])
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_ray_token_from_an_existing_secret_or_off():
    cluster = rayservice(render({"rayAuth": {"existingSecret": "ray-token"}}))["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    off = rayservice(render({"rayAuth": {"mode": "disabled", "existingSecret": "ray-token"}}))["spec"]["rayClusterConfig"]
    assert off["authOptions"] == {"mode": "disabled"}
    assert not [e for p in checkov_scan.kuberay_objects(rayservice(render({"rayAuth": {"mode": "disabled"}})))
                if p["kind"] == "Pod" for c in p["spec"]["containers"] for e in c["env"] if e["name"].startswith("RAY_AUTH")]


# --- containers: non-root, unprivileged, read-only root; API token only for the autoscaler --------


def effective(pod: dict[str, Any], container: dict[str, Any], field: str) -> Any:
    own = container.get("securityContext") or {}
    return own[field] if field in own else (pod["spec"].get("securityContext") or {}).get(field)


def all_containers(pod):
    return pod["spec"]["containers"] + pod["spec"].get("initContainers", [])


@pytest.mark.parametrize("key", list(VALUE_SETS) + ["no-autoscaler"])
def test_every_container_is_non_root_unprivileged_and_read_only(rendered, key):
    objects = render({"autoscaler": {"enabled": False}}) if key == "no-autoscaler" else rendered[key]
    names = set()
    for pod in pods(objects):
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert effective(pod, {}, "seccompProfile") == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for container in all_containers(pod):
            names.add(container["name"])
            where = f"{pod['metadata']['name']}/{container['name']}"
            assert effective(pod, container, "runAsNonRoot") is True, where
            assert effective(pod, container, "runAsUser") not in (None, 0), where
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc.get("privileged") and not sc.get("capabilities", {}).get("add"), where
            assert sc["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], where  # writable scratch, and HOME:
            assert {"name": "HOME", "value": "/tmp"} in container.get("env", []), where
            if container["name"] != "provision-models":
                assert "emptyDir" in volumes[mounts["/tmp/ray"]], where
            token_mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].startswith("/var/run/secrets/kubernetes.io")]
            if container["name"] == "autoscaler":
                # it creates and deletes worker pods: the one container with an API token
                assert [m["name"] for m in token_mounts] == ["sa-token"]
                assert "serviceAccountToken" in volumes["sa-token"]["projected"]["sources"][0]
            else:
                assert not token_mounts, where
        if pod["metadata"]["labels"]["ray.io/node-type"] == "worker" or key == "no-autoscaler":
            assert "sa-token" not in volumes
    assert ("autoscaler" in names) == (key != "no-autoscaler")
    assert {"ray-head", "ray-worker", "wait-gcs-ready", "provision-models"} <= names


def test_read_only_root_can_be_turned_off():
    objects = render({"containerSecurityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                                                   "capabilities": {"drop": ["ALL"]}}})
    for pod in pods(objects):
        for container in all_containers(pod):
            assert container["securityContext"]["readOnlyRootFilesystem"] is False
            assert "HOME" not in {e["name"] for e in container.get("env", [])}


def test_pod_user_is_the_images_user():
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "serving" / "values.yaml").read_text())
    sc = values["podSecurityContext"]
    for variant in ("cpu", "gpu"):
        users = [rest for word, rest in instructions(ROOT / "deploy" / "docker" / f"Dockerfile.{variant}") if word == "USER"]
        assert users[-1] == f"{sc['runAsUser']}:{sc['runAsGroup']}", f"Dockerfile.{variant} runs as {users[-1]}"
        assert sc["fsGroup"] == sc["runAsGroup"]


# --- checkov --------------------------------------------------------------------------------


_AHEAD: list[concurrent.futures.Future] = []  # the scan launch_ahead started


def scan_chart() -> dict:
    """deploy/checkov_scan.py over the chart's value sets and k8s/ (a checkov process, ~8 s of CPU)."""
    executable = checkov_scan.checkov_executable()
    assert executable, "checkov is needed: `make checkov` (its own venv, .venv-checkov/) or set CHECKOV"
    return checkov_scan.run_checkov(checkov_scan.value_sets(), executable)


def launch_ahead(tmp_path_factory, wanted: set[str]) -> None:
    """Called by tests/conftest.py (launch_early) at the run's first test: the scan is a subprocess,
    so it runs while the tests before it do (`make unit`: this module's worker runs it itself)."""
    if "checkov_result" in wanted and not _AHEAD and not os.environ.get("PYTEST_XDIST_WORKER"):
        _AHEAD.append(concurrent.futures.ThreadPoolExecutor(1, "checkov").submit(scan_chart))


@pytest.fixture(scope="module")
def checkov_result() -> dict:
    return _AHEAD.pop().result() if _AHEAD else scan_chart()


def test_skip_list_is_short_and_explained():
    skips = checkov_scan.skip_list()
    assert 0 < len(skips) <= 8
    assert all(len(reason) > 30 for reason in skips.values()), skips


def test_checkov_finds_nothing_but_the_skip_list(checkov_result):
    skips = checkov_scan.skip_list()
    verdict = checkov_scan.judge(checkov_result, skips)
    problems = {k: [f"{f['id']} {f['resource']}: {f['name']}" for f in v] for k, v in verdict["unexpected"].items() if v}
    assert not problems, problems
    assert not verdict["stale_skips"], f"skipped checks no set fails any more, remove them: {verdict['stale_skips']}"
    # checkov did check the Ray pods (not only ConfigMaps), and fails an insecure one
    for key, result in checkov_result["sets"].items():
        if key != "canary":
            checked = {(f["id"], f["resource"].split(".")[0]) for f in result["passed"]}
            assert {("CKV_K8S_20", "Pod"), ("CKV_K8S_22", "Pod"), ("CKV_K8S_38", "Pod"), ("CKV2_K8S_6", "Pod")} <= checked, key
    assert {"CKV_K8S_16", "CKV_K8S_20"} <= set(verdict["canary_failed"])
    assert checkov_result["seconds"] < 60


def test_committed_checkov_summary_is_current(checkov_result):
    text = checkov_scan.RESULT.read_text()
    assert text.startswith(f"# {checkov_scan.COMMAND}\n")
    expected = checkov_scan.summary(checkov_result, checkov_scan.skip_list(), checkov_scan.judge(checkov_result, checkov_scan.skip_list()))
    strip = lambda t: re.sub(r"^# [\d.]+ s;", "# s;", t, flags=re.M)  # noqa: E731 (the run time varies)
    assert strip(text) == strip(expected), f"run `{checkov_scan.COMMAND}`"
