"""k8s/ (plain kustomize manifests) equals the chart rendered with default values."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
import render  # noqa: E402


def key(obj: dict) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def test_kustomize_build_equals_the_default_helm_render():
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (client only) is needed to build k8s/ with kustomize"
    built = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    from_kustomize = {key(o): o for o in yaml.safe_load_all(built.stdout) if o}
    from_helm = {key(o): o for o in render.render()}
    assert sorted(from_kustomize) == sorted(from_helm), "k8s/ lists other objects than the chart; run `python deploy/render.py`"
    for k, obj in from_helm.items():
        assert from_kustomize[k] == obj, f"{k} differs from the chart's default render; run `python deploy/render.py`"


def test_k8s_files_are_exactly_what_render_writes():
    wanted = render.k8s_files(render.render())
    present = {p.name: p.read_text() for p in (ROOT / "k8s").iterdir() if p.is_file()}
    assert present == wanted, "k8s/ is stale or has stray files; run `python deploy/render.py`"
    assert render.main(["--check"]) == 0


def test_k8s_core_objects_validate():
    for path in sorted((ROOT / "k8s").glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        if obj.get("apiVersion", "").startswith("v1") and obj["kind"] != "Kustomization":
            kubernetes_validate.validate(obj, "1.32", strict=True)
