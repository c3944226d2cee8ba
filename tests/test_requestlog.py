"""The JSON request log: format, file output, never blocking, never a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from serving.protocol.timestamps import utc_iso
from serving.router.requestlog import RequestLog, RequestLogRecord

ROOT = Path(__file__).resolve().parents[1]


def record(i: int = 0, **over) -> RequestLogRecord:
    values = dict(time=utc_iso(timespec="milliseconds"), request_id=f"req-{i}", key="team-a", requested_model="smollm2",
                  served_model="smollm2-135m", replica="router#abc", route_rule="alias", status=200,
                  error_origin=None, prompt_tokens=12, completion_tokens=30, ttft_ms=41.5, duration_ms=380.2,
                  overhead_ms=3.1, fallback_from=None)
    values.update(over)
    return RequestLogRecord(**values)


FIELDS = ["time", "request_id", "key", "requested_model", "served_model", "replica", "route_rule", "status",
          "error_origin", "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms", "overhead_ms",
          "fallback_from", "base_model"]


def test_one_json_line_per_record_in_a_file(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = RequestLog(stdout=False, path=str(path))
    for i in range(100):
        log.write(record(i, status=429 if i % 10 == 0 else 200, error_origin="limit" if i % 10 == 0 else None))
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 100
    parsed = [json.loads(line) for line in lines]
    assert list(parsed[0]) == FIELDS
    assert [p["request_id"] for p in parsed] == [f"req-{i}" for i in range(100)]  # in order
    assert parsed[10]["status"] == 429 and parsed[10]["error_origin"] == "limit" and parsed[11]["error_origin"] is None
    assert parsed[0]["time"].endswith("Z") and "T" in parsed[0]["time"]


def test_the_file_is_appended_not_truncated(tmp_path):
    path = tmp_path / "requests.jsonl"
    for i in range(2):
        log = RequestLog(stdout=False, path=str(path))
        log.write(record(i))
        log.close()
    assert len(path.read_text().splitlines()) == 2


def test_stdout_gets_the_lines_and_they_are_flushed_at_exit():
    code = ("from serving.protocol.timestamps import utc_iso\n"
            "from serving.router.requestlog import *\n"
            "log = RequestLog()\n"
            "for i in range(3): log.write(RequestLogRecord(utc_iso(), f'r{i}', 'k', 'm', 'm', None, 'name', 200, None))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert [json.loads(line)["request_id"] for line in out.splitlines()] == ["r0", "r1", "r2"]


def test_a_stalled_output_never_blocks_the_caller(tmp_path):
    read_fd, write_fd = os.pipe()  # nobody reads: the pipe fills after ~64 KiB
    stalled = os.fdopen(write_fd, "w")
    log = RequestLog(stdout=False, max_pending=1000)
    log._outputs.append(stalled)
    started = time.perf_counter()
    for i in range(5000):
        log.write(record(i))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0  # ~5 µs per write, pipe or no pipe
    assert log.dropped > 0  # beyond max_pending lines behind: dropped and counted
    os.close(read_fd)  # unblock the writer (its write fails; ignored)
    log.close()


def test_write_cost_per_record(tmp_path, capsys):
    """Measured: a few µs per write on the caller's thread (printed for the README)."""
    log = RequestLog(stdout=False, path=str(tmp_path / "r.jsonl"), max_pending=100_000)
    records = [record(i) for i in range(20_000)]
    started = time.perf_counter()
    for r in records:
        log.write(r)
    per_write_us = (time.perf_counter() - started) / len(records) * 1e6
    log.close()
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 20_000
    with capsys.disabled():
        print(f"\nrequest log: {per_write_us:.1f} us per write (caller's thread)")
    assert per_write_us < 50


def test_no_key_material_only_the_name(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = RequestLog(stdout=False, path=str(path))
    log.write(record(key="team-a"))
    log.write(record(key=None, status=401, error_origin="auth"))
    log.close()
    parsed = [json.loads(line) for line in path.read_text().splitlines()]
    assert [p["key"] for p in parsed] == ["team-a", None]
    assert set(parsed[0]) == set(FIELDS)  # no field could carry a key or its digest


def test_any_client_string_survives_and_takes_no_other_line_with_it(tmp_path):
    """A lone surrogate in a client-chosen field (the model name) used to fail the writer's whole
    batch; every line is now valid ASCII JSON that round-trips."""
    path = tmp_path / "requests.jsonl"
    log = RequestLog(stdout=False, path=str(path))
    odd = ["\ud800", "caf\u00e9 \U0001f600", "\x00\x1b[31m", "a\nb"]
    for i, text in enumerate(odd * 3):
        log.write(record(i, requested_model=text))
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    assert [json.loads(line)["requested_model"] for line in lines] == odd * 3
    assert all(line.isascii() for line in lines)
