"""The engine's CPU thread settings, resolved per replica process (pure function, no engine)."""

import os

from serving.engine.deployment import expand_thread_binding


def test_all_means_every_allowed_core_and_as_many_omp_threads():
    cores = sorted(os.sched_getaffinity(0))
    env = expand_thread_binding({"VLLM_CPU_OMP_THREADS_BIND": "all", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    # Ray starts a 1-CPU replica with OMP_NUM_THREADS=1; the engine must not inherit that.
    assert env["OMP_NUM_THREADS"] == str(len(cores))
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_explicit_lists_count_their_cores():
    assert expand_thread_binding({"VLLM_CPU_OMP_THREADS_BIND": "0-3,6"})["OMP_NUM_THREADS"] == "5"
    assert expand_thread_binding({"VLLM_CPU_OMP_THREADS_BIND": "0-1|2-3"})["OMP_NUM_THREADS"] == "2"


def test_explicit_omp_threads_win_and_vllm_modes_pass_through():
    assert expand_thread_binding({"VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
    assert expand_thread_binding({"VLLM_CPU_OMP_THREADS_BIND": "auto"}) == {"VLLM_CPU_OMP_THREADS_BIND": "auto"}
    assert expand_thread_binding({}) == {}
