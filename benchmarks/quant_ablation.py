"""GEAR's ablation on real K/V: reconstruction error of quantization alone, + low-rank, + low-rank + outliers.

    python benchmarks/quant_ablation.py                     # codelm-27m, 2048 tokens of heldout-code, bits 2 and 4
    python benchmarks/quant_ablation.py --tokens 1024 --offset 0.25
    python benchmarks/quant_ablation.py --quick             # 256 tokens, written as quant_ablation_quick.*

A real prompt (``--tokens`` tokens of ../shared/assets/text/heldout-code.txt from the line start nearest fraction
``--offset`` of it, the same windowing as benchmarks/eviction_quality.py) goes through the plain transformers model
in float32 on CPU with ``use_cache=True``; each layer's keys and values ``[1, Hkv, T, D]`` are taken from the
returned DynamicCache (keys after RoPE, as the cache stores them), and the queries are recorded on the way (a
registered attention function that calls transformers' SDPA one unchanged).

Each whole ``[1, Hkv, T, D]`` block is compressed as one prompt segment (no full-precision residual: every token is
compressed) and reconstructed in float32 three ways, all with the storage dtypes kvfx uses (float16 scales, offsets
and low-rank factors):

    (a) quant       KIVI alone: kvfx.kernels.quant_pack.quantize_reference + dequantize
    (b) +lowrank    GEAR with rank r and no outliers (gear_compress_reference(..., rank, 0) + gear_reconstruct)
    (c) +outliers   GEAR with rank r and outliers

and the relative Frobenius error ``||X - X^|| / ||X||`` is reported per layer and as the mean over layers.  The
attention-output error ``||O - O^|| / ||O||`` (causal attention of the recorded queries over K^ and V^, both
reconstructed by the same variant, against the exact K and V) is reported beside it.

Configurations.  codelm-27m has head_dim 64, and kvfx keeps ``floor(outliers / 2 * row length)`` outliers at each end
of a row (kvfx/kernels/gear.py): a key row is one channel of a ``group``-token group (32 at the defaults), a value
row one token's 64 channels.  At the spec's ``outliers: 0.02`` that is floor(0.32) = 0 for keys and floor(0.64) = 0
for values: at the spec defaults on this model the outlier store is empty for both, and (c) equals (b) exactly.  So:

    defaults      group 32, outliers 0.02 for keys and values (empty outlier store: (c) == (b), not judged)
    outliers-on   keys group 128, outliers 0.02 (1 + 1 per 128-token channel row, 1.6% of the entries);
                  values group 32, outliers 0.04 (1 + 1 per 64-channel token, 3.1%; no value row of 64 channels
                  holds an outlier below outliers = 1/32)

each at rank 4 (the spec's ``prefill_rank``, with which kvfx compresses a prompt) and rank 2 (``rank``, the decode
blocks' rank).  The criterion (error strictly falls (a) > (b) > (c), on the mean over layers, at 2 and 4 bits, for
keys and values) is judged on the ``outliers-on`` rows at both ranks, and its (a) > (b) step also on the
``defaults`` rows; the script exits 1 if a judged step does not fall.

Writes benchmarks/results/quant_ablation.{json,md,png} (``$KVFX_RESULTS_DIR`` redirects them).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from kvfx.assets import asset
from kvfx.kernels.gear import gear_compress_reference, gear_reconstruct, outlier_count
from kvfx.kernels.quant_pack import dequantize, quantize_reference
from kvfx.results import results_path, save_figure, write_json

VARIANTS = ("quant", "+lowrank", "+outliers")
KINDS = ("keys", "values")
# Per configuration and kind: quantization group and outlier fraction (the rank is the run's --ranks).
CONFIGS = {
    "defaults": {"keys": {"group": 32, "outliers": 0.02}, "values": {"group": 32, "outliers": 0.02}},
    "outliers-on": {"keys": {"group": 128, "outliers": 0.02}, "values": {"group": 32, "outliers": 0.04}},
}
RECORD = "kvfx_ablation_record"


# ----------------------------------------------------------------------------------------------------------------
# Capture.
# ----------------------------------------------------------------------------------------------------------------


def capture(model_path: Path, text_path: Path, tokens: int, offset: float) -> dict:
    """One float32 prefill of ``tokens`` tokens: per layer the cache's keys and values and the attention's queries
    (all ``[1, heads, T, D]``, float32), and the scaling the model's attention uses."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvfx.evaluate import _perplexity_ids

    queries: dict[int, torch.Tensor] = {}
    scalings: dict[int, float] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query.detach().float().clone()
        scalings[module.layer_idx] = kwargs.get("scaling", module.scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(RECORD, record)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=RECORD).eval()
    ids = _perplexity_ids(tokenizer, text_path.read_text(), offset, tokens)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    layers = []
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys.float().clone(), layer.values.float().clone()
        if keys.shape[-2] != tokens:
            raise RuntimeError(f"layer {i}: the cache holds {keys.shape[-2]} tokens, {tokens} expected")
        layers.append({"keys": keys, "values": values, "queries": queries[i], "scaling": scalings[i]})
    return {"layers": layers, "ids": ids, "config": model.config}


