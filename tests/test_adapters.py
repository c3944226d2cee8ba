"""LoRA adapters without a cluster: models.yaml's `adapters:` (checks, derived engine arguments),
adapters as routing targets on their base's deployment, the router's requests, listing and admin
endpoints (the adapter book is the real class, called in this process). The real path, vLLM
serving the adapters, is tests/test_e2e_adapters.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.config import ConfigError, DEFAULT_MAX_LORAS, fallback_graph, parse_config, select_models
from serving.protocol.adapter_book import AdapterBook, RuntimeAdapter
from serving.protocol.messages import ReplyHead, RoutingStats, Usage
from serving.router.adapters import add_problem, parse_add
from serving.routing import Load, catalog_from_config, route
from serving.tenants.keys import KeyRecord, allowed_names
from tests.test_router_faults import FakeHandle, FakeStream, FakeView, client  # noqa: F401 (fixture)

PRICE = {"input_per_million": 1.0, "output_per_million": 2.0}


def adapter(name, **extra):
    return {"name": name, "source": {"path": f"/adapters/{name}"}, **extra}


def config(**router):
    return {
        "router": {"request_timeout_s": 30, **router},
        "models": [
            {"name": "base", "source": {"path": "/m/base"}, "task": "chat", "tags": ["chat"], "price": PRICE,
             "aliases": ["base-alias"],
             "adapters": [adapter("fruit-apple", aliases=["apple"], tags=["fruit", "red"]),
                          adapter("fruit-banana", tags=["fruit"], price={"input_per_million": 5.0})]},
            {"name": "other", "source": {"path": "/m/other"}, "task": "chat", "tags": ["chat"],
             "fallbacks": ["fruit-apple"]},
            {"name": "emb", "source": {"path": "/m/e"}, "task": "embed"},
        ],
        "routes": {"auto": {"small": "tag:fruit", "large": "other"}},
    }


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return [str(p) for p in caught.value.problems]


# --- models.yaml -------------------------------------------------------------------------------


def test_adapters_turn_on_lora_with_derived_engine_arguments_that_models_yaml_may_override():
    parsed = parse_config(config())
    base = parsed.engine_spec(parsed.models[0])
    assert base.lora and base.engine_args["enable_lora"] is True
    assert (base.engine_args["max_loras"], base.engine_args["max_cpu_loras"]) == (2, 2)
    assert not parsed.engine_spec(parsed.models[1]).lora and "enable_lora" not in parsed.engine_spec(
        parsed.models[1]).engine_args
    raw = config()
    raw["models"][0]["engine_args"] = {"max_loras": 1, "max_lora_rank": 64}
    raw["models"][0]["adapters"] += [adapter(f"a{i}") for i in range(10)]
    own = parse_config(raw).engine_spec(parse_config(raw).models[0]).engine_args
    assert (own["max_loras"], own["max_cpu_loras"], own["max_lora_rank"]) == (1, 12, 64)
    raw["models"][0]["engine_args"] = {}
    many = parse_config(raw).engine_spec(parse_config(raw).models[0]).engine_args
    assert (many["max_loras"], many["max_cpu_loras"]) == (DEFAULT_MAX_LORAS, 12)


@pytest.mark.parametrize("change, expected", [
    (lambda raw: raw["models"][0]["adapters"].append(adapter("other")), "duplicate model name 'other'"),
    (lambda raw: raw["models"][0]["adapters"].append(adapter("x", aliases=["base-alias"])), "duplicate alias 'base-alias'"),
    (lambda raw: raw["models"][0]["adapters"].append(adapter("x", aliases=["other"])), "collides with the name of a model"),
    (lambda raw: raw["models"][2].update(adapters=[adapter("x")]), "emb is an embed model"),
    (lambda raw: raw["models"][0].update(engine_args={"enable_lora": False}), "remove enable_lora: false"),
    (lambda raw: raw["models"][0]["adapters"].append({"name": "x", "source": {"path": "/a"}, "rank": 8}),
     "unknown key 'rank'"),
    (lambda raw: raw["models"][0]["adapters"].append({"name": "bad name", "source": {"path": "/a"}}), "name"),
])
def test_adapter_mistakes_are_refused_with_their_key_path(change, expected):
    raw = config()
    change(raw)
    found = problems(raw)
    assert any(expected in p for p in found), found
    assert any(p.startswith("models[") for p in found), found


def test_tags_routes_and_fallbacks_reach_adapters_like_models():
    parsed = parse_config(config())
    assert [m.name for m in select_models(parsed, "tag:fruit")] == ["fruit-apple", "fruit-banana"]
    assert [m.name for m in select_models(parsed, "apple")] == ["fruit-apple"]
    graph = fallback_graph(parsed)
    assert graph["other"] == ["fruit-apple"] and graph["fruit-apple"] == graph["base"] == []
    raw = config()
    raw["models"][0]["fallbacks"] = ["fruit-banana"]  # an adapter of itself is not another model
    assert any("names no other model" in p for p in problems(raw))


def test_an_adapter_is_a_target_on_its_base_deployment():
    catalog = catalog_from_config(parse_config(config()))
    apple = catalog["fruit-apple"]
    assert (apple.deployment, apple.base, apple.task, apple.aliases) == ("base", "base", "chat", ("apple",))
    assert catalog["fruit-banana"].price_per_million == 5.0 and apple.price_per_million == 3.0  # base's price
    assert catalog["base"].deployment == "base" and catalog["base"].base is None
    up = {"base": Load(healthy=True, replicas=1), "other": Load(healthy=True, replicas=1)}
    decision = route("apple", "chat", catalog, up)
    assert decision.candidates == ("fruit-apple",) and decision.rule == "alias"
    # the adapter's health and load are its base deployment's
    down = {"base": Load(healthy=False), "other": Load(healthy=True, replicas=1)}
    with pytest.raises(Exception, match="no healthy engine"):
        route("fruit-apple", "chat", catalog, down)
    busy = {"base": Load(healthy=True, replicas=1, running=30, waiting=10), "other": Load(healthy=True, replicas=1)}
    assert route("other", "chat", catalog, busy).candidates == ("other", "fruit-apple")  # its fallback
    with pytest.raises(Exception, match="cannot serve the embed endpoint"):
        route("fruit-apple", "embed", catalog, up)


def test_key_allow_lists_name_adapters_by_name_alias_or_tag():
    catalog = catalog_from_config(parse_config(config()))
    assert allowed_names(KeyRecord("k", models=("apple",)), catalog) == {"fruit-apple"}
    assert allowed_names(KeyRecord("k", models=("tag:fruit",)), catalog) == {"fruit-apple", "fruit-banana"}
    assert "fruit-apple" not in allowed_names(KeyRecord("k", models=("base",)), catalog)


# --- the router ---------------------------------------------------------------------------------


def answers(name):
    def make(request):
        served = request.adapter or name
        return FakeStream([ReplyHead(200, f"{name}-1", name, body=json.dumps({"model": served}).encode(),
                                     usage=Usage(10, 5), engine_s=0.001)])
    return make


class BookView(FakeView):
    """A base deployment's replicas reporting what the engines would after syncing with the book."""

    def __init__(self, book: AdapterBook, name: str, declared: list[str], errors: dict[str, str] | None = None):
        super().__init__()
        self.book, self.name, self.declared, self.errors = book, name, declared, errors or {}

    def reports(self):
        import time

        runtime = [e.spec.name for e in self.book.entries.values() if e.base == self.name]
        failed = {n: why for n, why in self.errors.items() if n in runtime}
        return [RoutingStats(replica=f"{self.name}-1", model=self.name, healthy=True, at=time.time() + 0.01,
                             adapters=self.declared + [n for n in runtime if n not in failed],
                             resident_adapters=self.declared[:1], adapter_slots=2, adapter_errors=failed)]


