"""The router's drain middleware: once the app is flagged as draining, new requests get an OpenAI-shaped 503.

The flag itself lives in Ray's GCS (tested on a real stack by bench chaos `sigterm`); here its read
is replaced so the HTTP behaviour is checked without a cluster.
"""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.router import drain


def app_with_drain(monkeypatch, flag: dict) -> TestClient:
    monkeypatch.setattr(drain, "is_draining", lambda app_name: flag["on"])
    monkeypatch.setattr(drain, "CHECK_INTERVAL_S", 0.0)
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat():
        return {"ok": True}

    app.add_middleware(drain.DrainMiddleware, app_name="serving")
    return TestClient(app)


def test_serves_until_draining_then_503_with_retry_after(monkeypatch):
    flag = {"on": False}
    client = app_with_drain(monkeypatch, flag)
    assert client.post("/v1/chat/completions", json={}).status_code == 200
    flag["on"] = True
    response = client.post("/v1/chat/completions", json={})
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(drain.RETRY_AFTER_S)
    assert response.headers["x-error-origin"] == "overload"
    error = response.json()["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == "shutting_down"
    assert isinstance(error["message"], str) and error["param"] is None
    # one way: a replica that saw the flag keeps refusing even if the read later fails or flips
    flag["on"] = False
    assert client.get("/health").status_code == 503


def test_flag_read_failure_keeps_serving(monkeypatch):
    def broken(app_name):
        raise ConnectionError("GCS unreachable")

    client = app_with_drain(monkeypatch, {"on": False})
    monkeypatch.setattr(drain, "is_draining", broken)
    assert client.post("/v1/chat/completions", json={}).status_code == 200


def test_outside_a_serve_replica_nothing_drains(monkeypatch):
    monkeypatch.setattr(drain, "is_draining", lambda app_name: True)  # would drain if asked
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    app.add_middleware(drain.DrainMiddleware)  # app name from the replica context: none here
    assert TestClient(app).get("/health").status_code == 200
