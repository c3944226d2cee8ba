"""Key records: the keys file schema, reload, authentication, allow-lists (no cluster)."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import pytest
import yaml

from serving.config import load_config
from serving.protocol.errors import ServingError
from serving.routing import catalog_from_config
from serving.tenants.keys import (KeyRecord, KeyStore, KeysFileError, allowed_names, key_digest, parse_keys_file, require_admin,
                             require_allowed, visible_models)

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def catalog():
    return catalog_from_config(load_config(ROOT / "models.yaml"))  # smollm2-135m (chat), all-minilm-l6-v2 (embed)


def write_keys(path: Path, entries: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"keys": entries}))


def entry(name: str, key: str, **extra) -> dict:
    return {"name": name, "sha256": key_digest(key), **extra}


# --- the file schema -------------------------------------------------------------------------
def test_a_valid_file_parses_with_defaults():
    parsed = parse_keys_file(yaml.safe_dump({"keys": [entry("team-a", "k1", rpm=30)]}))
    (one,) = parsed.keys
    assert (one.name, one.rpm, one.tpm, one.models, one.admin) == ("team-a", 30, None, None, False)


@pytest.mark.parametrize("keys, expected", [
    ([{"name": "a", "sha256": "abc"}], "keys[0].sha256: String should match pattern"),
    ([{"name": "a", "sha256": key_digest("x"), "rpm": 0}], "keys[0].rpm: Input should be greater than or equal to 1"),
    ([{"name": "a", "sha256": key_digest("x"), "rpn": 3}], "keys[0].rpn: Extra inputs are not permitted"),
    ([{"name": "a", "sha256": key_digest("x"), "models": []}], "omit `models` to allow every model"),
    ([{"name": "env-1", "sha256": key_digest("x")}], "reserved for keys from the API keys env var"),
    ([entry("a", "x"), entry("a", "y")], "duplicate name 'a'"),
    ([entry("a", "x"), entry("b", "x")], "the same key is already listed under another name"),
    ([{"sha256": key_digest("x")}], "keys[0].name: Field required"),
])
def test_bad_files_name_the_key_path(keys, expected):
    with pytest.raises(KeysFileError) as error:
        parse_keys_file(yaml.safe_dump({"keys": keys}), "keys.yaml")
    assert expected in str(error.value)
    assert str(error.value).startswith("keys.yaml")


def test_yaml_errors_say_where_without_echoing_content():
    with pytest.raises(KeysFileError) as error:
        parse_keys_file("keys:\n  - name: a\n    sha256: [unclosed secret-looking-text\n", "k.yaml")
    assert "line" in str(error.value) and "secret-looking-text" not in str(error.value)
    with pytest.raises(KeysFileError, match="top level must be a mapping"):
        parse_keys_file("- a\n- b\n")


def test_an_empty_file_has_no_keys():
    assert parse_keys_file("").keys == []


# --- authentication --------------------------------------------------------------------------
def test_no_keys_means_open_api():
    store = KeyStore(None, "")
    assert store.open and store.authenticate("") is None and store.authenticate("Bearer anything") is None


def test_env_keys_are_unlimited_records_and_not_admins_unless_asked():
    store = KeyStore(None, " k1, k2 ,,")
    record = store.authenticate("Bearer k2")
    assert record.name == "env-2" and not record.admin and not record.limited and record.models is None
    with pytest.raises(ServingError) as denied:
        require_admin(record)
    assert denied.value.status == 403
    assert KeyStore(None, "k1", env_admin=True).authenticate("Bearer k1").admin  # router.api_keys_admin: true
    assert store.authenticate("bearer k1").name == "env-1"  # scheme is case-insensitive
    for bad in ["", "Bearer", "Bearer k3", "k1", "Basic k1", "Bearer k1,k2"]:
        with pytest.raises(ServingError) as error:
            store.authenticate(bad)
        assert (error.value.status, error.value.code) == (401, "invalid_api_key")


def test_file_keys_authenticate_with_their_limits(tmp_path):
    path = tmp_path / "keys.yaml"
    write_keys(path, [entry("team-a", "sk-a", models=["smollm2"], rpm=30, tpm=1000, concurrency=2,
                            daily_budget=0.5), entry("ops", "sk-ops", admin=True)])
    store = KeyStore(str(path), "sk-env")
    a = store.authenticate("Bearer sk-a")
    assert (a.name, a.models, a.rpm, a.tpm, a.concurrency, a.daily_budget, a.admin, a.limited) == (
        "team-a", ("smollm2",), 30, 1000, 2, 0.5, False, True)
    assert store.authenticate("Bearer sk-ops").admin
    assert store.authenticate("Bearer sk-env").name == "env-1"
    assert sorted(store.names()) == ["env-1", "ops", "team-a"]
    with pytest.raises(ServingError):
        store.authenticate("Bearer " + key_digest("sk-a"))  # the stored hash is not a key


def test_a_configured_but_empty_file_locks_the_api(tmp_path):
    path = tmp_path / "keys.yaml"
    write_keys(path, [])
    store = KeyStore(str(path))
    assert not store.open
    with pytest.raises(ServingError):
        store.authenticate("Bearer whatever")


def test_a_missing_or_broken_file_at_start_fails_loudly(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read keys file"):
        KeyStore(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("keys: [{name: a}]")
    with pytest.raises(KeysFileError, match="sha256"):
        KeyStore(str(tmp_path / "bad.yaml"))


def test_records_hide_the_digest_in_repr():
    record = KeyStore(None, "sk-secret").authenticate("Bearer sk-secret")
    assert key_digest("sk-secret") not in repr(record) and "sk-secret" not in repr(record)


# --- reload ----------------------------------------------------------------------------------
def bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_changes_are_picked_up_at_most_once_per_interval(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    write_keys(path, [entry("a", "sk-a")])
    clock = Clock()
    store = KeyStore(str(path), clock=clock)
    assert store.authenticate("Bearer sk-a").name == "a"
    write_keys(path, [entry("b", "sk-b", rpm=5)])
    bump(path)
    with pytest.raises(ServingError):  # within the interval: not checked yet
        store.authenticate("Bearer sk-b")
    clock.t += 1.0
    assert store.authenticate("Bearer sk-b").rpm == 5
    with pytest.raises(ServingError):  # revoked
        store.authenticate("Bearer sk-a")

    # a broken edit keeps the last good keys, and says so in the log
    caplog.set_level(logging.INFO, logger="serving.tenants")
    path.write_text("keys: [{name: c, sha256: nothex}]")
    bump(path)
    clock.t += 1.0
    assert store.authenticate("Bearer sk-b").name == "b"
    assert any("not valid" in r.getMessage() and "keeping the 1 keys" in r.getMessage() for r in caplog.records)

    # the file disappearing (e.g. mid-update) also keeps the keys
    path.unlink()
    clock.t += 1.0
    assert store.authenticate("Bearer sk-b").name == "b"
    write_keys(path, [entry("d", "sk-d")])
    clock.t += 1.0
    assert store.authenticate("Bearer sk-d").name == "d"


def test_a_kubernetes_style_symlink_swap_is_noticed(tmp_path):
    """A mounted Secret updates by pointing a symlink at a new directory."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir(), v2.mkdir()
    write_keys(v1 / "keys.yaml", [entry("a", "sk-a")])
    write_keys(v2 / "keys.yaml", [entry("a", "sk-a2")])
    os.utime(v2 / "keys.yaml", ns=((v1 / "keys.yaml").stat().st_atime_ns, (v1 / "keys.yaml").stat().st_mtime_ns))
    link = tmp_path / "data"
    link.symlink_to(v1)
    clock = Clock()
    store = KeyStore(str(link / "keys.yaml"), clock=clock)
    assert store.authenticate("Bearer sk-a")
    tmp = tmp_path / "data.tmp"
    tmp.symlink_to(v2)
    tmp.replace(link)
    clock.t += 1.0
    assert store.authenticate("Bearer sk-a2").name == "a"


