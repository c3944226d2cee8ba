"""On the live stack: vLLM's engine cores and their replicas run at nice 0, not at the nice 15 Ray
gives its workers, so Ray's daemons (at 0) no longer preempt the engine's OpenMP threads
(serving.app.ENGINE_WORKER_ENV; measured in bench/results/request-path/priority)."""

from __future__ import annotations

import os

import psutil

from tests.conftest import CHAT_MODEL, EMBED_MODEL, SECOND_CHAT_MODEL


def _nice_of_threads(proc: psutil.Process) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in proc.threads()}


def _stack_processes(stack) -> dict[str, list[psutil.Process]]:
    """This stack's processes (descendants of its `serving up`) by process title."""
    by_title: dict[str, list[psutil.Process]] = {}
    for proc in psutil.Process(stack.process.pid).children(recursive=True):
        try:
            title = proc.cmdline()[0] if proc.cmdline() else ""
        except psutil.Error:
            continue
        by_title.setdefault(title.split(" ")[0], []).append(proc)
    return by_title


def test_engine_cores_and_engine_replicas_run_at_nice_0_other_workers_keep_rays_15(stack):
    procs = _stack_processes(stack)
    cores = procs.get("VLLM::EngineCore", [])
    assert len(cores) == 3, sorted(procs)  # two chat engines and the embedding engine
    for core in cores:
        assert _nice_of_threads(core) == {0}, core.pid
    for model in (CHAT_MODEL, SECOND_CHAT_MODEL, EMBED_MODEL):
        [replica] = procs[f"ray::ServeReplica:serving:{model}"]
        assert replica.nice() == 0, model
        assert replica.pid in {core.ppid() for core in cores}, model  # its own engine core
    [router] = procs["ray::ServeReplica:serving:router"]
    assert router.nice() == 15  # Ray's default for every other worker: below the engines
