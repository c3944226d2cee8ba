"""/metrics on the tenants stack (2 router replicas, a keys file): true across replicas, private per key.

- every scrape, whichever replica answers it, holds both router replicas' series (label
  `router_replica`), and every counter series only grows from one scrape to the next;
- a scrape without a key (the open /metrics) names no key of the keys file; an admin key's does,
  a non-admin key's names only its own.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CHAT_MODEL, bearer

pytestmark = pytest.mark.e2e

REPLICA = "router_replica"


def scrape(http: httpx.Client, headers: dict | None = None) -> tuple[str, dict[tuple, float], dict[str, str]]:
    """(text, {(sample name, labels): value}, {sample name: family type})."""
    response = http.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    samples, types = {}, {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
            types[s.name] = family.type
    return response.text, samples, types


def monotonic_series(samples: dict[tuple, float], types: dict[str, str]) -> dict[tuple, float]:
    """Counter and histogram series that must only grow (their _created timestamps excluded)."""
    return {k: v for k, v in samples.items()
            if types[k[0]] in ("counter", "histogram") and not k[0].endswith("_created")}


def replicas_of(samples: dict[tuple, float], name: str) -> set[str]:
    return {dict(labels).get(REPLICA) for (n, labels) in samples if n == name} - {None}


def traffic(url: str, key: str, n: int) -> None:
    """`n` requests at once, so Ray Serve's proxy spreads them over both router replicas:
    mostly 404s (unknown model: counted, no engine work), a few real answers."""
    def one(i: int) -> int:
        with httpx.Client(base_url=url, timeout=120) as http:
            model = CHAT_MODEL if i % 8 == 0 else "no-such-model"
            return http.post("/v1/chat/completions", headers=bearer(key), json={
                "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": f"hi {i}"}]}).status_code
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(n)))
    assert set(statuses) <= {200, 404}, statuses


def key_names(tenants) -> list[str]:
    keys_file = tenants["log"].parent / "keys.yaml"
    return [entry["name"] for entry in yaml.safe_load(keys_file.read_text())["keys"]]


def test_every_scrape_has_both_replicas_and_counters_only_grow(tenants):
    url, admin = tenants["url"], bearer(tenants["keys"]["admin"])
    with httpx.Client(base_url=url, timeout=120) as http:
        deadline = time.monotonic() + 120
        while True:  # both replicas counted requests (the proxy picks per request)
            traffic(url, tenants["keys"]["plain"], 32)
            _, samples, _ = scrape(http, admin)
            if len(replicas_of(samples, "serving_requests_total")) == 2 or time.monotonic() > deadline:
                break
        assert len(replicas_of(samples, "serving_requests_total")) == 2, "requests reached one router replica only"
        previous = None
        for round_ in range(8):
            traffic(url, tenants["keys"]["plain"], 8)
            _, samples, types = scrape(http, admin)
            assert len(replicas_of(samples, "serving_router_start_time_seconds")) == 2
            assert len(replicas_of(samples, "serving_key_requests_total")) == 2
            series = monotonic_series(samples, types)
            if previous is not None:
                for key, value in previous.items():
                    assert key in series, f"round {round_}: series gone between scrapes: {key}"
                    assert series[key] >= value, f"round {round_}: {key} went from {value} to {series[key]}"
            previous = series
        def key_total(samples, types) -> float:
            return sum(v for (n, labels), v in monotonic_series(samples, types).items()
                       if n == "serving_key_requests_total" and dict(labels)["key"] == "team-plain")

        # each replica publishes its counts every second (serving/router/metrics_export.py): the
        # last round's requests reach the shared /metrics within a few seconds, not at once
        total, settle_by = key_total(samples, types), time.monotonic() + 10
        while total < 32 + 8 * 8 and time.monotonic() < settle_by:
            time.sleep(0.5)
            total = key_total(*scrape(http, admin)[1:])
        assert total >= 32 + 8 * 8  # the sum over replicas counts every request of the key


def test_an_unauthenticated_scrape_names_no_key_and_an_admin_scrape_does(tenants):
    url = tenants["url"]
    traffic(url, tenants["keys"]["plain"], 8)
    names = key_names(tenants)
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(4):  # whichever replica answers
            text, samples, _ = scrape(http)
            assert "serving_key_" not in text
            assert not any("key" in dict(labels) for _, labels in samples)
            for name in names:
                assert f'"{name}"' not in text, name
            assert len(replicas_of(samples, "serving_requests_total")) >= 1  # the other families are there
        text, samples, _ = scrape(http, bearer(tenants["keys"]["admin"]))
        assert '"team-plain"' in text
        assert {dict(labels)["key"] for _, labels in samples if "key" in dict(labels)} >= {"team-plain"}
        # a non-admin key sees its own key's series and no other key's
        _, samples, _ = scrape(http, bearer(tenants["keys"]["plain"]))
        assert {dict(labels)["key"] for _, labels in samples if "key" in dict(labels)} == {"team-plain"}
        assert http.get("/metrics", headers=bearer("sk-not-a-key")).status_code == 401
