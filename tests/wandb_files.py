"""Read W&B offline run files (`run-<id>.wandb`) in tests.

The file is a 7-byte header (":W&B", magic, version) followed by LevelDB-log framing: 32 KiB blocks
of chunks with a 7-byte header (crc32, length, type). Each reassembled payload is a
`wandb_internal_pb2.Record`. wandb 0.31 reads these files in its Go core and has no Python reader.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK_SIZE = 32 * 1024
_FILE_HEADER_SIZE = 7
_CHUNK_HEADER_SIZE = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Return every Record of an offline run file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, position = [], b"", _FILE_HEADER_SIZE
    while position + _CHUNK_HEADER_SIZE <= len(data):
        left_in_block = _BLOCK_SIZE - position % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER_SIZE:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + _CHUNK_HEADER_SIZE])
        chunk = data[position + _CHUNK_HEADER_SIZE:position + _CHUNK_HEADER_SIZE + length]
        position += _CHUNK_HEADER_SIZE + length
        if kind == 0:
            position += left_in_block - _CHUNK_HEADER_SIZE - length
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(path: Path) -> list[dict]:
    """Return the logged history rows ({key: value}) of an offline run file."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_files(run_dir: Path) -> list[Path]:
    """Return the offline `.wandb` files under a run folder (one per start of the run), oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def run_info(path: Path) -> dict:
    """Return id, group and job type from the run record of an offline run file."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return {"id": record.run.run_id, "group": record.run.run_group, "job_type": record.run.job_type,
                    "config": {item.key: json.loads(item.value_json) for item in record.run.config.update}}
    raise ValueError(f"{path} has no run record")