def test_no_key_material_in_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "keys.yaml"
    keys = [f"sk-{secrets.token_urlsafe(24)}" for _ in range(20)]
    write_keys(path, [entry(f"k{i}", k) for i, k in enumerate(keys)])
    clock = Clock()
    store = KeyStore(str(path), ",".join(keys[:3]), clock=clock)
    for i, key in enumerate(keys):
        store.authenticate(f"Bearer {key}")
        with pytest.raises(ServingError) as error:
            store.authenticate(f"Bearer {key}x")
        assert key not in str(error.value.body()) and key not in str(error.value.headers)
        if i % 5 == 0:
            path.write_text(path.read_text() + ("\n  broken: [" if i % 10 == 0 else ""))
            bump(path)
            clock.t += 1.0
    text = caplog.text
    assert caplog.records  # the reloads did log
    for key in keys:
        assert key not in text and key_digest(key) not in text


# --- allow-lists -----------------------------------------------------------------------------
def rec(models=None) -> KeyRecord:
    return KeyRecord("team", tuple(models) if models is not None else None)


def allows(record, requested, resolved, catalog) -> bool:
    try:
        return bool(require_allowed(record, requested, resolved, catalog))
    except ServingError as error:
        assert error.status == 403
        return False


def test_no_list_allows_everything(catalog):
    assert allowed_names(rec(), catalog) is None
    assert allows(rec(), "tag:small", ["smollm2-135m", "all-minilm-l6-v2"], catalog)
    assert visible_models(rec(), catalog) == ["smollm2-135m", "all-minilm-l6-v2"]
    assert visible_models(None, catalog) == list(catalog)


def test_a_model_name_allows_its_aliases_and_nothing_else(catalog):
    key = rec(["smollm2-135m"])
    assert allows(key, "smollm2-135m", ["smollm2-135m"], catalog)
    assert allows(key, "smollm2", ["smollm2-135m"], catalog)
    assert allows(key, "default-chat", ["smollm2-135m"], catalog)
    assert not allows(key, "minilm", ["all-minilm-l6-v2"], catalog)
    assert visible_models(key, catalog) == ["smollm2-135m"]


