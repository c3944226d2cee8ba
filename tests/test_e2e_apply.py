"""`serving apply` on a running stack (the tenants stack: 2 router replicas, real vLLM engines), with
requests in flight across every step: nothing fails, every answer comes from the model its name
named in the catalog that routed it, engines the change leaves alone keep their replica; a
scale-to-zero model starts once for 20 requests at once; a removed model drains; autoscaling
rises under load and falls back after it.

Runs after every other user of the tenants stack (marker `changes_tenants_stack`), in file order:
each test starts from the state the previous one left.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest
import yaml

from bench.live_change import LiveLoad, apply_file, check, model_replicas, replicas_by_model, wait_for
from serving.config import config_digest, load_config
from tests.conftest import LOAD_PAUSE_S, bearer

pytestmark = pytest.mark.changes_tenants_stack

SMALL, LARGE, COLD = "smollm2-135m", "smollm2-135m-large", "smollm2-cold"
MOVED_ALIAS = "default-chat"  # the small model's, moved to the large one


def _model(raw, name):
    return next(m for m in raw["models"] if m["name"] == name)


@pytest.fixture(scope="module")
def files(tenants, tmp_path_factory) -> dict:
    """The tenants stack's file, then each change in turn (names -> path)."""
    folder = tmp_path_factory.mktemp("apply")
    base = yaml.safe_load(tenants["config"].read_text())
    steps = {"base": base}
    add = json.loads(json.dumps(base))
    _model(add, SMALL)["aliases"].remove(MOVED_ALIAS)
    _model(add, LARGE)["aliases"].append(MOVED_ALIAS)
    # scale to zero; it may have 2 replicas, so 20 cold requests starting only one is the stack's doing
    add["models"].append({**_model(add, LARGE), "name": COLD, "aliases": [], "tags": ["cold"], "fallbacks": [],
                          "replicas": {"min": 0, "max": 2, "cold_start_timeout_s": 240}})
    steps["add"] = add
    remove = json.loads(json.dumps(add))
    remove["models"] = [m for m in remove["models"] if m["name"] != COLD]
    _model(remove, LARGE)["engine_args"] = {**_model(remove, LARGE).get("engine_args", {}), "max_num_seqs": 8}
    steps["remove"] = remove
    autoscale = json.loads(json.dumps(remove))
    # a 5 s averaging window: the ended ramp leaves it within 5 s (Ray's default window, 30 s, kept
    # 2 replicas ~25 s more)
    _model(autoscale, SMALL)["replicas"] = {"min": 1, "max": 2, "target_ongoing_requests": 2, "upscale_delay_s": 2,
                                            "downscale_delay_s": 5, "look_back_period_s": 5}
    steps["autoscale"] = autoscale
    paths = {}
    for name, raw in steps.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


@pytest.fixture(scope="module")
def auth(tenants) -> dict:
    return bearer(tenants["keys"]["plain"])


def _chat(url, headers, model, max_tokens=4, stream=False, timeout=300) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=timeout,
                      json={"model": model, "max_tokens": max_tokens, "stream": stream,
                            "messages": [{"role": "user", "content": "Say hi."}]})


def _apply(tenants, path, *extra) -> str:
    code, output, seconds = apply_file(path, tenants["port"], "--address", tenants["address"], *extra)
    assert code == 0, output
    return output


def test_dry_run_shows_the_plan_and_changes_nothing(tenants, files, auth):
    before = _chat(tenants["url"], auth, SMALL).headers["x-serving-config"]
    assert before == config_digest(load_config(files["base"]))
    output = _apply(tenants, files["add"], "--dry-run")
    assert f"+ model {COLD}" in output and f"{MOVED_ALIAS}: {SMALL} -> {LARGE}" in output
    assert "APPLIED" not in output
    assert {_chat(tenants["url"], auth, SMALL).headers["x-serving-config"] for _ in range(4)} == {before}


