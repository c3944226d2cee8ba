"""Our OpenAI types against vLLM's: same field names, so a vLLM upgrade that changes them fails here.

serving/protocol/errors.py (ErrorInfo, ErrorResponse) and serving/router/listing.py (ModelCard, ModelList,
ModelPermission) copy vLLM's types instead of importing them: the router process must not import
vLLM (its protocol module pulls in torch). This test process may import vLLM; the router may not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest

from serving.protocol import errors
from serving.config import load_config
from serving.router import listing
from serving.routing import catalog_from_config

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)

# Ours against vLLM's class of the same name. vLLM is imported by the tests, not at collection,
# so collecting the suite (once per xdist worker) does not pay vLLM's ~6 s import.
PAIRS = [errors.ErrorInfo, errors.ErrorResponse, listing.ModelPermission, listing.ModelCard, listing.ModelList]


@pytest.fixture(scope="module")
def protocol():
    return pytest.importorskip("vllm.entrypoints.serve.engine.protocol")


@pytest.mark.parametrize("ours", PAIRS, ids=lambda t: t.__name__)
def test_same_field_names_as_vllm(ours, protocol):
    theirs = getattr(protocol, ours.__name__)
    extra = set(listing.ROUTER_FIELDS) if ours is listing.ModelCard else set()
    assert set(ours.model_fields) - extra == set(theirs.model_fields)
    assert ours.model_config.get("extra") == theirs.model_config.get("extra") == "allow"


@pytest.mark.parametrize("ours", PAIRS, ids=lambda t: t.__name__)
def test_same_defaults_as_vllm(ours, protocol):
    """Constant defaults agree (vLLM's time- and uuid-based ones and owned_by='vllm' excepted)."""
    theirs = getattr(protocol, ours.__name__)
    differ = {"created", "id", "owned_by", "code", "permission", "data"}
    for name, field in theirs.model_fields.items():
        if name in differ or field.is_required():
            continue
        assert ours.model_fields[name].default == field.default, name


def test_code_is_a_string_by_design(protocol):
    """The documented deviation: OpenAI's string code, where vLLM's ErrorInfo.code is the HTTP status."""
    assert protocol.ErrorInfo.model_fields["code"].annotation is int
    assert errors.ErrorInfo.model_fields["code"].annotation == typing.Optional[str]


def test_vllm_errors_reshape_into_ours(protocol):
    """vLLM's own ErrorResponse (int code) becomes our body with vLLM's field names and a string code."""
    from serving.engine.deployment import _from_vllm_response

    theirs = protocol.ErrorResponse(error=protocol.ErrorInfo(
        message="This model's maximum context length is 2048 tokens.", type="BadRequestError",
        param="messages", code=400))
    error = _from_vllm_response(theirs)
    assert error.status == 400
    body = error.body()
    assert body == errors.ErrorResponse.model_validate(body).model_dump()
    assert set(body["error"]) == set(theirs.error.model_dump())
    assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"


def test_vllm_stream_error_event_is_reshaped(protocol):
    """vLLM streams `data: {"error": {..., "code": 500}}`: the engine relays our shape instead."""
    from serving.engine.deployment import VLLM_SSE_ERROR, _reshape_sse_error

    event = "data: " + json.dumps(protocol.ErrorResponse(error=protocol.ErrorInfo(
        message="Internal server error", type="InternalServerError", code=500)).model_dump()) + "\n\n"
    assert event.startswith(VLLM_SSE_ERROR)
    reshaped = _reshape_sse_error(event)
    assert reshaped.startswith("data: ") and reshaped.endswith("\n\n")
    assert json.loads(reshaped[6:])["error"] == {"message": "Internal server error", "type": "server_error",
                                                 "param": None, "code": "engine_error"}
    assert _reshape_sse_error('data: {"error_rate": 1}\n\n') == 'data: {"error_rate": 1}\n\n'


def test_listing_is_a_valid_vllm_model_list(protocol):
    config = load_config("models.yaml")
    catalog = catalog_from_config(config)
    states = {name: {"state": "ready", "replicas": 1} for name in catalog}
    dumped = listing.model_list(config, catalog, set(catalog), states).model_dump(mode="json")
    theirs = protocol.ModelList.model_validate(dumped)
    assert [card.id for card in theirs.data] == [card["id"] for card in dumped["data"]]
    first, alias = dumped["data"][0], dumped["data"][1]
    assert first["max_model_len"] == 2048 and first["status"] == "ready" and first["tags"]
    assert alias["alias_of"] == first["id"] and "tags" not in alias and "price" not in alias
    embed = next(card for card in dumped["data"] if card.get("task") == "embed")
    assert embed["max_model_len"] == 256  # the model's own engine_args win over the profile's


def test_router_does_not_import_vllm():
    """The router is a thin process: importing it (and the errors) must not pull in vLLM or torch."""
    code = ("import sys, serving.protocol.errors, serving.router.core, serving.router.http, serving.router.listing, "
            "serving.router.drain; "
            "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
