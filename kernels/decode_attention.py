"""Fused decode attention (flash-decoding, GQA-native) and its torch reference.

One query token per sequence attends to the first ``kv_len`` tokens of a KV cache
that may have spare capacity::

    q: [B, Hq, D]          k, v: [B, Hkv, Tcap, D]  (Tcap >= kv_len)
    out[b, h] = softmax(mask(softcap(scale * q[b, h] . k[b, h // G, :kv_len]))) @ v[b, h // G, :kv_len]

with G = Hq // Hkv.  Tensors in, tensors out: nothing here knows about models.

Kernel design
-------------
* Split kernel, grid ``(B * Hkv * num_splits,)``: one program per (batch, KV head, split).
  It loads the G query heads of its group as one ``[BLOCK_G, D]`` block (G padded to
  >= 16 rows for ``tl.dot``, padding masked), so every KV head is streamed from memory
  exactly once per decode step for the whole group (no ``repeat_kv``).  It walks its
  chunk of the sequence in blocks of ``BLOCK_N`` keys with an exp2-based online softmax
  (fp32 accumulators) and writes a normalised fp32 partial output plus its log2-sum-exp.
* Combine kernel, grid ``(B * Hq,)``: merges the ``num_splits`` partials of one query
  head.  With ``num_splits == 1`` the split kernel writes the final output directly and
  the combine kernel is skipped.
* On CUDA the split kernel is autotuned over a few (BLOCK_N, num_warps, num_stages)
  configurations keyed on (head_dim, group, dtypes, a coarse keys-per-split bucket), so
  a growing ``kv_len`` never re-triggers tuning more than a few times.  Set
  ``KVFX_DECODE_AUTOTUNE=0`` to use one fixed configuration instead (e.g. before CUDA
  graph capture, which cannot host the autotuner's benchmarking).
* CPU tensors run the same kernels through the Triton interpreter (slow; tests only);
  there the dot operands are upcast to fp32 because the interpreter's bf16 ``tl.dot`` is
  wrong.  The kernel bodies use no ``triton.language.standard`` @jit helpers, so the
  interpreter works on CPU tensors even when triton was imported without
  ``TRITON_INTERPRET=1`` (e.g. by another test module first): interpreter tests and GPU
  tests can share one process.  CUDA tensors use the compiled kernels unless triton
  itself was imported under ``TRITON_INTERPRET=1`` (see :func:`triton_interpreting`).
"""

