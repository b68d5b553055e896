"""Quantization quality: perplexity and passkey retrieval of codelm-27m with a KIVI or GEAR cache.

    python benchmarks/quant_quality.py                     # full, kivi-4, kivi-2, gear-4, gear-2, h2o@0.5+kivi-4
    python benchmarks/quant_quality.py --device cuda --ppl-windows 4
    python benchmarks/quant_quality.py --specs gear-2 kivi-2 --append --no-full   # redo some rows of a sweep
    python benchmarks/quant_quality.py --quick             # tiny sizes: a smoke test of the whole pipeline

Each spec quantizes in every layer and KV head with the method's spec defaults (kvfx/spec.py: group 32, residual
128; GEAR rank 2, prefill_rank 4, outliers 0.02) and the given bits: ``{"version": 1, "default": {"quantize":
{"method": "kivi", "bits": 4}}}``, and ``h2o@0.5+kivi-4`` evicts with H2O at half the prompt and quantizes what it
keeps with KIVI 4-bit. The full cache (the model without kvfx) is the reference row. ``--quick`` (a 128-token
prompt) sets ``residual: 32`` so that the prompt is not all inside the full-precision residual.

Perplexity and passkey as benchmarks/eviction_quality.py (the same sizes, imported from it; kvfx/evaluate.py): a
1024-token prompt from the middle of ../shared/assets/text/heldout-code.txt in one prefill, then 1024 continuation
tokens teacher-forced one at a time through the (compressed) cache; ``--ppl-windows N`` pools N windows spread over
the text. Passkey: 2048-token haystacks with the passkey line at depths 0, 0.1, ..., 0.9, greedy decoding.

Goals (printed, and recorded in the JSON's ``meta.goals``): every 4-bit quantization-only row (kivi-4, gear-4) within
1% of the full cache's perplexity, and gear-2's perplexity below kivi-2's. A goal whose rows were not measured (a
spec kvfx refuses when compiling becomes a skipped row with kvfx's message) is reported as not measured, not as
failed.

Writes benchmarks/results/quant_quality.{json,md,png} (``$KVFX_RESULTS_DIR`` redirects them). Exits 1 if any spec
failed with an error other than "not implemented" (not when a goal is missed: that is a finding, in the JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kvfx.assets import asset
from kvfx.evaluate import evaluate_specs, write_table
from kvfx.results import results_path, save_figure, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eviction_quality import FULL, QUICK  # noqa: E402  the same prompt, continuation and passkey sizes

QUANTIZED = {  # row name -> the default policy (quantize, and for the last row evict too)
    "kivi-4": {"quantize": {"method": "kivi", "bits": 4}},
    "kivi-2": {"quantize": {"method": "kivi", "bits": 2}},
    "gear-4": {"quantize": {"method": "gear", "bits": 4}},
    "gear-2": {"quantize": {"method": "gear", "bits": 2}},
    "h2o@0.5+kivi-4": {"evict": {"method": "h2o", "budget": 0.5}, "quantize": {"method": "kivi", "bits": 4}},
}
NAMES = tuple(QUANTIZED)
FOUR_BIT = ("kivi-4", "gear-4")  # the quantization-only 4-bit rows held to 1% of the full cache's perplexity
TOLERANCE = 0.01
QUICK_RESIDUAL = 32  # --quick: the 128-token prompt would otherwise stay whole in the 128-token residual


def build_specs(names=NAMES, quick: bool = False) -> dict:
    """``{"full": None, "<name>": spec dict, ...}``."""
    specs = {"full": None}
    for name in names:
        policy = json.loads(json.dumps(QUANTIZED[name]))  # a deep copy
        if quick:
            policy["quantize"]["residual"] = QUICK_RESIDUAL
        specs[name] = {"version": 1, "default": policy}
    return specs


def goals(rows) -> dict:
    """Whether each goal is met: True, False, or None where a row it needs was not measured."""
    ppl = {row["name"]: row["ppl"] for row in rows if row.get("status", "ok") == "ok" and row.get("ppl") is not None}
    full = ppl.get("full")
    four = {}
    for name in FOUR_BIT:
        if full is None or name not in ppl:
            four[name] = {"ppl": ppl.get(name), "full_ppl": full, "ratio": None, "met": None}
        else:
            ratio = ppl[name] / full
            four[name] = {"ppl": ppl[name], "full_ppl": full, "ratio": ratio, "met": abs(ratio - 1) <= TOLERANCE}
    met = [entry["met"] for entry in four.values()]
    four_met = False if False in met else (None if None in met else True)
    if "gear-2" in ppl and "kivi-2" in ppl:
        gear_met = ppl["gear-2"] < ppl["kivi-2"]
    else:
        gear_met = None
    return {
        "four_bit_within_1pct": {"met": four_met, "tolerance": TOLERANCE, "rows": four,
                                 "goal": "kivi-4 and gear-4 perplexity within 1% of the full cache's"},
        "gear2_better_than_kivi2": {"met": gear_met, "gear-2": ppl.get("gear-2"), "kivi-2": ppl.get("kivi-2"),
                                    "goal": "gear-2 perplexity below kivi-2's"},
    }


def describe_goals(result: dict) -> list[str]:
    word = {True: "met", False: "NOT met", None: "not measured"}
    four = result["four_bit_within_1pct"]
    lines = [f"goal: 4-bit within {TOLERANCE:.0%} of full-cache perplexity: {word[four['met']]}"]
    for name, entry in four["rows"].items():
        if entry["met"] is None:
            lines.append(f"  {name}: not measured")
        else:
            lines.append(f"  {name}: {entry['ppl']:.3f} vs full {entry['full_ppl']:.3f} "
                         f"({100 * (entry['ratio'] - 1):+.2f}%): {word[entry['met']]}")
    gear = result["gear2_better_than_kivi2"]
    detail = ""
    if gear["met"] is not None:
        detail = f" (gear-2 {gear['gear-2']:.3f} vs kivi-2 {gear['kivi-2']:.3f})"
    lines.append(f"goal: gear-2 perplexity below kivi-2's: {word[gear['met']]}{detail}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", choices=NAMES, default=list(NAMES), metavar="SPEC",
                        help=f"rows besides the full cache ({', '.join(NAMES)}; default: all)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--compiler", choices=["inductor", "aot_eager"], default=None,
                        help="what compiles the rewritten graphs (default: inductor on CUDA, aot_eager on CPU)")
    parser.add_argument("--no-full", action="store_true", help="leave out the full-cache baseline (with --append)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing results file that this run does not redo (a sweep in parts)")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw the Markdown table and plot from the JSON")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes (128+32 tokens, 256-token passkeys, residual {QUICK_RESIDUAL})")
    parser.add_argument("--model", default=None, help="a local model folder (default: the shared codelm-27m)")
    parser.add_argument("--text", default=None, help="held-out text (default: the shared heldout-code.txt)")
    parser.add_argument("--ppl-windows", type=int, default=1,
                        help="perplexity windows spread over the text, pooled (default: 1, the text's middle)")
    parser.add_argument("--seed", type=int, default=0, help="passkey names, digits and haystacks")
    parser.add_argument("--name", default="quant_quality",
                        help="results file stem (default: %(default)s; --quick adds _quick)")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    sizes = QUICK if args.quick else FULL
    model = Path(args.model) if args.model else asset("codelm-27m")
    text = Path(args.text) if args.text else asset("text", "heldout-code.txt")
    specs = build_specs(args.specs, args.quick)
    if args.no_full:
        del specs["full"]

    stem = args.name + ("_quick" if args.quick else "")
    json_file = results_path(f"{stem}.json")
    if args.plot_only:
        saved = json.loads(json_file.read_text())
        return _write(saved["rows"], saved["meta"], stem)
    earlier = []
    if args.append and json_file.exists():
        earlier = [row for row in json.loads(json_file.read_text())["rows"] if row["name"] not in specs]
    started = time.perf_counter()
    compiler = args.compiler or ("inductor" if device == "cuda" else "aot_eager")

    def save(done):
        write_results(earlier + done, meta(earlier + done), stem)

    def meta(all_rows):
        return {
            "model": model.name, "text": text.name,
            "device": torch.cuda.get_device_name() if device == "cuda" else
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": "bfloat16" if device == "cuda" else "float32", "compiler": compiler,
            "torch": torch.__version__, "prompt_tokens": sizes["prompt_tokens"],
            "continuation_tokens": sizes["continuation_tokens"], "ppl_windows": args.ppl_windows,
            "passkey_length": sizes["passkey_length"], "depths": list(sizes["depths"]), "seed": args.seed,
            "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(["python benchmarks/quant_quality.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
        }

    rows = evaluate_specs(model, specs, text, device=device, seed=args.seed, ppl_windows=args.ppl_windows,
                          compiler=compiler, on_row=save, **sizes)
    status = _write(earlier + rows, meta(earlier + rows), stem)
    errors = [row["name"] for row in rows if row["status"] == "error"]
    if errors:
        print(f"failed: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else status


def write_results(rows, meta, stem) -> tuple[Path, Path]:
    """The JSON (with ``meta.goals``) and the Markdown table with the goals below it."""
    result = goals(rows)
    json_path, md_path = write_table(rows, results_path(f"{stem}.json"), results_path(f"{stem}.md"), meta)
    write_json(json_path, {"meta": {**meta, "goals": result}, "rows": [dict(row) for row in rows]})
    with md_path.open("a") as md:
        md.write("\n" + "\n".join(f"- {line}" if line.startswith("goal") else f"  - {line.strip()}"
                                  for line in describe_goals(result)) + "\n")
    return json_path, md_path


def _write(rows, meta, stem) -> int:
    """The JSON, the Markdown table, the plot (where matplotlib is installed); prints the table and the goals."""
    meta = {key: value for key, value in meta.items() if key != "goals"}
    json_path, md_path = write_results(rows, meta, stem)
    print(md_path.read_text())
    try:
        png_path = plot(rows, results_path(f"{stem}.png"),
                        f"{meta['model']} on {meta['text']}, {meta['device']}, {meta['dtype']}")
    except ImportError as error:
        print(f"no plot ({error}); redraw it where matplotlib is installed: "
              f"python benchmarks/quant_quality.py --plot-only", file=sys.stderr)
        png_path = None
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return 0


def plot(rows, png_path: Path, title: str) -> Path:
    """Perplexity (left: each row's change from the full cache's, in %, with the 1% band, each bar labelled with its
    perplexity; absolute perplexities if the full cache was not measured) and passkey accuracy (right); rows not
    measured are marked n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in rows]
    ok = {row["name"]: row for row in rows if row.get("status", "ok") == "ok"}
    ppl = {name: ok[name].get("ppl") for name in names if name in ok and ok[name].get("ppl") is not None}
    accuracy = {name: ok[name].get("passkey_accuracy") for name in names
                if name in ok and ok[name].get("passkey_accuracy") is not None}
    full = ppl.get("full")
    relative = full is not None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = ["black" if name == "full" else f"C{i}" for i, name in enumerate(names)]
    xs = range(len(names))
    heights = [(100 * (ppl[n] / full - 1) if relative else ppl[n]) if n in ppl else 0 for n in names]
    bars = left.bar(xs, heights, color=colors, alpha=0.85)
    left.bar_label(bars, labels=[(f"{ppl[n]:.3f}" + (f"\n{h:+.2f}%" if relative else "")) if n in ppl else "n/a"
                                 for n, h in zip(names, heights)], fontsize=7)
    if relative:
        left.axhline(0, color="black", linewidth=0.8)
        left.axhspan(-100 * TOLERANCE, 100 * TOLERANCE, color="grey", alpha=0.25, label=f"within {TOLERANCE:.0%}")
        low, high = min(heights + [-100 * TOLERANCE]), max(heights + [100 * TOLERANCE])
        left.set_ylim(low - 0.2 * (high - low), high + 0.2 * (high - low))
        left.legend(fontsize=8, loc="upper left")
        left.set(ylabel=f"perplexity change from full ({full:.3f}), %", title="Perplexity (teacher-forced decode)")
    else:
        left.set(ylabel="perplexity (teacher-forced decode)", title="Perplexity")
    bars = right.bar(xs, [accuracy.get(n, 0) for n in names], color=colors, alpha=0.85)
    right.bar_label(bars, labels=[f"{accuracy[n]:.2f}" if n in accuracy else "n/a" for n in names], fontsize=8)
    right.set(ylabel="passkey accuracy", title="Passkey retrieval", ylim=(0, 1.12))
    for axis in (left, right):
        axis.set_xticks(list(xs))
        axis.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    skipped = [name for name in names if name not in ok]
    suptitle = title + (f"\nnot measured: {', '.join(skipped)} (see the table)" if skipped else "")
    figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, png_path)


if __name__ == "__main__":
    sys.exit(main())
