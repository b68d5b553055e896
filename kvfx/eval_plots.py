"""The passkey heatmap of one evaluated row: needle depth x haystack length, each cell retrieved or missed.

    from kvfx.eval_plots import plot_passkey_grid
    plot_passkey_grid(row, "passkey_h2o.png")      # a row of kvfx.evaluate.evaluate_specs

Needs matplotlib (``pip install 'kvfx[plots]'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvfx.results import save_figure

__all__ = ["passkey_grid", "plot_passkey_grid"]


def passkey_grid(row: Mapping[str, Any]) -> tuple[list[float], list[int], list[list[bool | None]]]:
    """``(depths, lengths, cells)`` of a row's passkey cases; ``cells[i][j]`` is whether the needle at ``depths[i]``
    of the ``lengths[j]``-token haystack was retrieved (None: not measured).

    A case without ``length`` (results written before kvfx recorded it) takes the row's ``passkey_length``.
    """
    cases = row.get("passkey") or []
    if not cases:
        raise ValueError(f"row {row.get('name')!r} has no passkey results (status {row.get('status', 'ok')!r}); "
                         "a heatmap needs at least one depth and one length")
    default_length = row.get("passkey_length")
    lengths_of = [case.get("length", default_length) for case in cases]
    if any(not isinstance(n, int) for n in lengths_of):
        raise ValueError(f"row {row.get('name')!r}: a passkey case records no haystack length and the row has no "
                         f"single passkey_length (it is {default_length!r})")
    depths = sorted({case["depth"] for case in cases})
    lengths = sorted(set(lengths_of))
    cells: list[list[bool | None]] = [[None] * len(lengths) for _ in depths]
    for case, length in zip(cases, lengths_of):
        cells[depths.index(case["depth"])][lengths.index(length)] = bool(case["correct"])
    return depths, lengths, cells


def plot_passkey_grid(row: Mapping[str, Any], png_path: str | Path, title: str | None = None) -> Path:
    """Draw :func:`passkey_grid` as a heatmap (depth down, length across; green retrieved, red missed, grey not
    measured), each cell marked Y or n; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    depths, lengths, cells = passkey_grid(row)
    values = [[math.nan if cell is None else float(cell) for cell in line] for line in cells]
    colors = ListedColormap(["#d62728", "#2ca02c"]).with_extremes(bad="#bbbbbb")
    figure, axis = plt.subplots(figsize=(2.8 + 0.9 * len(lengths), 1.4 + 0.38 * len(depths)))
    axis.imshow(values, cmap=colors, vmin=0, vmax=1, aspect="auto")
    for i, line in enumerate(cells):
        for j, cell in enumerate(line):
            if cell is not None:
                axis.text(j, i, "Y" if cell else "n", ha="center", va="center", color="white", fontsize=9)
    axis.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    axis.set_xlabel("haystack length (tokens)")
    axis.set_ylabel("needle depth")
    found = sum(cell for line in cells for cell in line if cell is not None)
    measured = sum(cell is not None for line in cells for cell in line)
    axis.set_title(title or f"{row.get('name', '')}: passkey {found}/{measured}", fontsize=10)
    axis.legend(handles=[Patch(color="#2ca02c", label="retrieved"), Patch(color="#d62728", label="missed")],
                loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    return save_figure(figure, png_path)
