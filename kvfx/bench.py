"""``kvfx bench``: end-to-end ``generate()`` speed and memory of kvfx against the stock transformers caches.

    from kvfx.bench import build_configs, run_bench
    from kvfx.bench_models import parse_sizes, LLAMA_1B
    payload = run_bench(parse_sizes("8x32768", LLAMA_1B), build_configs())   # needs CUDA

Configurations (one process, the same model and prompt for each):

- ``dynamic``: transformers eager, ``DynamicCache``, SDPA attention.
- ``static+compile``: a ``StaticCache(max_cache_len = prompt + new tokens)`` passed to ``generate()``, which then
  compiles the decode forward itself (transformers' default ``CompileConfig``: inductor, ``mode="reduce-overhead"``,
  i.e. CUDA graphs). The cache is made once per workload and ``reset()`` between calls, so its tensors keep their
  addresses and nothing re-records or recompiles.
- ``quanto-4``, ``quanto-2``: transformers' ``QuantizedCache`` with the optimum-quanto backend
  (``cache_implementation="quantized"``; q_group_size 64, residual_length 128: transformers' defaults).
- ``kvfx``: the identity spec (full cache, what ``examples/specs/full.yaml`` says), and ``kvfx <policy> <budget>``
  for each eviction policy and budget (``razor`` once, for a model whose profile exists), ``kvfx kivi-<bits>`` /
  ``gear-<bits>`` where kvfx implements them. ``model.forward = torch.compile(model.forward, backend="kvfx", ...)``.

Each configuration: one warm-up ``generate()`` of the same batch, prompt and (by default) number of new tokens, so
that it compiles, autotunes and allocates whatever the timed calls need, then ``repeats`` timed ``generate()``
calls of ``new_tokens`` tokens. A logits processor marks every generated token with a CUDA event, so one call gives
its time to first token (call -> first token's logits: the prefill) and ``new_tokens - 1`` decode steps. Decode
ms/step is the mean step of a call, the median over calls; a call during which dynamo compiled anything is discarded
and repeated (at most twice), and the counts are recorded. Peak memory is ``torch.cuda.max_memory_allocated`` over
the whole call (reset before it), weights included; "over weights" subtracts what was allocated when the
configuration started (the weights), so a static cache made before the call counts. KV bytes are what the cache
holds at the end of the call: its largest holding, since no cache here shrinks (quanto's residual buffer is folded
into its quantized store every 128 tokens, which a call of fewer new tokens never reaches); transient copies show
in the peak.

Also measured once: the device's copy bandwidth, for the floor of a decode step (:mod:`kvfx.bench_models`).
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from kvfx.bench_models import (
    LLAMA_1B,
    TINY_LLAMA,
    Workload,
    cache_bytes,
    copy_bandwidth,
    floor_ms,
    kv_cache_bytes,
    kvfx_state_bytes,
    load_model,
    weight_bytes_read,
)
from kvfx.evaluate import find_spec_error

KINDS = ("dynamic", "static", "quanto", "kvfx")
POLICIES = ("window", "h2o", "keyformer", "snapkv", "razor", "kivi", "gear")
BASELINES = ("dynamic", "static+compile")  # the stock full-cache baselines kvfx is held to
IDENTITY = {"version": 1, "default": {"evict": {"method": "none"}, "quantize": {"method": "none"}}}
_ROOT = Path(__file__).resolve().parent.parent
RANDOM_MAX_POSITIONS = {LLAMA_1B: 131072, TINY_LLAMA: 4096}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (no CUDA, bad options); the message says why."""