class LocalBook:
    """The real AdapterBook behind the `.method.remote()` shape of its Ray actor handle."""

    def __init__(self, book: AdapterBook):
        self.book = book

    def __getattr__(self, method):
        call = getattr(self.book, method)

        class Remote:
            @staticmethod
            async def remote(*args):
                return call(*args)
        return Remote


@pytest.fixture
def lora_stack(client, monkeypatch):  # noqa: F811
    def make(errors=None, api_keys="", **router_options):
        book = AdapterBook()
        engines = {name: FakeHandle(name, answers(name)) for name in ("base", "other", "emb")}
        views = {"base": BookView(book, "base", ["fruit-apple", "fruit-banana"], errors),
                 "other": FakeView(RoutingStats(replica="other-1", model="other", healthy=True)),
                 "emb": FakeView(RoutingStats(replica="emb-1", model="emb", healthy=True))}
        router, http = client(engines, views, api_keys=api_keys, config=config(**router_options))
        router.adapters._book = LocalBook(book)
        monkeypatch.setattr("serving.router.adapters.POLL_S", 0.01)
        return router, http, engines, book
    return make


def test_a_request_for_an_adapter_goes_to_its_base_deployment_named_as_the_adapter(lora_stack):
    router, http, engines, _ = lora_stack()
    logged = []
    router.accounting.request_log = type("Log", (), {"write": lambda self, line: logged.append(line)})()
    for asked in ("fruit-apple", "apple", "tag:red"):
        answer = http.post("/v1/chat/completions", json={"model": asked, "messages": []})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-served-model"] == "fruit-apple"
        assert answer.headers["x-served-base-model"] == "base"
        assert engines["base"].requests[-1].adapter == "fruit-apple"
    plain = http.post("/v1/chat/completions", json={"model": "base", "messages": []})
    assert engines["base"].requests[-1].adapter is None and "x-served-base-model" not in plain.headers
    assert router.loads.inflight == {"base": 0, "other": 0, "emb": 0}  # counted on the deployment, released
    assert [(line.served_model, line.base_model) for line in logged] == [("fruit-apple", "base")] * 3 + [
        ("base", None)]
    assert router.prices["fruit-banana"].input_per_million == 5.0 and router.prices["fruit-apple"] == router.prices["base"]


