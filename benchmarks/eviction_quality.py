"""Eviction quality: perplexity and passkey retrieval of codelm-27m under each eviction policy and KV budget.

    python benchmarks/eviction_quality.py                       # window, h2o, keyformer, snapkv x 0.1 0.2 0.3 0.5
    python benchmarks/eviction_quality.py --policies h2o snapkv --budgets 0.2 0.5 --device cuda
    python benchmarks/eviction_quality.py --quick               # tiny sizes: a smoke test of the whole pipeline

Each spec evicts in every layer and KV head (``{"version": 1, "default": {"evict": {"method": ..., "budget": b}}}``,
the method's other parameters at their spec defaults except ``window``'s ``sink: 4`` and ``snapkv``'s ``window: 32``);
the budget is a fraction of the prompt. The full cache (the model without kvfx) is the reference row.

Perplexity: a 1024-token prompt from the middle of ../shared/assets/text/heldout-code.txt in one prefill, then 1024
continuation tokens fed one at a time through the cache (teacher forcing); ``--ppl-windows N`` pools N such windows
spread over the text. Passkey: 2048-token haystacks of the same
text with the passkey line at depths 0, 0.1, ..., 0.9, greedy decoding. See kvfx/evaluate.py.

A policy kvfx does not implement yet is recorded as a skipped row with kvfx's message. Writes
benchmarks/results/eviction_quality.{json,md,png} (``$KVFX_RESULTS_DIR`` redirects them). Exits 1 if any spec
failed with an error other than "not implemented".
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
from kvfx.evaluate import DEFAULT_DEPTHS, evaluate_specs, plot_quality, write_table
from kvfx.results import results_path

POLICIES = ("window", "h2o", "keyformer", "snapkv")
BUDGETS = (0.1, 0.2, 0.3, 0.5)
# Parameters each method gets besides its budget (the rest stay at the spec's defaults, see kvfx/spec.py).
EXTRA = {"window": {"sink": 4}, "h2o": {}, "keyformer": {}, "snapkv": {"window": 32}}
FULL = (dict(prompt_tokens=1024, continuation_tokens=1024, passkey_length=2048, depths=DEFAULT_DEPTHS))
QUICK = (dict(prompt_tokens=128, continuation_tokens=32, passkey_length=256, depths=(0.1, 0.5, 0.9)))


def build_specs(policies, budgets, quick: bool = False) -> dict:
    """``{"full": None, "<policy>@<budget>": spec dict, ...}``."""
    specs = {"full": None}
    for policy in policies:
        extra = dict(EXTRA[policy])
        if quick and policy == "snapkv":
            extra["window"] = 8  # the quick prompt (128 tokens) leaves budgets of 12 to 64 tokens
        for budget in budgets:
            specs[f"{policy}@{budget:g}"] = {"version": 1,
                                             "default": {"evict": {"method": policy, "budget": budget, **extra}}}
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), metavar="POLICY",
                        help=f"eviction methods ({', '.join(POLICIES)}; default: all)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS),
                        help="KV budgets, fractions of the prompt (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--compiler", choices=["inductor", "aot_eager"], default=None,
                        help="what compiles the rewritten graphs (default: inductor on CUDA, aot_eager on CPU)")
    parser.add_argument("--no-full", action="store_true", help="leave out the full-cache baseline (with --append)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing results file that this run does not redo (a sweep in parts)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the Markdown table and plot from the JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (128+32 tokens, 256-token passkeys)")
    parser.add_argument("--identity", action="store_true",
                        help="also measure kvfx's identity spec (full cache through the compiled graph)")
    parser.add_argument("--model", default=None, help="a local model folder (default: the shared codelm-27m)")
    parser.add_argument("--text", default=None, help="held-out text (default: the shared heldout-code.txt)")
    parser.add_argument("--ppl-windows", type=int, default=1,
                        help="perplexity windows spread over the text, pooled (default: 1, the text's middle; "
                             "single windows range from 1.9 to 9.4 in perplexity across heldout-code.txt)")
    parser.add_argument("--seed", type=int, default=0, help="passkey names, digits and haystacks")
    parser.add_argument("--name", default="eviction_quality",
                        help="results file stem (default: %(default)s; --quick adds _quick)")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    sizes = QUICK if args.quick else FULL
    model = Path(args.model) if args.model else asset("codelm-27m")
    text = Path(args.text) if args.text else asset("text", "heldout-code.txt")
    specs = build_specs(args.policies, args.budgets, args.quick)
    if args.no_full:
        del specs["full"]
    if args.identity:
        specs = {"full": None, "kvfx-identity": {"version": 1}, **{k: v for k, v in specs.items() if k != "full"}}

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
        write_table(earlier + done, json_file, results_path(f"{stem}.md"), meta(done))

    def meta(done):
        return {
            "model": model.name, "text": text.name,
            "device": torch.cuda.get_device_name() if device == "cuda" else
            f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": "bfloat16" if device == "cuda" else "float32", "compiler": compiler,
            "torch": torch.__version__, "prompt_tokens": sizes["prompt_tokens"],
            "continuation_tokens": sizes["continuation_tokens"], "ppl_windows": args.ppl_windows,
            "passkey_length": sizes["passkey_length"], "depths": list(sizes["depths"]), "seed": args.seed,
            "seconds": round(time.perf_counter() - started, 1),
            "command": "python benchmarks/eviction_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }

    rows = evaluate_specs(model, specs, text, device=device, seed=args.seed, ppl_windows=args.ppl_windows,
                          compiler=compiler, on_row=save, **sizes)
    status = _write(earlier + rows, meta(rows), stem)
    errors = [row["name"] for row in rows if row["status"] == "error"]
    if errors:
        print(f"failed: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else status


def _write(rows, meta, stem) -> int:
    """The JSON, the Markdown table and (where matplotlib is installed) the plot."""
    json_path, md_path = write_table(rows, results_path(f"{stem}.json"), results_path(f"{stem}.md"), meta)
    print(md_path.read_text())
    try:
        png_path = plot_quality(rows, results_path(f"{stem}.png"),
                                title=f"{meta['model']} on {meta['text']}, {meta['device']}, {meta['dtype']}")
    except ImportError as error:
        print(f"no plot ({error}); redraw it where matplotlib is installed: "
              f"python benchmarks/eviction_quality.py --plot-only", file=sys.stderr)
        png_path = None
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
