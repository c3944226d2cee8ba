"""The Helm chart (deploy/helm/serving), rendered offline by Helm's own engine (helm-python-sdk).

Every rendered core object is validated against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields fail), the RayService against KubeRay's ray.io/v1 fields and types
(tests/schemas), its pod templates and serve Service against core/v1. The serveConfigV2 must
be a Ray Serve config for `serving.app:build_app` whose args pass `serving check`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from serving.config import ConfigError, load_config, parse_config
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "serving"
GPU_VALUES = CHART / "values-gpu-example.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBE_VERSION = "1.32"

sys.path.insert(0, str(ROOT / "deploy"))
from render import render  # noqa: E402

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)


def gpu_values() -> dict[str, Any]:
    return yaml.safe_load(GPU_VALUES.read_text())


ALL_FEATURES = {
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.internal"]}]},
    "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}, "serviceMonitor": {"enabled": True}},
    "apiKeys": {"existingSecret": "serving-api-keys", "key": "api-keys"},
    "huggingface": {"allowDownload": True, "token": {"existingSecret": "hf-token", "key": "token"}},
    "modelCache": {"existingClaim": "model-cache"},
    "imagePullSecrets": [{"name": "regcred"}],
    "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "INFO"}],
    "head": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "a", "operator": "Exists", "effect": "NoSchedule"}]},
}

VALUE_SETS = {"default": None, "gpu": "gpu", "all-features": ALL_FEATURES}


def values_for(key: str) -> dict[str, Any] | None:
    v = VALUE_SETS[key]
    return gpu_values() if v == "gpu" else copy.deepcopy(v)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {key: render(values_for(key)) for key in VALUE_SETS}


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind}*{name_suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])


def served(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole models config the chart serves: the routers' user_config (their catalog)."""
    router_app = serve_config(objects)["applications"][0]
    return router_app["deployments"][0]["user_config"]["config"]


def pod_templates(rayservice: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    return out


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def kube_validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{obj['kind']}/{obj.get('metadata', {}).get('name')} at {'.'.join(map(str, error.path))}: {error.message}")


# --- rendering and schema validation -------------------------------------------------------


def test_helm_lint_is_clean_for_default_and_gpu_values():
    for values in (None, gpu_values()):
        report = helm_python.lint(CHART, values, strict=True, kube_version="v1.32.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_every_rendered_object_validates(rendered, key):
    objects = rendered[key]
    kinds = {o["kind"] for o in objects}
    assert {"RayService", "ConfigMap"} <= kinds
    rayservice_schema = json.loads((SCHEMAS / "rayservice-ray.io-v1.schema.json").read_text())
    monitoring_schema = json.loads((SCHEMAS / "monitoring.coreos.com-v1.schema.json").read_text())
    for obj in objects:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if obj["kind"] == "RayService":
            errors = sorted(jsonschema.Draft7Validator(rayservice_schema).iter_errors(obj), key=str)
            assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
            for group_name, template in pod_templates(obj):
                kube_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group_name}, "template": template})
            kube_validate({"apiVersion": "v1", "kind": "Service", **obj["spec"]["serveService"]})
        elif group == "monitoring.coreos.com":
            errors = list(jsonschema.Draft7Validator(monitoring_schema).iter_errors(obj))
            assert not errors, [e.message for e in errors]
        else:
            kube_validate(obj)
        assert obj["metadata"]["namespace"] == "serving"
    if key == "all-features":
        assert {"Ingress", "PodMonitor", "ServiceMonitor"} <= kinds