def test_models_lists_adapters_as_vllm_does_with_parent_and_root(lora_stack):
    router, http, _, _ = lora_stack()
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    apple = cards["fruit-apple"]
    assert apple["parent"] == "base" and apple["root"] == "path:/adapters/fruit-apple" and apple["task"] == "chat"
    assert apple["tags"] == ["fruit", "red"] and cards["apple"]["alias_of"] == "fruit-apple"
    assert cards["base"].get("parent") is None
    assert http.get("/v1/models/apple").json()["alias_of"] == "fruit-apple"


def test_adapters_added_at_run_time_route_list_and_leave(lora_stack):
    router, http, engines, book = lora_stack(adapter_admin="open")
    added = http.post("/v1/adapters", json={"name": "fruit-cherry", "base": "base", "source": {"path": "/a/c"},
                                            "aliases": ["cherry"], "tags": ["fruit"]})
    assert added.status_code == 200, added.text
    assert added.json()["replicas"] == ["base-1"] and book.entries["fruit-cherry"].base == "base"
    answer = http.post("/v1/chat/completions", json={"model": "cherry", "messages": []})
    assert answer.headers["x-served-model"] == "fruit-cherry" and engines["base"].requests[-1].adapter == "fruit-cherry"
    assert "fruit-cherry" in [m.name for m in router.catalog.values() if m.name.startswith("fruit")]
    listed = {a["id"]: a for a in http.get("/v1/adapters").json()["data"]}
    assert listed["fruit-cherry"]["origin"] == "runtime" and listed["fruit-apple"]["origin"] == "models.yaml"
    assert http.get("/v1/models/fruit-cherry").json()["parent"] == "base"
    # vLLM's bodies, and its plain-text answers
    loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "fruit-date", "lora_path": "/a/d"})
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'fruit-date' added successfully."
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fruit-date"}).status_code == 200
    gone = http.delete("/v1/adapters/fruit-cherry")
    assert gone.status_code == 200 and gone.json()["deleted"] is True and not book.entries
    after = http.post("/v1/chat/completions", json={"model": "cherry", "messages": []})
    assert after.status_code == 404 and after.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body, status, code", [
    ({"name": "fruit-apple", "base": "base", "source": {"path": "/a"}}, 409, "name_taken"),  # declared
    ({"name": "x", "base": "base", "source": {"path": "/a"}, "aliases": ["other"]}, 409, "name_taken"),
    ({"name": "auto", "base": "base", "source": {"path": "/a"}}, 409, "name_taken"),  # a route
    ({"name": "x", "base": "other", "source": {"path": "/a"}}, 400, "lora_not_enabled"),
    ({"name": "x", "base": "emb", "source": {"path": "/a"}}, 400, "lora_not_enabled"),
    ({"name": "x", "base": "nope", "source": {"path": "/a"}}, 400, "model_not_found"),
    ({"name": "x", "base": "base"}, 400, None),
    ({"name": "x y", "base": "base", "source": {"path": "/a"}}, 400, None),
    ({"name": "x", "base": "base", "source": {"path": "/a", "hub": "o/m"}}, 400, None),
])
def test_adding_a_bad_adapter_is_refused_before_the_book_changes(lora_stack, body, status, code):
    router, http, _, book = lora_stack(adapter_admin="open")
    answer = http.post("/v1/adapters", json=body)
    assert answer.status_code == status, answer.text
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    if code:
        assert answer.json()["error"]["code"] == code
    assert not book.entries


