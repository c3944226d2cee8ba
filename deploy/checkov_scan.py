"""Scan the chart with checkov: every value set of tests/test_helm.py, rendered, and k8s/.

    python deploy/checkov_scan.py            # print the summary (exit 1 on a failed check not skipped)
    python deploy/checkov_scan.py --write    # also write bench/results/security/checkov.txt

checkov knows Pods, not KubeRay's RayService, so next to each render go the objects KubeRay makes
from it (kuberay_objects: the head and worker Pods with the containers KubeRay adds, the head
Service); without them checkov would only see ConfigMaps and NetworkPolicies. checkov runs once,
without skips, over all sets; the skip list is the table in deploy/helm/serving/README.md
("checkov"), applied here, and every skipped check must really fail (else the skip is stale).

checkov conflicts with Ray's pins (it pins packaging<24; ray needs >=24.2), so it lives in its own
venv: `make checkov` (.venv-checkov/), or set CHECKOV to a checkov executable.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SKIP_TABLE = ROOT / "deploy" / "helm" / "serving" / "README.md"
RESULT = ROOT / "bench" / "results" / "security" / "checkov.txt"
COMMAND = "python deploy/checkov_scan.py --write"
# A deliberately insecure Pod scanned in the same run: checkov must fail it (a green scan is not
# a scan that checked nothing).
CANARY = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "canary", "namespace": "canary"},
    "spec": {"containers": [{"name": "c", "image": "busybox:1", "securityContext": {"privileged": True}}]},
}


def checkov_executable() -> str | None:
    for candidate in (os.environ.get("CHECKOV"), str(ROOT / ".venv-checkov" / "bin" / "checkov"), shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def skip_list() -> dict[str, str]:
    """check id -> reason, from the README's table (the one place the skips are written)."""
    rows = re.findall(r"^\|\s*`?(CKV2?_K8S_\d+)`?\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*$", SKIP_TABLE.read_text(), re.M)
    return {check: reason for check, _title, reason in rows}


# --- what KubeRay (v1.7.0, ray-operator/controllers/ray/common/pod.go, service.go) makes --------


def _auth_env(cluster: dict[str, Any], cluster_name: str) -> list[dict[str, Any]]:
    auth = cluster.get("authOptions") or {}
    if auth.get("mode", "disabled") != "token":
        return []
    secret = auth.get("secretName") or cluster_name
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}}]


def _add_env(container: dict[str, Any], env: list[dict[str, Any]]) -> None:
    present = {e["name"] for e in container.get("env", [])}
    container.setdefault("env", []).extend(e for e in env if e["name"] not in present)


