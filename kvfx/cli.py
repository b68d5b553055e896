"""The ``kvfx`` command line."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import click


@click.group()
def main():
    """kvfx: a torch.compile backend that compresses the KV cache of Hugging Face models."""


@main.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="A local Hugging Face model folder (default: the shared codelm-27m).")
@click.option("--spec", default=None, help="A spec file (YAML/JSON); default: the identity policy (full cache).")
@click.option("--text", type=click.Path(exists=True, path_type=Path), default=None,
              help="Text to take the prompt from (default: the shared heldout-code.txt).")
@click.option("--prompt-tokens", default=512, show_default=True, help="Prompt length in tokens.")
@click.option("--new-tokens", default=128, show_default=True, help="Tokens to generate.")
@click.option("--batch", default=1, show_default=True, help="Sequences per batch (the same prompt at offsets).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compiler", type=click.Choice(["inductor", "aot_eager", "eager"]), default="inductor",
              show_default=True, help="What runs the rewritten graph.")
def demo(model_path, spec, text, prompt_tokens, new_tokens, batch, device, compiler):
    """Generate with and without kvfx; print speed, KV-cache bytes and whether the outputs agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvfx
    from kvfx.assets import asset

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available here")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model_path = model_path or asset("codelm-27m")
    text = text or asset("text", "heldout-code.txt")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    source = text.read_text()
    rows = [tokenizer(source[i * 4000:], return_tensors="pt").input_ids[0, :prompt_tokens] for i in range(batch)]
    if min(len(r) for r in rows) < prompt_tokens:
        raise click.UsageError(f"{text} is too short for {batch} prompts of {prompt_tokens} tokens")
    ids = torch.stack(rows).to(device)
    click.echo(f"model {model_path} ({dtype}, {device}), batch {batch}, prompt {prompt_tokens}, "
               f"new tokens {new_tokens}, spec {spec or 'identity (full cache)'}")

    def run(m):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0,
                         return_dict_in_generate=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    eager_out, eager_s = run(model)
    eager_kv = _cache_bytes(eager_out.past_key_values)
    del eager_out.past_key_values
    model.forward = torch.compile(model.forward, backend="kvfx", options={"spec": spec, "compiler": compiler})
    click.echo("compiling (first call)...")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?!kvfx)")
        run(model)
        kvfx_out, kvfx_s = run(model)
    state = kvfx.REGISTRY.lookup(kvfx_out.past_key_values.layers[0].keys)
    held = _cache_bytes(kvfx_out.past_key_values)  # what transformers' DynamicCache holds: the 1-element handle
    kvfx_kv, kvfx_used = state.nbytes + held, state.used_bytes + held
    tokens = batch * new_tokens
    same = torch.equal(eager_out.sequences, kvfx_out.sequences)
    click.echo(f"{'':24}{'tokens/s':>12}{'KV bytes used':>16}{'allocated':>14}")
    click.echo(f"{'transformers (eager)':24}{tokens / eager_s:12.1f}{eager_kv:16,d}{eager_kv:14,d}")
    click.echo(f"{'kvfx':24}{tokens / kvfx_s:12.1f}{kvfx_used:16,d}{kvfx_kv:14,d}")
    if same:
        click.echo(f"outputs agree: all {tokens} generated tokens are identical")
    else:
        differ = (eager_out.sequences != kvfx_out.sequences).nonzero()[0].tolist()
        click.echo(f"outputs differ: first at row {differ[0]}, token {differ[1] - ids.shape[1]}")
    click.echo("kvfx continuation: " + repr(tokenizer.decode(kvfx_out.sequences[0, ids.shape[1]:])[:200]))


def _ratio(ctx, param, value):
    if value is not None and not 0.0 < value < 1.0:
        raise click.BadParameter(f"must be a fraction in (0, 1), got {value}")
    return value


@main.command("profile-heads")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The profile JSON to write (spec: evict: {method: razor, profile: ...}).")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The heatmap PNG (default: --out with .png).")
@click.option("--no-heatmap", is_flag=True, help="Do not draw the heatmap.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random probe tokens.")
@click.option("--echo-ratio", default=0.01, show_default=True, callback=_ratio,
              help="Fraction of KV heads chosen by echo score.")
@click.option("--induction-ratio", default=0.14, show_default=True, callback=_ratio,
              help="Fraction of KV heads chosen by induction score.")
