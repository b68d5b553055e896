"""What is alive at the peak of a generate() call (prompt included): stock transformers against kvfx configurations.

    python benchmarks/prefill_peak.py --size 8x32768 --policy window --budget 0.25 \\
        --configs dynamic,kvfx,kvfx:mlp_chunk_mib=0

The 1B-shaped random model (kvfx.bench_models.LLAMA_1B) in bfloat16. Each configuration runs in its own process (a
fresh allocator and compile cache): one warm-up generate() that compiles, then one recorded call with the CUDA
allocator's history on. Printed per configuration: the peak (``max_memory_allocated``), the peak above the weights,
and the allocations of that call alive at the peak grouped by where they were made (inductor's generated code reuses
a freed buffer for a later tensor of the same size, so a group's label is where its memory was first allocated, not
necessarily what it holds at the peak). ``kvfx:OPTION=VALUE[;...]`` passes backend options (numbers or true/false).
A diagnosis tool beside ``kvfx bench``, which judges the goals.
"""

from __future__ import annotations

import argparse
import gc
import json
import linecache
import os
import subprocess
import sys
import time

import torch

_SOURCES = ("torchinductor", "/kvfx/", "/kernels/", "/passes/", "transformers/")


def _parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, text.split(";")):
        name, _, value = item.partition("=")
        options[name] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
    return options


def _where(event: dict) -> tuple[str, ...]:
    out = []
    for frame in event.get("frames", []):
        name = frame["filename"]
        if any(part in name for part in _SOURCES):
            source = linecache.getline(name, frame["line"]).strip()[:100]
            out.append(f"{name.rsplit('/', 1)[-1]}:{frame['line']} {frame['name']}: {source}")
        if len(out) == 2:
            break
    return tuple(out)


def _live_at_peak(events: list[dict]) -> list[tuple[int, int, tuple[str, ...]]]:
    """(bytes, blocks, where) of this call's allocations alive when they summed highest, largest first."""
    live, current, best, best_index = {}, 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > best:
                best, best_index = current, index
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    live = {}
    for event in events[: best_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: dict[tuple[str, ...], list[int]] = {}
    for event in live.values():
        entry = groups.setdefault(_where(event), [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    return sorted(((b, n, w) for w, (b, n) in groups.items()), reverse=True)


def measure(size: str, policy: str, budget: float, config: str, new_tokens: int) -> None:
    from kvfx.bench import policy_spec
    from kvfx.bench_models import LLAMA_1B, load_model

    batch, prompt = (int(x) for x in size.split("x"))
    model = load_model(LLAMA_1B, "cuda", torch.bfloat16, prompt + new_tokens + 8)
    weights = torch.cuda.memory_allocated()
    if config != "dynamic":
        spec = policy_spec(policy, budget, new_tokens)  # the spec `kvfx bench` runs as "kvfx <policy> <budget>"
        options = {"spec": spec, "verbose": False, **_parse_options(config.partition(":")[2])}
        model.forward = torch.compile(model.forward, backend="kvfx", options=options)
    ids = torch.randint(100, 30000, (batch, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def generate():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)

    generate()  # compiles
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
    start = time.perf_counter()
    generate()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    print(f"== {config}: peak {peak / 2**30:.2f} GiB, above the weights ({weights / 2**30:.2f} GiB) "
          f"{(peak - weights) / 2**30:.2f} GiB; the recorded call took {seconds:.1f} s")
    for nbytes, blocks, where in _live_at_peak(snapshot["device_traces"][0])[:8]:
        print(f"   {nbytes / 2**30:6.3f} GiB in {blocks:3d} blocks  " + ("  <-  ".join(where) or "(no source)"))
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8x32768", help="BATCHxPROMPT")
    p.add_argument("--policy", default="window", help="eviction policy of the kvfx configurations")
    p.add_argument("--budget", type=float, default=0.25, help="its budget, a fraction of the prompt")
    p.add_argument("--configs", default="dynamic,kvfx,kvfx:mlp_chunk_mib=0",
                   help="comma-separated: dynamic (stock eager transformers) or kvfx[:OPTION=VALUE;...]")
    p.add_argument("--new-tokens", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one configuration in this process
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_peak: CUDA is not available", file=sys.stderr)
        return 2
    if a.one is not None:
        measure(a.size, a.policy, a.budget, a.one, a.new_tokens)
        return 0
    print(f"# python benchmarks/prefill_peak.py --size {a.size} --policy {a.policy} --budget {a.budget:g} "
          f"--configs {a.configs}")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    sys.stdout.flush()
    failed = 0
    for config in a.configs.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--size", a.size, "--policy", a.policy, "--budget",
               str(a.budget), "--new-tokens", str(a.new_tokens), "--one", config]
        failed |= subprocess.run(cmd, check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
