"""The memory planner: the KV bytes kvfx will allocate for a spec and a model, before anything runs.

Per attention layer, a closed-form sympy expression in three symbols:

- ``B``: the batch size;
- ``T``: the prompt length in tokens (padded: the width of the prompt batch);
- ``N``: the tokens written to the cache after the prompt, i.e. the decode steps. ``generate(max_new_tokens=M)``
  runs ``M - 1`` of them (the last generated token is never fed back), so ``N = M - 1``.

The expressions count every tensor the layer caches hold, as they are written (shapes from the code, in brackets):

- full layers (``kvfx.state.LayerCache``): keys and values ``[B, Hkv, C, D]``, where the capacity C is the prompt
  rounded up to 64-token chunks and grows by at least 1/8, in chunks, when decode runs out of room;
- eviction layers (``kvfx.eviction.slot_cache.EvictingLayerCache``): a slot store of the largest budget of the
  layer's KV heads + 1 slots, each slot a key and a value (model dtype), a position (int64) and a score (float32),
  plus the small ``[B, Hkv]`` and ``[B]`` bookkeeping (budget, recent, live, free slot, first real position,
  query position, and from the first decode step on the keep rule). A layer in which some head keeps everything
  starts at T + 1 slots and grows in chunks like a full layer;
- razor layers (``kvfx.eviction.ragged_cache.RaggedLayerCache``): one flat slot buffer per row, a region per KV head:
  retrieval heads (from the profile) and ``method: none`` heads hold every token (the prompt exactly, then grown in
  chunks), the others ``sink + W`` slots, with ``W = max(min(min_window, T), T // compress_ratio)``. Each slot is a
  key, a value and a position (int64); the compensation token of every head is float32 (mean key, mean value, count),
  plus offsets, region lengths and sink counters;
- quantized layers (``kvfx.quantization.base.QuantizedLayerCache``, KIVI and GEAR): for keys and for values a
  packed store of ``C`` tokens (``kvfx.quantization.storage.QuantizedStore``: int32 codes ``[B, Hkv, C, D * bits /
  32]``, float16 scale and offset ``[B, Hkv, C / group, D]`` for keys, ``[B, Hkv, C, D / group]`` for values) and a
  full-precision residual buffer ``[B, Hkv, R, D]`` in the model dtype (``R = residual``, or ``2 * residual`` for
  KIVI's values, which leave one token at a time). The quantized tokens follow the schedule (a decode step flushes
  after attending): keys (and GEAR's values) in whole blocks, ``residual * floor((T + N) / residual)``; KIVI's
  values ``max(0, T + N - residual)``. A store's capacity starts at the prompt's quantized tokens rounded up to its
  chunk ``k = residual * ceiling(64 / residual)`` and grows by at least 1/8, in chunks. GEAR adds, per capacity,
  float16 low-rank factors ``lr_a [B, Hkv, C, r]`` and ``lr_b [B, Hkv, C / residual, D, r]`` (``r = max(rank,
  prefill_rank)``: segments of lower rank are zero-padded), an int32 segment map ``[1, 1, C / residual]`` and,
  where ``n = 2 * floor(outliers / 2 * row)`` is not 0, outliers (uint8 index + float32 value) ``[B, Hkv, C /
  group, n, D]`` for keys (rows of ``group`` tokens) and ``[B, Hkv, C, n]`` for values (rows of ``D`` channels).
  Nothing of it depends on the data: ranks are padded, outlier counts are per row, fixed by the config and D;
- eviction with quantization (``kvfx.quantization.evicting.QuantizedEvictingLayerCache``): the kept prompt tokens
  (the largest budget, or all T where a head keeps everything) then one slot per decode token, evicted or not, in a
  quantized layer cache as above (its prompt is the kept tokens, ``K``), each slot with a position (int64) and a
  score (float32) in ``[B, Hkv, P]``, where P starts at ``K`` and grows by ``max(1, P // 8)`` rounded up to 64;
  plus the eviction layers' bookkeeping.

Growth is not a closed form (each step rounds to a chunk), so it is a sympy function of the starting capacity and
the tokens it must hold: ``grow_full(c, n)``, ``grow_slots(c, n)``, ``grow_ragged(c, n)``, ``grow_positions(c, n)``
and, for quantized stores whose chunk ``k`` is the third argument, ``grow_quantized(c, n, k)``. Each evaluates
exactly, by the same rule as its cache, once its arguments are numbers, and is ``c`` while ``c >= n`` (no decode
growth).

Counted are the tensors on the model's device. Not counted: host-side copies of per-head flags (a few bytes),
transient working memory of a step (the prompt's keys and values before compression, the dequantized cache of a
torch-path step, quantization scratch, attention scratch, compact-position re-rotation), and the 1-element sequence
handle whose zero-storage views transformers keeps. Fraction budgets are exact rationals here (``floor(T/5)`` for
0.2); kvfx multiplies in float64, which can differ by one token at exact multiples.

Refused, as kvfx refuses them: a quantized layer whose KV heads do not share one quantize config, razor with
quantization, eviction with quantization on a sliding-window layer or with ``positions: compact``, a head dim the
quantizer cannot pack; at given numbers, a quantized sliding-window layer asked to decode past its window (its cache
does not slide).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sympy
import torch

from kvfx.spec import Plan, Policy, Spec, SpecError

__all__ = ["B", "T", "N", "PlanError", "ModelShape", "LayerMemory", "MemoryTotals", "MemoryPlan", "plan_memory",
           "decode_steps", "grow_full", "grow_slots", "grow_ragged", "grow_quantized", "grow_positions",
           "quantized_tokens", "store_chunk", "buffer_tokens", "outliers_per_row"]

B = sympy.Symbol("B", integer=True, positive=True)  # batch size
T = sympy.Symbol("T", integer=True, positive=True)  # prompt tokens (padded)
N = sympy.Symbol("N", integer=True, nonnegative=True)  # tokens written after the prompt (decode steps)

CHUNK = 64  # GROWTH_CHUNK of kvfx.state, kvfx.eviction.slot_cache, kvfx.eviction.ragged_cache and
# kvfx.quantization.storage (checked in tests)
INT64, FLOAT32, BOOL = 8, 4, 1  # bytes per element of positions/counters, scores/compensation, head masks
INT32, FLOAT16, UINT8 = 4, 2, 1  # packed codes and GEAR's segment map, scales/offsets/factors, outlier indices
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The methods this planner models; a method kvfx implements but the planner does not is refused, never guessed.
PLANNED = {"evict": {"none", "window", "h2o", "keyformer", "snapkv", "razor"}, "quantize": {"none", "kivi", "gear"}}


class PlanError(ValueError):
    """The planner cannot say what kvfx would allocate (a bad model folder, dtype or shape)."""


# --------------------------------------------------------------------------------------------
# Growth: sympy functions of (starting capacity, tokens to hold), exact once both are numbers.
# --------------------------------------------------------------------------------------------


def _round_up(n: int, chunk: int = CHUNK) -> int:
    return -(-n // chunk) * chunk


class _Growth(sympy.Function):
    """The capacity of a cache that starts at ``c`` slots and grows one decode token at a time until it holds ``n``
    tokens; subclasses give the step (the new capacity when the cache is full at ``c``; arguments after ``n`` are
    the step's parameters, e.g. a chunk)."""

    nargs = 2
    rule = ""  # the capacity after growing from c, before rounding up to a chunk (for the printed legend)

    @staticmethod
    def step(capacity: int) -> int:
        raise NotImplementedError

    @classmethod
    def eval(cls, start, target, *params):
        if start.is_Integer and target.is_Integer and all(param.is_Integer for param in params):
            capacity = int(start)
            while capacity < int(target):
                capacity = cls.step(capacity, *(int(param) for param in params))
            return sympy.Integer(capacity)
        if (start - target).is_nonnegative:  # it already holds them: no growth
            return start
        return None

    @classmethod
    def legend(cls) -> str:
        """The rule as printed under a plan."""
        name = cls.__name__
        return f"{name}(c, n) = c if c >= n, else {name}({CHUNK}*ceiling({cls.rule}/{CHUNK}), n)"

    def _eval_is_integer(self):
        return True

    def _eval_is_nonnegative(self):
        return True

    def _eval_is_positive(self):
        return True if self.args[0].is_positive else None


class grow_full(_Growth):  # noqa: N801 (sympy's naming: printed as written)
    """kvfx.state.LayerCache: full at c, it needs c + 1 and grows to the chunk multiple of max(c + 1, c + c // 8)."""

    rule = "max(c + 1, c + c//8)"

    @staticmethod
    def step(capacity: int) -> int:
        return _round_up(max(capacity + 1, capacity + capacity // 8))


class grow_slots(_Growth):  # noqa: N801
    """EvictingLayerCache with a keep-everything head: at seen == c it grows to the chunk multiple of
    max(c + 2, c + c // 8) (``_grow(seen + 1)`` keeps one spare slot)."""

    rule = "max(c + 2, c + c//8)"

    @staticmethod
    def step(capacity: int) -> int:
        return _round_up(max(capacity + 2, capacity + capacity // 8))


class grow_ragged(_Growth):  # noqa: N801
    """RaggedLayerCache's retrieval regions: at position == c they grow to the chunk multiple of
    max(c + 1 + 64, c + 1 + (c + 1) // 8)."""

    rule = "max(c + 65, c + 1 + (c + 1)//8)"

    @staticmethod
    def step(capacity: int) -> int:
        needed = capacity + 1
        return _round_up(max(needed + CHUNK, needed + needed // 8))


class grow_quantized(_Growth):  # noqa: N801
    """QuantizedStore (codes, scales, offsets, GEAR's terms) with chunk ``k``: a flush that needs more than ``c``
    tokens grows it to the k-multiple of max(needed, c + c // 8). Keys (blocks of ``residual``, k a multiple of it)
    and values (one token) alike, it needs c + 1 .. c + k at that point, so the step is the k-multiple of
    max(c + 1, c + c // 8); an empty store (c = 0) gets k."""

    nargs = 3
    rule = "max(c + 1, c + c//8)"

    @staticmethod
    def step(capacity: int, chunk: int) -> int:
        return _round_up(max(capacity + 1, capacity + capacity // 8), chunk)

    @classmethod
    def legend(cls) -> str:
        name = cls.__name__
        return f"{name}(c, n, k) = c if c >= n, else {name}(k*ceiling({cls.rule}/k), n, k)"


class grow_positions(_Growth):  # noqa: N801
    """QuantizedEvictingLayerCache's positions and scores: full at ``c`` slots, ``_grow_slots`` adds max(1, c // 8)
    rounded up to a chunk (c itself need not be a chunk multiple: it starts at the kept prompt tokens)."""

    rule = f"c + {CHUNK}*ceiling(max(1, c//8)/{CHUNK})"

    @staticmethod
    def step(capacity: int) -> int:
        return capacity + _round_up(max(1, capacity // 8))

    @classmethod
    def legend(cls) -> str:
        name = cls.__name__
        return f"{name}(c, n) = c if c >= n, else {name}({cls.rule}, n)"


def decode_steps(new_tokens: int) -> int:
    """N for ``generate(max_new_tokens=new_tokens)``: every generated token but the last is written to the cache."""
    return max(int(new_tokens) - 1, 0)


def _fraction(value: float) -> sympy.Rational:
    """A spec's float as the decimal the user wrote (0.2 -> 1/5), not its binary expansion."""
    return sympy.Rational(repr(float(value)))


# --------------------------------------------------------------------------------------------
# The model side: what the planner needs from a transformers config.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The attention shape of a model: layers, KV heads, head dims, cache dtype and sliding windows."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    dtype: torch.dtype
    keep_last: tuple[int, ...]  # per layer: > 0 for a sliding-window layer (transformers keeps window - 1 tokens)
    name: str = "model"
    config: Any = dataclasses.field(default=None, compare=False, repr=False)  # the transformers config, if any

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @classmethod
    def from_config(cls, config, dtype: torch.dtype | str | None = None, name: str | None = None) -> ModelShape:
        """Read a transformers config (its text decoder's, for multimodal ones); ``dtype`` None or "auto" takes
        the config's dtype (float32 if it has none)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = _config_int(text, "num_hidden_layers")
        query_heads = _config_int(text, "num_attention_heads")
        kv_heads = _kv_heads(text, query_heads)
        head_dim = getattr(text, "head_dim", None) or _config_int(text, "hidden_size") // query_heads
        keep_last = _keep_last(text, layers)
        return cls(num_layers=layers, num_kv_heads=kv_heads, head_dim=int(head_dim),
                   value_head_dim=int(getattr(text, "v_head_dim", None) or head_dim),
                   dtype=_dtype(dtype, text if getattr(text, "dtype", None) else config),
                   keep_last=keep_last, name=name or getattr(config, "_name_or_path", None) or "model",
                   config=config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> ModelShape:
        """Read ``config.json`` of a local model folder (no network)."""
        from transformers import AutoConfig

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise PlanError(f"{folder}: not a model folder (no config.json in it); give a local Hugging Face model "
                            "folder such as ../shared/assets/codelm-27m")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (ValueError, OSError, KeyError) as err:
            raise PlanError(f"{folder}/config.json: transformers cannot read it ({err})") from None
        return cls.from_config(config, dtype, name=folder.name)


def _config_int(config, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int) or value < 1:
        raise PlanError(f"the model config ({type(config).__name__}) has {name} = {value!r}, not an int >= 1; "
                        "the planner needs num_hidden_layers, num_attention_heads and hidden_size or head_dim")
    return value


def _kv_heads(config, query_heads: int) -> int:
    """KV heads: 1 for the multi-query families (Falcon's old architecture, GPT-BigCode), else num_key_value_heads
    (num_kv_heads in Falcon) where the config has it, else one per query head."""
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        return 1
    for name in ("num_key_value_heads", "num_kv_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 1:
            return value
    return query_heads


def _keep_last(config, layers: int) -> tuple[int, ...]:
    """Per layer, the tokens a sliding-window layer keeps (transformers' DynamicSlidingWindowLayer keeps
    ``sliding_window - 1``), 0 for full-attention layers; layer types as transformers' DynamicCache reads them."""
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * layers
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * layers
        else:
            types = ["full_attention"] * layers
    windows = {"sliding_attention": getattr(config, "sliding_window", None),
               "chunked_attention": getattr(config, "attention_chunk_size", None)}
    return tuple(max(int(windows[kind]) - 1, 0) if windows.get(kind) else 0 for kind in list(types)[:layers])


def _dtype(dtype: torch.dtype | str | None, config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, torch.dtype):
            return found
        return DTYPES.get(str(found).removeprefix("torch."), torch.float32)
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------
# Per layer: which cache kvfx makes, and what it holds.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """One attention layer: its policies, the cache class kvfx makes for it, and the bytes that cache holds.

    ``storage`` is the keys, values, positions, scores and compensation state, and for quantized layers the packed
    stores (codes, scales, offsets, GEAR's terms) and residual buffers (the tensors that scale with tokens or heads x
    head_dim); ``bookkeeping`` the small per-row and per-head tensors beside them; ``total`` both.
    """

    layer: int
    policies: tuple[Policy, ...]
    cache: str  # "full" | "slots" | "ragged" | "quantized" | "quantized slots"
    storage: sympy.Expr
    bookkeeping: sympy.Expr
    note: str = ""  # e.g. the retrieval heads of a razor layer, a sliding window

    @property
    def total(self) -> sympy.Expr:
        return self.storage + self.bookkeeping

    def describe_policy(self) -> str:
        groups: dict[Policy, list[int]] = {}
        for head, policy in enumerate(self.policies):
            groups.setdefault(policy, []).append(head)
        if len(groups) == 1:
            text = self.policies[0].describe()
        else:
            text = "; ".join(f"{_heads(heads)}: {policy.describe()}" for policy, heads in groups.items())
        return text + (f" [{self.note}]" if self.note else "")


def _heads(indices: Sequence[int]) -> str:
    return f"head{'s' if len(indices) > 1 else ''} {_ranges(indices)}"


def _ranges(indices: Sequence[int]) -> str:
    runs = itertools.groupby(enumerate(indices), key=lambda pair: pair[1] - pair[0])
    parts = []
    for _, run in runs:
        members = [index for _, index in run]
        parts.append(str(members[0]) if len(members) == 1 else f"{members[0]}-{members[-1]}")
    return ",".join(parts)


def _full_layer(layer: int, policies, shape: ModelShape) -> LayerMemory:
    keep_last = shape.keep_last[layer]
    holds = T + N if not keep_last else sympy.Min(T + N, keep_last + 1)  # the room decode needs before trimming
    capacity = grow_full(CHUNK * sympy.ceiling(T / CHUNK), holds)
    per_slot = (shape.head_dim + shape.value_head_dim) * shape.element_size
    note = f"sliding window: keeps {keep_last}" if keep_last else ""
    return LayerMemory(layer, policies, "full", B * shape.num_kv_heads * capacity * per_slot, sympy.Integer(0), note)


def _slot_capacity(policy) -> sympy.Expr:
    """The host-side bound of a policy's budget (``EvictionPolicy.capacity``) as an expression in T."""
    budget = policy.config.budget
    if isinstance(budget, int):
        return sympy.Integer(budget)
    return sympy.Max(1, sympy.floor(T * _fraction(budget)))


def _slot_layer(layer: int, policies, shape: ModelShape) -> LayerMemory:
    from kvfx.eviction import make_policy
    from kvfx.eviction.base import EvictionError
    from kvfx.eviction.slot_cache import EvictingLayerCache

    try:  # the cache's own constructor: its grouping of heads and its checks (one scoring policy per layer)
        cache = EvictingLayerCache(layer, [make_policy(p.evict) for p in policies], shape.keep_last[layer])
    except EvictionError as err:
        raise _refused(layer, err) from None
    budgets = [_slot_capacity(policy) for policy, _ in cache.groups]
    if cache.unbounded:
        slots = grow_slots(T + 1, T + N)
    else:
        slots = sympy.Max(*budgets) + 1 if len(budgets) > 1 else budgets[0] + 1
    h = shape.num_kv_heads
    per_slot = (shape.head_dim + shape.value_head_dim) * shape.element_size + INT64 + FLOAT32  # k, v, pos, score
    bookkeeping = (4 * INT64 * B * h  # budget, recent, live, free: [B, Hkv] int64
                   + 2 * INT64 * B  # first_valid, qpos: [B] int64
                   # from the first decode step on, the keep rule: lo, hi [B, Hkv] int64; from_seen, by_score [Hkv] bool
                   + sympy.Min(N, 1) * (2 * INT64 * B * h + 2 * BOOL * h))
    note = "heads keeping everything grow in chunks" if cache.unbounded else ""
    return LayerMemory(layer, policies, "slots", B * h * slots * per_slot, bookkeeping, note)


def _razor_window(config) -> sympy.Expr:
    """``kvfx.eviction.razor.window_size`` as an expression in T."""
    return sympy.Max(1, sympy.Min(config.min_window, T), sympy.floor(T / _fraction(config.compress_ratio)))


def _razor_layer(layer: int, policies, shape: ModelShape) -> LayerMemory:
    from kvfx.eviction.razor import retrieval_heads

    razor = {p.evict.describe(): p.evict for p in policies if p.evict.method == "razor"}
    others = sorted({p.evict.method for p in policies} - {"razor", "none"})
    if others or len(razor) > 1:  # kvfx.ops refuses such a layer the same way
        raise SpecError(f"layer {layer}: razor's KV heads share one layout, so a layer takes one razor config and no "
                        f"other eviction method (got {', '.join(sorted(razor) + others)}); use per-layer overrides")
    config = next(iter(razor.values()))
    chosen = retrieval_heads(config)  # this config's profile and ratios, as kvfx.ops picks them
    keep_all = [p.evict.method == "none" or (layer, head) in chosen for head, p in enumerate(policies)]
    kept, h = sum(keep_all), shape.num_kv_heads
    full = grow_ragged(T, T + N) if kept else 0
    slots = kept * full + (h - kept) * (config.sink + _razor_window(config))  # one flat region per head
    d, dv = shape.head_dim, shape.value_head_dim
    storage = (B * slots * ((d + dv) * shape.element_size + INT64)  # k, v, pos
               + B * h * ((d + dv) * FLOAT32 + FLOAT32))  # comp_k, comp_v, comp_n: float32
    bookkeeping = (BOOL * h  # keep_dev: [Hkv] bool (keep_all, its host copy, is not counted)
                   + INT64 * h  # offsets: [Hkv]
                   + 2 * INT64 * B * h)  # lengths, sinks_filled: [B, Hkv] int64
    retrieval = [head for head, keep in enumerate(keep_all) if keep]
    note = f"keep everything: {_heads(retrieval)}" if retrieval else "no retrieval heads"
    return LayerMemory(layer, policies, "ragged", storage, bookkeeping, note)


def _refused(layer: int, err: Exception) -> SpecError:
    """kvfx's own refusal of a layer as the planner's SpecError (prefixed with the layer unless it says it)."""
    text = str(err)
    return SpecError(text if text.startswith(f"layer {layer}:") else f"layer {layer}: {text}")


def _whole_blocks(config, kind: str) -> bool:
    """Whether ``kind`` leaves the residual buffer in whole blocks of ``residual`` (KIVI keys, GEAR keys and values)
    or one token at a time once more than ``residual`` wait (KIVI values): ``BlockQuantizer.whole_blocks``."""
    return kind == "keys" or config.method == "gear"


def quantized_tokens(config, kind: str, tokens: sympy.Expr) -> sympy.Expr:
    """Tokens of ``kind`` quantized once ``tokens`` have been written (the prompt, then one per decode step, each
    step flushing after it attends): ``BlockQuantizer.flush_count`` applied as the cache applies it."""
    r = int(config.residual)
    return r * sympy.floor(tokens / r) if _whole_blocks(config, kind) else sympy.Max(0, tokens - r)


def store_chunk(config) -> int:
    """A quantized store's growth step: ``BlockQuantizer.chunk``, the 64-token chunk rounded up to ``residual``."""
    return _round_up(CHUNK, int(config.residual))


def buffer_tokens(config, kind: str) -> int:
    """The residual buffer's capacity: ``BlockQuantizer.buffer_tokens``."""
    return int(config.residual) * (1 if _whole_blocks(config, kind) else 2)


def outliers_per_row(config, kind: str, head_dim: int) -> int:
    """GEAR's stored outliers per row (both ends): keys rows of ``group`` tokens, values rows of ``head_dim``."""
    if config.method != "gear":
        return 0
    from kvfx.kernels.gear import outlier_count

    return 2 * outlier_count(float(config.outliers), int(config.group) if kind == "keys" else head_dim)


def _quantized_bytes(config, prompt: sympy.Expr, shape: ModelShape) -> sympy.Expr:
    """A QuantizedLayerCache whose prompt is ``prompt`` tokens, after N decode tokens: both stores (capacity
    included) and both residual buffers, as ``QuantizedLayerCache.nbytes`` counts them."""
    bits, group, residual = int(config.bits), int(config.group), int(config.residual)
    chunk = store_chunk(config)
    h = shape.num_kv_heads
    total = sympy.Integer(0)
    for kind, d in (("keys", shape.head_dim), ("values", shape.value_head_dim)):
        start = quantized_tokens(config, kind, prompt)
        capacity = grow_quantized(chunk * sympy.ceiling(start / chunk), quantized_tokens(config, kind, prompt + N),
                                  chunk)
        # codes [B, H, C, D // per] int32 = D * bits / 8 bytes a token; scale + offset float16
        per_token = sympy.Rational(d * bits, 8) + (sympy.Rational(2 * FLOAT16 * d, group) if kind == "keys"
                                                   else 2 * FLOAT16 * (d // group))
        segment_map = 0
        if config.method == "gear":
            rank = max(int(config.rank), int(config.prefill_rank))
            per_token += FLOAT16 * rank + sympy.Rational(FLOAT16 * d * rank, residual)  # lr_a, lr_b per block
            segment_map = INT32 * capacity / residual  # lr_seg [1, 1, C / residual]: not per row or head
            n = outliers_per_row(config, kind, d)
            per_token += (UINT8 + FLOAT32) * n * (sympy.Rational(d, group) if kind == "keys" else 1)
        buffer = buffer_tokens(config, kind) * d * shape.element_size  # [B, H, R, D] model dtype
        total += B * h * (capacity * per_token + buffer) + segment_map
    return total


def _quantized_note(config, keep_last: int, prompt: str) -> str:
    residual = int(config.residual)
    values = "in blocks of" if _whole_blocks(config, "values") else "token by token past"
    note = (f"{prompt}quantized: keys in blocks of {residual}, values {values} {residual}; stores grow in "
            f"{store_chunk(config)}-token chunks")
    if config.method == "gear":
        rank = max(int(config.rank), int(config.prefill_rank))
        note += f"; low rank {rank}"
    if keep_last:
        note += f"; sliding window {keep_last}: does not slide, decodes while T + N <= {keep_last + 1}"
    return note


def _quantized_layer(layer: int, policies, shape: ModelShape) -> LayerMemory:
    """A layer whose KV heads quantize: ``QuantizedLayerCache``, or with eviction ``QuantizedEvictingLayerCache``."""
    from kvfx.eviction.base import EvictionError
    from kvfx.ops import quantized_layer_cache
    from kvfx.quantization.evicting import QuantizedEvictingLayerCache
    from kvfx.state import KvfxCacheError

    keep_last = shape.keep_last[layer]
    try:  # kvfx's own constructor: one quantize config per layer, no razor, no window/compact with eviction
        cache = quantized_layer_cache(layer, list(policies), keep_last)
        quantized = cache.quantized if isinstance(cache, QuantizedEvictingLayerCache) else cache
        for kind, d in (("keys", shape.head_dim), ("values", shape.value_head_dim)):
            quantized.quantizers[kind].check(layer, d)  # packing and group rules, checked by kvfx at the prompt
    except (KvfxCacheError, EvictionError) as err:
        raise _refused(layer, err) from None
    config = policies[0].quantize
    h = shape.num_kv_heads
    if not isinstance(cache, QuantizedEvictingLayerCache):
        return LayerMemory(layer, policies, "quantized", _quantized_bytes(config, T, shape), sympy.Integer(0),
                           _quantized_note(config, keep_last, ""))
    budgets = [_slot_capacity(policy) for policy, _ in cache.groups]
    kept = T if cache.unbounded else sympy.Max(*budgets) if len(budgets) > 1 else budgets[0]  # the prompt's slots
    slots = grow_positions(kept, kept + N)  # positions and scores: every kept prompt token, then each decode token
    storage = _quantized_bytes(config, kept, shape) + B * h * slots * (INT64 + FLOAT32)
    bookkeeping = (4 * INT64 * B * h  # budget, recent, live, free: [B, Hkv] int64
                   + 2 * INT64 * B  # first_valid, qpos: [B] int64
                   # from the first decode step on, the keep rule: lo, hi [B, Hkv] int64; from_seen, by_score [Hkv] bool
                   + sympy.Min(N, 1) * (2 * INT64 * B * h + 2 * BOOL * h))
    prompt = "keeps every prompt token (a head keeps everything), " if cache.unbounded else "keeps its budget, "
    return LayerMemory(layer, policies, "quantized slots", storage, bookkeeping,
                       _quantized_note(config, 0, prompt + "then a slot per decode token; "))


# --------------------------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryTotals:
    """A plan evaluated at one batch size, prompt length and number of generated tokens."""

    batch: int
    tokens: int
    new_tokens: int
    decode_steps: int  # N
    layers: tuple[int, ...]  # bytes per layer (storage + bookkeeping)
    storage: int  # keys and values (packed and residual where quantized), positions, scores, compensation state
    total: int  # storage + bookkeeping
    full_cache: int  # every token in the model dtype, as transformers' DynamicCache holds it

    @property
    def ratio(self) -> float:
        """kvfx's bytes over the full cache's."""
        return self.total / self.full_cache


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """A spec resolved against a model shape, with the bytes of every layer as an expression in B, T and N."""

    shape: ModelShape
    spec: Spec
    plan: Plan
    layers: tuple[LayerMemory, ...]

    @property
    def storage(self) -> sympy.Expr:
        return sympy.Add(*(layer.storage for layer in self.layers))

    @property
    def total(self) -> sympy.Expr:
        return sympy.Add(*(layer.total for layer in self.layers))

    def full_cache(self) -> sympy.Expr:
        """The full cache in the model dtype, as transformers holds it: T + N tokens per layer (a sliding-window
        layer at most its window)."""
        per_token = B * self.shape.num_kv_heads * (self.shape.head_dim + self.shape.value_head_dim) \
            * self.shape.element_size
        return sympy.Add(*(per_token * (sympy.Min(T + N, keep) if keep else T + N) for keep in self.shape.keep_last))

    def evaluate(self, batch: int, tokens: int, new_tokens: int = 0) -> MemoryTotals:
        """Bytes at batch ``batch``, a ``tokens``-token prompt and ``generate(max_new_tokens=new_tokens)``; raises
        SpecError where kvfx would refuse the prompt (a budget larger than it, or no room beside sinks/window)."""
        for name, value, low in (("batch", batch, 1), ("tokens", tokens, 1), ("new_tokens", new_tokens, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise PlanError(f"{name} must be an int >= {low}, not {value!r}")
        self._check_prompt(tokens)
        self._check_windows(tokens, decode_steps(new_tokens))
        values = {B: batch, T: tokens, N: decode_steps(new_tokens)}
        layers = tuple(int(layer.total.subs(values)) for layer in self.layers)
        return MemoryTotals(batch=batch, tokens=tokens, new_tokens=new_tokens, decode_steps=values[N],
                            layers=layers, storage=int(self.storage.subs(values)), total=sum(layers),
                            full_cache=int(self.full_cache().subs(values)))

    def _check_prompt(self, tokens: int) -> None:
        """The policies' own prefill checks (a token budget larger than the prompt, no room beside the sinks or the
        observation window), so the planner refuses what kvfx would refuse."""
        from kvfx.eviction import make_policy
        from kvfx.eviction.base import EvictionError

        prompt = torch.tensor([tokens])
        for layer in self.layers:
            for policy in {p.evict for p in layer.policies if p.evict.method not in ("none", "razor")}:
                rule = make_policy(policy)
                try:
                    rule.check(rule.budget(prompt, tokens), prompt)
                except EvictionError as err:
                    raise SpecError(f"{self.spec.source or '<spec>'}: layer {layer.layer}: {err}") from None

    def _check_windows(self, tokens: int, steps: int) -> None:
        """A quantized sliding-window layer does not slide: kvfx refuses the decode step that would drop a token
        from its window (it serves T + N <= window tokens, the window being ``keep_last + 1``)."""
        for layer in self.layers:
            keep = self.shape.keep_last[layer.layer]
            if layer.cache == "quantized" and keep and steps and tokens + steps - 1 > keep:
                raise SpecError(
                    f"{self.spec.source or '<spec>'}: layer {layer.layer}: this sliding-window layer keeps only its "
                    f"last {keep} tokens and decoding {steps} tokens after a {tokens}-token prompt goes past them; "
                    "quantized caches do not slide yet: give sliding-window layers quantize: {method: none} "
                    "(per-layer overrides) or keep sequences within the window")

    def describe(self, batch: int | None = None, tokens: int | None = None, new_tokens: int = 0) -> str:
        """Per group of layers: the policy and the bytes expression; then, given numbers, the totals and ratio."""
        s = self.shape
        lines = [f"kvfx plan: {s.name}, {s.num_layers} layers x {s.num_kv_heads} KV heads, head_dim {s.head_dim}, "
                 f"{s.dtype_name}; spec {self.spec.source or '<dict>'}",
                 "bytes per layer, B = batch, T = prompt tokens (padded), N = tokens written after the prompt "
                 "(generate's max_new_tokens - 1):"]
        totals = None if batch is None or tokens is None else self.evaluate(batch, tokens, new_tokens)
        groups = itertools.groupby(zip(self.layers, totals.layers if totals else [None] * len(self.layers)),
                                   key=lambda pair: (pair[0].describe_policy(), pair[0].total))
        for (policy, expression), members in groups:
            members = list(members)
            indices = [layer.layer for layer, _ in members]
            label = f"layer{'s' if len(indices) > 1 else ''} {_ranges(indices)}"
            lines.append(f"  {label}: {policy}")
            lines.append(f"      {expression}")
            if totals:
                lines.append(f"      = {members[0][1]:,} bytes per layer at B={totals.batch}, T={totals.tokens}, "
                             f"N={totals.decode_steps}")
        used = sorted({type(f) for layer in self.layers for f in layer.total.atoms(_Growth)}, key=str)
        if used:
            lines.append(f"  growth from c slots until n tokens fit, in {CHUNK}-token chunks (k for quantized "
                         "stores):" if grow_quantized in used else
                         f"  growth from c slots until n tokens fit, in {CHUNK}-token chunks:")
        for growth in used:
            lines.append(f"      {growth.legend()}")
        if totals:
            lines += [f"totals at batch {totals.batch}, prompt {totals.tokens} tokens, {totals.new_tokens} new "
                      f"token{'s' if totals.new_tokens != 1 else ''} (N = {totals.decode_steps}):",
                      f"  kvfx:       {totals.total:>16,} bytes ({_mib(totals.total)}; keys and values "
                      f"(quantized or not), positions, scores: {totals.storage:,})",
                      f"  full cache: {totals.full_cache:>16,} bytes ({_mib(totals.full_cache)}; every token in "
                      f"{s.dtype_name})",
                      f"  ratio:      {totals.ratio:.4f} of the full cache ({1 / totals.ratio:.2f}x smaller)"
                      if totals.ratio < 1 else
                      f"  ratio:      {totals.ratio:.4f} of the full cache ({totals.ratio:.2f}x larger)"]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def plan_memory(spec: Spec | str | os.PathLike | dict | None, model: ModelShape | str | os.PathLike | Any,
                dtype: torch.dtype | str | None = None) -> MemoryPlan:
    """Resolve ``spec`` against ``model`` (a ModelShape, a local model folder, a transformers config or model) and
    give each layer's bytes; ``dtype`` None takes the model's. Raises SpecError for methods kvfx does not implement
    yet (as the compile step does), razor profiles that are missing or made for another model, and layers kvfx would
    refuse."""
    if isinstance(model, torch.nn.Module):
        shape = ModelShape.from_config(model.config, dtype or next(model.parameters()).dtype)
    elif isinstance(model, ModelShape):
        shape = model if dtype is None else dataclasses.replace(model, dtype=_dtype(dtype, None))
    elif isinstance(model, (str, os.PathLike)):
        shape = ModelShape.from_pretrained(model, dtype)
    else:
        shape = ModelShape.from_config(model, dtype)
    spec = Spec.coerce(spec)
    from kvfx.plans import check_implemented, check_profiles

    check_implemented(spec)  # methods kvfx does not implement yet: the compile step's message
    _check_planned(spec)
    resolved = spec.resolve(shape.num_layers, shape.num_kv_heads)
    check_profiles(resolved)
    _check_profile_models(resolved, shape, spec)
    layers = []
    for layer, policies in enumerate(resolved.policies):
        methods = {p.evict.method for p in policies}
        if any(p.quantize.method != "none" for p in policies):  # kvfx.ops: quantization first, as kvfx picks
            layers.append(_quantized_layer(layer, policies, shape))
        elif "razor" in methods:
            layers.append(_razor_layer(layer, policies, shape))
        elif methods != {"none"}:
            layers.append(_slot_layer(layer, policies, shape))
        else:
            layers.append(_full_layer(layer, policies, shape))
    return MemoryPlan(shape=shape, spec=spec, plan=resolved, layers=tuple(layers))


def _check_planned(spec: Spec) -> None:
    policies = [("default", spec.default)] + [(f"overrides[{i}]", o) for i, o in enumerate(spec.overrides)]
    for where, policy in policies:
        for part in ("evict", "quantize"):
            rule = getattr(policy, part, None)
            if rule is not None and rule.method not in PLANNED[part]:
                raise SpecError(f"{spec.source or '<spec>'}: {where}.{part}.method: {rule.method!r} is not "
                                f"implemented in the memory planner yet (it plans: {', '.join(sorted(PLANNED[part]))})")


def _check_profile_models(resolved: Plan, shape: ModelShape, spec: Spec) -> None:
    """Where the model's config is known, every razor profile must have been made for it (its config hash)."""
    from kvfx.head_profile import ProfileError, load_profile

    if shape.config is None:
        return
    profiles = {p.evict.profile for row in resolved.policies for p in row if p.evict.method == "razor"}
    for profile in sorted(profiles):
        try:
            load_profile(profile, config=shape.config)
        except ProfileError as err:
            raise SpecError(f"{spec.source or '<spec>'}: evict.profile: {err}") from None
