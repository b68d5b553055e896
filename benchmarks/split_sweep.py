"""How many split-K programs the slot-store decode kernels should launch: time scored decode attention and the
whole eviction decode step (CUDA-graph replays, L2 flushed) while varying the split heuristic's knobs.

    python benchmarks/split_sweep.py --budgets 0.1,0.2,0.3 --waves 4,8,16,32 --min-keys 128,512

Prints one line per (budget, waves, min keys): the number of splits chosen and the times. Used to set
kvfx.kernels.decode_attention's _WAVES and _MIN_KEYS_PER_SPLIT; writes nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode_eviction import _filled_cache, _time_ms  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="0.2")
    p.add_argument("--waves", default="4,8,16,32")
    p.add_argument("--min-keys", default="128,512")
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--reps", type=int, default=100)
    a = p.parse_args(argv)
    import kvfx.kernels.decode_attention as da
    import kvfx.kernels.scored_decode_attention as sda
    from kvfx.kernels.scored_decode_attention import scored_decode_attention

    B, Hq, Hkv, D, T = 8, 32, 8, 128, a.seq
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=dev)
    sms = da._sm_count(0)
    for budget in (float(x) for x in a.budgets.split(",")):
        S = round(budget * T) + 1
        k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
        bias = torch.zeros(B, 1, S, device=dev)
        for waves in (int(x) for x in a.waves.split(",")):
            for min_keys in (int(x) for x in a.min_keys.split(",")):
                da._WAVES, da._MIN_KEYS_PER_SPLIT = waves, min_keys
                sda._SPLIT_TUNED.cache.clear()  # tune again for this split count
                splits = da.default_num_splits(B, Hkv, S, sms)
                scored = _time_ms(lambda: scored_decode_attention(q, k, v, bias, scale=D**-0.5), 10, a.reps, flush,
                                  graph=True)
                times = {}
                for method in ("h2o", "keyformer"):
                    cache = _filled_cache(method, k, v, T)
                    k_new, v_new = k[:, :, :1].clone(), v[:, :, :1].clone()
                    times[method] = _time_ms(lambda: cache.decode(q[:, :, None], k_new, v_new, None,
                                                                  scale=D**-0.5, softcap=0.0), 10, a.reps, flush,
                                             graph=True)
                print(f"budget {budget:g} S={S} waves {waves:>3} min_keys {min_keys:>4}: {splits:>3} splits  "
                      f"scored {scored * 1e3:7.1f} us  step h2o {times['h2o'] * 1e3:7.1f} us  "
                      f"keyformer {times['keyformer'] * 1e3:7.1f} us", flush=True)
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
