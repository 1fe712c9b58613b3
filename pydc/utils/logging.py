"""A JSON-lines log: one JSON object per line, appended and flushed, so a killed run keeps what it wrote."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# Records a resumed run keeps although they belong to the epoch it rewrites.
HISTORY_EVENTS = ("preempted", "resumed")


def _plain(value):
    """Numbers and containers as JSON can hold them (NaN/inf become strings, numpy/torch scalars floats)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonLinesLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(_plain(record), sort_keys=False) + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after_epoch(self, epoch: int) -> None:
        """Drop records of epochs >= `epoch` (a resumed run rewrites them), keeping the file otherwise and the
        run's history (HISTORY_EVENTS: where it was preempted and resumed)."""
        kept = [record for record in self.read()
                if record.get("epoch", -1) < epoch or record.get("event") in HISTORY_EVENTS]
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(temporary, self.path)