def test_an_adapter_the_engine_cannot_load_is_refused_with_its_reason_and_leaves_the_book(lora_stack):
    router, http, _, book = lora_stack(errors={"broken": "No adapter found for /a/broken"}, adapter_admin="open")
    answer = http.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": "/a/broken"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "adapter_load_failed"
    assert "No adapter found" in answer.json()["error"]["message"] and not book.entries
    assert http.post("/v1/chat/completions", json={"model": "broken", "messages": []}).status_code == 404


def test_removing_a_declared_or_unknown_adapter_is_refused(lora_stack):
    router, http, _, _ = lora_stack(adapter_admin="open")
    assert http.delete("/v1/adapters/fruit-apple").json()["error"]["code"] == "adapter_declared"
    missing = http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    assert http.post("/v1/unload_lora_adapter", json={}).json()["error"]["param"] == "lora_name"


ADMIN_CALLS = [("post", "/v1/adapters", {"name": "x", "base": "base", "source": {"path": "/a"}}),
               ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/a"}),
               ("post", "/v1/unload_lora_adapter", {"lora_name": "x"}),
               ("delete", "/v1/adapters/x", None)]


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
def test_nobody_changes_adapters_on_an_api_without_keys_by_default(lora_stack, method, path, body):
    router, http, _, book = lora_stack()
    answer = getattr(http, method)(path, **({"json": body} if body else {}))
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "admin_key_required"
    assert not book.entries


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
def test_only_admin_keys_change_adapters_and_off_means_nobody(lora_stack, tmp_path, method, path, body):
    from tests.conftest import create_key

    keys = tmp_path / "keys.yaml"
    admin, plain = create_key(keys, "ops", "--admin"), create_key(keys, "team")
    kwargs = {"json": body} if body else {}
    router, http, _, book = lora_stack(keys_file=str(keys))
    for headers, status in (({}, 401), ({"authorization": "Bearer wrong"}, 401),
                            ({"authorization": f"Bearer {plain}"}, 403)):
        assert getattr(http, method)(path, headers=headers, **kwargs).status_code == status
    assert not book.entries
    allowed = getattr(http, method)(path, headers={"authorization": f"Bearer {admin}"}, **kwargs)
    assert allowed.status_code in (200, 404), allowed.text  # past the check: added, or nothing to remove
    _, off_http, _, off_book = lora_stack(keys_file=str(keys), adapter_admin="off")
    refused = getattr(off_http, method)(path, headers={"authorization": f"Bearer {admin}"}, **kwargs)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "adapter_admin_off"
    assert not off_book.entries


