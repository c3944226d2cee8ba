"""`serving apply` without a cluster: the plan, the pinned deployment versions that make Ray Serve
restart only what changed, the router taking a new catalog in place, scale to zero's bounded wait.

The live path (a running stack, real vLLM, requests in flight across each step) is
tests/test_e2e_apply.py."""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from fastapi.testclient import TestClient

from serving.app import AUTOSCALING_METRICS_INTERVAL_S, autoscaling_config, build, engine_options
from serving.config import config_digest, parse_config
from serving.control import apply as applying
from serving.control.cli import main as serving_main
from serving.protocol.messages import ReplyHead, Usage
from serving.router.http import app
from tests.test_router_faults import FakeHandle, FakeStream, FakeView, healthy, make_router, ok

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)

BASE = {
    "router": {"request_timeout_s": 30},
    "models": [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat", "aliases": ["chat"], "tags": ["small"],
         "engine_args": {"max_model_len": 2048}},
        {"name": "b", "source": {"path": "/m/b"}, "task": "chat", "tags": ["large"],
         "engine_args": {"max_model_len": 2048}},
    ],
}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def changed(edit) -> dict:
    raw = copy.deepcopy(BASE)
    edit(raw)
    return raw


def model(raw, name) -> dict:
    return next(m for m in raw["models"] if m["name"] == name)


def versions(raw) -> dict[str, str]:
    """Each deployment's pinned version, and the router's user_config digest, as `build` makes them."""
    router = build(parse_config(raw))._bound_deployment
    engines = router._replica_config.init_args[0]
    return {"router": router.version, "router-catalog": json.dumps(router._deployment_config.user_config, sort_keys=True),
            **{name: bound._bound_deployment.version for name, bound in engines.items()}}


# --- versions: what a redeploy restarts --------------------------------------------------------


def test_versions_are_stable_across_builds_so_a_redeploy_of_the_same_file_restarts_nothing():
    assert versions(BASE) == versions(copy.deepcopy(BASE))


def test_moving_an_alias_changes_only_the_routers_catalog():
    before = versions(BASE)
    after = versions(changed(lambda r: (model(r, "a")["aliases"].clear(), model(r, "b").__setitem__("aliases", ["chat"]))))
    assert {k for k in before if before[k] != after[k]} == {"router-catalog"}


def test_engine_arguments_restart_only_that_engine():
    before = versions(BASE)
    after = versions(changed(lambda r: model(r, "b")["engine_args"].__setitem__("max_model_len", 1024)))
    assert {k for k in before if before[k] != after[k]} == {"b", "router-catalog"}


def test_replica_counts_keep_every_version():
    """Replica counts are deployment options Ray Serve changes in place: no version moves."""
    before = versions(BASE)
    after = versions(changed(lambda r: model(r, "a").__setitem__("replicas", {"min": 1, "max": 3})))
    assert {k for k in before if before[k] != after[k]} == {"router-catalog"}


def test_the_router_section_rolls_the_routers():
    before = versions(BASE)
    after = versions(changed(lambda r: r["router"].__setitem__("request_timeout_s", 60)))
    assert before["router"] != after["router"]


# --- the plan ------------------------------------------------------------------------------------


def test_plan_of_the_same_file_is_empty():
    assert applying.plan(parse_config(BASE), parse_config(copy.deepcopy(BASE))).empty


def test_plan_names_each_kind_of_change():
    def edit(raw):
        model(raw, "a")["aliases"] = []
        model(raw, "b")["aliases"] = ["chat"]
        model(raw, "b")["engine_args"]["max_model_len"] = 1024
        raw["models"].append({"name": "c", "source": {"path": "/m/c"}, "task": "chat", "replicas": {"min": 0, "max": 1}})
    p = applying.plan(parse_config(BASE), parse_config(changed(edit)))
    assert (p.added, p.removed, p.restarted, p.rescaled) == (("c",), (), ("b",), ())
    assert "chat: a -> b" in p.names and not p.router_restarted and p.catalog_changed
    assert any(line.startswith("+ model c") for line in p.lines())


def test_plan_of_a_removal_and_a_rescale():
    def edit(raw):
        raw["models"] = [model(raw, "a")]
        model(raw, "a")["replicas"] = {"min": 1, "max": 2}
    p = applying.plan(parse_config(BASE), parse_config(changed(edit)))
    assert (p.added, p.removed, p.restarted, p.rescaled) == ((), ("b",), (), ("a",))
    assert "tag:large: b -> (none)" in p.names


def test_apply_refuses_an_invalid_file_before_connecting_to_anything(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(changed(lambda r: model(r, "b").__setitem__("aliases", ["chat"]))))  # alias taken twice
    with pytest.raises(SystemExit) as exit_:
        serving_main(["apply", str(bad), "--address", "127.0.0.1:1"])
    assert exit_.value.code == 2 and "duplicate alias 'chat'" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(json.dumps(changed(lambda r: model(r, "b")["engine_args"].__setitem__("no_such_arg", 1))))
    assert serving_main(["apply", str(unknown), "--address", "127.0.0.1:1"]) == 2
    assert "no_such_arg" in capsys.readouterr().err


# --- autoscaling options -------------------------------------------------------------------------


