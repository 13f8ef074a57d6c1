"""Structured (JSON lines) logging for the server process: one object per record.

Fields: ts (UTC, ISO 8601 with milliseconds), level, logger, msg, plus whatever a call
site passes in `extra=` (request_id, model, version, code, latency_ms, ...), and the
traceback as `exc` when there is one. Configured by `xlaserve serve --log-format json`.
"""

from __future__ import annotations

import datetime
import json
import logging

from serving.runners.base import REQUEST_LOGGER, log_outcome, request_log_enabled  # noqa: F401

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message",
                                                                                  "asctime"}


class JsonFormatter(logging.Formatter):
  """Formats each record as one JSON object on one line."""

  def format(self, record: logging.LogRecord) -> str:
    out = {
        "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        .isoformat(timespec="milliseconds"),
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
      if key not in _STANDARD and not key.startswith("_"):
        out[key] = value
    if record.exc_info:
      out["exc"] = self.formatException(record.exc_info)
    return json.dumps(out, default=str)


def progress_line(msg: str, *, logger_name: str = "xlaserve") -> str:
  """A start-up progress message as a JSON line (what `--log-format json` prints on stdout)."""
  return json.dumps({
      "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
      "level": "INFO", "logger": logger_name, "msg": msg})
