"""On the live stack: serving's own log records reach the log file of the Ray Serve replica that
wrote them (serving.replica_logs), in the folder `serving up` names, as they happen."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.e2e  # starts (or uses) the shared stack


def replica_logs(stack, deployment: str) -> str:
    line = next(line for line in stack.log.read_text().splitlines() if line.startswith("replica logs in "))
    folder = Path(line.removeprefix("replica logs in "))
    files = sorted(folder.glob(f"replica_*_{deployment}_*.log"))
    assert files, f"no replica log of {deployment} in {folder}"
    return "\n".join(path.read_text(errors="replace") for path in files)


def test_each_replica_log_has_serving_records_written_at_start(stack):
    # INFO records, logged at start and in the file although Ray Serve buffers it by 1,000 records;
    # the engine's after vLLM's logging set-up closed that file (serving.replica_logs.reopen_replica_log)
    engine = replica_logs(stack, CHAT_MODEL)
    assert re.search(rf"INFO .*engine {re.escape(CHAT_MODEL)} ready on replica \S+ in [\d.]+s", engine)
    assert re.search(r"INFO .* -- .*INFO .*\[\w+\.py:\d+\] ", engine)  # vLLM's own records (its format) of the replica's process too
    assert "\x1b[" not in engine  # and no terminal colour codes (VLLM_LOGGING_COLOR)
    assert re.search(r"INFO .*catalog applied: \d+ models, \d+ names", replica_logs(stack, "router"))