def test_validation_catches_broken_objects(rendered):
    """The validators above do reject wrong objects (so a green run means something)."""
    rayservice = copy.deepcopy(one(rendered["default"], "RayService"))
    rayservice_schema = json.loads((SCHEMAS / "rayservice-ray.io-v1.schema.json").read_text())
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1  # typo
    assert list(jsonschema.Draft7Validator(rayservice_schema).iter_errors(rayservice))
    template = copy.deepcopy(pod_templates(one(rendered["default"], "RayService"))[1][1])
    template["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}, KUBE_VERSION, strict=True)


# --- serveConfigV2 -------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_serve_config_is_one_application_per_model_and_one_for_the_routers(rendered, key):
    """The chart renders exactly serving.app.serve_config of the config it serves (one source), each
    application's args valid for its builder; the models config is the routers' user_config."""
    from serving.app import serve_config as python_serve_config

    config = serve_config(rendered[key])
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["proxy_location"] == "EveryNode"
    router_app, *engine_apps = config["applications"]
    assert (router_app["name"], router_app["import_path"], router_app["route_prefix"]) == (
        "serving", "serving.app:build_router_app", "/")
    whole = served(rendered[key])
    parse_config(whole, "the router's user_config")
    assert router_app["args"] == {"router": whole.get("router") or {}}
    assert [a["name"] for a in engine_apps] == [f"serving.{m['name']}" for m in whole["models"]]
    assert all(a["route_prefix"] is None and a["import_path"] == "serving.app:build_engine_app" for a in engine_apps)
    for app in engine_apps:  # each a valid one-model config
        assert len(parse_config(app["args"], app["name"]).models) == 1
    assert config["applications"] == python_serve_config(whole)["applications"]
    configmap = one(rendered[key], "ConfigMap", "-config")
    assert yaml.safe_load(configmap["data"]["models.yaml"]) == whole


def _app_args(values: dict) -> dict[str, Any]:
    return {a["name"]: a.get("args") for a in serve_config(render(values))["applications"]}


def test_an_upgrade_changes_the_args_of_only_the_applications_it_must_roll():
    """Ray Serve versions an application by its args: a rename, alias, tag or price change leaves every
    application's args (only the routers' user_config changes, applied in place); an engine
    argument changes only its own model's application."""
    base = {"serving": copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["serving"])}
    before = _app_args(base)
    renamed = copy.deepcopy(base)
    first, second = renamed["serving"]["models"][:2]
    first["aliases"], second["aliases"] = first["aliases"][1:], second.get("aliases", []) + first["aliases"][:1]
    first["tags"], first["price"] = ["moved"], {"input_per_million": 9.0, "output_per_million": 9.0}
    assert _app_args(renamed) == before
    assert served(render(renamed)) != served(render(base))
    rolled = copy.deepcopy(base)
    rolled["serving"]["models"][1]["engine_args"] = {"max_model_len": 128}
    after = _app_args(rolled)
    assert [name for name in before if before[name] != after[name]] == [f"serving.{second['name']}"]


def test_import_paths_resolve_to_the_application_builders(rendered):
    for app in serve_config(rendered["default"])["applications"]:
        module_name, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module_name), attr)
        assert callable(builder) and builder.__module__ == "serving.app"
        assert list(inspect.signature(builder).parameters) == ["args"]
        assert builder(app["args"]) is not None  # each builds its application from its args


@pytest.mark.parametrize("key", ["default", "gpu"])
def test_serve_config_models_pass_serving_check(rendered, key, tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(served(rendered[key])))
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_values_serve_the_repository_models_yaml(rendered):
    args = served(rendered["default"])
    assert args == yaml.safe_load((ROOT / "models.yaml").read_text()), (
        "values.yaml `serving:` must equal models.yaml; update it (and run `python deploy/render.py` for k8s/)"
    )


def test_gpu_models_file_is_valid_and_sized():
    config = load_config(ROOT / "deploy" / "models.gpu.yaml")
    assert config.default_profile == "gpu"
    assert len(config.models) >= 5
    tasks = {m.task for m in config.models}
    assert {"chat", "embed"} <= tasks
    assert any(not m.replicas.fixed for m in config.models), "at least one model autoscales"
    for spec in config.models:
        engine = config.engine_spec(spec)
        assert spec.source.hub and spec.price is not None and spec.aliases
        parallel = engine.engine_args.get("tensor_parallel_size", 1) * engine.engine_args.get("pipeline_parallel_size", 1)
        assert engine.resources.gpus == parallel, f"{spec.name}: gpus {engine.resources.gpus} != TP x PP {parallel}"
    assert {4, 2} <= {config.engine_spec(m).engine_args.get("tensor_parallel_size", 1) for m in config.models}


