"""Where a decode step's time goes: torch.profiler over generate() of the 1B-shaped random model with kvfx.

    python benchmarks/profile_decode.py --size 8x8192 --spec examples/specs/full.yaml

Prints the mean decode step (wall), the GPU kernel time per step, the ops with the most host time and the kernels
with the most GPU time, and writes the tables to $KVFX_RESULTS_DIR (or benchmarks/results/) as
``profile_decode_<label>.txt``. A diagnosis tool: no goal is judged on it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8x8192", help="BATCHxPROMPT")
    p.add_argument("--spec", default="examples/specs/full.yaml", help="kvfx spec, or 'dynamic' for stock eager")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--compiler", default="inductor")
    p.add_argument("--label", default=None)
    p.add_argument("--cprofile", action="store_true",
                   help="also profile the host side of one generate() call with cProfile (Python functions)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode: CUDA is not available", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    from kvfx.bench_models import decode_probe_model
    from kvfx.results import results_path

    model, ids = decode_probe_model(a.size, a.spec, a.new_tokens, compiler=a.compiler)

    def run(n):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    run(a.new_tokens)  # compiles (prefill, first decode, dynamic decode)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(a.new_tokens)
    torch.cuda.synchronize()
    total_s = time.perf_counter() - t0
    step_ms = (total_s - prefill_s) / (a.new_tokens - 1) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(a.new_tokens)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    lines = [f"{a.spec} {a.size} {a.compiler}: decode step {step_ms:.2f} ms wall (prefill {prefill_s * 1e3:.0f} ms); "
             f"GPU kernel time over the profiled call {gpu_us / 1e3:.1f} ms",
             "", "== host time (self CPU), top 30",
             events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
             "== GPU time, top 25",
             events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)]
    if a.cprofile:
        import cProfile
        import io
        import pstats

        host = cProfile.Profile()
        host.enable()
        run(a.new_tokens)
        torch.cuda.synchronize()
        host.disable()
        for key in ("tottime", "cumtime"):
            buf = io.StringIO()
            pstats.Stats(host, stream=buf).sort_stats(key).print_stats(45)
            lines += [f"== cProfile by {key}", buf.getvalue()]
    text = "\n".join(lines)
    print(text)
    label = a.label or (a.spec.rsplit("/", 1)[-1].removesuffix(".yaml") + f"_{a.size}")
    results_path(f"profile_decode_{label}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
