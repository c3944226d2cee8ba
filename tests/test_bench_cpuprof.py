"""bench/cpuprof.py: /proc parsing, role classification, per-token arithmetic, and one real
measurement of a child process's CPU (no cluster needed)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from bench import cpuprof
from bench.cpuprof import Sample, aggregate, classify, descendants, diff, parse_stat


def stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, start: int = 1000) -> str:
    # Real layout: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    #              utime stime cutime cstime priority nice threads itrealvalue starttime vsize ...
    return (f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 1000 0 0 0 {utime} {stime} 7 3 20 0 "
            f"12 0 {start} 123456789 2000 18446744073709551615 1 1 0 0 0 0 0 4096 17003 0 0 0 17 1 0 0 0 0 0")


def test_parse_stat_reads_utime_stime_and_survives_odd_comm():
    s = parse_stat(stat_line(42, "ray::ServeRepli", 7, 150, 50, start=9999), "ray::ServeReplica:serving:router")
    assert (s.pid, s.ppid, s.comm, s.ticks, s.start) == (42, 7, "ray::ServeRepli", 200, 9999)
    # comm may contain spaces and parentheses: the last ')' ends it
    odd = parse_stat(stat_line(5, "a) (b c", 1, 3, 4))
    assert odd.comm == "a) (b c" and odd.ticks == 7 and odd.ppid == 1


def test_parse_stat_of_this_process_matches_os_times():
    with open(f"/proc/{os.getpid()}/stat") as fh:
        s = parse_stat(fh.read())
    assert s.pid == os.getpid() and s.ppid == os.getppid()
    t = os.times()
    hz = os.sysconf("SC_CLK_TCK")
    assert abs(s.ticks / hz - (t.user + t.system)) < 0.1


@pytest.mark.parametrize("comm,cmd,role", [
    ("ray::ProxyActor", "ray::ProxyActor.receive_asgi_messages", "proxy"),
    ("ray::ServeRepli", "ray::ServeReplica:serving:router.handle_request_with_rejection", "router"),
    ("ray::ServeRepli", "ray::ServeReplica:serving:router", "router"),
    ("ray::ServeRepli", "ray::ServeReplica:serving:smollm2-135m", "engine_frontend"),
    ("ray::ServeRepli", "ray::ServeReplica:serving:smollm2-135m.generate", "engine_frontend"),
    # Ray Serve LLM: ingress and LLMServer:<model>
    ("ray::ServeRepli", "ray::ServeReplica:default:OpenAiIngress", "router"),
    ("ray::ServeRepli", "ray::ServeReplica:default:LLMServer:smollm2-135m", "engine_frontend"),
    ("VLLM::EngineCor", "VLLM::EngineCore", "engine_core"),
    ("VLLM::Worker", "VLLM::Worker", "engine_worker"),
    ("python", "/v/bin/python -m vllm.entrypoints.openai.api_server --model /m --port 8100", "vllm_api_server"),
    ("ray::ServeContr", "ray::ServeController", "controller"),
    ("gcs_server", "/v/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp", "gcs"),
    ("raylet", "/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "raylet"),
    ("ray::DashboardA", "ray::DashboardAgent", "ray_agents"),
    ("python", "/v/bin/python -u /v/lib/python3.11/site-packages/ray/dashboard/agent.py --node-id=1", "ray_agents"),
    ("python", "/v/bin/python -u /v/ray/_private/runtime_env/agent/main.py --node-id=1", "ray_agents"),
    ("ray::IDLE", "ray::IDLE", "ray_workers"),
    ("ray::LimitsActo", "ray::LimitsActor.take", "ray_workers"),
    ("python", "/v/bin/python -m serving.control.cli up /tmp/x.yaml", "driver"),
    ("serving", "/v/bin/python /v/bin/serving up --port 8000", "driver"),
    ("python", "/v/bin/python bench/scripts/null_stack.py --port 18300", "driver"),
    ("python", "/v/bin/python bench/scripts/ray_serve_llm.py --port 18200", "driver"),
    ("bash", "bash -l", "other"),
    ("kworker/0:1", "", "other"),
])
def test_classify(comm, cmd, role):
    assert classify(comm, cmd) == role


def snap(*samples: Sample) -> dict:
    return {s.key: s for s in samples}


def test_diff_counts_deltas_new_processes_reused_pids_and_exits():
    hz = 100.0
    before = snap(Sample(10, 1, "raylet", 500, 1), Sample(11, 10, "ray::ProxyActor", 100, 2, "ray::ProxyActor"),
                  Sample(12, 10, "ray::IDLE", 40, 3, "ray::IDLE"), Sample(13, 10, "x", 7, 4, "old process"))
    after = snap(Sample(10, 1, "raylet", 530, 1), Sample(11, 10, "ray::ProxyActor", 250, 2, "ray::ProxyActor"),
                 Sample(20, 11, "VLLM::EngineCor", 900, 50, "VLLM::EngineCore"),  # started in the window
                 Sample(13, 10, "x", 5, 77, "a new process with a reused pid"))  # pid 13 reused
    d = {(x.pid, x.state): x for x in diff(before, after, hz)}
    assert d[(10, "alive")].cpu_s == pytest.approx(0.30)
    assert d[(11, "alive")].cpu_s == pytest.approx(1.50) and d[(11, "alive")].role == "proxy"
    assert d[(20, "started")].cpu_s == pytest.approx(9.0) and d[(20, "started")].role == "engine_core"
    assert d[(13, "started")].cpu_s == pytest.approx(0.05)  # counted from zero, not 5 - 7
    assert d[(12, "exited")].cpu_s == 0.0 and d[(13, "exited")].cpu_s == 0.0
    scoped = diff(before, after, hz, exclude={11}, scope={10, 11, 20})
    assert {x.pid for x in scoped} == {10, 20}


def test_descendants():
    samples = [Sample(1, 0, "init", 0, 0), Sample(100, 1, "python", 0, 0), Sample(101, 100, "gcs_server", 0, 0),
               Sample(102, 100, "raylet", 0, 0), Sample(103, 102, "ray::X", 0, 0), Sample(104, 103, "VLLM", 0, 0),
               Sample(200, 1, "other", 0, 0)]
    assert descendants(samples, {100}) == {100, 101, 102, 103, 104}
    assert descendants(samples, {102}) == {102, 103, 104}


def test_aggregate_per_role_and_per_token():
    D = cpuprof.Delta
    deltas = [D(1, "router", 2.5, "", "alive"), D(2, "proxy", 1.5, "", "alive"),
              D(3, "engine_frontend", 1.7, "", "alive"), D(4, "controller", 0.6, "", "alive"),
              D(5, "gcs", 0.5, "", "alive"), D(6, "engine_core", 35.1, "", "alive"),
              D(7, "other", 9.0, "", "alive"), D(8, "bench_client", 0.1, "", "alive"),
              D(9, "ray_workers", 0.0, "", "exited"), D(10, "engine_worker", 0.0, "", "alive")]
    rep = aggregate(deltas, wall_s=29.0, output_tokens=3072, client_cpu_s=3.0)
    # The issue's own numbers: 6.8 CPU-s around the engine over 3,072 tokens = 2.21 ms/token
    assert rep["around_engine_cpu_s"] == pytest.approx(6.8)
    assert rep["around_engine_ms_per_token"] == pytest.approx(6.8 * 1000 / 3072, abs=1e-4)
    assert rep["engine_core_ms_per_token"] == pytest.approx(35.1 * 1000 / 3072, abs=1e-4)
    roles = rep["roles"]
    assert roles["bench_client"]["cpu_s"] == 3.0  # getrusage replaces the /proc figure
    assert roles["other"]["cpu_s"] == 9.0 and "other" not in rep["around_engine_roles"]
    assert roles["router"]["cores"] == pytest.approx(2.5 / 29.0, abs=1e-3)
    assert roles["ray_workers"]["exited"] == 1
    with_worker = aggregate(deltas + [D(11, "engine_worker", 4.9, "", "alive")], 29.0, 3072)
    assert with_worker["engine_core_cpu_s"] == pytest.approx(40.0)  # the executor worker is the engine's
    assert with_worker["around_engine_cpu_s"] == pytest.approx(6.8)
    assert aggregate(deltas, 29.0, None)["around_engine_ms_per_token"] is None


def test_output_tokens_of_runs_counts_only_completed(tmp_path):
    doc = {"config": {"command": "run"}, "records": [
        {"outcome": "ok", "output_tokens": 64}, {"outcome": "ok", "output_tokens": 60},
        {"outcome": "error", "output_tokens": 3}, {"outcome": "incomplete", "output_tokens": 10}],
        "warmup_records": [{"outcome": "ok", "output_tokens": 64}]}
    p = tmp_path / "x-c8.json"
    p.write_text(json.dumps(doc))
    (tmp_path / "other.json").write_text(json.dumps({"schema": "bench.ab/1"}))
    assert cpuprof.output_tokens_of_runs([str(p)]) == 124
    assert cpuprof.new_run_files(str(tmp_path), 0) == [str(p)]
    assert cpuprof.out_dir_of(["python", "-m", "bench", "run", "--out", "d"]) == "d"
    assert cpuprof.out_dir_of(["x", "--out=e"]) == "e"


def test_measure_a_real_command_counts_its_cpu_as_the_client(tmp_path):
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.4: pass"
    # scoped to this test's own process tree: other jobs on a shared machine stay out
    m = cpuprof.measure([sys.executable, "-c", burn], roots=[os.getpid()])
    client = m.report["roles"]["bench_client"]["cpu_s"]
    assert 0.35 <= client <= 1.5
    assert m.report["around_engine_cpu_s"] == 0  # the burner is the client, never the stack
    assert m.report["scope"]["roots"] == [os.getpid()]


def test_scope_by_port_finds_the_listener_tree():
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    try:
        assert cpuprof.listener_pid(port) == os.getpid()
        scope, roots = cpuprof.scope_pids(cpuprof.read_snapshot(), port=port)
        assert os.getpid() in scope and len(roots) == 1
    finally:
        srv.close()
    assert cpuprof.listener_pid(port) is None