def test_an_alias_on_the_list_allows_its_model(catalog):
    key = rec(["minilm"])
    assert allowed_names(key, catalog) == {"all-minilm-l6-v2"}
    assert allows(key, "all-minilm-l6-v2", ["all-minilm-l6-v2"], catalog)
    assert not allows(key, "smollm2", ["smollm2-135m"], catalog)


def test_tag_selectors_allow_every_model_with_those_tags(catalog):
    assert allowed_names(rec(["tag:small"]), catalog) == {"smollm2-135m", "all-minilm-l6-v2"}
    assert allowed_names(rec(["tag:chat,small"]), catalog) == {"smollm2-135m"}
    assert allowed_names(rec(["tag:gpu"]), catalog) == frozenset()
    assert allowed_names(rec(["tag:"]), catalog) == frozenset()


def test_a_tag_request_is_narrowed_to_the_allowed_models(catalog):
    key = rec(["smollm2"])
    resolved = ["all-minilm-l6-v2", "smollm2-135m"]
    assert allows(key, "tag:small", resolved, catalog)
    assert require_allowed(key, "tag:small", resolved, catalog) == ["smollm2-135m"]


def test_a_route_on_the_list_allows_its_sides_through_it_and_nothing_they_fall_back_to(catalog):
    key = rec(["auto"])
    sides = ["smollm2-135m"]
    assert require_allowed(key, "auto", ["smollm2-135m", "all-minilm-l6-v2"], catalog, route_models=sides) == sides
    with pytest.raises(ServingError):  # the route's models are not the key's outside the route
        require_allowed(key, "smollm2-135m", ["smollm2-135m"], catalog)


def test_every_candidate_is_checked_fallbacks_included(catalog):
    """A key allowed one model is never served by another candidate, even when the requested
    model itself is on the key's list (the old code returned every candidate then)."""
    key = rec(["smollm2-135m"])
    assert require_allowed(key, "smollm2-135m", ["smollm2-135m", "all-minilm-l6-v2"], catalog) == ["smollm2-135m"]
    with pytest.raises(ServingError) as error:  # only the fallback left: refused, not served by it
        require_allowed(key, "smollm2-135m", ["all-minilm-l6-v2"], catalog)
    assert error.value.status == 403


def test_forbidden_is_a_403_naming_what_the_key_may_use(catalog):
    with pytest.raises(ServingError) as error:
        require_allowed(rec(["smollm2"]), "minilm", ["all-minilm-l6-v2"], catalog)
    e = error.value
    assert (e.status, e.code, e.type, e.param) == (403, "model_not_allowed", "permission_error", "model")
    assert e.headers["x-error-origin"] == "auth" and "smollm2-135m" in e.message


def test_admin_only_and_key_labels():
    from serving.tenants.keys import OPEN_KEY, key_label, require_admin
    require_admin(None)  # open API
    require_admin(KeyRecord("ops", admin=True))
    with pytest.raises(ServingError) as error:
        require_admin(KeyRecord("team"))
    assert (error.value.status, error.value.code, error.value.headers["x-error-origin"]) == (403, "admin_key_required", "auth")
    assert key_label(KeyRecord("team")) == "team" and key_label(None) == OPEN_KEY


def test_1000_random_requests_half_invalid_leave_no_key_material(tmp_path, caplog, capsys):
    """The issue's target at unit level: every invalid key 401, no key or digest in any log line."""
    import random
    import time

    from serving.protocol.timestamps import utc_iso
    from serving.router.requestlog import RequestLog, RequestLogRecord

    caplog.set_level(logging.DEBUG)
    valid = [f"sk-{secrets.token_urlsafe(32)}" for _ in range(50)]
    path = tmp_path / "keys.yaml"
    write_keys(path, [entry(f"team-{i}", k, rpm=30) for i, k in enumerate(valid)])
    store = KeyStore(str(path), ",".join(valid[:2]))
    log = RequestLog(stdout=False, path=str(tmp_path / "requests.jsonl"))
    rng = random.Random(7)
    sent = []
    elapsed = 0.0
    for i in range(1000):
        key = rng.choice(valid) if i % 2 else f"sk-{secrets.token_urlsafe(32)}"
        sent.append(key)
        started = time.perf_counter()
        try:
            record = store.authenticate(f"Bearer {key}")
            status, origin, name = 200, None, record.name
        except ServingError as error:
            status, origin, name = error.status, "auth", None
        elapsed += time.perf_counter() - started
        assert status == (200 if i % 2 else 401)
        log.write(RequestLogRecord(utc_iso(timespec="milliseconds"), f"r{i}", name, "smollm2", None, None, None, status, origin))
    log.close()
    text = (tmp_path / "requests.jsonl").read_text() + caplog.text
    assert len(text.splitlines()) >= 1000
    for key in set(sent):
        assert key not in text and key_digest(key) not in text
    with capsys.disabled():
        print(f"\nauthenticate: {elapsed / 1000 * 1e6:.1f} us per request (50 file keys + 2 env keys)")