@dataclass(frozen=True)
class BenchConfig:
    """One way of running ``generate()``.

    ``method`` groups configurations into one plot line (``dynamic``, ``static``, ``identity`` are reference lines);
    ``model``, if set, limits the configuration to that model's workloads (by folder name);
    ``x`` is the nominal share of the full bf16 KV cache (an eviction budget, or bits / 16) or None; configurations
    run in ``tier`` order (1: the full-cache baselines and kvfx identity; 2: quanto 4-bit and the first budget;
    3: the rest), so that a time budget cuts the least important ones.
    """

    name: str
    kind: str
    method: str
    description: str
    x: float | None = None
    tier: int = 1
    spec: dict | None = None
    bits: int | None = None
    model: str | None = None  # run on this model's workloads only (razor: the model its profile was made for)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"configuration {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")


def _evict_spec(rule: dict) -> dict:
    return {"version": 1, "default": {"evict": rule}}


def policy_spec(policy: str, budget: float, new_tokens: int) -> dict:
    """The kvfx spec of an eviction ``policy`` at a fractional ``budget`` (the README's parameters)."""
    rules = {
        "window": {"method": "window", "sink": 4, "budget": budget},
        "h2o": {"method": "h2o", "budget": budget, "recent": 0.5},
        "keyformer": {"method": "keyformer", "budget": budget, "recent": 0.3, "tau": [1.0, 2.0], "seed": 0,
                      "max_new_tokens": new_tokens},
        "snapkv": {"method": "snapkv", "budget": budget, "window": 32, "pool": 7, "pooling": "max"},
    }
    if policy not in rules:
        raise ValueError(f"no budgeted spec for policy {policy!r} (budgeted policies: {', '.join(rules)})")
    return _evict_spec(rules[policy])


def build_configs(budgets: Sequence[float] = (0.25, 0.125), policies: Sequence[str] = POLICIES,
                  bits: Sequence[int] = (4, 2), new_tokens: int = 32, profile: str | Path | None = None,
                  only: Sequence[str] | None = None) -> list[BenchConfig]:
    """Every configuration to run, baselines first. ``profile``: the razor profile, ``<model name>.json`` (razor is
    left out without one, and runs only on that model); ``only``: keep just these configuration names (an unknown
    name is an error naming the known ones)."""
    for budget in budgets:
        if not 0 < budget < 1:
            raise ValueError(f"budget {budget} is not a fraction in (0, 1)")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown} (known: {', '.join(POLICIES)})")
    bad_bits = sorted(set(bits) - {2, 4})
    if bad_bits:
        raise ValueError(f"bits {bad_bits} not supported (quanto's QuantizedCache takes 2 or 4)")
    top_bits = max(bits, default=None)
    configs = [
        BenchConfig("dynamic", "dynamic", "dynamic", "transformers eager, DynamicCache, SDPA"),
        BenchConfig("static+compile", "static", "static",
                    "transformers StaticCache(max_cache_len=prompt+new) + generate()'s torch.compile "
                    "(inductor, mode reduce-overhead)"),
        BenchConfig("kvfx", "kvfx", "identity", "kvfx identity spec (full cache), inductor", spec=IDENTITY),
    ]
    for b in bits:
        configs.append(BenchConfig(f"quanto-{b}", "quanto", "quanto",
                                   f"transformers QuantizedCache, optimum-quanto int{b}, q_group_size 64, "
                                   "residual_length 128", x=b / 16, tier=2 if b == top_bits else 3, bits=b))
    for i, budget in enumerate(budgets):
        for policy in policies:
            if policy in ("window", "h2o", "keyformer", "snapkv"):
                configs.append(BenchConfig(f"kvfx {policy} {budget:g}", "kvfx", policy,
                                           f"kvfx {policy}, budget {budget:g} of the prompt", x=budget,
                                           tier=2 if i == 0 else 3, spec=policy_spec(policy, budget, new_tokens)))
    for method in ("kivi", "gear"):
        if method in policies:
            for b in bits:
                rule = {"method": method, "bits": b, "group": 32, "residual": 128}
                configs.append(BenchConfig(f"kvfx {method}-{b}", "kvfx", method, f"kvfx {method}, {b} bits",
                                           x=b / 16, tier=2 if b == top_bits else 3, bits=b,
                                           spec={"version": 1, "default": {"quantize": rule}}))
    if "razor" in policies and profile is not None:
        rule = {"method": "razor", "profile": str(Path(profile).resolve()), "sink": 4, "min_window": 256,
                "compress_ratio": 5, "compensate": True}
        configs.append(BenchConfig("kvfx razor", "kvfx", "razor", f"kvfx razor, profile {Path(profile).name}",
                                   tier=2, spec=_evict_spec(rule), model=Path(profile).stem))
    if only is not None:
        names = {c.name for c in configs}
        missing = [n for n in only if n not in names]
        if missing:
            raise ValueError(f"--only: no configuration named {missing} (known: {', '.join(c.name for c in configs)})")
        configs = [c for c in configs if c.name in only]
    return configs


