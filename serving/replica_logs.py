"""A Ray Serve replica's log file, kept whole: serving's own records (the `serving.*` loggers) go into
it, and it is reopened after vLLM's logging set-up closed it.

Ray Serve gives each replica one logger, `ray.serve`: its handlers write the replica's file
(`serve/replica_<app>_<deployment>_<id>.log` in the Ray session's logs, `serving up` prints where),
with the replica's name and the request id, behind a buffer (1,000 records in Ray Serve's
throughput mode; an ERROR flushes it), and it propagates nowhere. Two things went wrong there:

- serving's loggers had no handler in a replica, so their INFO records (an engine ready and its
  start time, a catalog applied, a keys file reloaded, an adapter loaded, a stream cut at its
  deadline) were dropped, and warnings reached the file only as stray stderr text;
- in an engine replica, `AsyncLLM.from_engine_args` has vLLM configure its loggers with
  `logging.config.dictConfig`, which closes every handler of the process: Ray Serve's buffer lost
  its file, and from then on every record of the replica (Ray Serve's own, request errors, the
  engine's death) stayed in memory, never written.

Serving logs events, not requests, so each of its records is flushed at once.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
from pathlib import Path

SERVING_LOGGER = "serving"
SERVE_REPLICA_LOGGER = "ray.serve"  # Ray Serve's replica logger (ray.serve._private.constants.SERVE_LOGGER_NAME)

# each buffer of Ray Serve's replica logger and the file it writes to, as Ray Serve set them up
_FILES: list[tuple[logging.handlers.MemoryHandler, logging.Handler]] = []


class ToServeReplicaLog(logging.Handler):
    """Hands each record to Ray Serve's replica logger, with that logger's level, filters and
    handlers as they are when the record is written (Ray Serve replaces its handlers when the
    deployment's logging_config changes), then flushes them."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_REPLICA_LOGGER)
        if not serve_logger.isEnabledFor(record.levelno):
            return
        serve_logger.handle(record)
        for handler in serve_logger.handlers:
            handler.flush()


def log_into_replica() -> None:
    """First thing in each replica's constructor (idempotent): serving's records at the replica's
    log level (Ray Serve's `logging_config.log_level`, INFO by default) into its log, and what
    `reopen_replica_log` needs to put the file back."""
    serve_logger = logging.getLogger(SERVE_REPLICA_LOGGER)
    known = {id(buffer) for buffer, _ in _FILES}
    _FILES.extend((h, h.target) for h in serve_logger.handlers
                  if isinstance(h, logging.handlers.MemoryHandler) and h.target is not None and id(h) not in known)
    logger = logging.getLogger(SERVING_LOGGER)
    if not any(isinstance(handler, ToServeReplicaLog) for handler in logger.handlers):
        logger.addHandler(ToServeReplicaLog())
    logger.setLevel(serve_logger.getEffectiveLevel())
    logger.propagate = False  # not also to the root logger's stderr fallback, which Ray Serve redirects into the same file


def reopen_replica_log() -> int:
    """After vLLM configured its logging in this process: give each of Ray Serve's buffers its file
    back (a closed file handler reopens on its next record), write what was held meanwhile, and
    flush them at exit (closing took them off logging's own exit list). Returns how many it reopened."""
    reopened = 0
    for buffer, target in _FILES:
        if buffer.target is None:
            buffer.setTarget(target)
            buffer.flush()
            atexit.register(buffer.flush)
            reopened += 1
    return reopened


def serve_logs_dir(temp_dir: str, session_name: str) -> Path:
    """Where Ray Serve writes this node's replica logs (ray.get_runtime_context()'s temp dir and session)."""
    return Path(temp_dir) / session_name / "logs" / "serve"