import functools
import math
import operator
import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["decode_attention", "decode_attention_reference", "supports", "default_num_splits", "triton_interpreting"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
_MAX_BLOCK_ELEMS = 128 * 128  # BLOCK_G * D accumulator elements one program may hold

# Split heuristic knobs (GPU).  Aim for at most _WAVES programs per SM, but never give a
# split fewer than _MIN_KEYS_PER_SPLIT keys (below that the combine step and the pipeline
# prologue cost more than the parallelism buys).  Two per SM, rounded down: on the H100
# (B=8, 8 KV heads, 6555 bf16 slots) 4 splits read at SDPA's bandwidth, while the 9 of a
# rounded-up four per SM cost 3-25% more, depending on the config the autotuner picked
# (benchmarks/results/split_sweep_h100.txt).
_WAVES = 2
_MIN_KEYS_PER_SPLIT = 512
_MAX_SPLITS = 128

# Fixed launch configurations (interpreter, or autotuning disabled).
_INTERPRET_CONFIG = dict(BLOCK_N=32, num_warps=4, num_stages=1)
_SMEM_BUDGET = 160 * 1024  # bytes of K/V pipeline buffers a config may use (H100: 227 KiB/block)


# --------------------------------------------------------------------------------------
# Triton kernels (plain functions; wrapped below as compiled and interpreted variants)
#
# The bodies use builtins only, no triton.language.standard @jit helpers (tl.sum, tl.max,
# tl.cdiv, tl.zeros): those are created once, compiled-or-interpreted, when triton is
# imported, and would tie this module to the TRITON_INTERPRET value at that moment.
# Reductions use tl.reduce with the standard combine functions, which the interpreter
# recognises (numpy fast path) and the compiler treats exactly like tl.max / tl.sum.
# --------------------------------------------------------------------------------------

_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


def triton_interpreting() -> bool:
    """True if triton itself was imported under TRITON_INTERPRET=1.

    Then all of its @jit functions are interpreted and nothing can be compiled in this
    process, so even CUDA tensors go through the interpreter (slowly).
    """
    return not isinstance(_SUM, JITFunction)


def _decode_split_kernel(
    Q, K, V, M, O, Opart, Lse,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mn,
    stride_ob, stride_oh,
    kv_len, num_splits, Hkv,
    sm_scale, softcap,
    TUNE_KEY,  # unused by the body: only part of the autotuning key
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0: none, 1: bool (nonzero = attend), 2: additive float bias
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 and use IEEE fp32 products
    DIRECT_OUT: tl.constexpr,  # num_splits == 1: write the final output in O's dtype
    STATIC_ITERS: tl.constexpr,  # > 0 (interpreter only): fixed trip count, see below
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    split = pid % num_splits
    bh = pid // num_splits
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_valid = offs_g < GROUP
    hq = hk * GROUP + offs_g  # query heads of this group (int64)

    q = tl.load(Q + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    per_split = (kv_len + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, kv_len)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = M + b * stride_mb

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_DIM], 0.0, tl.float32)

    # Compiled: runtime trip count (kv_len changes never recompile).  Interpreter: a
    # constexpr count (blocks past `end` are fully masked and change nothing), because
    # the triton 3.6 interpreter cannot use a runtime scalar as a loop bound with
    # numpy >= 2.3 (and turns every assigned name into a tensor, hence the inline ternary).
    for it in range(0, STATIC_ITERS if STATIC_ITERS > 0 else (tl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N):
        cols = start + it * BLOCK_N + offs_n
        n_valid = cols < end
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * sm_scale
        if HAS_SOFTCAP:
            # s = softcap * tanh(s / softcap); tanh from exp2 (no libdevice), with a short
            # odd Taylor series near 0 where 1 - e^{-2|x|} would cancel.
            x = s / softcap
            ax = tl.abs(x)
            e = tl.exp2(ax * (-2.0 * LOG2E))
            th_big = (1.0 - e) / (1.0 + e)
            x2 = x * x
            th_small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
            th = tl.where(ax < 0.125, th_small, th_big)
            s = softcap * tl.where(x < 0, -th, th)
        if MASK_KIND == 1:
            mv = tl.load(m_base + cols * stride_mn, mask=n_valid, other=0)
            s = tl.where((mv != 0)[None, :], s, float("-inf"))
        elif MASK_KIND == 2:
            bias = tl.load(m_base + cols * stride_mn, mask=n_valid, other=0.0).to(tl.float32)
            s = s + bias[None, :]
        s = tl.where(n_valid[None, :], s * LOG2E, float("-inf"))

        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # l == 0 only if every key was masked: acc == 0
    out = acc / l_safe[:, None]
    if DIRECT_OUT:
        o_ptrs = O + b * stride_ob + hq[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_valid[:, None])
    else:
        # Opart: [B, Hq, num_splits, D] fp32 contiguous; Lse: [B, Hq, num_splits] fp32 (log2 units)
        row = (b * (Hkv * GROUP) + hq) * num_splits + split
        tl.store(Opart + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_valid[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(Lse + row, lse, mask=g_valid)


def _decode_combine_kernel(
    Opart, Lse, O,
    stride_ob, stride_oh,
    Hq, num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # >= num_splits, power of two (log-sum-exps, scalars)
    CHUNK_S: tl.constexpr,  # partial outputs merged per iteration
    STATIC_CHUNKS: tl.constexpr,  # > 0 (interpreter only): constexpr trip count
):
    pid = tl.program_id(0).to(tl.int64)  # b * Hq + h
    b = pid // Hq
    h = pid % Hq
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    lse_all = tl.load(Lse + pid * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.reduce(lse_all, 0, _MAX)
    m_use = tl.where(m == float("-inf"), 0.0, m)  # every split empty/masked: weights all 0
    denom = tl.reduce(tl.exp2(lse_all - m_use), 0, _SUM)

    acc = tl.full([HEAD_DIM], 0.0, tl.float32)
    offs_c = tl.arange(0, CHUNK_S)
    for c in range(0, STATIC_CHUNKS if STATIC_CHUNKS > 0 else (num_splits + CHUNK_S - 1) // CHUNK_S):
        sp = c * CHUNK_S + offs_c
        s_valid = sp < num_splits
        lse = tl.load(Lse + pid * num_splits + sp, mask=s_valid, other=float("-inf"))
        w = tl.exp2(lse - m_use)
        # an empty split (lse -inf) need not have written its partial output: it is not read
        used = s_valid & (lse != float("-inf"))
        o = tl.load(Opart + (pid * num_splits + sp)[:, None] * HEAD_DIM + offs_d[None, :], mask=used[:, None],
                    other=0.0)
        acc += tl.reduce(o * w[:, None], 0, _SUM)
    out = acc / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


# Compiled and interpreted variants live side by side: CPU tensors always take the
# interpreter; CUDA tensors take the compiled kernels unless triton itself was imported
# under TRITON_INTERPRET=1 (then nothing can be compiled: see triton_interpreting).
# Runtime ints that vary per call are not specialised (no recompiles as kv_len, the split
# count or the tuning bucket change; Triton would otherwise specialise values == 1).
_SPLIT_JIT = JITFunction(_decode_split_kernel, do_not_specialize=["kv_len", "num_splits", "Hkv", "TUNE_KEY"])
_COMBINE_JIT = JITFunction(_decode_combine_kernel, do_not_specialize=["num_splits", "Hq"])


@functools.lru_cache(maxsize=None)
def _interpreted(kernel):
    """The interpreted variant of a kernel, made on first use by CPU tensors only: a process that runs on the GPU
    never creates one (running interpreter functions patches triton.language for the whole process, which was seen
    to send inductor's own Triton kernels through the interpreter on the GPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel)


def _autotune_configs():
    cfgs = []
    for block_n, warps, stages in [
        (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3),
        (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3),
        (32, 4, 3), (32, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages))
    return cfgs


def _smem_bytes(block_n: int, head_dim: int, elem_size: int, stages: int) -> int:
    return 2 * max(stages, 1) * block_n * head_dim * elem_size


def _prune_configs(configs, named_args, **kwargs):
    head_dim = kwargs["HEAD_DIM"]
    es = named_args["K"].element_size()
    kept = [c for c in configs if _smem_bytes(c.kwargs["BLOCK_N"], head_dim, es, c.num_stages) <= _SMEM_BUDGET]
    if not kept:  # keep the smallest footprint rather than fail
        kept = [min(configs, key=lambda c: _smem_bytes(c.kwargs["BLOCK_N"], head_dim, es, c.num_stages))]
    return kept


_SPLIT_TUNED = triton.autotune(
    configs=_autotune_configs(),
    key=["HEAD_DIM", "GROUP", "TUNE_KEY"],  # the autotuner appends the tensor dtypes itself
    prune_configs_by={"early_config_prune": _prune_configs},
)(_SPLIT_JIT)


def _fixed_gpu_config(head_dim: int, elem_size: int) -> dict:
    for block_n, stages in ((64, 3), (64, 2), (32, 3), (32, 2), (16, 2)):
        if _smem_bytes(block_n, head_dim, elem_size, stages) <= _SMEM_BUDGET:
            return dict(BLOCK_N=block_n, num_warps=4, num_stages=stages)
    return dict(BLOCK_N=16, num_warps=4, num_stages=1)


def _autotune_enabled() -> bool:
    return os.environ.get("KVFX_DECODE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _tune_bucket(kv_len: int, num_splits: int) -> int:
    """Coarse keys-per-split bucket: part of the autotune key, never kv_len itself."""
    per_split = -(-kv_len // num_splits)
    if per_split <= 1024:
        return 0
    if per_split <= 8192:
        return 1
    return 2


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_inputs(q, k, v, kv_len, mask, scale, softcap, num_splits=None) -> int:
    """Validate shapes/arguments shared by kernel and reference; returns kv_len as int."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a [B, Hq, D] tensor, got shape {tuple(getattr(q, 'shape', ()))}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [B, Hkv, Tcap, D] tensor, got shape {tuple(getattr(k, 'shape', ()))}")
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(getattr(v, 'shape', ()))}")
    B, Hq, D = q.shape
    Bk, Hkv, Tcap, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k batch size {Bk} does not match q batch size {B}")
    if Dk != D:
        raise ValueError(f"k head_dim {Dk} does not match q head_dim {D}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}")
    if isinstance(kv_len, bool):
        raise ValueError("kv_len must be an int")
    try:
        kv_len = operator.index(kv_len)
    except TypeError:
        raise ValueError(f"kv_len must be an int, got {type(kv_len).__name__}") from None
    if not 0 <= kv_len <= Tcap:
        raise ValueError(f"kv_len {kv_len} must be in [0, Tcap={Tcap}] (the capacity of k/v)")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (B, kv_len):
            raise ValueError(f"mask must have shape [B, kv_len] = {(B, kv_len)}, got {tuple(mask.shape)}")
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on {q.device}, got {mask.device}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if softcap is None or not (float(softcap) >= 0.0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    return kv_len


def decode_attention_reference(q, k, v, kv_len: int, *, mask=None, scale=None, softcap=0.0) -> torch.Tensor:
    """Plain-torch fp32 decode attention: the ground truth and the CPU path.

    Same contract as :func:`decode_attention`.  Rows whose keys are all masked give zeros.
    """
    kv_len = _check_inputs(q, k, v, kv_len, mask, scale, softcap)
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf = q.float().reshape(B, Hkv, G, D)
    kf = k[:, :, :kv_len].float()
    vf = v[:, :, :kv_len].float()
    s = torch.einsum("bhgd,bhnd->bhgn", qf, kf) * scale
    if softcap and softcap > 0:
        s = float(softcap) * torch.tanh(s / float(softcap))
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        else:
            s = s + mask.float()[:, None, None, :]
    m = s.amax(dim=-1, keepdim=True) if kv_len > 0 else s.new_zeros(B, Hkv, G, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgn,bhnd->bhgd", p, vf) / torch.where(l == 0, torch.ones_like(l), l)
    return out.reshape(B, Hq, D).to(q.dtype)


def supports(q, k) -> str | None:
    """None if the Triton kernel handles these tensors, else a short reason to fall back."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 3 or k.dim() != 4:
        return "q must be [B, Hq, D] and k [B, Hkv, Tcap, D]"
    D = q.shape[-1]
    if not (_is_pow2(D) and _MIN_HEAD_DIM <= D <= _MAX_HEAD_DIM):
        return f"head_dim {D} is not a power of two in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}]"
    if k.shape[-1] != D:
        return f"k head_dim {k.shape[-1]} != q head_dim {D}"
    if q.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not one of fp16/bf16/fp32"
    if k.dtype != q.dtype:
        return f"k dtype {k.dtype} differs from q dtype {q.dtype}"
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        return f"q heads ({Hq}) not a multiple of k heads ({Hkv})"
    G = Hq // Hkv
    if max(16, triton.next_power_of_2(G)) * D > _MAX_BLOCK_ELEMS:
        return f"group size {G} with head_dim {D} is too large for one program"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return "last dim of q/k must be contiguous"
    if q.device.type == "cuda":
        if q.dtype == torch.bfloat16 and _capability(q.device.index or 0)[0] < 8:
            return "bf16 needs compute capability >= 8.0"
        return None
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" or triton_interpreting():
            return None
        return "CPU tensors run the Triton kernel only under TRITON_INTERPRET=1"
    return f"device {q.device.type} is not supported"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def default_num_splits(batch: int, kv_heads: int, kv_len: int, sm_count: int | None) -> int:
    """Split-K heuristic.  ``sm_count=None`` means CPU/interpreter: small numbers.

    GPU: at most ``_WAVES`` programs per SM (B * Hkv * splits <= 2 * SMs, rounded down), each
    split at least ``_MIN_KEYS_PER_SPLIT`` keys (so short caches get 1 split), at most
    ``_MAX_SPLITS``.
    """
    if kv_len <= 0:
        return 1
    if sm_count is None:
        return 1 if kv_len <= 128 else 2
    base = max(1, batch * kv_heads)
    want = (_WAVES * sm_count) // base
    cap = max(1, kv_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(want, cap, _MAX_SPLITS))


def combine_partials(opart: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, *, interpret: bool) -> None:
    """out[b, h] := the log-sum-exp weighted merge of the splits' normalised partial outputs.

    opart ``[B, Hq, S, Dv]`` float32 and lse ``[B, Hq, S]`` float32 (log2 units, ``-inf``: an empty split), both
    contiguous; out ``[B, Hq, Dv]`` with a contiguous last dim. One program per (row, query head) loads up to 16
    splits per iteration (no serial chain of loads, whatever S is). The partial output of a split whose lse is
    ``-inf`` (it attended nothing) is never read, so such a split may skip writing it; a head whose splits are all
    empty gets zeros."""
    B, Hq, num_splits, Dv = opart.shape
    block_s = max(2, triton.next_power_of_2(num_splits))
    chunk_s = min(block_s, 16)
    combine = _interpreted(_decode_combine_kernel) if interpret else _COMBINE_JIT
    combine[(B * Hq,)](
        opart, lse, out,
        out.stride(0), out.stride(1),
        Hq, num_splits,
        HEAD_DIM=Dv, BLOCK_S=block_s, CHUNK_S=chunk_s,
        STATIC_CHUNKS=-(-num_splits // chunk_s) if interpret else 0,
        num_warps=4 if Dv >= 128 else 2,
    )


def decode_attention(
    q, k, v, kv_len: int, *, mask=None, scale: float | None = None, softcap: float = 0.0, num_splits: int | None = None
) -> torch.Tensor:
    """Fused decode attention over the first ``kv_len`` tokens of a KV cache.

    q: [B, Hq, D]; k, v: [B, Hkv, Tcap, D] (last dim contiguous, other strides free);
    mask: None or [B, kv_len] bool (True = attend) or float additive bias; scale defaults
    to 1/sqrt(D); softcap > 0 applies ``softcap * tanh(s / softcap)`` before the mask.
    Returns [B, Hq, D] in q.dtype; rows with every key masked are zeros.
    Raises ValueError on malformed arguments or inputs the kernel does not support
    (see :func:`supports`; callers fall back to :func:`decode_attention_reference`).
    """
    kv_len = _check_inputs(q, k, v, kv_len, mask, scale, softcap, num_splits)
    reason = supports(q, k)
    # CPU tensors always run (interpreted) when called directly; `supports` only tells
    # callers to prefer the reference there unless TRITON_INTERPRET=1.
    if reason is not None and not (q.device.type == "cpu" and reason.startswith("CPU tensors")):
        raise ValueError(f"decode_attention cannot run these inputs: {reason}")
    if v.dtype != q.dtype or v.stride(-1) != 1:
        raise ValueError("v must have q's dtype and a contiguous last dim")

    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap = float(softcap)
    interpret = q.device.type != "cuda" or triton_interpreting()

    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    if B == 0 or Hq == 0:
        return out
    result = out
    if interpret and q.dtype == torch.bfloat16:
        # the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even.
        # Write fp32 there and let torch round, so CPU results match the GPU's rounding.
        out = torch.empty((B, Hq, D), device=q.device, dtype=torch.float32)

    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, kv_len, None if interpret else _sm_count(q.device.index or 0))

    if mask is None:
        mask_kind, m_arg, stride_mb, stride_mn = 0, q, 0, 0
    else:
        if mask.dtype == torch.bool:
            mask_kind, m_arg = 1, mask.view(torch.uint8)
        else:
            mask_kind, m_arg = 2, mask
        stride_mb, stride_mn = mask.stride()

    direct = num_splits == 1
    if direct:
        opart = lse = out  # unused
    else:
        opart = torch.empty((B, Hq, num_splits, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)

    block_g = max(16, triton.next_power_of_2(G))
    args = (
        q, k, v, m_arg, out, opart, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_mb, stride_mn,
        out.stride(0), out.stride(1),
        kv_len, num_splits, Hkv,
        scale, softcap if softcap > 0 else 1.0,
        _tune_bucket(kv_len, num_splits),
    )
    meta = dict(
        GROUP=G, BLOCK_G=block_g, HEAD_DIM=D,
        MASK_KIND=mask_kind, HAS_SOFTCAP=softcap > 0,
        DOT_FP32=interpret or q.dtype == torch.float32,
        DIRECT_OUT=direct,
    )
    grid = (B * Hkv * num_splits,)
    if interpret:
        bn = _INTERPRET_CONFIG["BLOCK_N"]
        chunk_blocks = -(-(-(-kv_len // num_splits)) // bn)  # cdiv(cdiv(kv_len, splits), BLOCK_N)
        _interpreted(_decode_split_kernel)[grid](*args, **meta, STATIC_ITERS=max(chunk_blocks, 1), **_INTERPRET_CONFIG)
    elif _autotune_enabled():
        _SPLIT_TUNED[grid](*args, **meta, STATIC_ITERS=0)
    else:
        _SPLIT_JIT[grid](*args, **meta, STATIC_ITERS=0, **_fixed_gpu_config(D, q.element_size()))

    if not direct:
        combine_partials(opart, lse, out, interpret=interpret)
    if out is not result:
        result.copy_(out)
    return result
