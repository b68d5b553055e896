"""Where measured figures go: ``benchmarks/results/`` (or ``$KVFX_RESULTS_DIR``), one JSON per run, named by GPU."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_DEFAULT_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_path(filename: str) -> Path:
    return Path(os.environ.get("KVFX_RESULTS_DIR", _DEFAULT_DIR)) / filename


def gpu_environment() -> dict:
    """What a GPU measurement ran on: device, SM count and software versions (call only where CUDA is present)."""
    import platform

    import torch
    import triton

    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "autotune": os.environ.get("KVFX_DECODE_AUTOTUNE", "1"),
    }


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save_figure(figure, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib ``figure`` as a PNG at ``path`` (its folder made as needed) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path
