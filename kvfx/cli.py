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


if __name__ == "__main__":
    main()
