"""Where a decode step's wall time goes on the host: the generate() loop, the compiled forward, kvfx's decode ops.

    python benchmarks/decode_host_split.py --size 8x8192 --spec .gl/window25.yaml --new-tokens 96 [--cpp-wrapper] [--cuda-graphs]

The 1B-shaped random model (kvfx.bench_models.LLAMA_1B) under ``generate()``; three calls, each printing the mean
decode step (host time from one forward's start to the next: generate() synchronises with the GPU every step, so
this is the step's wall time), the second half's median, the host time inside the compiled forward, and the host
time inside kvfx's compressing-cache decode calls. The first call includes compilation. A diagnosis tool: no goal
is judged on it. ``KVFX_STEP_GRAPHS=0`` turns the eviction steps' CUDA-graph replay off for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8x8192", help="BATCHxPROMPT")
    p.add_argument("--spec", required=True, help="kvfx spec file, or 'dynamic' for stock eager transformers")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--cpp-wrapper", action="store_true", help="kvfx backend option cpp_wrapper=True")
    p.add_argument("--cuda-graphs", action="store_true", help="kvfx backend option cuda_graphs=True")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_host_split: CUDA is not available", file=sys.stderr)
        return 2
    import kvfx.ops as ops
    from kvfx.bench_models import decode_probe_model

    model, ids = decode_probe_model(a.size, a.spec, a.new_tokens, cpp_wrapper=a.cpp_wrapper,
                                   cuda_graphs=a.cuda_graphs)
    starts, forward_s, op_s = [], [], [0.0]
    compiled_forward, compressing = model.forward, ops._attend_compressing

    def timed_forward(*args, **kwargs):
        t0 = time.perf_counter()
        starts.append(t0)
        out = compiled_forward(*args, **kwargs)
        forward_s.append(time.perf_counter() - t0)
        return out

    def timed_compressing(*args, **kwargs):
        t0 = time.perf_counter()
        out = compressing(*args, **kwargs)
        if args[1].shape[2] == 1:  # a decode step (q: [B, Hq, 1, D])
            op_s[0] += time.perf_counter() - t0
        return out

    model.forward, ops._attend_compressing = timed_forward, timed_compressing
    for call in range(3):
        starts.clear()
        forward_s.clear()
        op_s[0] = 0.0
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                           min_new_tokens=a.new_tokens, do_sample=False)
        torch.cuda.synchronize()
        steps = [starts[i + 1] - starts[i] for i in range(1, len(starts) - 1)]
        decode_fwd = forward_s[1:]
        half = len(steps) // 2
        print(f"{a.spec} {a.size} cpp_wrapper={a.cpp_wrapper} cuda_graphs={a.cuda_graphs} call {call}: decode step {1e3 * statistics.fmean(steps):.2f} ms "
              f"(2nd half median {1e3 * statistics.median(steps[half:]):.2f}); forward host "
              f"{1e3 * statistics.fmean(decode_fwd):.2f} ms (2nd half median {1e3 * statistics.median(decode_fwd[half:]):.2f}); "
              f"kvfx decode ops host {1e3 * op_s[0] / max(len(decode_fwd), 1):.2f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
