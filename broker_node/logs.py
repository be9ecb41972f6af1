"""Logging set-up for the CLI: text or JSON lines, the node id on every line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final

#: A condition met again and again (refusals at a limit, dropped envelopes) is logged at most
#: once per this many seconds; the counters in /metrics hold every occurrence.
LIMIT_LOG_INTERVAL: Final = 10.0

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s node=%(node_id)s %(name)s: %(message)s"


class _NodeIdFilter(logging.Filter):
    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": getattr(record, "node_id", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, level: str, log_format: str, node_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeIdFilter(node_id))
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter(_TEXT_FORMAT)
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every connection at INFO; we log lifecycle only.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
