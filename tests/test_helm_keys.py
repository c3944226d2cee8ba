"""The chart's keys Secret: rendered, mounted as a directory, and router.keys_file pointing at it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from serving.config import parse_config
from serving.tenants.keys import key_digest, parse_keys_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))
from render import render  # noqa: E402

KEYS_FILE = yaml.safe_dump({"keys": [{"name": "team-a", "sha256": key_digest("sk-a"), "models": ["smollm2"], "rpm": 30}]})


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def rayservice(objects):
    (rs,) = of_kind(objects, "RayService")
    return rs


def templates(rs):
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def app_args(objects):
    router_app = yaml.safe_load(rayservice(objects)["spec"]["serveConfigV2"])["applications"][0]
    return router_app["deployments"][0]["user_config"]["config"]  # the models config the routers serve


def configmap_config(objects):
    (cm,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config")]
    return yaml.safe_load(cm["data"]["models.yaml"])


def test_no_keys_by_default():
    objects = render()
    assert not of_kind(objects, "Secret")
    assert "keys_file" not in app_args(objects).get("router", {})
    for t in templates(rayservice(objects)):
        assert all(v["name"] != "api-keys" for v in t["spec"]["volumes"])


def test_inline_keys_file_becomes_a_mounted_secret():
    objects = render({"keys": {"file": KEYS_FILE}})
    (secret,) = of_kind(objects, "Secret")
    assert secret["metadata"]["name"] == "serving-keys" and secret["type"] == "Opaque"
    assert parse_keys_file(secret["stringData"]["keys.yaml"]).keys[0].name == "team-a"
    kubernetes_validate.validate(secret, "1.32", strict=True)
    for t in templates(rayservice(objects)):
        (volume,) = [v for v in t["spec"]["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"] == {"secretName": "serving-keys", "items": [{"key": "keys.yaml", "path": "keys.yaml"}]}
        (mount,) = [m for m in t["spec"]["containers"][0]["volumeMounts"] if m["name"] == "api-keys"]
        assert mount == {"name": "api-keys", "mountPath": "/etc/serving-keys", "readOnly": True}  # no subPath: updates arrive
    args = app_args(objects)
    assert args["router"]["keys_file"] == "/etc/serving-keys/keys.yaml"
    assert configmap_config(objects) == args  # the ConfigMap ships the same config
    parse_config(args)  # still a valid models config


def test_an_existing_secret_is_mounted_with_its_key():
    objects = render({"keys": {"existingSecret": "team-keys", "key": "tenants"},
                      "serving": {"router": {"port": 8000, "replicas": 2}}})
    assert not of_kind(objects, "Secret")
    for t in templates(rayservice(objects)):
        (volume,) = [v for v in t["spec"]["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"] == {"secretName": "team-keys", "items": [{"key": "tenants", "path": "keys.yaml"}]}
    router = app_args(objects)["router"]
    assert router == {"port": 8000, "replicas": 2, "keys_file": "/etc/serving-keys/keys.yaml"}


def test_both_sources_are_refused():
    with pytest.raises(helm_python.HelmError, match="keys.existingSecret or keys.file, not both"):
        render({"keys": {"existingSecret": "x", "file": KEYS_FILE}})


def test_router_knobs_pass_the_values_schema():
    objects = render({"serving": {"router": {"keys_file": "/data/keys.yaml", "limits_fail_open": False,
                                             "request_log_file": "/tmp/requests.jsonl"}}})
    router = app_args(objects)["router"]
    assert router["keys_file"] == "/data/keys.yaml" and router["limits_fail_open"] is False
    with pytest.raises(helm_python.HelmError):
        render({"keys": {"fiel": KEYS_FILE}})


def test_dashboard_has_per_key_panels():
    (cm,) = [o for o in of_kind(render(), "ConfigMap") if o["metadata"]["name"].endswith("-grafana-dashboard")]
    dashboard = json.loads(cm["data"]["serving.json"])
    key_var = [v for v in dashboard["templating"]["list"] if v["name"] == "key"]
    assert key_var and key_var[0]["definition"] == "label_values(serving_key_requests_total, key)"
    repeated = [p for p in dashboard["panels"] if p.get("repeat") == "key"]
    assert len(repeated) == 1
    exprs = "\n".join(t["expr"] for t in repeated[0]["targets"])
    for metric in ("serving_key_requests_total", "serving_key_tokens_total", "serving_key_estimated_cost_total"):
        assert f'{metric}{{key="$key"' in exprs
    by_key = "\n".join(t["expr"] for p in dashboard["panels"] for t in p["targets"] if "by (key" in t["expr"])
    for metric in ("serving_key_requests_total", "serving_key_tokens_total", "serving_key_estimated_cost_total"):
        assert metric in by_key
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
