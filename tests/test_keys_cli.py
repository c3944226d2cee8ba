"""`serving keys`: create, list, revoke, and what lands on disk. The command runs in this process
(`run_cli`: its exit code, stdout and stderr, as a shell sees them); as real processes where that is
what is tested: the first create (the console entry point) and concurrent creates (the file lock
between processes)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from serving.protocol.errors import ServingError
from serving.tenants.keys import KeyStore, key_digest, load_keys_file
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def serving(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`serving ARGS` run in `cwd`, in this process."""
    with contextlib.chdir(cwd):
        return run_cli(*args)


def serving_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.control.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_create_prints_the_key_last_and_stores_only_its_hash(tmp_path):
    done = serving_process("keys", "create", "team-a", "--models", "smollm2,tag:embed", "--rpm", "30", "--tpm", "5000",
                   "--concurrency", "4", "--budget", "0.5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    key = done.stdout.splitlines()[-1]
    assert key.startswith("sk-") and len(key) > 40 and done.stdout.count(key) == 1
    path = tmp_path / "keys.yaml"  # the default file
    text = path.read_text()
    assert key not in text and key_digest(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (entry,) = load_keys_file(path).keys
    assert (entry.name, entry.models, entry.rpm, entry.tpm, entry.concurrency, entry.daily_budget, entry.admin) == (
        "team-a", ["smollm2", "tag:embed"], 30, 5000, 4, 0.5, False)
    assert not list(tmp_path.glob(".keys.yaml.*"))  # no temp file left behind
    # and the router accepts exactly that key
    record = KeyStore(str(path)).authenticate(f"Bearer {key}")
    assert record.name == "team-a" and record.rpm == 30


def test_duplicate_names_are_refused_and_the_file_is_untouched(tmp_path):
    assert serving("keys", "create", "a", cwd=tmp_path).returncode == 0
    before = (tmp_path / "keys.yaml").read_text()
    done = serving("keys", "create", "a", "--admin", cwd=tmp_path)
    assert done.returncode == 1 and "already exists" in done.stderr and not done.stdout
    assert (tmp_path / "keys.yaml").read_text() == before


def test_list_shows_names_and_limits_without_hashes(tmp_path):
    serving("keys", "create", "team-a", "--rpm", "30", cwd=tmp_path)
    serving("keys", "create", "ops", "--admin", "--budget", "2", cwd=tmp_path)
    done = serving("keys", "list", cwd=tmp_path)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODELS", "RPM", "TPM", "CONCURRENCY", "DAILY_BUDGET", "ADMIN", "CREATED"]
    assert lines[1].split()[:7] == ["team-a", "all", "30", "-", "-", "-", "no"]
    assert lines[2].split()[:7] == ["ops", "all", "-", "-", "-", "2", "yes"]
    for entry in load_keys_file(tmp_path / "keys.yaml").keys:
        assert entry.sha256 not in done.stdout
    assert serving("keys", "list", "--file", "none.yaml", cwd=tmp_path).stdout.strip() == "none.yaml: no keys"


def test_revoke_removes_the_key_for_a_running_store(tmp_path):
    key = serving("keys", "create", "a", cwd=tmp_path).stdout.splitlines()[-1]
    serving("keys", "create", "b", cwd=tmp_path)
    store = KeyStore(str(tmp_path / "keys.yaml"), check_interval_s=0)
    assert store.authenticate(f"Bearer {key}").name == "a"
    done = serving("keys", "revoke", "a", cwd=tmp_path)
    assert done.returncode == 0 and "revoked key 'a'" in done.stdout
    with pytest.raises(ServingError):
        store.authenticate(f"Bearer {key}")
    assert [e.name for e in load_keys_file(tmp_path / "keys.yaml").keys] == ["b"]
    missing = serving("keys", "revoke", "a", cwd=tmp_path)
    assert missing.returncode == 1 and "no key named 'a'" in missing.stderr


def test_the_file_comes_from_router_keys_file_in_the_config(tmp_path):
    config = yaml.safe_load((ROOT / "models.yaml").read_text())
    config["router"]["keys_file"] = str(tmp_path / "secrets" / "tenants.yaml")
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(config))
    done = serving("keys", "create", "a", "--models", "smollm2", "--config", "models.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "secrets" / "tenants.yaml").exists() and not (tmp_path / "keys.yaml").exists()
    unknown = serving("keys", "create", "b", "--models", "gpt-9", "--config", "models.yaml", cwd=tmp_path)
    assert unknown.returncode == 2 and "'gpt-9' is no model, alias or tag selector" in unknown.stderr
    assert serving("keys", "create", "c", "--models", "tag:chat,small", "--config", "models.yaml", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--rpm", "0"], "must be at least 1"),
    (["--budget", "-1"], "must be 0 or more"),
    (["--models", " , "], "--models is empty"),
])
def test_bad_arguments_are_refused(tmp_path, args, message):
    done = serving("keys", "create", "a", *args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "keys.yaml").exists()


def test_bad_names_are_refused(tmp_path):
    done = serving("keys", "create", "env-1", cwd=tmp_path)
    assert done.returncode == 2 and "reserved" in done.stderr
    done = serving("keys", "create", "has space", cwd=tmp_path)
    assert done.returncode == 2 and "invalid key" in done.stderr


def test_a_broken_file_is_not_overwritten(tmp_path):
    (tmp_path / "keys.yaml").write_text("keys: [{name: a}]\n")
    done = serving("keys", "create", "b", cwd=tmp_path)
    assert done.returncode == 2 and "nothing was changed" in done.stderr
    assert (tmp_path / "keys.yaml").read_text() == "keys: [{name: a}]\n"


def test_concurrent_creates_lose_no_key(tmp_path):
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: serving_process("keys", "create", f"k{i}", cwd=tmp_path), range(6)))
    assert all(r.returncode == 0 for r in results)
    stored = {e.name: e.sha256 for e in load_keys_file(tmp_path / "keys.yaml").keys}
    assert stored == {f"k{i}": key_digest(r.stdout.splitlines()[-1]) for i, r in enumerate(results)}


def test_models_argument_parsing():
    from serving.control.keys_cli import parse_models
    assert parse_models(["a,b"]) == ["a", "b"]
    assert parse_models(["smollm2,tag:chat,small"]) == ["smollm2", "tag:chat,small"]
    assert parse_models(["tag:embed", "minilm, smollm2"]) == ["tag:embed", "minilm", "smollm2"]
    assert parse_models([" , "]) == []