def test_parse_add_takes_vllms_body_and_finds_the_only_lora_base():
    parsed = parse_config(config())
    added = parse_add({"lora_name": "x", "lora_path": "/a/x"}, parsed, vllm_form=True)
    assert (added.base, added.spec.name, added.spec.source.path) == ("base", "x", "/a/x")
    with pytest.raises(Exception, match="unknown field 'rank'"):
        parse_add({"lora_name": "x", "lora_path": "/a", "rank": 8}, parsed, vllm_form=True)
    raw = config()
    raw["models"][1]["engine_args"] = {"enable_lora": True}
    with pytest.raises(Exception, match="models with LoRA on are base, other"):
        parse_add({"lora_name": "x", "lora_path": "/a"}, parse_config(raw), vllm_form=True)
    catalog = catalog_from_config(parsed)
    replaced = RuntimeAdapter("base", added.spec)
    assert add_problem(replaced, parsed, {**catalog, "x": catalog["fruit-apple"]}, {}, {"x": replaced}) is None


def test_the_book_answers_only_what_changed():
    book = AdapterBook()
    assert book.read(-1) == (0, [])
    assert book.read(0) is None
    entry = RuntimeAdapter("base", parse_add({"lora_name": "x", "lora_path": "/a"}, parse_config(config()), True).spec)
    assert book.put(entry) == 1 and book.read(0) == (1, [entry]) and book.read(1) is None
    assert book.remove("x") == entry and book.remove("x") is None and book.version == 2


def test_replica_choice_keeps_an_adapter_to_replicas_that_serve_it():
    from serving.router.replica_router import EngineRequestRouter

    class Replica:
        def __init__(self, rid, adapters):
            self.routing_stats = RoutingStats(replica=rid, model="base", healthy=True, adapters=adapters).to_dict()
            self.rid = rid

    old, new, fresh = Replica("r1", ["x"]), Replica("r2", []), Replica("r3", None)
    fresh.routing_stats = {}
    serving = EngineRequestRouter._serving(None, [old, new, fresh], "x")
    assert [r.rid for r in serving] == ["r1", "r3"]
    assert [r.rid for r in EngineRequestRouter._serving(None, [new], "x")] == ["r2"]  # none does: the engine's 404


def test_check_refuses_an_adapter_rank_the_engine_cannot_hold(tmp_path):
    import yaml

    from serving.engine.lora import max_lora_rank
    from tests.conftest import run_cli

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 32}}))
    raw = {"models": [{"name": "base", "source": {"path": str(tmp_path)}, "engine_args": {"max_lora_rank": 16},
                       "adapters": [{"name": "big", "source": {"path": str(folder)}},
                                    {"name": "elsewhere", "source": {"path": str(tmp_path / "missing")}}]}]}
    file = tmp_path / "models.yaml"
    file.write_text(yaml.safe_dump(raw))
    result = run_cli("check", str(file), "--skip-engine-args")
    assert result.returncode == 2
    assert "models[0] (base).adapters[0] (big): rank 32 does not fit engine_args.max_lora_rank 16" in result.stderr
    assert "elsewhere" not in result.stderr  # not provisioned here: the engine checks it at start
    del raw["models"][0]["engine_args"]
    file.write_text(yaml.safe_dump(raw))
    assert run_cli("check", str(file), "--skip-engine-args").returncode == 0
    assert [max_lora_rank([r]) for r in (1, 8, 9, 16, 300)] == [1, 8, 16, 16, 320]
