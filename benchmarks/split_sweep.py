"""How many split-K programs the bf16 decode kernels should launch: time the plain decode attention, scored decode
attention and the whole window and h2o eviction steps over a ``budget * seq``-slot store at fixed split counts
(CUDA-graph replays after an L2 flush, median of --reps; each split count is autotuned afresh).

    python benchmarks/split_sweep.py --budgets 0.2 --splits 4,6,8,9,12

Prints one line per (flush, budget, splits). Used to set kvfx.kernels.decode_attention's split heuristic; writes
nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import _filled_cache, _time_ms, add_flush_option, flush_modes, l2_flush  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="0.2")
    p.add_argument("--splits", default="4,6,8,9,12")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--compare-hints", action="store_true",
                   help="also time scored decode with its L2 hints (scored_decode_attention._Y_IN_L2) flipped")
    add_flush_option(p)
    a = p.parse_args(argv)
    import kvfx.kernels.decode_attention as da
    import kvfx.kernels.scored_decode_attention as sda
    from kvfx.kernels.scored_decode_attention import scored_decode_attention

    B, Hq, Hkv, D, T = 8, 32, 8, 128, a.seq
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    heuristic = da.default_num_splits
    for mode in flush_modes(p, a.flush):
        flush = l2_flush(mode, dev)
        for budget in (float(x) for x in a.budgets.split(",")):
            S = round(budget * T) + 1
            k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
            v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
            bias = torch.zeros(B, 1, S, device=dev)
            print(f"{mode} flush, budget {budget:g}: {S} slots, heuristic {heuristic(B, Hkv, S, da._sm_count(0))} "
                  "splits", flush=True)
            for splits in (int(x) for x in a.splits.split(",")):
                da._SPLIT_TUNED.cache.clear()  # tune again for this split count
                sda._SPLIT_TUNED.cache.clear()
                da.default_num_splits = lambda *_, n=splits: n  # what the eviction step launches
                times = {
                    "plain": _time_ms(lambda: da.decode_attention(q, k, v, S, scale=D**-0.5), 10, a.reps, flush,
                                      graph=True),
                    "scored": _time_ms(lambda: scored_decode_attention(q, k, v, bias, scale=D**-0.5), 10, a.reps,
                                       flush, graph=True),
                }
                if a.compare_hints:
                    default = sda._Y_IN_L2
                    sda._Y_IN_L2 = not default
                    sda._SPLIT_TUNED.cache.clear()
                    times[f"scored hints {'on' if not default else 'off'}"] = _time_ms(
                        lambda: scored_decode_attention(q, k, v, bias, scale=D**-0.5), 10, a.reps, flush, graph=True)
                    sda._Y_IN_L2 = default
                    sda._SPLIT_TUNED.cache.clear()
                for method in ("window", "h2o"):
                    cache = _filled_cache(method, k, v, T)
                    k_new, v_new = k[:, :, :1].clone(), v[:, :, :1].clone()
                    times[f"{method} step"] = _time_ms(
                        lambda: cache.decode(q[:, :, None], k_new, v_new, None, scale=D**-0.5, softcap=0.0), 10,
                        a.reps, flush, graph=True)
                da.default_num_splits = heuristic
                print(f"  {splits:>3} splits  " + "  ".join(f"{n} {t * 1e3:6.1f} us" for n, t in times.items()),
                      flush=True)
            k = v = cache = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