def default_profile(model: str | Path) -> Path | None:
    """``examples/profiles/<model folder name>.json`` if it exists (razor's retrieval heads for that model)."""
    path = _ROOT / "examples" / "profiles" / f"{Path(model).name}.json"
    return path if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# One generate() call, timed.
# ----------------------------------------------------------------------------------------------------------------


class StepClock(LogitsProcessor):
    """A logits processor that marks the time of every generated token (transformers calls it once per token,
    right after the forward that produced the token's logits). CUDA events on CUDA, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronizes on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int, extra: dict) -> dict:
    """One ``generate()`` of exactly ``new_tokens`` tokens; its TTFT, decode steps, peak memory, KV bytes and the
    graphs dynamo compiled during it."""
    device = ids.device
    cuda = device.type == "cuda"
    gc.collect()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    graphs = _graph_count()
    clock = StepClock(device)
    began = time.perf_counter()
    clock.mark()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id or 0,
                         return_dict_in_generate=True, logits_processor=LogitsProcessorList([clock]), **extra)
    _sync(device)
    wall_s = time.perf_counter() - began
    intervals = clock.intervals_ms()
    if out.sequences.shape != (ids.shape[0], ids.shape[1] + new_tokens) or len(intervals) != new_tokens:
        raise BenchError(f"generate() made {tuple(out.sequences.shape)} with {len(intervals)} marks; expected "
                         f"{(ids.shape[0], ids.shape[1] + new_tokens)} and {new_tokens}")
    cache = out.past_key_values
    kvfx_bytes = kvfx_state_bytes(cache)
    kv = cache_bytes(cache) + (kvfx_bytes or 0)
    del out, cache
    steps = intervals[1:]
    return {
        "ttft_ms": intervals[0],
        "decode_ms": statistics.fmean(steps) if steps else None,
        "decode_ms_median_step": statistics.median(steps) if steps else None,
        "decode_ms_max_step": max(steps) if steps else None,  # a slow outlier: a re-recorded CUDA graph, a malloc
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "kv_bytes": kv,
        "kvfx_state": kvfx_bytes is not None,
        "graphs_compiled": _graph_count() - graphs,
        "wall_s": wall_s,
    }


@contextmanager
def configured(model, config: BenchConfig, workload: Workload, new_tokens: int, compiler: str,
               kvfx_options: dict | None = None):
    """Set ``model`` up for ``config`` (calls of up to ``new_tokens`` tokens); yields a function giving each
    ``generate()`` call's extra arguments, and undoes everything (compiled forwards, caches, dynamo state) on exit."""
    from transformers import StaticCache

    torch._dynamo.reset()
    had_forward = "forward" in model.__dict__
    original = model.__dict__.get("forward")
    static_cache = None
    try:
        if config.kind == "kvfx":
            model.forward = torch.compile(model.forward, backend="kvfx",
                                          options={"spec": config.spec, "compiler": compiler, "verbose": False,
                                                   **(kvfx_options or {})})
            yield lambda: {}
        elif config.kind == "static":
            static_cache = StaticCache(config=model.config, max_cache_len=workload.prompt + new_tokens)

            def static_args():
                static_cache.reset()
                return {"past_key_values": static_cache}

            yield static_args
        elif config.kind == "quanto":
            yield lambda: {"cache_implementation": "quantized",
                           "cache_config": {"backend": "quanto", "nbits": config.bits}}
        else:
            yield lambda: {}
    finally:
        if had_forward:
            model.forward = original
        else:
            model.__dict__.pop("forward", None)
        for name in ("_compiled_call", "_last_compile_config"):  # transformers' auto-compiled decode forward
            model.__dict__.pop(name, None)
        static_cache = None  # the closure handed out holds it too: drop it there as well
        torch._dynamo.reset()
        _release(model.device)


