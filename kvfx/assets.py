"""Where the shared models and texts live: ``$KVFX_ASSETS``, ``../shared/assets`` beside the checkout, or a copy in
``.assets/`` inside it (the GPU machine receives only the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def assets_dir() -> Path:
    candidates = [os.environ.get("KVFX_ASSETS"), _ROOT.parent / "shared" / "assets", _ROOT / ".assets",
                  Path.cwd() / ".." / "shared" / "assets"]
    for candidate in candidates:
        if candidate and Path(candidate, "codelm-27m").is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "kvfx: the shared assets (codelm-27m, ...) were not found; set KVFX_ASSETS or pass a model path. Looked in: "
        + ", ".join(str(c) for c in candidates if c)
    )


def asset(*parts: str) -> Path:
    return assets_dir().joinpath(*parts)