def kuberay_objects(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    """The head and worker Pods and the head Service KubeRay creates for this RayService."""
    name = rayservice["metadata"]["name"]
    namespace = rayservice["metadata"].get("namespace", "default")
    cluster = rayservice["spec"]["rayClusterConfig"]
    cluster_name = f"{name}-abcde"
    auth_env = _auth_env(cluster, cluster_name)
    objects = []
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for group, spec in groups:
        template = copy.deepcopy(spec["template"])
        pod_spec = template["spec"]
        ray = pod_spec["containers"][0]
        head = group == "head"
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/cluster": cluster_name,
                  "ray.io/node-type": "head" if head else "worker", "ray.io/group": "headgroup" if head else group}
        _add_env(ray, auth_env)
        if head and cluster.get("enableInTreeAutoscaling"):
            options = cluster.get("autoscalerOptions", {})
            pod_spec["serviceAccountName"] = cluster_name
            autoscaler = {
                "name": "autoscaler", "image": options.get("image", ray["image"]),
                "imagePullPolicy": options.get("imagePullPolicy", "IfNotPresent"),
                "command": ["/bin/bash", "-c", "--"], "args": ["ray kuberay-autoscaler --cluster-name ..."],
                "env": [{"name": "RAY_CLUSTER_NAME", "value": cluster_name}] + options.get("env", []),
                "resources": options.get("resources") or {"limits": {"cpu": "500m", "memory": "512Mi"},
                                                          "requests": {"cpu": "500m", "memory": "512Mi"}},
                "volumeMounts": list(options.get("volumeMounts", [])),
            }
            if "securityContext" in options:
                autoscaler["securityContext"] = options["securityContext"]
            _add_env(autoscaler, auth_env)
            pod_spec["containers"].append(autoscaler)
        # /tmp/ray: the volume named ray-logs (KubeRay's name), mounted where missing.
        if head and cluster.get("enableInTreeAutoscaling"):
            if not any(v["name"] == "ray-logs" for v in pod_spec.get("volumes", [])):
                pod_spec.setdefault("volumes", []).append({"name": "ray-logs", "emptyDir": {}})
            for container in pod_spec["containers"]:
                if not any(m["mountPath"] == "/tmp/ray" for m in container.get("volumeMounts", [])):
                    container.setdefault("volumeMounts", []).append({"name": "ray-logs", "mountPath": "/tmp/ray"})
        if not head:  # ENABLE_INIT_CONTAINER_INJECTION (on by default)
            pod_spec.setdefault("initContainers", []).append({
                "name": "wait-gcs-ready", "image": ray["image"], "imagePullPolicy": ray.get("imagePullPolicy"),
                "command": ["/bin/bash", "-c", "--"], "args": ["ray health-check --address ..."],
                "env": copy.deepcopy(ray.get("env", [])), "volumeMounts": copy.deepcopy(ray.get("volumeMounts", [])),
                "resources": {"limits": {"cpu": "200m", "memory": "256Mi"}, "requests": {"cpu": "200m", "memory": "256Mi"}},
                **({"securityContext": copy.deepcopy(ray["securityContext"])} if "securityContext" in ray else {}),
            })
        # Ray >= 2.53: KubeRay adds the probes a template leaves out, on the dashboard agent's port.
        probe = {"httpGet": {"path": "/api/healthz", "port": 52365}, "initialDelaySeconds": 10, "periodSeconds": 5}
        ray.setdefault("livenessProbe", probe)
        ray.setdefault("readinessProbe", probe)
        ray["command"] = ["/bin/bash", "-c", "--"]
        params = " ".join(f"--{k}={v}" for k, v in sorted(spec.get("rayStartParams", {}).items()))
        ray["args"] = [f"ulimit -n 65536; ray start {'--head ' if head else ''}{params} --block"]
        objects.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": f"{cluster_name}-{'head' if head else group + '-worker'}-x",
                                     "namespace": namespace, "labels": labels,
                                     **({"annotations": template["metadata"]["annotations"]}
                                        if template.get("metadata", {}).get("annotations") else {})},
                        "spec": pod_spec})
    head_ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0].get("ports", [])}
    head_ports.setdefault("metrics", 8080)  # getServicePorts adds it when missing
    objects.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": f"{name}-head-svc", "namespace": namespace},
                    "spec": {"clusterIP": "None", "selector": {"ray.io/cluster": cluster_name, "ray.io/node-type": "head"},
                             "ports": [{"name": n, "port": p} for n, p in sorted(head_ports.items())]}})
    return objects


def with_kuberay_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return objects + [o for rs in objects if rs["kind"] == "RayService" for o in kuberay_objects(rs)]


# --- the scan -----------------------------------------------------------------------------


def value_sets() -> dict[str, list[dict[str, Any]]]:
    """Objects to scan, per set: tests/test_helm.py's VALUE_SETS rendered, and k8s/ as committed."""
    for path in (ROOT, ROOT / "deploy", ROOT / "tests"):  # this checkout's serving, render and tests
        sys.path.insert(0, str(path))
    from render import render
    from test_helm import VALUE_SETS, values_for

    sets = {f"render:{key}": render(values_for(key)) for key in VALUE_SETS}
    sets["k8s/"] = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "k8s").glob("*.yaml")) if p.name != "kustomization.yaml"]
    return sets


