"""Every benchmark writes its figures as JSON too: benchmarks/results/DATE_DEVICE_WHAT.json, with
the device, the versions and the exact command, so BENCHMARKS.md can quote a file."""

import datetime
import json
import platform
import re
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next(line.split(":", 1)[1] for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"CPU {model.strip()}"


def save(what, device, figures, out_dir=RESULTS, tag=""):
    """Write figures (a dict) with their context to DATE_DEVICE_WHAT[_TAG].json; returns the path."""
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    date = datetime.date.today().isoformat()
    record = {"what": what, "date": date, "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cpu_threads": torch.get_num_threads(), "command": " ".join([Path(sys.executable).name, "-m",
                                                                            f"benchmarks.{what}", *sys.argv[1:]]),
              "figures": figures}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{date}_{slug}_{what}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"figures written to {path}")
    return path
