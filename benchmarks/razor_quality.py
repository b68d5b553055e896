"""RazorAttention quality on codelm-27m: razor at its defaults (with and without the compensation token), the window
policy at the same total KV memory, and the full cache.

    python benchmarks/razor_quality.py                 # device auto; --quick for a smoke test of the pipeline

Perplexity (a 1024-token prompt, then 1024 tokens teacher-forced through the cache) and passkey retrieval (2048-token
haystacks, needle at depths 0-90%), as benchmarks/eviction_quality.py (kvfx/evaluate.py). Razor keeps
``R x T + (H - R) x (sink + window + 1)`` tokens per row for R retrieval heads of H KV heads and a T-token prompt, so
its memory share depends on T: the window policy is run at the razor share of each task's prompt length
(``window=ppl`` for perplexity, ``window=passkey`` for passkey) and each window row reports only its task.
Writes benchmarks/results/razor_quality.{json,png} (``$KVFX_RESULTS_DIR`` redirects them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvfx.assets import asset
from kvfx.evaluate import DEFAULT_DEPTHS, evaluate_specs
from kvfx.eviction.razor import retrieval_heads, window_size
from kvfx.results import results_path, save_figure
from kvfx.spec import EvictRazor

PROFILE = "examples/profiles/codelm-27m.json"
FULL = dict(prompt_tokens=1024, continuation_tokens=1024, passkey_length=2048, depths=DEFAULT_DEPTHS)
QUICK = dict(prompt_tokens=128, continuation_tokens=32, passkey_length=256, depths=(0.1, 0.5, 0.9))


def memory_share(config: EvictRazor, layers: int, kv_heads: int, tokens: int) -> float:
    """Razor's kept tokens over the full cache's, for a ``tokens``-token prompt (at most 1: short prompts fit the
    window whole)."""
    kept = len(retrieval_heads(config))
    window = window_size(config, tokens)
    total = layers * kv_heads
    return min(1.0, (kept * tokens + (total - kept) * (config.sink + window + 1)) / (total * tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (128+32 tokens, 256-token passkeys)")
    parser.add_argument("--profile", default=PROFILE, help="the retrieval-head profile (default: %(default)s)")
    parser.add_argument("--name", default="razor_quality", help="results file stem (default: %(default)s)")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = QUICK if args.quick else FULL
    model, text = asset("codelm-27m"), asset("text", "heldout-code.txt")
    layers, kv_heads = 8, 2

    razor = {"method": "razor", "profile": args.profile}
    config = EvictRazor(**razor)
    shares = {task: memory_share(config, layers, kv_heads, sizes[key])
              for task, key in (("ppl", "prompt_tokens"), ("passkey", "passkey_length"))}
    window = {"method": "window", "sink": config.sink}
    specs = {
        "full": None,
        "razor": {"version": 1, "default": {"evict": razor}},
        "razor, no compensation": {"version": 1, "default": {"evict": {**razor, "compensate": False}}},
        "window=ppl": {"version": 1, "default": {"evict": {**window, "budget": shares["ppl"]}}},
        "window=passkey": {"version": 1, "default": {"evict": {**window, "budget": shares["passkey"]}}},
    }
    started = time.perf_counter()
    rows = evaluate_specs(model, specs, text, device=device, **sizes)
    for row in rows:  # each window row stands for one task
        if row["name"] == "window=ppl":
            row["passkey_accuracy"], row["passkey"] = None, None
        if row["name"] == "window=passkey":
            row["ppl"], row["nll"] = None, None
        row.pop("traceback", None)
    payload = {
        "model": model.name, "text": text.name, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": "bfloat16" if device == "cuda" else "float32", "torch": torch.__version__, **sizes,
        "depths": list(sizes["depths"]), "profile": args.profile,
        "retrieval_heads": sorted(retrieval_heads(config)), "memory_share": shares,
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python benchmarks/razor_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    stem = args.name + ("_quick" if args.quick else "")
    path = results_path(f"{stem}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    for row in rows:
        print(f"{row['name']:<26} {row['status']:<8} ppl {row.get('ppl')}  passkey {row.get('passkey_accuracy')}  "
              f"{row['message']}")
    print(f"memory share of razor: {shares}; wrote {path}, {plot(payload, results_path(f'{stem}.png'))}")
    return 1 if any(row["status"] != "ok" for row in rows) else 0


def plot(payload: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in payload["rows"] if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ppl = [(r["name"], r["ppl"]) for r in rows if r.get("ppl") is not None]
    left.barh([n for n, _ in ppl], [p for _, p in ppl], color="tab:blue")
    left.set_xlabel(f"perplexity ({payload['prompt_tokens']} + {payload['continuation_tokens']} tokens)")
    left.invert_yaxis()
    for r in rows:
        if r.get("passkey"):
            depths = [case["depth"] for case in r["passkey"]]
            right.plot(depths, [int(case["correct"]) for case in r["passkey"]], marker="o", label=r["name"])
    right.set_xlabel(f"needle depth in a {payload['passkey_length']}-token haystack")
    right.set_ylabel("retrieved")
    right.legend(fontsize=8)
    share = payload["memory_share"]
    fig.suptitle(f"{payload['model']}: razor ({len(payload['retrieval_heads'])} retrieval KV heads) vs window at "
                 f"equal memory ({share['ppl']:.0%} / {share['passkey']:.0%} of the full cache), {payload['device']}")
    return save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
