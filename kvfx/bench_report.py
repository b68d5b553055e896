"""``kvfx bench`` output: the results JSON, a Markdown table per workload (with the issue's goals checked) and a PNG
of decode throughput and peak memory against the KV share, one line per policy, the full-cache configurations as
horizontal reference lines.

    payload = json.loads(Path("bench_nvidia-h100-80gb-hbm3.json").read_text())
    write_results(payload, "bench.json")   # and bench.md beside it
    plot_bench(payload, "bench.png")
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvfx.results import save_figure

REFERENCES = ("dynamic", "static", "identity")  # plot methods drawn as horizontal lines
STOCK = ("dynamic", "static+compile")  # the stock full-cache baselines
GOAL_WORKLOAD = ("llama-1b", 8, 32768)
GOAL_SPEEDUP, GOAL_MEMORY_CUT = 2.0, 3.5
GiB = 2**30


def load_results(path: str | Path) -> dict:
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise ValueError(f"{path} is not a kvfx bench results file (no 'rows' list)")
    return payload


def sibling(json_path: str | Path, suffix: str) -> Path:
    return Path(json_path).with_suffix(suffix)


def write_results(payload: Mapping[str, Any], json_path: str | Path) -> tuple[Path, Path]:
    """Write the JSON and the Markdown beside it (same name, ``.md``); returns both paths."""
    from kvfx.results import write_json

    json_path = write_json(json_path, dict(payload))
    md_path = sibling(json_path, ".md")
    md_path.write_text(markdown(payload))
    return json_path, md_path


def _config_key(row: Mapping) -> tuple:
    return row["model"], row["batch"], row["prompt"], row["config"]


def _key(row: Mapping) -> tuple:
    """One row per workload, configuration and run (``row["run"]``: the run's date; None in rows recorded before
    rows carried one)."""
    return *_config_key(row), row.get("run")


def merge_rows(previous: Sequence[Mapping], new: Sequence[Mapping]) -> list[Mapping]:
    """``previous`` rows and ``new`` ones, every run's measured rows kept (each is compared only with the baselines
    of its own run). Within one run, a new row replaces an old one unless the old one was measured and the new one
    was not (skipped, failed); a configuration skipped or failed is listed only while no run measured it, by its
    latest such row."""
    merged = {_key(r): r for r in previous}
    for row in new:
        old = merged.get(_key(row))
        if old is None or _ok(row) or not _ok(old):
            merged[_key(row)] = row
    rows = list(merged.values())
    measured = {_config_key(r) for r in rows if _ok(r)}
    latest_unmeasured = {_config_key(r): r for r in rows if not _ok(r)}
    return [r for r in rows if _ok(r) or (_config_key(r) not in measured and latest_unmeasured[_config_key(r)] is r)]


def latest(rows: Sequence[Mapping]) -> list[Mapping]:
    """The last measured row of each (workload, configuration) among ``rows`` (what the plots draw)."""
    return list({_config_key(r): r for r in rows if _ok(r)}.values())


# ----------------------------------------------------------------------------------------------------------------
# Comparisons.
# ----------------------------------------------------------------------------------------------------------------


def workloads(rows: Sequence[Mapping]) -> list[tuple[str, int, int]]:
    """The (model, batch, prompt) workloads of ``rows``, in first-seen order."""
    seen: dict[tuple, None] = {}
    for row in rows:
        seen.setdefault((row["model"], row["batch"], row["prompt"]), None)
    return list(seen)


def _of(rows: Sequence[Mapping], workload: tuple) -> list[Mapping]:
    return [r for r in rows if (r["model"], r["batch"], r["prompt"]) == workload]


def _ok(row: Mapping | None) -> bool:
    return row is not None and row.get("status") == "ok"


def best_stock(rows: Sequence[Mapping]) -> Mapping | None:
    """The faster (lower decode ms/step) of the stock full-cache baselines among one workload's ``rows``."""
    stock = [r for r in rows if r["config"] in STOCK and _ok(r)]
    return min(stock, key=lambda r: r["decode_ms"], default=None)


def runs(rows: Sequence[Mapping]) -> list[str | None]:
    """The runs (dates; None for rows recorded before rows carried one) of ``rows``, oldest first."""
    return sorted(dict.fromkeys(r.get("run") for r in rows), key=lambda run: run or "")


def same_run(rows: Sequence[Mapping], run: str | None) -> list[Mapping]:
    return [r for r in rows if r.get("run") == run]