def run_checkov(sets: dict[str, list[dict[str, Any]]], executable: str) -> dict[str, Any]:
    """One checkov run over every set (plus the canary); results grouped by set."""
    with tempfile.TemporaryDirectory(prefix="checkov-") as tmp:
        dirs = {}
        for i, (key, objects) in enumerate({**sets, "canary": [CANARY]}.items()):
            d = Path(tmp) / f"set{i}"
            d.mkdir()
            all_objects = objects if key == "canary" else with_kuberay_objects(objects)
            (d / "objects.yaml").write_text(yaml.safe_dump_all(all_objects, sort_keys=False))
            dirs[f"/set{i}/"] = key
        argv = [executable, "-d", tmp, "--framework", "kubernetes", "--skip-download", "-o", "json"]
        started = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
        seconds = time.monotonic() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"checkov exited {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    by_set: dict[str, dict[str, list[dict[str, Any]]]] = {key: {"passed": [], "failed": []} for key in dirs.values()}
    for r in reports:
        for outcome in ("passed", "failed"):
            for check in r.get("results", {}).get(f"{outcome}_checks", []):
                key = next(k for d, k in dirs.items() if check["file_path"].startswith(d))
                by_set[key][outcome].append({"id": check["check_id"], "name": check["check_name"], "resource": check["resource"]})
    argv_shown = " ".join(a if a != tmp else "<dir with one objects.yaml per set>" for a in argv[1:])
    return {"sets": by_set, "seconds": seconds, "argv": f"checkov {argv_shown}", "version": _version(executable)}


def _version(executable: str) -> str:
    return subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()


def judge(result: dict[str, Any], skips: dict[str, str]) -> dict[str, Any]:
    """Per set: failures not on the skip list; and skips no set fails (stale)."""
    unexpected = {k: [f for f in v["failed"] if f["id"] not in skips] for k, v in result["sets"].items() if k != "canary"}
    failing_ids = {f["id"] for k, v in result["sets"].items() if k != "canary" for f in v["failed"]}
    return {"unexpected": unexpected, "stale_skips": sorted(set(skips) - failing_ids),
            "canary_failed": sorted({f["id"] for f in result["sets"]["canary"]["failed"]})}


def summary(result: dict[str, Any], skips: dict[str, str], verdict: dict[str, Any]) -> str:
    lines = [f"# {COMMAND}", f"# checkov {result['version']}, one run: {result['argv']}",
             f"# {result['seconds']:.1f} s; each set = the rendered objects + the Pods and head Service KubeRay makes from the RayService", ""]
    for key, r in result["sets"].items():
        if key == "canary":
            continue
        skipped = [f for f in r["failed"] if f["id"] in skips]
        lines.append(f"{key}: passed {len(r['passed'])}, failed {len(verdict['unexpected'][key])}, "
                     f"skipped {len(skipped)} ({', '.join(sorted({f['id'] for f in skipped})) or '-'})")
        for f in verdict["unexpected"][key]:
            lines.append(f"  FAILED {f['id']} {f['resource']}: {f['name']}")
    lines += ["", f"canary (a privileged Pod, must fail): {len(result['sets']['canary']['failed'])} failed checks", "",
              "skipped (deploy/helm/serving/README.md, section checkov):"]
    lines += [f"  {check}: {reason}" for check, reason in sorted(skips.items())]
    if verdict["stale_skips"]:
        lines.append(f"STALE skips (no set fails them): {', '.join(verdict['stale_skips'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    executable = checkov_executable()
    if not executable:
        print("checkov not found: run `make checkov` (its own venv, .venv-checkov/) or set CHECKOV", file=sys.stderr)
        return 2
    skips = skip_list()
    result = run_checkov(value_sets(), executable)
    verdict = judge(result, skips)
    text = summary(result, skips, verdict)
    print(text, end="")
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)
    bad = any(verdict["unexpected"].values()) or verdict["stale_skips"] or not verdict["canary_failed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
