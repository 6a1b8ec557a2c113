"""Read the records of an offline W&B run file (``run-*.wandb``) to check what was logged.

The file is W&B's append-only log: a 7-byte header, then 32 KiB blocks of chunks, each chunk
``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)``;
records are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def logged_values(path: Path) -> dict:
    """Every key logged to history or summary, with its last value (JSON-decoded)."""
    values = {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = {"history": lambda r: r.history.item, "summary": lambda r: r.summary.update}
        if kind in items:
            for item in items[kind](record):
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
    return values


def wait_for_logged(path: Path, key: str, timeout: float = 30.0) -> dict:
    """``logged_values`` once ``key`` is in the file: W&B's service process finishes writing the
    offline run file shortly after ``finish()`` returns, so a reader must poll (bounded)."""
    import time

    deadline = time.monotonic() + timeout
    while key not in (logged := logged_values(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return logged