@click.option("--length", type=click.IntRange(min=2), default=None,
              help="Probe length L (default: 2500, or the largest L with 4L + 1 <= max_position_embeddings).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def profile_heads(model_path, out, heatmap, no_heatmap, seed, echo_ratio, induction_ratio, length, device, quiet):
    """Find MODEL's retrieval heads (RazorAttention's echo and induction scores) and write a profile."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvfx.head_profile import ProfileError, plot_profile
    from kvfx.head_profile import profile_heads as run_profile

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available here")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    try:
        profile = run_profile(model, model_name=model_path.name, seed=seed, echo_ratio=echo_ratio,
                              induction_ratio=induction_ratio, length=length, progress=not quiet)
        profile.save(out)
        picture = None if no_heatmap else plot_profile(profile, heatmap or out.with_suffix(".png"))
    except ProfileError as err:
        raise click.ClickException(str(err)) from None
    total = profile.num_layers * profile.num_kv_heads
    chosen = ", ".join(f"L{layer}H{head}" for layer, head in profile.retrieval_heads)
    click.echo(f"{len(profile.retrieval_heads)} of {total} KV heads are retrieval heads "
               f"({100 * len(profile.retrieval_heads) / total:.1f}%): {chosen}")
    click.echo(f"wrote {out}" + (f" and {picture}" if picture else ""))


def _cache_bytes(cache) -> int:
    """Bytes of storage the cache's tensors hold (kvfx's views of its handle hold 2 to 4 bytes each)."""
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _eval_parsed(parser_name: str):
    """A click callback that parses a value with ``kvfx.eval_command.<parser_name>`` (a ValueError: bad usage)."""

    def callback(ctx, param, value):
        if value is None:
            return None
        from kvfx import eval_command

        try:
            return getattr(eval_command, parser_name)(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None

    return callback


@main.command("eval")
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A local Hugging Face model folder (default: the shared codelm-27m).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out text for the perplexity prompt and the passkey haystacks (default: the shared "
                   "heldout-code.txt).")
@click.option("--spec", "spec_values", multiple=True, metavar="[NAME=]PATH",
              help="A spec file to evaluate, its row named NAME or the file's stem; repeatable. The full-cache "
                   "baseline row (the model without kvfx) is always measured.")
@click.option("--budgets", default=None, callback=_eval_parsed("parse_budgets"), metavar="B1,B2,...",
              help="Sweep the default eviction budget of each spec that has one: rows NAME@B (0.2: a fraction of "
                   "the prompt, 512: tokens).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Perplexity: prompt length N (one prefill).")
@click.option("--continuation-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Perplexity: continuation length M, fed one token at a time through the cache.")
@click.option("--ppl-windows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Perplexity windows spread over the text, pooled (1: the text's middle).")
@click.option("--depths", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", show_default=True,
              callback=_eval_parsed("parse_depths"), help="Passkey needle depths (fractions), or none.")
@click.option("--lengths", default="2048", show_default=True, callback=_eval_parsed("parse_lengths"),
              help="Passkey haystack lengths in tokens: the depth x length grid.")
@click.option("--seed", default=0, show_default=True, help="Passkey names, digits and haystacks.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: bfloat16 on CUDA, float32 on CPU.")
@click.option("--compiler", type=click.Choice(["inductor", "aot_eager", "eager"]), default=None,
              help="What runs the rewritten graph (default: inductor on CUDA, aot_eager on CPU).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("kvfx-eval"),
              show_default=True, help="Folder for eval.json, eval.md, eval.png and the passkey heatmaps.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(model_path, text, spec_values, budgets, prompt_tokens, continuation_tokens, ppl_windows, depths,
                 lengths, seed, device, dtype, compiler, out, quiet):
    """Quality under each spec: teacher-forced continuation perplexity and passkey retrieval (depth x length)."""
    import platform

    import torch
    import transformers

    from kvfx.assets import asset
    from kvfx.eval_command import BASELINE, load_specs, write_outputs
    from kvfx.evaluate import evaluate_specs
    from kvfx.spec import SpecError

    try:
        specs = load_specs(spec_values, budgets or ())
    except (ValueError, SpecError) as err:
        raise click.BadParameter(str(err), param_hint="'--spec'") from None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    compiler = compiler or ("inductor" if device == "cuda" else "aot_eager")
    try:
        model_path = model_path or asset("codelm-27m")
        text = text or asset("text", "heldout-code.txt")
    except FileNotFoundError as err:
        raise click.ClickException(f"{err} (or pass --model and --text)") from None
    meta = {
        "model": str(model_path), "text": str(text),
        "device": torch.cuda.get_device_name() if device == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."), "compiler": compiler, "torch": torch.__version__,
        "transformers": transformers.__version__, "prompt_tokens": prompt_tokens,
        "continuation_tokens": continuation_tokens, "ppl_windows": ppl_windows, "passkey_lengths": list(lengths),
        "depths": list(depths), "seed": seed,
        "specs": {name: spec.source for name, spec in specs.items()},
    }
    click.echo(f"kvfx eval: {model_path.name} ({meta['dtype']}, {device}, compiler {compiler}), "
               f"{1 + len(specs)} rows: {', '.join([BASELINE, *specs])}")
    started = time.perf_counter()
    try:
        rows = evaluate_specs(model_path, {BASELINE: None, **specs}, text, prompt_tokens=prompt_tokens,
                              continuation_tokens=continuation_tokens, ppl_windows=ppl_windows,
                              passkey_length=lengths, depths=depths, seed=seed, device=device, dtype=dtype,
                              compiler=compiler, progress=not quiet)
    except ValueError as err:  # e.g. a text too short for the prompt and continuation
        raise click.ClickException(str(err)) from None
    meta["seconds"] = round(time.perf_counter() - started, 1)
    paths, no_plots = write_outputs(rows, meta, out)
    click.echo((out / "eval.md").read_text())
    if no_plots:
        click.echo(no_plots, err=True)
    click.echo("wrote " + ", ".join(str(path) for path in paths))
    errors = [row["name"] for row in rows if row["status"] == "error"]
    if errors:
        click.echo(f"failed: {', '.join(errors)} (eval.json has the tracebacks)", err=True)
        click.get_current_context().exit(1)


@main.command("plan")
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("spec", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size B.")
@click.option("--tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Prompt length T in tokens (the padded width of the batch).")
@click.option("--new-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens generated (max_new_tokens); the cache then holds N = new-tokens - 1 of them.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32", "auto"]), default="bfloat16",
              show_default=True, help="The cache dtype (auto: the model config's).")
def plan_command(model_path, spec, batch, tokens, new_tokens, dtype):
    """The KV bytes kvfx will allocate for SPEC on the model in folder MODEL: per layer a sympy expression in B, T
    and N, then the totals at --batch, --tokens and --new-tokens and the ratio to the full cache."""
    from kvfx.head_profile import ProfileError
    from kvfx.memory_plan import PlanError, plan_memory
    from kvfx.spec import SpecError

    try:
        click.echo(plan_memory(spec, model_path, dtype).describe(batch, tokens, new_tokens))
    except (SpecError, PlanError, ProfileError) as err:
        raise click.ClickException(str(err)) from None


@main.command("bench")
@click.option("--sizes", default="1x8192,8x8192,1x32768,8x32768", show_default=True,
              help="BATCHxPROMPT workloads of the Llama-3.2-1B-shaped model (random bf16 weights), comma-separated; "
                   "'none' for none.")
@click.option("--model", "bench_model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A local model folder for --model-sizes (default: the shared codelm-27m).")
@click.option("--model-sizes", default="8x2048", show_default=True,
              help="BATCHxPROMPT workloads of --model; 'none' for none.")
@click.option("--budgets", default="0.25,0.125", show_default=True,
              help="Eviction budgets, fractions of the prompt (the first runs before the others).")
@click.option("--policies", default="window,h2o,keyformer,snapkv,razor,kivi,gear", show_default=True,
              help="kvfx policies (razor only where examples/profiles/<model>.json fits the model; policies kvfx "
                   "does not implement yet are listed as skipped).")
@click.option("--bits", default="4,2", show_default=True, help="Bits of quanto's QuantizedCache (and kvfx kivi/gear).")
@click.option("--only", default=None,
              help="Run only these configurations, comma-separated (e.g. 'dynamic,static+compile,kvfx,kvfx h2o 0.25').")
@click.option("--new-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Tokens per timed generate() call (new tokens - 1 decode steps are timed).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed generate() calls per configuration (the median is reported).")
@click.option("--warmup-tokens", type=click.IntRange(min=3), default=None,
              help="Tokens of the warm-up call, which compiles the prefill and decode graphs (default: --new-tokens).")
@click.option("--time-budget", type=click.FloatRange(min=0), default=None,
              help="Seconds: a configuration that would end past it is skipped (and listed as skipped).")
@click.option("--quanto-unpack", type=click.Choice(["auto", "torch", "extension"]), default="auto", show_default=True,
              help="quanto's int2/int4 unpack: its C++/CUDA extension (built at first use: minutes, needs nvcc) or "
                   "torch ops; auto: the extension only if already built.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Results JSON (default: benchmarks/results/bench_<gpu>.json, or in $KVFX_RESULTS_DIR); the "
                   ".md table and .png plots go beside it.")
@click.option("--plot-only", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Redraw the table and plots of a results JSON (no GPU needed).")
@click.option("--merge", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An earlier results JSON: its rows that this run does not measure are kept in --out.")
@click.option("--no-plot", is_flag=True, help="Do not draw the plots.")
@click.option("--list", "list_only", is_flag=True, help="Print the configurations in run order and exit (no GPU).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="kvfx backend option cuda_graphs for every kvfx configuration (default: the backend's default).")
def bench_command(sizes, bench_model, model_sizes, budgets, policies, bits, only, new_tokens, repeats, warmup_tokens,
                  time_budget, quanto_unpack, out, plot_only, merge, no_plot, list_only, cuda_graphs):
    """End-to-end generate() on a GPU: decode tokens/s, time to first token and peak memory of transformers'
    DynamicCache, StaticCache + torch.compile and quanto QuantizedCache, and of kvfx (identity and each policy)."""
    from kvfx.bench import BenchError
    from kvfx.bench import bench_command as run

    try:
        run(sizes=sizes, model=bench_model, model_sizes=model_sizes, budgets=budgets, policies=policies, bits=bits,
            only=only, new_tokens=new_tokens, repeats=repeats, warmup_tokens=warmup_tokens, time_budget=time_budget,
            quanto_unpack=quanto_unpack, out=out, plot_only=plot_only, no_plot=no_plot, merge=merge,
            list_only=list_only, log=click.echo, cuda_graphs=cuda_graphs)
    except (BenchError, ValueError) as err:
        raise click.ClickException(str(err)) from None


if __name__ == "__main__":
    main()
