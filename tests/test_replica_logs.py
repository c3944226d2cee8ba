"""serving.replica_logs without Ray: serving's records go to Ray Serve's replica logger at once, at its level."""

from __future__ import annotations

import logging
import logging.config
import logging.handlers

import pytest

from serving import replica_logs
from serving.replica_logs import SERVE_REPLICA_LOGGER, SERVING_LOGGER, log_into_replica, reopen_replica_log, serve_logs_dir


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def replica_logger():
    """Ray Serve's replica logger as a replica has it (its file behind a 1,000-record buffer), restored after."""
    serve, serving = logging.getLogger(SERVE_REPLICA_LOGGER), logging.getLogger(SERVING_LOGGER)
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (serve, serving)]
    file = Collect()
    serve.handlers = [logging.handlers.MemoryHandler(capacity=1000, target=file, flushLevel=logging.ERROR)]
    serve.setLevel(logging.INFO)
    serve.propagate = False
    serving.handlers = []
    files = replica_logs._FILES[:]
    yield file
    replica_logs._FILES[:] = files
    for lg, handlers, level, propagate in saved:
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


def test_serving_info_reaches_the_replica_file_at_once_and_debug_does_not(replica_logger):
    log_into_replica()
    log_into_replica()  # idempotent: one handler, no record twice
    logging.getLogger("serving.engine").info("engine %s ready", "m")
    logging.getLogger("serving.router").debug("not at INFO")
    assert [r.getMessage() for r in replica_logger.records] == ["engine m ready"]
    assert replica_logger.records[0].name == "serving.engine"


def test_serving_records_do_not_also_reach_the_root_logger(replica_logger):
    root = Collect()
    logging.getLogger().addHandler(root)
    try:
        log_into_replica()
        logging.getLogger("serving.limiter").warning("limits actor unreachable")
    finally:
        logging.getLogger().removeHandler(root)
    assert [r.getMessage() for r in replica_logger.records] == ["limits actor unreachable"]
    assert root.records == []


def test_the_replica_file_closed_by_a_dictconfig_is_reopened_with_what_it_held(replica_logger, tmp_path):
    """What vLLM's configure_logging does in an engine replica (AsyncLLM.from_engine_args): a
    dictConfig, which closes every handler of the process, Ray Serve's file among them."""
    path = tmp_path / "replica.log"
    file = logging.FileHandler(path)
    logging.getLogger(SERVE_REPLICA_LOGGER).handlers[0].setTarget(file)
    log_into_replica()
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                               "loggers": {"vllm": {"level": "INFO"}}})
    logging.getLogger(SERVE_REPLICA_LOGGER).error("a request failed")  # an ERROR flushes Ray Serve's buffer
    assert "a request failed" not in path.read_text()  # closed: held in memory, never written
    assert reopen_replica_log() == 1
    assert reopen_replica_log() == 0  # once
    logging.getLogger("serving.engine").info("engine m ready")
    assert path.read_text().splitlines() == ["a request failed", "engine m ready"]
    file.close()


def test_serve_logs_dir_is_the_sessions_serve_logs():
    assert str(serve_logs_dir("/tmp/ray", "session_2026-12-07_00-00-00_1_2")) == "/tmp/ray/session_2026-12-07_00-00-00_1_2/logs/serve"
