"""Read an offline W&B run file (LevelDB log format: 32 KiB blocks, 7-byte record headers,
after a 7-byte ':W&B' file header) into wandb's own protobuf records."""

import re
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history_and_config(path):
    """-> (list of {key: json value} per logged row, {config key: json value})."""
    history, config = [], {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
        elif kind in ("run", "config"):  # the config arrives with the run record, updates after
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): item.value_json for item in items})
    return history, config


def run_files_in_start_order(run_folder):
    """The offline run file of each attempt under run_folder/wandb, the first attempt first. W&B names
    an attempt's folder offline-run-YYYYMMDD_HHMMSS-ID and adds -1, -2... to attempts that start in
    the same second; sorting the paths themselves would put ".../ID-1/run.wandb" first ('-' < '/')."""
    def start(path):
        when, repeat = re.fullmatch(r"offline-run-(\d{8}_\d{6})-.+?(?:-(\d+))?", path.parent.name).groups()
        return when, int(repeat or 0)
    return sorted(Path(run_folder).glob("wandb/offline-run-*/run-*.wandb"), key=start)