def test_autoscaling_never_sets_initial_replicas_and_passes_the_delays():
    spec = parse_config(changed(lambda r: model(r, "a").__setitem__(
        "replicas", {"min": 0, "max": 2, "target_ongoing_requests": 2, "upscale_delay_s": 3, "downscale_delay_s": 20,
                     "look_back_period_s": 5})))
    config = autoscaling_config(spec.models[0].replicas)
    assert config == {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 3,
                      "downscale_delay_s": 20, "downscale_to_zero_delay_s": 20, "look_back_period_s": 5,
                      "metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S}
    assert AUTOSCALING_METRICS_INTERVAL_S < 10  # Ray's default: a cold model's first request waited for it
    options = engine_options(spec.engine_spec(spec.models[0]), spec)
    assert "num_replicas" not in options and "initial_replicas" not in options["autoscaling_config"]


# --- the router takes a new catalog in place --------------------------------------------------------


def test_router_applies_a_new_catalog_without_restart(monkeypatch):
    a, b = FakeHandle("a", ok("a")), FakeHandle("b", ok("b"))
    router = make_router({"a": a, "b": b}, config=BASE, monkeypatch=monkeypatch)
    http = TestClient(app)
    first = http.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert first.headers["x-served-model"] == "a"
    new = parse_config(changed(lambda r: (model(r, "a")["aliases"].clear(), model(r, "b").__setitem__("aliases", ["chat"]))))
    asyncio.run(router.apply_config(new, {"a": a, "b": b}))
    second = http.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert second.headers["x-served-model"] == "b"
    assert second.headers["x-serving-config"] == config_digest(new) != first.headers["x-serving-config"]


def test_a_removed_model_answers_404_and_its_request_in_flight_finishes(monkeypatch):
    """The stream that started before the removal ends normally on the removed model's engine."""
    go = asyncio.Event()

    def held(request):
        class Stream(FakeStream):
            async def __anext__(self):
                if self.served == 1:
                    await go.wait()
                return await super().__anext__()
        return Stream([ReplyHead(200, "b-1", "b", stream=True, body=b'data: {"n": 0}\n\n'), b"data: [DONE]\n\n"])

    a, b = FakeHandle("a", ok("a")), FakeHandle("b", held)
    router = make_router({"a": a, "b": b}, config=BASE, monkeypatch=monkeypatch)

    async def scenario():
        from tests.test_router_faults import _request
        from serving.protocol.endpoints import BY_NAME

        response = await router.inference(_request({"model": "b", "stream": True, **CHAT}), BY_NAME["chat"])
        assert response.status_code == 200
        await router.apply_config(parse_config(changed(lambda r: r.__setitem__("models", [model(r, "a")]))), {"a": a})
        gone = await router.inference(_request({"model": "b", **CHAT}), BY_NAME["chat"])
        chunks = []
        go.set()
        async for chunk in response.body_iterator:
            chunks.append(chunk)
        return gone, b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)

    gone, body = asyncio.run(scenario())
    assert gone.status_code == 404 and json.loads(gone.body)["error"]["code"] == "model_not_found"
    assert body.endswith(b"data: [DONE]\n\n")
    assert router.loads.inflight == {"a": 0}  # the removed model's count left once its stream ended


# --- scale to zero: the bounded wait ------------------------------------------------------------------


COLD = changed(lambda r: model(r, "b").__setitem__("replicas", {"min": 0, "max": 1, "cold_start_timeout_s": 0.3}))


def test_a_cold_model_reports_cold_and_a_request_waits_for_its_first_replica(monkeypatch):
    def slow_start(request):
        class Stream(FakeStream):
            async def __anext__(self):
                if self.served == 0:
                    await asyncio.sleep(0.15)  # Ray's handle holds it while a replica starts
                return await super().__anext__()
        return Stream([ReplyHead(200, "b-1", "b", body=b'{"model": "b"}', usage=Usage(1, 1), engine_s=0.01)])

    views = {"a": FakeView(healthy("a")), "b": FakeView()}  # b: no replica reports
    router = make_router({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", slow_start)}, views, config=COLD,
                         monkeypatch=monkeypatch)
    http = TestClient(app)
    assert router.status_report()["models"]["b"]["state"] == "cold"
    assert {m["id"]: m.get("status") for m in http.get("/v1/models").json()["data"]}["b"] == "cold"
    response = http.post("/v1/chat/completions", json={"model": "b", **CHAT})
    assert response.status_code == 200
    assert 100 <= int(response.headers["x-cold-start-ms"]) < 300


def test_a_cold_start_past_its_limit_is_a_503_with_retry_after_and_the_call_is_cancelled(monkeypatch):
    handle = FakeHandle("b", lambda request: FakeStream([], hang_at=0))
    views = {"a": FakeView(healthy("a")), "b": FakeView()}
    router = make_router({"a": FakeHandle("a", ok("a")), "b": handle}, views, config=COLD, monkeypatch=monkeypatch)
    response = TestClient(app).post("/v1/chat/completions", json={"model": "b", **CHAT})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "cold_start_timeout"
    assert int(response.headers["retry-after"]) > 0
    assert handle.streams[0].cancelled
    assert router.loads.inflight["b"] == 0


def test_a_warm_model_with_min_zero_has_no_cold_wait(monkeypatch):
    handle = FakeHandle("b", ok("b"))
    router = make_router({"a": FakeHandle("a", ok("a")), "b": handle}, config=COLD, monkeypatch=monkeypatch)
    response = TestClient(app).post("/v1/chat/completions", json={"model": "b", **CHAT})
    assert response.status_code == 200 and "x-cold-start-ms" not in response.headers
    assert router.status_report()["models"]["b"]["state"] == "ready"