def _release(device: torch.device) -> None:
    from kvfx.state import REGISTRY

    gc.collect()
    REGISTRY.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def prompt_ids(vocab_size: int, workload: Workload, device, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[B, T]`` (ids 0-2 left out: special tokens in the models here)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (workload.batch, workload.prompt), generator=generator)
    return ids.to(device)


def measure(model, config: BenchConfig, workload: Workload, *, new_tokens: int = 32, repeats: int = 3,
            warmup_tokens: int | None = None, compiler: str = "inductor", extra_attempts: int = 2,
            seed: int = 0, kvfx_options: dict | None = None) -> dict:
    """Warm up once, then time ``repeats`` calls of ``generate()`` (see the module docstring); one result dict."""
    from kvfx.backend import REPORTS

    warmup_tokens = new_tokens if warmup_tokens is None else warmup_tokens
    if new_tokens < 2 or repeats < 1 or warmup_tokens < 1:
        raise ValueError(f"new_tokens ({new_tokens}) must be >= 2, repeats ({repeats}) and warmup_tokens "
                         f"({warmup_tokens}) >= 1")
    device = model.device
    _release(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # the weights (and leftovers)
    ids = prompt_ids(model.config.vocab_size, workload, device, seed)
    reports = len(REPORTS)
    with configured(model, config, workload, max(new_tokens, warmup_tokens), compiler,
                    kvfx_options) as call_args, _quiet():
        began = time.perf_counter()
        warm = timed_generate(model, ids, warmup_tokens, call_args())
        setup_s = time.perf_counter() - began
        kept, discarded = [], 0
        while len(kept) < repeats and discarded <= extra_attempts:
            run = timed_generate(model, ids, new_tokens, call_args())
            if run["graphs_compiled"]:
                discarded += 1
            else:
                kept.append(run)
        del ids
    if not kept:
        raise BenchError(f"every timed generate() compiled new graphs ({discarded} tries): "
                         "the warm-up did not reach a steady state")
    decode = statistics.median(r["decode_ms"] for r in kept)
    peaks = [r["peak_bytes"] for r in kept if r["peak_bytes"] is not None]
    return {
        "decode_ms": decode,
        "tokens_per_s": workload.batch * 1e3 / decode,
        "decode_ms_median_step": statistics.median(r["decode_ms_median_step"] for r in kept),
        "ttft_ms": statistics.median(r["ttft_ms"] for r in kept),
        "peak_bytes": max(peaks) if peaks else None,
        "base_bytes": base,
        "kv_bytes": kept[-1]["kv_bytes"],
        "kvfx_state": kept[-1]["kvfx_state"],
        "repeats": len(kept),
        "discarded_repeats": discarded,
        "graphs_compiled_warmup": warm["graphs_compiled"],
        "graphs_compiled_timed": sum(r["graphs_compiled"] for r in kept),
        # per graph kvfx compiled: attention layers rewritten / found (a layer kvfx left alone runs stock attention)
        "kvfx_rewritten": [f"{len(r.rewritten)}/{len(r.sites)}" for r in REPORTS[reports:]],
        "warmup_s": setup_s,
        "per_repeat": [{k: r[k] for k in ("ttft_ms", "decode_ms", "decode_ms_median_step", "decode_ms_max_step",
                                          "peak_bytes", "wall_s")} for r in kept],
    }


@contextmanager
def _quiet():
    """Compilation and generation chatter (dynamo, transformers) is noise in a benchmark log; kvfx's stays."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?!kvfx)")
            yield
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------------------------------------------
# A whole run.
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Models:
    """One model resident at a time (switching frees the other; random models are rebuilt from the same seed)."""

    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    key: str | None = None
    model: Any = None
    info: dict = field(default_factory=dict)

    def get(self, key: str):
        if key != self.key:
            self.model = None
            _release(self.device)
            positions = RANDOM_MAX_POSITIONS.get(key, 0)
            began = time.perf_counter()
            self.model = load_model(key, self.device, self.dtype, positions, self.seed).to(self.device)
            self.key = key
            _sync(self.device)
            gc.collect()
            self.info = {"load_s": time.perf_counter() - began, "weight_bytes_read": weight_bytes_read(self.model),
                         "resident_bytes": (torch.cuda.memory_allocated(self.device)
                                            if self.device.type == "cuda" else None)}
        return self.model


def environment(device: torch.device) -> dict:
    """Device and software versions."""
    import transformers

    import kvfx

    if device.type == "cuda":
        from kvfx.results import gpu_environment

        env = gpu_environment()
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        env = {"gpu": None, "device": device.type, "cpu": platform.processor() or platform.machine(),
               "torch": torch.__version__, "python": platform.python_version()}
    env.update(transformers=transformers.__version__, kvfx=kvfx.__version__)
    try:
        import importlib.metadata

        env["optimum_quanto"] = importlib.metadata.version("optimum-quanto")
    except importlib.metadata.PackageNotFoundError:
        env["optimum_quanto"] = None
    return env


def _skip_reason(config: BenchConfig, workload: Workload, model, device: torch.device, quanto: dict | str | None,
                 new_tokens: int) -> str | None:
    """Why ``config`` cannot run on ``workload`` here (None: it can)."""
    from kvfx.plans import check_implemented
    from kvfx.spec import Spec, SpecError

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and workload.prompt + new_tokens > limit:
        return f"prompt + new tokens ({workload.prompt + new_tokens}) > max_position_embeddings ({limit})"
    if config.kind == "static" and device.type != "cuda":
        return "needs CUDA (generate() compiles the static-cache decode step only on accelerators; CUDA graphs)"
    if config.kind == "quanto" and isinstance(quanto, str):
        return quanto
    if config.kind == "kvfx":
        try:
            spec = Spec.coerce(config.spec)
            check_implemented(spec)
        except SpecError as error:
            return str(error).splitlines()[0]
        if spec.default.evict.method == "razor":
            from kvfx.head_profile import ProfileError, load_profile

            try:
                load_profile(spec.default.evict.profile, model.config)
            except (ProfileError, OSError) as error:
                return f"razor profile: {str(error).splitlines()[0]}"
    return None


def _describe_failure(error: BaseException) -> tuple[str, str, str | None]:
    """``(status, message, traceback)``: a kvfx SpecError raised while compiling is a skip, anything else an error."""
    spec_error = find_spec_error(error)
    if spec_error is not None:
        return "skipped", str(spec_error).splitlines()[0], None
    return ("error", f"{type(error).__name__}: {error}".splitlines()[0], "".join(traceback.format_exception(error)))


def _add_derived(row: dict, model, workload: Workload, new_tokens: int, bandwidth: float, info: dict) -> None:
    """Floors, KV share and memory over the resident weights."""
    element = next(model.parameters()).element_size()
    context = workload.prompt + new_tokens // 2  # mean context over the timed steps
    row["weight_bytes_read"] = info["weight_bytes_read"]
    row["kv_full_bytes"] = kv_cache_bytes(model.config, workload.batch, workload.prompt + new_tokens, element)
    row["floor_kv_bytes"] = kv_cache_bytes(model.config, workload.batch, context, element)
    row["bandwidth_bytes_per_s"] = bandwidth
    row["floor_ms"] = floor_ms(info["weight_bytes_read"], row["floor_kv_bytes"], bandwidth)
    if row.get("status") != "ok":
        return
    row["kv_share"] = row["kv_bytes"] / row["kv_full_bytes"]
    row["own_floor_ms"] = floor_ms(info["weight_bytes_read"], row["kv_bytes"], bandwidth)
    row["x_floor"] = row["decode_ms"] / row["floor_ms"]
    row["x_own_floor"] = row["decode_ms"] / row["own_floor_ms"]
    if row.get("peak_bytes") is not None and row.get("base_bytes") is not None:
        # above what was allocated when the configuration started: the weights, plus anything an earlier
        # configuration left behind (recorded, normally 0)
        row["resident_bytes"] = info["resident_bytes"]
        row["leftover_bytes"] = row["base_bytes"] - info["resident_bytes"]
        row["peak_over_weights_bytes"] = row["peak_bytes"] - row["base_bytes"]


def run_bench(workloads: Sequence[Workload], configs: Sequence[BenchConfig], *, new_tokens: int = 32,
              repeats: int = 3, warmup_tokens: int | None = None, device: str | torch.device = "cuda",
              dtype: torch.dtype | None = None, compiler: str | None = None, time_budget: float | None = None,
              quanto_unpack: str = "auto", seed: int = 0, allow_cpu: bool = False,
              log: Callable[[str], None] = print, on_row: Callable[[dict], None] | None = None,
              kvfx_options: dict | None = None) -> dict:
    """Measure every configuration on every workload; returns ``{"meta", "bandwidth", "rows"}``.

    Order: by priority = ``tier`` + the workload's place in ``workloads`` (0 for the first), ties by workload, so
    the first workload's tiers 1 and 2 run before the second workload's baselines, and ``time_budget`` (seconds; a
    configuration is skipped when the time spent plus the longest one of its kind on that model so far would pass
    it) cuts the least important.
    Rows that cannot run are kept with ``status`` ``skipped`` and the reason; failures (out of memory, ...) with
    ``status`` ``error``. ``on_row(payload)`` is called after every row (e.g. to save it). ``allow_cpu``: run on a
    CPU too (smoke tests: float32, compiler aot_eager). ``kvfx_options``: more kvfx backend options for every kvfx
    configuration (e.g. ``{"cuda_graphs": True}``).
    """
    device = torch.device(device)
    if device.type != "cuda" and not allow_cpu:
        raise BenchError(f"kvfx bench times GPU decoding and needs CUDA; device {device} was asked for")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("kvfx bench needs CUDA, and no CUDA device is available here "
                         "(torch.cuda.is_available() is False)")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    compiler = compiler or ("inductor" if device.type == "cuda" else "aot_eager")
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth['bytes_per_s'] / 1e12:.3f} TB/s (read + written)")
    meta = environment(device)
    warmup_tokens = new_tokens if warmup_tokens is None else warmup_tokens
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                dtype=str(dtype).replace("torch.", ""), compiler=compiler, new_tokens=new_tokens, repeats=repeats,
                warmup_tokens=warmup_tokens, time_budget_s=time_budget, seed=seed,
                kvfx_options=kvfx_options or {},
                static_compile_config=_default_compile_config())
    payload = {"meta": meta, "bandwidth": bandwidth, "configs": [asdict(c) for c in configs], "rows": []}
    quanto: dict | str | None = None
    if any(c.kind == "quanto" for c in configs):
        from kvfx.bench_quanto import QuantoUnavailable, prepare_quanto

        try:
            quanto = prepare_quanto(device, quanto_unpack)
            meta["quanto_unpack"] = quanto["unpack"]
        except QuantoUnavailable as error:
            quanto = str(error)
    order = schedule(workloads, configs)
    models = _Models(device, dtype, seed)
    durations: dict[tuple[str, str], list[float]] = {}
    started = time.perf_counter()
    lost: str | None = None  # set once a failure leaves the CUDA context unusable: nothing after it can run
    for workload, config in order:
        row = {"model": workload.model_name, "batch": workload.batch, "prompt": workload.prompt,
               "run": meta["date"], "new_tokens": new_tokens, "config": config.name, "kind": config.kind,
               "method": config.method, "x": config.x, "bits": config.bits, "description": config.description,
               "status": "ok", "message": ""}
        if lost is not None:
            row.update(status="skipped", message=lost)
            payload["rows"].append(row)
            log(_row_line(row))
            if on_row is not None:
                on_row(payload)
            continue
        model = models.get(workload.model)
        began = time.perf_counter()
        reason = _skip_reason(config, workload, model, device, quanto, new_tokens)
        expected = _expected_seconds(durations, config.kind, workload)
        if reason is None and time_budget is not None and time.perf_counter() - started + expected > time_budget:
            reason = f"time budget: {time.perf_counter() - started:.0f} s spent, about {expected:.0f} s more needed"
        if reason is not None:
            row.update(status="skipped", message=reason)
        else:
            failure = None
            try:
                row.update(measure(model, config, workload, new_tokens=new_tokens, repeats=repeats,
                                   warmup_tokens=warmup_tokens, compiler=compiler, seed=seed,
                                   kvfx_options=kvfx_options))
            except Exception as error:  # noqa: BLE001 - one failing configuration must not end the run
                failure = _describe_failure(error)  # strings only: the traceback's frames (and tensors) can go
            if failure is not None:
                row.update(status=failure[0], message=failure[1])
                if failure[2]:
                    row["traceback"] = failure[2]
                try:
                    _release(device)
                except Exception as error:  # noqa: BLE001 - e.g. an illegal memory access: the context is gone
                    lost = (f"not run: the CUDA context was lost when {config.name} on {workload.label} failed "
                            f"({type(error).__name__})")
            durations.setdefault((config.kind, workload.model), []).append(time.perf_counter() - began)
        row["seconds"] = time.perf_counter() - began
        _add_derived(row, model, workload, new_tokens, bandwidth["bytes_per_s"], models.info)
        payload["rows"].append(row)
        log(_row_line(row))
        if on_row is not None:
            on_row(payload)
    meta["total_s"] = time.perf_counter() - started
    return payload


def schedule(workloads: Sequence[Workload], configs: Sequence[BenchConfig]) -> list[tuple[Workload, BenchConfig]]:
    """Every (workload, configuration) pair in run order (a configuration limited to one model only with that
    model's workloads): priority ``tier`` + the workload's place in the list, ties by workload, then tier, then the
    configuration's place."""
    keyed = [((c.tier + wi, wi, c.tier, ci), w, c) for wi, w in enumerate(workloads) for ci, c in enumerate(configs)
             if c.model is None or c.model == w.model_name]
    return [(w, c) for _, w, c in sorted(keyed, key=lambda item: item[0])]


def _expected_seconds(durations: dict, kind: str, workload: Workload) -> float:
    """How long a configuration of ``kind`` should take on ``workload``: the longest one of that kind on the same
    model so far (0 when there is none yet)."""
    return max(durations.get((kind, workload.model), [0.0]))


def _default_compile_config() -> dict | None:
    try:
        from transformers import CompileConfig

        config = CompileConfig().to_dict()
        return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in config.items()}
    except ImportError:
        return None


def _row_line(row: dict) -> str:
    head = f"{row['model']} B={row['batch']} T={row['prompt']} {row['config']}: "
    if row["status"] != "ok":
        return head + f"{row['status']}: {row['message']}"
    peak = f", peak {row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") is not None else ""
    return (head + f"decode {row['decode_ms']:.2f} ms/step ({row['tokens_per_s']:.0f} tok/s, {row['x_floor']:.2f}x "
            f"floor), TTFT {row['ttft_ms']:.0f} ms{peak}, KV {row['kv_bytes'] / 2**20:.1f} MiB, "
            f"{row['seconds']:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------------------------


def _split(text: str, convert, what: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of {convert.__name__} values") from None


def bench_command(*, sizes: str, model: Path | None, model_sizes: str, budgets: str, policies: str, bits: str,
                  only: str | None, new_tokens: int, repeats: int, warmup_tokens: int | None,
                  time_budget: float | None, quanto_unpack: str, out: Path | None, plot_only: Path | None,
                  no_plot: bool, merge: Path | None = None, list_only: bool = False,
                  log: Callable[[str], None] = print, cuda_graphs: bool | None = None) -> dict:
    """What ``kvfx bench`` does (the click command in ``kvfx/cli.py`` only declares the options)."""
    import shlex
    import sys

    from kvfx import bench_report as report

    if plot_only is not None:
        payload = report.load_results(plot_only)
        target = Path(out) if out else Path(plot_only)
        if out:
            report.write_results(payload, target)  # a copy of the JSON, and the Markdown beside it
        else:
            report.sibling(target, ".md").write_text(report.markdown(payload))
        log(report.markdown(payload))
        png = report.plot_bench(payload, report.sibling(target, ".png"))
        log(f"wrote {report.sibling(target, '.md')} and {png}")
        return payload
    from kvfx.bench_models import parse_sizes

    local = parse_sizes(model_sizes, "")
    if local:
        from kvfx.assets import asset

        try:
            model = Path(model) if model else asset("codelm-27m")
        except FileNotFoundError as error:
            raise BenchError(f"{error}; pass --model PATH, or --model-sizes none") from None
        local = parse_sizes(model_sizes, str(model))
    chosen = parse_sizes(sizes, LLAMA_1B) + local
    if not chosen:
        raise BenchError("no workloads: --sizes and --model-sizes are both empty")
    configs = build_configs(_split(budgets, float, "--budgets"), _split(policies, str, "--policies"),
                            _split(bits, int, "--bits"), new_tokens,
                            profile=default_profile(model) if local else None,
                            only=_split(only, str, "--only") if only else None)
    if list_only:
        for workload, config in schedule(chosen, configs):
            log(f"{workload.label:32} {config.name:22} {config.description}")
        return {"rows": []}
    if not torch.cuda.is_available():
        raise BenchError("kvfx bench measures GPU decoding and needs CUDA, but no CUDA device is available here "
                         "(torch.cuda.is_available() is False). To redraw the table and plots of an earlier run: "
                         "kvfx bench --plot-only RESULTS.json")
    from kvfx.results import gpu_slug, results_path

    out = Path(out) if out else results_path(f"bench_{gpu_slug(torch.cuda.get_device_name(0))}.json")
    command = "kvfx " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None

    previous = report.load_results(merge) if merge else None

    def combined(payload: dict) -> dict:
        payload["meta"]["command"] = command
        if previous is None:
            return payload
        earlier = previous.get("meta", {}).get("earlier_runs", []) + [
            {k: v for k, v in previous.get("meta", {}).items() if k != "earlier_runs"}]
        return {**payload, "meta": {**payload["meta"], "earlier_runs": earlier},
                "rows": report.merge_rows(previous["rows"], payload["rows"])}

    payload = run_bench(chosen, configs, new_tokens=new_tokens, repeats=repeats, warmup_tokens=warmup_tokens,
                        time_budget=time_budget, quanto_unpack=quanto_unpack, log=log,
                        kvfx_options={} if cuda_graphs is None else {"cuda_graphs": cuda_graphs},
                        on_row=lambda p: report.write_results(combined(p), out))
    payload = combined(payload)
    report.write_results(payload, out)
    log(report.markdown(payload))
    written = [str(out), str(report.sibling(out, ".md"))]
    if not no_plot:
        try:
            written.append(str(report.plot_bench(payload, report.sibling(out, ".png"))))
        except ImportError:
            log(f"matplotlib is not installed: no plots (pip install 'kvfx[bench]', then kvfx bench --plot-only {out})")
        except ValueError as error:
            log(f"no plots: {error}")
    log("wrote " + ", ".join(written))
    return payload