def run_label(run: str | None) -> str:
    """``2026-11-23T03:38:00+00:00`` -> ``11-23 03:38`` (UTC); ``-`` for none."""
    return f"{run[5:10]} {run[11:16]}" if run else "-"


def speedup(row: Mapping, baseline: Mapping | None) -> float | None:
    """Decode throughput of ``row`` over ``baseline``'s."""
    if not (_ok(row) and _ok(baseline)):
        return None
    return baseline["decode_ms"] / row["decode_ms"]


def memory_cut(row: Mapping, baseline: Mapping | None) -> float | None:
    """``baseline``'s peak memory above the weights over ``row``'s (how many times less ``row`` needs)."""
    if not (_ok(row) and _ok(baseline)):
        return None
    mine, theirs = row.get("peak_over_weights_bytes"), baseline.get("peak_over_weights_bytes")
    if not mine or not theirs:
        return None
    return theirs / mine


def goals(rows: Sequence[Mapping]) -> list[str]:
    """The issue's goals at the 1B shape, B=8, prompt 32768, each as a Markdown bullet saying met or not met,
    checked within each run that measured there (a run's kvfx rows against that run's own stock baselines); the
    bullets of a run are headed by its date when the rows come from more than one run."""
    members = _of(rows, GOAL_WORKLOAD)
    measured = runs(members)
    if len(measured) == 1:
        return _run_goals(members)
    lines = []
    for run in measured:
        lines.append(f"- run {run_label(run)}:")
        lines += ["  " + line for line in _run_goals(same_run(members, run))]
    return lines