# ----------------------------------------------------------------------------------------------------------------
# Compression.
# ----------------------------------------------------------------------------------------------------------------


def rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).norm() / x.norm())


def reconstruct(x: torch.Tensor, kind: str, variant: str, bits: int, group: int, rank: int, outliers: float
                ) -> tuple[torch.Tensor, float]:
    """float32 X^ of one variant and its storage in bits per entry (codes, scales, offsets and GEAR terms)."""
    tokens = x.shape[-2]
    if variant == "quant":
        qt = quantize_reference(x, kind, bits, group)
        return dequantize(qt), 8 * qt.nbytes() / x.numel()
    qt, terms = gear_compress_reference(x, kind, bits, group, rank, outliers if variant == "+outliers" else 0.0)
    size = qt.nbytes() + terms.nbytes(tokens, group, kind)
    return gear_reconstruct(qt, terms), 8 * size / x.numel()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention with GQA (query head h reads KV head h // (H / Hkv), as transformers' repeat_kv)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)


def ablate(layers: list[dict], bits_list, ranks, configs: dict, with_attention: bool = True) -> list[dict]:
    """One row per (config, rank, bits, kind): per-variant errors per layer and their mean."""
    rows = []
    exact_out = [attention(L["queries"], L["keys"], L["values"], L["scaling"]) for L in layers] \
        if with_attention else None
    for config_name, config in configs.items():
        for rank in ranks:
            for bits in bits_list:
                recon: dict[str, dict[str, list[torch.Tensor]]] = {kind: {} for kind in KINDS}
                for kind in KINDS:
                    group, outliers = config[kind]["group"], config[kind]["outliers"]
                    row_length = group if kind == "keys" else layers[0][kind].shape[-1]
                    per_side = outlier_count(outliers, row_length)
                    row = {"config": config_name, "rank": rank, "bits": bits, "kind": kind, "group": group,
                           "outliers": outliers, "outlier_row_length": row_length, "outliers_per_side": per_side,
                           "error": {}, "error_per_layer": {}, "pooled_error": {}, "bits_per_entry": {}}
                    for variant in VARIANTS:
                        errors, sq_err, sq_norm, sizes, xs = [], 0.0, 0.0, [], []
                        for L in layers:
                            x = L[kind]
                            x_hat, size = reconstruct(x, kind, variant, bits, group, rank, outliers)
                            errors.append(rel_error(x, x_hat))
                            sq_err += float((x - x_hat).pow(2).sum())
                            sq_norm += float(x.pow(2).sum())
                            sizes.append(size)
                            xs.append(x_hat)
                        recon[kind][variant] = xs
                        row["error_per_layer"][variant] = errors
                        row["error"][variant] = sum(errors) / len(errors)
                        row["pooled_error"][variant] = math.sqrt(sq_err / sq_norm)
                        row["bits_per_entry"][variant] = sum(sizes) / len(sizes)
                    rows.append(row)
                if with_attention:  # K^ and V^ of the same variant together
                    attn = {}
                    for variant in VARIANTS:
                        errs = [rel_error(exact_out[i], attention(L["queries"], recon["keys"][variant][i],
                                                                  recon["values"][variant][i], L["scaling"]))
                                for i, L in enumerate(layers)]
                        attn[variant] = {"mean": sum(errs) / len(errs), "per_layer": errs}
                    for row in rows[-len(KINDS):]:
                        row["attention_error"] = {v: attn[v]["mean"] for v in VARIANTS}
                        row["attention_error_per_layer"] = {v: attn[v]["per_layer"] for v in VARIANTS}
    return rows


def judge(rows: list[dict]) -> list[dict]:
    """Mark each row's steps: (a) > (b) and (b) > (c) on the mean over layers; which steps are judged."""
    for row in rows:
        e = row["error"]
        empty_store = row["outliers_per_side"] == 0
        row["falls"] = {"quant>+lowrank": e["quant"] > e["+lowrank"],
                        "+lowrank>+outliers": e["+lowrank"] > e["+outliers"]}
        row["judged"] = {"quant>+lowrank": row["rank"] > 0,
                         "+lowrank>+outliers": row["config"] == "outliers-on" and not empty_store}
        row["layers_falling"] = {
            "quant>+lowrank": sum(a > b for a, b in zip(row["error_per_layer"]["quant"],
                                                        row["error_per_layer"]["+lowrank"])),
            "+lowrank>+outliers": sum(a > b for a, b in zip(row["error_per_layer"]["+lowrank"],
                                                            row["error_per_layer"]["+outliers"])),
        }
        row["passed"] = all(row["falls"][s] for s, judged in row["judged"].items() if judged)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------------


def table(rows: list[dict], layers: int) -> str:
    head = ["config", "rank", "bits", "kind", "group", "out/side", "quant", "+lowrank", "+outliers",
            "bits/entry (a/b/c)", "attn (a/b/c)", "a>b", "b>c", "judged"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        mark = lambda s: ("yes" if r["falls"][s] else "NO") + f" ({r['layers_falling'][s]}/{layers})"  # noqa: E731
        judged = [s for s, j in r["judged"].items() if j]
        attn = r.get("attention_error")
        lines.append("| " + " | ".join([
            r["config"], str(r["rank"]), str(r["bits"]), r["kind"], str(r["group"]),
            f"{r['outliers_per_side']} of {r['outlier_row_length']}",
            *(f"{r['error'][v]:.4f}" for v in VARIANTS),
            "/".join(f"{r['bits_per_entry'][v]:.2f}" for v in VARIANTS),
            "/".join(f"{attn[v]:.4f}" for v in VARIANTS) if attn else "-",
            mark("quant>+lowrank"), mark("+lowrank>+outliers") if r["outliers_per_side"] else "n/a (no outliers)",
            ("a>b, b>c" if len(judged) == 2 else "a>b" if judged else "no") + ("" if r["passed"] else " FAILED"),
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], png_path: Path, title: str) -> Path:
    """One panel per (kind, bits); in each, a group of three bars (quant, +lowrank, +outliers) per configuration and
    rank, each labelled with its error (linear axes, from 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["kind"], r["bits"]) for r in rows}, key=lambda c: (KINDS.index(c[0]), c[1]))
    setups = sorted({(r["config"], r["rank"]) for r in rows},
                    key=lambda p: (list(CONFIGS).index(p[0]) if p[0] in CONFIGS else len(CONFIGS), -p[1]))
    figure, axes = plt.subplots(1, len(cells), figsize=(4.4 * len(cells), 4.6), squeeze=False)
    width = 0.26
    for axis, (kind, bits) in zip(axes[0], cells):
        members = [next(r for r in rows if (r["kind"], r["bits"], r["config"], r["rank"]) == (kind, bits, c, k))
                   for c, k in setups]
        for j, variant in enumerate(VARIANTS):
            xs = [i + (j - 1) * width for i in range(len(members))]
            values = [r["error"][variant] for r in members]
            bars = axis.bar(xs, values, width, color=f"C{j}", label=variant)
            axis.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=6, rotation=90, padding=2)
        axis.set_xticks(range(len(members)))
        axis.set_xticklabels([f"{r['config']}\nrank {r['rank']}, g{r['group']}\n{r['outliers_per_side']} out/side"
                              + ("\n(judged)" if r["judged"]["+lowrank>+outliers"] else "") for r in members],
                             fontsize=7)
        axis.set_ylim(0, 1.18 * max(r["error"]["quant"] for r in members))
        axis.grid(axis="y", alpha=0.3)
        axis.set_title(f"{kind}, {bits}-bit", fontsize=10)
    axes[0][0].set_ylabel("||X - X^|| / ||X||, mean over layers")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", ncol=3, fontsize=8)
    figure.suptitle(title, fontsize=10, x=0.02, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    return save_figure(figure, png_path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder (default: the shared codelm-27m)")
    parser.add_argument("--text", default=None, help="the prompt's text (default: the shared heldout-code.txt)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default: %(default)s; a multiple "
                                                                  "of every key group)")
    parser.add_argument("--offset", type=float, default=0.5,
                        help="where in the text the prompt starts, a fraction (default: %(default)s, the middle)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 2],
                        help="GEAR ranks (default: 4 = spec prefill_rank, 2 = spec rank)")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention-output error")
    parser.add_argument("--quick", action="store_true", help="256 tokens (a smoke test); results named *_quick")
    parser.add_argument("--name", default="quant_ablation", help="results file stem (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = 256 if args.quick else args.tokens
    largest_group = max(c[k]["group"] for c in CONFIGS.values() for k in KINDS)
    if tokens < largest_group or tokens % largest_group:
        parser.error(f"--tokens {tokens} must be a positive multiple of {largest_group} (the largest key group)")
    model = Path(args.model) if args.model else asset("codelm-27m")
    text = Path(args.text) if args.text else asset("text", "heldout-code.txt")
    stem = args.name + ("_quick" if args.quick else "")

    started = time.perf_counter()
    torch.manual_seed(0)
    captured = capture(model, text, tokens, args.offset)
    layers = captured["layers"]
    captured_s = time.perf_counter() - started
    rows = judge(ablate(layers, args.bits, args.ranks, CONFIGS, with_attention=not args.no_attention))
    seconds = time.perf_counter() - started

    k0 = layers[0]["keys"]
    judged_rows = [r for r in rows if any(r["judged"].values())]
    passed = all(r["passed"] for r in judged_rows)
    meta = {
        "command": " ".join(["python benchmarks/quant_ablation.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": model.name, "text": text.name, "tokens": tokens, "offset": args.offset,
        "first_token_ids": captured["ids"][0, :8].tolist(),
        "layers": len(layers), "kv_heads": k0.shape[1], "query_heads": layers[0]["queries"].shape[1],
        "head_dim": k0.shape[-1], "dtype": "float32", "device": f"cpu ({platform.machine()}, "
                                                               f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "keys": "post-RoPE, from the DynamicCache of a use_cache=True forward",
        "compressed": "every token of each layer's [1, Hkv, T, D] block as one segment (no full-precision residual)",
        "storage": "float16 scales/offsets (quant_pack default), float16 low-rank factors, float32 outlier values",
        "bits": args.bits, "ranks": args.ranks, "configs": CONFIGS, "variants": {
            "quant": "KIVI: quantize_reference + dequantize",
            "+lowrank": "gear_compress_reference(x, kind, bits, group, rank, outliers=0) + gear_reconstruct",
            "+outliers": "gear_compress_reference(x, kind, bits, group, rank, outliers) + gear_reconstruct"},
        "error": "relative Frobenius ||X - X^|| / ||X|| per layer (all heads), 'error' the mean over layers, "
                 "'pooled_error' over all layers together",
        "attention_error": None if args.no_attention else
        "||O - O^|| / ||O||, causal attention of the recorded queries, K^ and V^ of the same variant, mean over "
        "layers (all query positions and heads)",
        "judged_on": "mean over layers; steps quant>+lowrank on every row with rank > 0, +lowrank>+outliers on the "
                     "outliers-on rows (the defaults rows keep no outliers on this head_dim-64 model: floor(0.01 x "
                     "32) = floor(0.01 x 64) = 0 per side, so there +outliers == +lowrank)",
        "criterion_met": passed,
        "seconds": round(seconds, 1), "capture_seconds": round(captured_s, 1),
    }
    md = table(rows, len(layers))
    print(md)
    json_path = write_json(results_path(f"{stem}.json"), {"meta": meta, "rows": rows})
    md_path = results_path(f"{stem}.md")
    md_path.write_text(
        f"# GEAR ablation on real K/V ({model.name}, {tokens} tokens of {text.name})\n\n"
        + "\n".join(f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in meta.items())
        + "\n\nErrors: mean over layers of ||X - X^|| / ||X||; `a>b`/`b>c`: whether the mean falls, "
          "(layers where it falls / layers); `attn`: the attention-output error with K^ and V^ of the same variant "
          "together (so the same on a setup's keys and values rows).\n\n" + md + "\n")
    try:
        png_path = plot(rows, results_path(f"{stem}.png"),
                        f"GEAR ablation: {model.name}, {tokens} tokens of {text.name}, float32 K/V")
    except ImportError as error:
        print(f"no plot ({error})", file=sys.stderr)
        png_path = None
    print(f"\nstrictly falling on every judged row ({len(judged_rows)} rows): {'yes' if passed else 'NO'}")
    for r in judged_rows:
        if not r["passed"]:
            print(f"  not falling: {r['config']} rank {r['rank']} {r['bits']}-bit {r['kind']}: {r['error']}")
    print(f"{seconds:.1f} s; wrote {json_path}, {md_path}, {png_path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