def test_apply_moves_an_alias_and_adds_a_model_under_load_without_restarting_engines(tenants, files, auth):
    url = tenants["url"]
    base, add = load_config(files["base"]), load_config(files["add"])
    with LiveLoad(url, [MOVED_ALIAS, "smollm2", "smollm2-large"], workers=2, pause_s=LOAD_PAUSE_S, headers=auth) as load:
        time.sleep(3)
        output = _apply(tenants, files["add"])
        applied_at = load.now()
        time.sleep(4)
    assert "APPLIED" in output, output
    assert check(load.samples, [base, add]) == []
    routed_by = {s.config for s in load.samples}
    assert routed_by == {config_digest(base), config_digest(add)}  # requests on both sides of the change
    assert {s.served for s in load.samples if s.name == MOVED_ALIAS and s.sent > applied_at} == {LARGE}
    assert {m: len(r) for m, r in replicas_by_model(load.samples).items()} == {SMALL: 1, LARGE: 1}
    # both router replicas serve the new catalog; the new model is listed, cold
    assert {_chat(url, auth, SMALL).headers["x-serving-config"] for _ in range(8)} == {config_digest(add)}
    listed = {m["id"]: m for m in httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()["data"]}
    assert listed[COLD]["status"] == "cold" and listed[MOVED_ALIAS]["alias_of"] == LARGE


def test_twenty_requests_to_a_cold_model_start_one_replica(tenants, auth):
    url = tenants["url"]
    assert model_replicas(url, COLD) == 0

    def one(i):
        return _chat(url, auth, COLD, max_tokens=4, stream=i % 2 == 1)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(one, range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert all(r.text.rstrip().endswith("data: [DONE]") for r in responses[1::2])
    assert len({r.headers["x-served-replica"] for r in responses}) == 1
    waits = [int(r.headers["x-cold-start-ms"]) for r in responses if "x-cold-start-ms" in r.headers]
    assert waits and max(waits) >= 1000  # they waited for the engine to start, and say how long
    assert model_replicas(url, COLD) == 1
    time.sleep(3)
    assert model_replicas(url, COLD) == 1


def test_removing_a_model_drains_it_while_another_rolls_its_engine(tenants, files, auth):
    url = tenants["url"]
    add, remove = load_config(files["add"]), load_config(files["remove"])
    stream_body, first_chunk = [], threading.Event()

    def long_stream():
        body = {"model": COLD, "max_tokens": 120, "ignore_eos": True, "stream": True,
                "messages": [{"role": "user", "content": "Tell a long story."}]}
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=auth, json=body, timeout=300) as response:
            stream_body.append(response.status_code)
            for chunk in response.iter_text():
                stream_body.append(chunk)
                first_chunk.set()

    in_flight = threading.Thread(target=long_stream)
    in_flight.start()
    assert first_chunk.wait(120)
    with LiveLoad(url, ["smollm2", "smollm2-large"], workers=2, pause_s=LOAD_PAUSE_S, headers=auth) as load:
        output = _apply(tenants, files["remove"])
        time.sleep(3)
    in_flight.join(300)
    assert stream_body[0] == 200 and "".join(stream_body[1:]).rstrip().endswith("data: [DONE]")
    assert "".join(stream_body[1:]).count('"finish_reason":"length"') == 1  # all 120 tokens, not cut
    gone = _chat(url, auth, COLD)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert f"- model {COLD}" in output and f"~ model {LARGE} (engine replicas roll" in output
    assert check(load.samples, [add, remove]) == []
    replicas = replicas_by_model(load.samples)
    assert len(replicas[SMALL]) == 1 and len(replicas[LARGE]) == 2  # small untouched; large rolled


def test_autoscaling_rises_under_load_and_falls_back_after(tenants, files, auth):
    url = tenants["url"]
    remove, autoscale = load_config(files["remove"]), load_config(files["autoscale"])
    before = _chat(url, auth, SMALL).headers["x-served-replica"]
    output = _apply(tenants, files["autoscale"])
    assert f"~ model {SMALL} (replicas, autoscaling or queue limits: in place)" in output
    assert _chat(url, auth, SMALL).headers["x-served-replica"] == before  # changed in place, not restarted
    with LiveLoad(url, [SMALL], workers=8, max_tokens=64, headers=auth) as ramp:
        rose = wait_for(lambda: model_replicas(url, SMALL) >= 2, 180)
        # the load goes on until the new replica has answered part of it
        wait_for(lambda: len(replicas_by_model(ramp.samples).get(SMALL, ())) == 2, 60, every_s=0.5)
    assert rose is not None, "no second replica under 8 concurrent streams (target 2 per replica)"
    fell = wait_for(lambda: model_replicas(url, SMALL) == 1, 120)
    assert fell is not None, "still 2 replicas 120 s after the load ended (downscale delay 5 s)"
    assert check(ramp.samples, [remove, autoscale]) == []
    assert len(replicas_by_model(ramp.samples)[SMALL]) == 2  # the second replica served part of the ramp