def _run_goals(members: Sequence[Mapping]) -> list[str]:
    """The goal bullets of one run's rows at the goal workload (at least one row)."""
    baseline = best_stock(members)
    if baseline is None:
        return ["- no stock baseline was measured at this size: the goals cannot be checked"]
    lines = [f"- best stock baseline: {baseline['config']} ({baseline['decode_ms']:.2f} ms/step)"]
    identity = next((r for r in members if r["config"] == "kvfx" and _ok(r)), None)
    if identity is None:
        lines.append("- kvfx identity >= best stock baseline: not measured")
    else:
        ratio = speedup(identity, baseline)
        lines.append(f"- kvfx identity >= best stock baseline: {ratio:.2f}x its tokens/s: "
                     f"{'met' if ratio >= 1 else 'not met'}")
    candidates = [r for r in members if _ok(r) and r["kind"] == "kvfx" and r.get("x") is not None
                  and ((r.get("bits") == 4) or (r.get("bits") is None and abs(r["x"] - 0.25) < 1e-9))]
    if not candidates:
        lines.append(f"- 4-bit or 25% budget >= {GOAL_SPEEDUP:g}x tokens/s and >= {GOAL_MEMORY_CUT:g}x less peak "
                     "memory: no such kvfx configuration measured")
        return lines

    def score(row):
        s, m = speedup(row, baseline), memory_cut(row, baseline) or 0.0
        return (s >= GOAL_SPEEDUP and m >= GOAL_MEMORY_CUT, s)

    best = max(candidates, key=score)
    s, m = speedup(best, baseline), memory_cut(best, baseline)
    met = s >= GOAL_SPEEDUP and m is not None and m >= GOAL_MEMORY_CUT
    memory = f"{m:.2f}x" if m is not None else "unknown"
    lines.append(f"- 4-bit or 25% budget >= {GOAL_SPEEDUP:g}x tokens/s and >= {GOAL_MEMORY_CUT:g}x less peak memory "
                 f"above the weights: best {best['config']}: {s:.2f}x tokens/s, {memory} less: "
                 f"{'met' if met else 'not met'}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------------------------


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def markdown(payload: Mapping[str, Any]) -> str:
    meta, rows = payload.get("meta", {}), payload["rows"]
    bandwidth = (payload.get("bandwidth") or {}).get("bytes_per_s")
    earlier = meta.get("earlier_runs") or []
    lines = [f"# kvfx bench: {meta.get('gpu') or meta.get('device', '?')}", ""]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "transformers", "optimum_quanto", "cuda",
                                                    "python") if meta.get(k))
    lines += [f"- {versions}" if versions else "- versions not recorded",
              f"- dtype {meta.get('dtype', '?')}, kvfx compiler {meta.get('compiler', '?')}, "
              f"{meta.get('new_tokens', '?')} new tokens per call, {meta.get('repeats', '?')} timed calls "
              f"after a warm-up of {meta.get('warmup_tokens', '?')} tokens; random prompt tokens",
              f"- copy bandwidth {_num(bandwidth, '.3f', 1e12)} TB/s (bytes read + written by a device copy)"]
    if earlier:
        each = "; ".join(f"{run_label(m.get('date'))}: {m.get('new_tokens', '?')} new tokens, {m.get('repeats', '?')} "
                         f"timed calls" for m in [*earlier, meta])
        lines.append(f"- merged from {len(earlier) + 1} runs ({each}; the settings above are the last run's): each "
                     "row's floor uses the bandwidth of its own run")
    if meta.get("quanto_unpack"):
        lines.append(f"- quanto unpack: {meta['quanto_unpack']}")
    if meta.get("kvfx_options"):
        lines.append("- kvfx backend options: " + ", ".join(f"{k}={v}" for k, v in meta["kvfx_options"].items()))
    lines += ["- decode: mean step of a generate() call (CUDA events at every token), median over calls (calls "
              "min-max: the fastest and slowest call); "
              "tokens/s = batch / step; TTFT: the call to its first token (prefill); peak: max_memory_allocated "
              "over the call (weights included), over weights: minus what the model holds; KV: bytes the cache "
              "holds at the end; floor: (weights + full KV at the mean context) read once at the copy bandwidth; "
              "vs stock: tokens/s over the faster of dynamic and static+compile measured in the same run; mem cut: "
              "its peak over weights over this one's; run: when the row's run started (UTC), rows of different "
              "runs are never compared", ""]
    goal_lines = goals(rows)
    if goal_lines:
        lines += ["## Goals at llama-1b B=8 T=32768", "", *goal_lines, ""]
    header = ("| configuration | decode ms/step | calls min-max | tokens/s | vs stock | TTFT ms | peak GiB | "
              "over weights GiB | mem cut | KV GiB | KV share | x floor | run | status |")
    for workload in workloads(rows):
        members = _of(rows, workload)
        baselines = {run: best_stock(same_run(members, run)) for run in runs(members)}
        any_row = members[0]
        model, batch, prompt = workload
        lines += [f"## {model} B={batch} T={prompt}", ""]
        if any_row.get("floor_ms") is not None:
            lines += [f"floor {any_row['floor_ms']:.3f} ms/step: {any_row['weight_bytes_read'] / 1e9:.2f} GB "
                      f"weights + {_num(any_row.get('floor_kv_bytes'), '.2f', 1e9)} GB KV read at "
                      f"{_num(any_row.get('bandwidth_bytes_per_s'), '.2f', 1e12)} TB/s", ""]
        if len(baselines) > 1:
            lines += ["vs stock, by run: " + "; ".join(_baseline_note(run, members, baselines[run])
                                                         for run in baselines), ""]
        lines += [header, "| " + " | ".join(["---"] * 14) + " |"]
        for row in members:
            ok, baseline = _ok(row), baselines[row.get("run")]
            status = "ok" if ok else f"{row['status']}: {row.get('message', '')}"
            if ok and row.get("graphs_compiled_timed"):
                status += f" ({row['graphs_compiled_timed']} graphs compiled while timed)"
            if ok and row.get("kind") == "kvfx" and row.get("kvfx_state") is False:
                status += " (kvfx did not serve this cache: attention not rewritten)"
            cells = [
                row["config"],
                _num(row.get("decode_ms") if ok else None, ".2f"),
                _call_spread(row) if ok else "-",
                _num(row.get("tokens_per_s") if ok else None, ".0f"),
                _num(speedup(row, baseline), ".2f") + ("x" if _ok(row) and _ok(baseline) else ""),
                _num(row.get("ttft_ms") if ok else None, ".0f"),
                _num(row.get("peak_bytes") if ok else None, ".2f", GiB),
                _num(row.get("peak_over_weights_bytes") if ok else None, ".2f", GiB),
                _num(memory_cut(row, baseline), ".2f") + ("x" if memory_cut(row, baseline) else ""),
                _num(row.get("kv_bytes") if ok else None, ".3f", GiB),
                _num(row.get("kv_share") if ok else None, ".3f"),
                _num(row.get("x_floor") if ok else None, ".2f"),
                run_label(row.get("run")),
                status.replace("|", "\\|"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _baseline_note(run: str | None, members: Sequence[Mapping], baseline: Mapping | None) -> str:
    if baseline is None:
        return f"run {run_label(run)}: no stock baseline measured"
    missing = [c for c in STOCK if not any(r["config"] == c and _ok(r) for r in same_run(members, run))]
    return (f"run {run_label(run)}: {baseline['config']} {baseline['decode_ms']:.2f} ms/step"
            + (f" ({', '.join(missing)} not measured)" if missing else ""))


def _call_spread(row: Mapping) -> str:
    """The fastest and slowest timed call's mean decode step: how far one call strays from the median."""
    steps = [r["decode_ms"] for r in row.get("per_repeat") or () if r.get("decode_ms") is not None]
    return f"{min(steps):.1f}-{max(steps):.1f}" if steps else "-"


# ----------------------------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------------------------


_METHOD_ORDER = ("window", "h2o", "keyformer", "snapkv", "razor", "kivi", "gear", "quanto")


def _style_index(method: str) -> int:
    """The same color and marker for a method in every panel."""
    return _METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER) + sum(map(ord, method))


def _x(row: Mapping) -> float | None:
    return row.get("x") if row.get("x") is not None else row.get("kv_share")


def plot_bench(payload: Mapping[str, Any], png_path: str | Path) -> Path:
    """One row of two panels per workload: decode tokens/s and peak memory above the weights, against the KV share
    (eviction budget, bits / 16, or razor's measured share); one line per method, the full-cache configurations
    (dynamic, static+compile, kvfx identity) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    shown = [w for w in workloads(rows) if any(_ok(r) for r in _of(rows, w))]
    if not shown:
        raise ValueError("no measured rows to plot")
    figure, axes = plt.subplots(len(shown), 2, figsize=(12, 3.6 * len(shown)), squeeze=False)
    styles = {"dynamic": ("black", "--"), "static": ("tab:gray", ":"), "identity": ("tab:red", "-.")}
    for (left, right), workload in zip(axes, shown):
        members = latest(_of(rows, workload))
        curves: dict[str, list[Mapping]] = {}
        for row in members:
            if row["method"] in REFERENCES:
                color, line = styles[row["method"]]
                left.axhline(row["tokens_per_s"], color=color, linestyle=line,
                             label=f"{row['config']} ({row['tokens_per_s']:.0f})")
                if row.get("peak_over_weights_bytes") is not None:
                    right.axhline(row["peak_over_weights_bytes"] / GiB, color=color, linestyle=line,
                                  label=f"{row['config']} ({row['peak_over_weights_bytes'] / GiB:.2f})")
            elif _x(row) is not None:
                curves.setdefault(row["method"], []).append(row)
        for method, points in sorted(curves.items(), key=lambda item: _style_index(item[0])):
            points = sorted(points, key=_x)
            index = _style_index(method)
            label = "transformers quanto" if method == "quanto" else f"kvfx {method}"
            style = dict(marker="osD^vP*X"[index % 8], color=f"C{index % 10}", label=label, alpha=0.9)
            left.plot([_x(r) for r in points], [r["tokens_per_s"] for r in points], **style)
            with_peak = [r for r in points if r.get("peak_over_weights_bytes") is not None]
            if with_peak:
                right.plot([_x(r) for r in with_peak], [r["peak_over_weights_bytes"] / GiB for r in with_peak],
                           **style)
        model, batch, prompt = workload
        xlabel = "KV kept: eviction budget, bits / 16 (razor: measured share)"
        left.set(title=f"{model} B={batch} T={prompt}: decode throughput", xlabel=xlabel, ylabel="tokens/s")
        right.set(title="peak memory of generate() above the weights", xlabel=xlabel, ylabel="GiB")
        xs = [_x(r) for points in curves.values() for r in points]
        for axis in (left, right):
            axis.set_xlim(0, max([0.3, *xs]) * 1.1)
            axis.set_ylim(bottom=0)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    meta = payload.get("meta", {})
    tokens = sorted({r.get("new_tokens") or meta.get("new_tokens") or 0 for r in rows})
    span = str(tokens[0]) if len(tokens) == 1 else f"{tokens[0]}-{tokens[-1]}"
    figure.suptitle(f"kvfx bench: {meta.get('gpu') or meta.get('device', '')}, {span} new tokens per call; the "
                    "latest run of each configuration", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, png_path, dpi=110)