def test_gpu_values_serve_the_gpu_models_file(rendered):
    served_config = parse_config(served(rendered["gpu"]))
    wanted = load_config(ROOT / "deploy" / "models.gpu.yaml")
    assert [m.name for m in served_config.models] == [m.name for m in wanted.models]
    assert served_config.models == wanted.models
    assert served_config.router == wanted.router
    assert [served_config.engine_spec(m) for m in served_config.models] == [wanted.engine_spec(m) for m in wanted.models]
    # the literal block in the values file is the models file
    assert gpu_values()["serving"] == yaml.safe_load((ROOT / "deploy" / "models.gpu.yaml").read_text())


def test_gpu_worker_groups_hold_every_model(rendered):
    rayservice = one(rendered["gpu"], "RayService")
    config = parse_config(served(rendered["gpu"]))
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod_gpus = {}
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod_gpus[g["groupName"]] = int(limits.get("nvidia.com/gpu", 0))
        if pod_gpus[g["groupName"]]:
            assert limits["nvidia.com/gpu"] == g["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
            assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"]["tolerations"])
    for spec in config.models:
        need = config.engine_spec(spec).resources.gpus
        assert any(gpus >= need for gpus in pod_gpus.values()), f"{spec.name} needs {need} GPUs per pod"
    # minimum GPU capacity covers every model's minimum replicas
    need_total = sum(config.engine_spec(m).resources.gpus * m.replicas.min for m in config.models)
    have_total = sum(pod_gpus[g["groupName"]] * g["minReplicas"] for g in groups)
    assert have_total >= need_total


# --- pods: readiness, termination, secrets, provisioning ------------------------------------


def drain_and_grace(template: dict[str, Any]) -> tuple[int, int]:
    drain = " ".join(ray_container(template)["lifecycle"]["preStop"]["exec"]["command"])
    return int(re.search(r'-lt (\d+)', drain).group(1)), template["spec"]["terminationGracePeriodSeconds"]


def longest_graceful_shutdown(config) -> float:
    return max([config.router.request_timeout_s] + [config.engine_spec(m).graceful_shutdown_timeout_s for m in config.models])


@pytest.mark.parametrize("graceful", [{}, {"router": {"request_timeout_s": 120}}, {"model": 900}])
def test_pod_drain_is_the_configs_graceful_shutdown(graceful):
    """One value: the chart drains pods for the longest graceful_shutdown_timeout_s the config resolves."""
    values = {"serving": copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["serving"])}
    values["serving"]["router"].update(graceful.get("router", {}))
    if "model" in graceful:
        values["serving"]["models"][1]["graceful_shutdown_timeout_s"] = graceful["model"]
    config = parse_config(values["serving"])
    wanted = {(): 600, ("router",): 120, ("model",): 900}[tuple(graceful)]
    assert longest_graceful_shutdown(config) == wanted
    margin = helm_python.Chart.load(CHART).merge_values(None)["terminationGraceMarginSeconds"]
    for _, template in pod_templates(one(render(values), "RayService")):
        assert drain_and_grace(template) == (wanted, wanted + margin)


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_readiness_and_graceful_termination(rendered, key):
    rayservice = one(rendered[key], "RayService")
    values = helm_python.Chart.load(CHART).merge_values(values_for(key))
    timeout = longest_graceful_shutdown(parse_config(values["serving"]))
    for group, template in pod_templates(rayservice):
        container = ray_container(template)
        if group == "head":
            # KubeRay deploys the app only once the head is ready: the head keeps KubeRay's probes.
            assert "readinessProbe" not in container
        else:
            probe = container["readinessProbe"]["httpGet"]
            assert probe == {"path": "/health", "port": "serve"}
            assert {"name": "serve", "containerPort": 8000} in container["ports"]
        seconds, grace = drain_and_grace(template)
        assert seconds == timeout, "pods must wait out a request that may still succeed"
        assert grace > seconds
        assert "/-/healthz" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"] == "dshm"
        shm = next(v for v in template["spec"]["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"


def test_api_keys_come_from_the_secret_reference(rendered):
    for _, template in pod_templates(one(rendered["default"], "RayService")):
        assert all(e["name"] != "SERVING_API_KEYS" for e in ray_container(template)["env"])
    for _, template in pod_templates(one(rendered["all-features"], "RayService")):
        env = {e["name"]: e for e in ray_container(template)["env"]}
        assert env["SERVING_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "serving-api-keys", "key": "api-keys"}
    values = copy.deepcopy(ALL_FEATURES)
    values["serving"] = {"router": {"api_keys_env": "MY_KEYS"}}
    for _, template in pod_templates(one(render(values), "RayService")):
        assert "MY_KEYS" in {e["name"] for e in ray_container(template)["env"]}


def _parse_with_the_cli(argv: list[str], monkeypatch) -> Any:
    """The arguments the real CLI parser makes of argv; the provisioning itself is stubbed out
    (test_provisioning_init_container_runs_for_real runs it)."""
    import serving.control.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "cmd_provision", lambda args: seen.setdefault("args", args) and 0)
    cli.main(argv)
    return seen["args"]


@pytest.mark.parametrize("key", list(VALUE_SETS))
def test_model_provisioning_command_parses_with_the_cli_and_matches_the_pod(rendered, key, monkeypatch):
    rayservice = one(rendered[key], "RayService")
    values = helm_python.Chart.load(CHART).merge_values(values_for(key))
    cache = values["modelCache"]["mountPath"]
    provisioned = 0
    for group, template in pod_templates(rayservice):
        container = ray_container(template)
        env = {e["name"]: e.get("value") for e in container["env"]}
        allow = values["huggingface"]["allowDownload"]
        assert env["SERVING_CACHE_DIR"] == cache and env["HF_HUB_OFFLINE"] == ("0" if allow else "1")
        assert (env.get("SERVING_ALLOW_DOWNLOAD") == "1") == allow  # engines provision models added later
        assert {"mountPath": cache, "name": "model-cache"} in container["volumeMounts"]
        inits = template["spec"].get("initContainers", [])
        if not inits:
            continue
        provisioned += 1
        (init,) = inits
        assert init["image"] == container["image"]
        assert init["command"][0] == "serving"
        args = _parse_with_the_cli(init["command"][1:], monkeypatch)
        assert args.command == "provision" and args.file == "/etc/serving/models.yaml"
        assert args.allow_download == values["huggingface"]["allowDownload"]
        init_env = {e["name"]: e for e in init["env"]}
        assert init_env["SERVING_CACHE_DIR"]["value"] == cache
        assert init_env["HF_HUB_OFFLINE"]["value"] == ("0" if values["huggingface"]["allowDownload"] else "1")
        if values["huggingface"]["token"]["existingSecret"]:
            assert init_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == values["huggingface"]["token"]["existingSecret"]
        assert {"mountPath": "/etc/serving", "name": "models-config", "readOnly": True} in init["volumeMounts"]
        cache_volume = next(v for v in template["spec"]["volumes"] if v["name"] == "model-cache")
        if values["modelCache"]["existingClaim"]:
            assert cache_volume["persistentVolumeClaim"] == {"claimName": values["modelCache"]["existingClaim"]}
        else:
            assert "emptyDir" in cache_volume
    assert provisioned >= 1, "some pod must provision the weights its engines load"


def test_provisioning_init_container_runs_for_real(rendered, tmp_path):
    """The default pods' init container command, run as it is with the ConfigMap's models.yaml.

    The cache is this machine's (SERVING_CACHE_DIR as the e2e tests use it): models already there
    are found, missing ones are provisioned, exactly as in the pod."""
    (init,) = pod_templates(one(rendered["default"], "RayService"))[1][1]["spec"]["initContainers"]
    configmap = tmp_path / "models.yaml"
    configmap.write_text(one(rendered["default"], "ConfigMap", "-config")["data"]["models.yaml"])
    command = [str(configmap) if a == "/etc/serving/models.yaml" else a for a in init["command"]]
    env = {**os.environ, **{e["name"]: e["value"] for e in init["env"] if "value" in e and e["name"] == "HF_HUB_OFFLINE"}}
    result = subprocess.run([sys.executable, "-m", "serving.control.cli", *command[1:]], capture_output=True, text=True,
                            timeout=1800, cwd=ROOT, env=env)
    assert command[0] == "serving" and result.returncode == 0, result.stdout + result.stderr
    for model in yaml.safe_load(configmap.read_text())["models"]:
        assert re.search(rf"^{re.escape(model['name'])}: (cached|provisioned) at ", result.stdout, re.M), result.stdout


def test_pod_images_follow_the_values(rendered):  # no weights in them: tests/test_docker.py
    rayservice = one(rendered["gpu"], "RayService")
    for _, template in pod_templates(rayservice):
        assert ray_container(template)["image"] == "serving:0.1.0-gpu"


def test_service_and_ingress_expose_the_router(rendered):
    objects = rendered["all-features"]
    rayservice = one(objects, "RayService")
    service = rayservice["spec"]["serveService"]
    assert service["spec"]["ports"] == [{"name": "serve", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]
    ingress = one(objects, "Ingress")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": service["metadata"]["name"], "port": {"name": "serve"}}]
    assert ingress["spec"]["tls"][0]["secretName"] == "llm-tls"
    assert "Ingress" not in {o["kind"] for o in rendered["default"]}


def test_monitors_are_off_by_default_and_scrape_metrics(rendered):
    assert not {"PodMonitor", "ServiceMonitor"} & {o["kind"] for o in rendered["default"]}
    objects = rendered["all-features"]
    router = one(objects, "PodMonitor", "-router")
    assert router["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert router["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-head"
    assert router["metadata"]["labels"]["release"] == "prom"
    head = pod_templates(one(objects, "RayService"))[0][1]
    assert router["spec"]["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    monitor = one(objects, "ServiceMonitor")
    service_labels = one(objects, "RayService")["spec"]["serveService"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()


# What Grafana substitutes before a query reaches Prometheus: its interval variables, and the
# dashboard's own variables at their "All" value.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def promql(expr: str, dashboard: dict[str, Any]) -> promql_parser.Expr:
    """Parse a panel's query the way Prometheus will see it (raises ValueError if it is not PromQL)."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for var in dashboard.get("templating", {}).get("list", []):
        expr = re.sub(rf"\$\{{?{re.escape(var['name'])}\b}}?", var.get("allValue", ".*"), expr)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return promql_parser.parse(expr)


def selected_metrics(tree: promql_parser.Expr) -> set[str]:
    names: set[str] = set()
    promql_parser.walk(tree, lambda node: names.add(node.name) if isinstance(node, promql_parser.VectorSelector) else None)
    return names


def test_promql_check_rejects_broken_queries():
    """The parser used below rejects what Prometheus would (so a green dashboard test means something)."""
    for broken in ('sum(rate(serving_requests_total[1m])', 'rate(serving_requests_total)',
                   'histogram_quantile(0.9, rate(x_bucket[1m]) by (le))', 'serving_requests_total{model=~"a"',
                   'rate(serving_requests_total[$__rate_interval]) +'):
        with pytest.raises(ValueError):
            promql(broken, {})
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        promql('sum(serving_requests_total{model=~"$nope"})', {})


def test_grafana_dashboard_covers_the_serving_metrics(rendered):
    configmap = one(rendered["default"], "ConfigMap", "-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["serving.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "serving.json").read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    metrics: set[str] = set()
    for title, expr in queries:
        tree = promql(expr, dashboard)  # raises on anything Prometheus would refuse
        metrics |= selected_metrics(tree)
        quantiles = []
        promql_parser.walk(tree, lambda n: quantiles.append(n) if isinstance(n, promql_parser.Call) and n.func.name == "histogram_quantile" else None)
        for call in quantiles:
            inner = call.args[1]
            assert isinstance(inner, promql_parser.AggregateExpr) and "le" in inner.modifier.labels, f"{title}: {expr} loses `le`"
    assert metrics == {
        "serving_requests_total", "serving_time_to_first_token_seconds_bucket", "serving_request_duration_seconds_bucket",
        "serving_completion_tokens_total", "serving_prompt_tokens_total", "serving_inflight_requests",
        "serving_engine_waiting_requests", "serving_engine_running_requests", "serving_engine_kv_cache_usage_ratio",
        "serving_key_requests_total", "serving_key_tokens_total", "serving_key_estimated_cost_total",
        "serving_overhead_seconds_bucket", "serving_engine_seconds_bucket",
    }
    exposed = router_metric_names()
    assert metrics <= exposed, metrics - exposed  # the dashboard only queries what the router exports
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("request rate", "status", "first token", "end-to-end", "tokens per second", "in-flight", "queue", "kv-cache"):
        assert word in titles, word
    by_status = [promql(e, dashboard) for t, e in queries if "status" in t.lower()]
    assert any(isinstance(q, promql_parser.AggregateExpr) and q.modifier.labels == ["status"] for q in by_status)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --- bad values fail to render with a clear message -----------------------------------------

MODEL = {"name": "m", "source": {"hub": "org/m"}}


def _models(*models: dict[str, Any]) -> dict[str, Any]:
    return {"serving": {"models": list(models)}}


# Rejected by Helm itself: values.schema.json (generated from serving/config.py) or the chart's
# checks of its own values. The third item: is the models config itself invalid (None: not a
# models config case)? The chart must agree with serving/config.py on it.
BAD_VALUES = {
    "model without source": (_models({"name": "m"}), ["/serving/models/0", "missing property 'source'"], True),
    "negative replicas": (_models({**MODEL, "replicas": -1}), ["/serving/models/0/replicas", "minimum"], True),
    "two source kinds": (_models({**MODEL, "source": {"hub": "a/b", "path": "/m"}}), ["/serving/models/0/source", "oneOf"], True),
    "pypi without file": (_models({**MODEL, "source": {"pypi": "pkg==1.0"}}), ["/serving/models/0/source", "'file'"], True),
    "unpinned pypi": (_models({**MODEL, "source": {"pypi": "pkg", "file": "x"}}), ["/serving/models/0/source/pypi"], True),
    "bad tag": (_models({**MODEL, "tags": ["Big!"]}), ["/serving/models/0/tags/0"], True),
    "repeated tag": (_models({**MODEL, "tags": ["a", "a"]}), ["/serving/models/0/tags"], True),
    "alias like a tag selector": (_models({**MODEL, "aliases": ["tag:x"]}), ["/serving/models/0/aliases/0"], True),
    "unknown task": (_models({**MODEL, "task": "vision"}), ["/serving/models/0/task", "chat"], True),
    "reserved engine arg": (_models({**MODEL, "engine_args": {"model": "x"}}), ["/serving/models/0/engine_args"], True),
    "reserved engine arg in a profile": ({"serving": {"profiles": {"cpu": {"engine_args": {"served_model_name": "x"}}}}},
                                         ["/serving/profiles/cpu/engine_args"], True),
    "unknown model key": (_models({**MODEL, "replica": 2}), ["/serving/models/0", "replica"], True),
    "bad api keys variable": ({"serving": {"router": {"api_keys_env": "MY-KEYS"}}}, ["/serving/router/api_keys_env"], True),
    "no models": ({"serving": {"models": []}}, ["/serving/models", "minItems"], True),
    "no group with enough GPUs": (_models({**MODEL, "profile": "gpu"}), ["serving.models[0] (m)", "no worker group"], False),
    "worker group min over max": ({"workerGroups": [{"name": "cpu", "minReplicas": 3, "maxReplicas": 1}]}, ["workerGroups[0] (cpu)", "minReplicas (3)"], None),
    "negative worker replicas": ({"workerGroups": [{"name": "cpu", "minReplicas": -1, "maxReplicas": 1}]}, ["/workerGroups/0/minReplicas", "minimum"], None),
    "typo at top level": ({"ingres": {"enabled": True}}, ["ingres"], None),
    "removed drain value": ({"drainSeconds": 600}, ["drainSeconds"], None),
    "bad pull policy": ({"image": {"repository": "x", "tag": "1", "pullPolicy": "Sometimes"}}, ["/image/pullPolicy"], None),
}


def merged_serving(values: dict[str, Any]) -> dict[str, Any]:
    """The models config Helm serves for these values (values.yaml's `serving:` under them)."""
    return helm_python.Chart.load(CHART).merge_values(values)["serving"]


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_fail_to_render_with_a_clear_message(case):
    values, expected, config_invalid = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmError) as raised:
        render(values)
    message = str(raised.value)
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    if config_invalid is not None:
        # the chart agrees with the models schema (serving/config.py) on the same config
        if config_invalid:
            with pytest.raises(ConfigError):
                parse_config(merged_serving(values))
        else:
            parse_config(merged_serving(values))  # valid models config; the chart's cluster checks reject it


# Checks across keys of the models config that JSON schema cannot state: Helm renders these, and
# `serving check` (run by this test on the rendered serveConfigV2 args, as the README says to do
# before `helm upgrade`; the pods' provisioning and the Serve application refuse them too) names the key path.
GPU_GROUPS = {"workerGroups": yaml.safe_load(GPU_VALUES.read_text())["workerGroups"]}
CHECKED_BY_SERVING_CHECK = {
    "duplicate names": (_models(MODEL, MODEL), "models[1] (m).name: duplicate model name 'm'"),
    "alias is a name": (_models(MODEL, {**MODEL, "name": "n", "aliases": ["m"]}), "models[1] (n).aliases[0]: alias 'm' collides"),
    "unknown profile": (_models({**MODEL, "profile": "tpu"}), "models[0] (m).profile: unknown profile 'tpu'"),
    "replicas min over max": (_models({**MODEL, "replicas": {"min": 3, "max": 1}}), "models[0] (m).replicas: min (3) must not exceed max (1)"),
    "gpus below tensor parallel": (
        {**_models({**MODEL, "profile": "gpu", "engine_args": {"tensor_parallel_size": 4}, "resources": {"gpus": 2}}), **GPU_GROUPS},
        "models[0] (m).resources.gpus: 2 GPUs per replica cannot hold tensor_parallel_size x pipeline_parallel_size = 4"),
    "engine arg typo": (_models({**MODEL, "engine_args": {"max_modle_len": 512}}), "engine_args.max_modle_len: not a vLLM engine argument"),
}


@pytest.mark.parametrize("case", list(CHECKED_BY_SERVING_CHECK))
def test_cross_key_problems_are_caught_by_serving_check_on_the_render(case, tmp_path):
    values, expected = CHECKED_BY_SERVING_CHECK[case]
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(served(render(values))))
    result = run_cli("check", str(path))
    assert result.returncode != 0 and expected in result.stderr, result.stdout + result.stderr


GOOD_CONFIGS = {
    "autoscaling from zero": _models({**MODEL, "replicas": {"min": 0, "max": 3, "target_ongoing_requests": 4}}),
    "hub revision": _models({**MODEL, "source": {"hub": "org/m", "revision": "main"}, "task": "completion"}),
    "local path": _models({**MODEL, "source": {"path": "/models/m"}, "max_queued_requests": -1, "resources": {"cpus": 2, "memory_gib": 8}}),
    "router settings": {"serving": {"router": {"replicas": 2, "request_timeout_s": 120, "api_keys_env": "KEYS"}, "models": [MODEL]}},
}


@pytest.mark.parametrize("case", list(GOOD_CONFIGS))
def test_valid_models_configs_render(case):
    values = GOOD_CONFIGS[case]
    objects = render(values)
    args = served(objects)
    parse_config(args)
    assert args["models"] == values["serving"]["models"]


def test_models_changes_leave_the_cluster_spec_alone():
    """A models change must be a serveConfigV2 change (applied in place), not a new RayCluster."""
    base = one(render(), "RayService")
    values = {"serving": {"models": yaml.safe_load((CHART / "values.yaml").read_text())["serving"]["models"] + [MODEL]}}
    changed = one(render(values), "RayService")
    assert changed["spec"]["serveConfigV2"] != base["spec"]["serveConfigV2"]
    assert changed["spec"]["rayClusterConfig"] == base["spec"]["rayClusterConfig"]


def router_metric_names() -> set[str]:
    """Sample names the router's registry really exposes (every labelled metric touched once)."""
    from prometheus_client.parser import text_string_to_metric_families

    from serving.protocol.messages import RoutingStats
    from serving.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    metrics.engines.reports = lambda: {"m": [RoutingStats("r", "m", True)]}
    for name in ("requests", "ttft", "duration", "engine_time", "overhead", "prompt_tokens", "completion_tokens",
                 "cost", "inflight", "route_failovers", "key_requests", "key_tokens", "key_cost"):
        metric = getattr(metrics, name)
        labelled = metric.labels(*["x"] * len(metric._labelnames))
        (labelled.observe if hasattr(labelled, "observe") else labelled.inc)(1)
    text = metrics.exposition().decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}
