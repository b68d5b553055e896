"""KIVI quantization of a KV cache into packed codes: torch references and a Triton quantize-and-pack kernel.

Quantization (KIVI: asymmetric min-max, ``bits`` in {2, 4, 8}, ``L = 2**bits - 1`` levels)::

    scale = (max - min) / L        code = round(clamp((x - min) / scale, 0, L))        x^ = code * scale + min

over groups of ``group`` entries: keys per channel over ``group`` consecutive tokens, values per token over ``group``
consecutive channels.  ``round`` is ``floor(y + 0.5)``.  A group whose range is zero (or whose rounded scale
underflows to 0) gets ``scale = 0`` and codes 0, so ``x^ = min``: never a NaN.

What is stored beside the codes is ``scale`` and ``offset = min - bias * scale``, with ``bias = 2**bits`` for 2 and
4 bits and 0 for 8 bits, each rounded to the storage dtype (scale first), and the codes are computed for the stored
pair: ``min' = offset + bias * scale`` (float32) is the minimum they are relative to, ``x^ = code * scale + min'``.
The bias is for the decode kernel: ``2**bits + code`` is a float16 it makes from the code bits with one OR, so one
fma ``(2**bits + code) * scale + offset`` dequantizes (kvfx.kernels.quant_decode_attention).  It costs nothing in
accuracy that matters: the offset's rounding, ``|min - bias * scale| * 2**-11`` in float16, exceeds the minimum's
own by at most ``bias * scale * 2**-11`` (1/128 of a step at 4 bits, 1/512 at 2); 8 bits, where it would be 1/8 of
a step, keep bias 0.

Packed layout of ``x: [B, H, T, C]`` (``C`` the head dim; ``per = 32 // bits`` codes per int32 word, ``per / 2``
per 16-bit half)::

    codes    [B, H, T, C // per]  int32   word j of token t holds channels j*per .. j*per + per - 1:
                                          channel j*per + 2k + h in bits [16h + k*bits, 16h + (k+1)*bits)
                                          (h = 0, 1 the word's half; keys and values alike)
    scale    keys   [B, H, T // group, C]       values [B, H, T, C // group]
    offset   the same shape as scale
    (scale and offset float16 by default; bfloat16 and float32 are accepted)

Why this layout:

* Both keys and values are packed along channels, so a token row is ``C * bits / 8`` contiguous bytes (64 bytes at
  4 bits, d = 128) and an attention tile of ``N`` tokens is one contiguous block of ``N`` rows: the kernel reads it
  with the widest coalesced loads, exactly like a bf16 tile.  Adjacent channels 2k and 2k + 1 sit at the same bit
  offset of the two 16-bit halves, so one 32-bit operation extracts and dequantizes both into the two float16
  halves of one register, which is the pair of adjacent channels a float16 tile keeps in one register (no byte
  shuffles).  A value token (quantized one at a time by KIVI) is a whole row of words: appending it never rewrites
  a neighbour's word.
* float16 scales and offsets: float16 and bfloat16 cost the same 2 bytes, float32 twice as much (at ``group`` 32 a
  32-bit scale + offset pair would add 2 bits per entry, as much as the 2-bit codes themselves).  Of the 2-byte
  types float16 keeps 3 more mantissa bits: the minimum's rounding error is ``|min| * 2**-12`` against bfloat16's
  ``|min| * 2**-9``, which at 8 bits (step = range / 255) is a visible fraction of a quantization step.  The price is
  float16's range (|x| < 65504), ample for attention keys and values; bfloat16 is there for caches that exceed it.
* Bytes per entry as a fraction of bfloat16: ``bits / 16`` for the codes plus ``2 * 16 / (16 * group) = 2 / group``
  for a 2-byte scale and offset: 4 bits 0.25 + 0.0625 (group 32) or + 0.031 (group 64), 2 bits 0.125 + the same.

Tensors in, tensors out: nothing here knows about caches or models.  ``quantize`` runs the Triton kernel (CPU tensors
through the interpreter, as the decode kernels), ``quantize_reference`` is the float32 torch ground truth; they agree
bit for bit (same float32 operations: IEEE division, floor, the storage dtype's round-to-nearest-even).
:func:`dequantize` is the float32 reconstruction every consumer uses.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kvfx.kernels import decode_attention as _da

__all__ = [
    "BITS",
    "KINDS",
    "SCALE_DTYPES",
    "Quantized",
    "codes_per_word",
    "offset_bias",
    "check_quant_args",
    "pack_codes",
    "unpack_codes",
    "quantize_codes_reference",
    "quantize_reference",
    "quantize",
    "dequantize",
    "empty_quantized",
]

BITS = (2, 4, 8)
KINDS = ("keys", "values")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_MAX = _da._MAX  # tl.reduce combine functions (see kvfx.kernels.decode_attention)
_MIN = tl.standard._elementwise_min
_SUM = _da._SUM


class Quantized(NamedTuple):
    """A packed, quantized key or value cache (the layout in the module docstring)."""

    codes: Tensor  # [B, H, T, C // per] int32
    scale: Tensor  # keys [B, H, T // group, C], values [B, H, T, C // group]
    offset: Tensor  # like scale: min - offset_bias(bits) * scale
    bits: int
    group: int
    kind: str  # "keys" | "values"

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * codes_per_word(self.bits)

    @property
    def tokens(self) -> int:
        """Token capacity (rows of codes)."""
        return self.codes.shape[-2]

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of codes, scales and offsets for the first ``tokens`` tokens (all rows if None) of every head."""
        t = self.tokens if tokens is None else tokens
        lead = self.codes.numel() // max(self.tokens * self.codes.shape[-1], 1)
        code_bytes = lead * t * self.codes.shape[-1] * 4
        rows = -(-t // self.group) if self.kind == "keys" else t
        param_bytes = 2 * lead * rows * self.scale.shape[-1] * self.scale.element_size()
        return code_bytes + param_bytes


def codes_per_word(bits: int) -> int:
    return 32 // bits


def offset_bias(bits: int) -> int:
    """The stored offset is min - offset_bias(bits) * scale (module docstring)."""
    return 1 << bits if bits < 8 else 0


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return bits


def check_quant_args(kind: str, bits: int, group: int, head_dim: int, tokens: int | None = None) -> None:
    """Raise ValueError unless (kind, bits, group) can quantize a [..., tokens, head_dim] tensor."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _check_bits(bits)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    per = codes_per_word(bits)
    if head_dim % per:
        raise ValueError(f"head_dim {head_dim} must be a multiple of {per} ({per} {bits}-bit codes per int32 word)")
    if kind == "values" and head_dim % group:
        raise ValueError(f"group {group} must divide head_dim {head_dim} (values are grouped along channels)")
    if kind == "keys" and tokens is not None and tokens % group:
        raise ValueError(f"group {group} must divide the number of key tokens {tokens} (keys are grouped along "
                         f"tokens: quantize whole groups)")


def _check_scale_dtype(dtype) -> torch.dtype:
    if dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {[str(d) for d in SCALE_DTYPES]}, got {dtype}")
    return dtype


def _check_x(x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, H, T, C] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating point tensor, got {x.dtype}")


# --------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------


def _bit_offsets(bits: int, device) -> Tensor:
    """[per] bit offset of the word's channel i = 2k + h: 16h + k * bits."""
    i = torch.arange(codes_per_word(bits), device=device)
    return 16 * (i % 2) + bits * (i // 2)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes ``[..., C]`` (each in [0, 2**bits)) -> int32 words ``[..., C // per]`` (module layout)."""
    per = codes_per_word(_check_bits(bits))
    if codes.shape[-1] % per:
        raise ValueError(f"the last dim {codes.shape[-1]} must be a multiple of {per} to pack {bits}-bit codes")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits, got [{int(c.min())}, "
                         f"{int(c.max())}]")
    words = (c << _bit_offsets(bits, codes.device)).sum(-1)  # [..., C // per] in [0, 2**32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_codes(words: Tensor, bits: int) -> Tensor:
    """int32 words ``[..., W]`` -> int64 codes ``[..., W * per]`` (inverse of :func:`pack_codes`)."""
    per = codes_per_word(_check_bits(bits))
    w = words.to(torch.int64) & 0xFFFFFFFF
    c = (w[..., None] >> _bit_offsets(bits, words.device)) & ((1 << bits) - 1)
    return c.reshape(*words.shape[:-1], words.shape[-1] * per)


def _round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).float()


def quantize_codes_reference(x: Tensor, kind: str, bits: int, group: int,
                             scale_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """Unpacked float32 codes ``[B, H, T, C]``, scale and offset (float32 holding storage-dtype values)."""
    _check_x(x)
    T, C = x.shape[-2:]
    check_quant_args(kind, bits, group, C, T)
    _check_scale_dtype(scale_dtype)
    levels = float((1 << bits) - 1)
    bias = float(offset_bias(bits))
    xf = x.float()
    if kind == "keys":
        g = xf.reshape(*x.shape[:2], T // group, group, C)  # rows: (token group, channel), reduced over dim -2
        mx, mn = g.amax(-2, keepdim=True), g.amin(-2, keepdim=True)
    else:
        g = xf.reshape(*x.shape[:2], T, C // group, group)  # rows: (token, channel group), reduced over dim -1
        mx, mn = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    scale = _round_to((mx - mn) / levels, scale_dtype)
    offset = _round_to(mn - bias * scale, scale_dtype)
    mn = offset + bias * scale  # the minimum the codes are relative to
    live = scale > 0
    y = torch.where(live, (g - mn) / torch.where(live, scale, torch.ones_like(scale)), torch.zeros_like(g))
    codes = torch.floor(y.clamp(0.0, levels) + 0.5).reshape(x.shape)
    if kind == "keys":
        return codes, scale.squeeze(-2), offset.squeeze(-2)
    return codes, scale.squeeze(-1), offset.squeeze(-1)


def quantize_reference(x: Tensor, kind: str, bits: int, group: int, *,
                       scale_dtype: torch.dtype = torch.float16) -> Quantized:
    """Torch reference of :func:`quantize`: ``x [B, H, T, C]`` -> :class:`Quantized` (module layout)."""
    codes, scale, offset = quantize_codes_reference(x, kind, bits, group, scale_dtype)
    return Quantized(pack_codes(codes.to(torch.int64), bits), scale.to(scale_dtype), offset.to(scale_dtype), bits,
                     group, kind)


def dequantize(qt: Quantized, tokens: int | None = None) -> Tensor:
    """float32 ``x^ [B, H, tokens, C]`` of the first ``tokens`` tokens (all if None): code * scale + min', with
    ``min' = offset + offset_bias(bits) * scale``."""
    t = qt.tokens if tokens is None else int(tokens)
    if not 0 <= t <= qt.tokens:
        raise ValueError(f"tokens {t} must be in [0, {qt.tokens}] (the capacity of the codes)")
    if qt.kind == "keys" and t % qt.group:
        raise ValueError(f"tokens {t} must be a multiple of the key group {qt.group}")
    codes = unpack_codes(qt.codes[..., :t, :], qt.bits).float()
    bias = float(offset_bias(qt.bits))
    if qt.kind == "keys":
        s = qt.scale[..., : t // qt.group, :].float()
        m = (qt.offset[..., : t // qt.group, :].float() + bias * s).repeat_interleave(qt.group, dim=-2)
        s = s.repeat_interleave(qt.group, dim=-2)
    else:
        s = qt.scale[..., :t, :].float()
        m = (qt.offset[..., :t, :].float() + bias * s).repeat_interleave(qt.group, dim=-1)
        s = s.repeat_interleave(qt.group, dim=-1)
    return codes * s + m


def empty_quantized(batch: int, heads: int, tokens: int, head_dim: int, kind: str, bits: int, group: int, *,
                    scale_dtype: torch.dtype = torch.float16, device=None) -> Quantized:
    """Uninitialised storage for ``tokens`` tokens (e.g. a cache's capacity; keys: a multiple of ``group``)."""
    check_quant_args(kind, bits, group, head_dim, tokens)
    _check_scale_dtype(scale_dtype)
    per = codes_per_word(bits)
    codes = torch.empty(batch, heads, tokens, head_dim // per, dtype=torch.int32, device=device)
    shape = (batch, heads, tokens // group, head_dim) if kind == "keys" else (batch, heads, tokens, head_dim // group)
    return Quantized(codes, torch.empty(shape, dtype=scale_dtype, device=device),
                     torch.empty(shape, dtype=scale_dtype, device=device), bits, group, kind)


# --------------------------------------------------------------------------------------
# Triton quantize-and-pack kernel (house rules of kvfx.kernels.decode_attention: a plain function wrapped as
# compiled and interpreted variants, reductions through tl.reduce with the standard combine functions).
# --------------------------------------------------------------------------------------


def _quantize_kernel(
    X, Codes, Scale, Offset,
    stride_xb, stride_xh, stride_xt,
    stride_cb, stride_ch, stride_ct,
    stride_sb, stride_sh, stride_sr,
    T, H,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,  # tokens per program (keys: GROUP, one group per program)
    KEYS: tl.constexpr,
    SCALE_BF16: tl.constexpr,  # round scale and offset to bfloat16 by hand (the interpreter's cast truncates)
    SCALE_FP16: tl.constexpr,
    BIAS: tl.constexpr,  # offset_bias(BITS), as a float
):
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 32 // BITS
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_t.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_valid = rows < T
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt + offs_d[None, :],
                mask=r_valid[:, None], other=0.0).to(tl.float32)  # [ROWS, C]
    s_base = b * stride_sb + h * stride_sh
    if KEYS:  # one group of tokens: a min and a scale per channel
        mx = tl.reduce(x, 0, _MAX)
        mn = tl.reduce(x, 0, _MIN)
        scale = tl.math.div_rn(mx - mn, LEVELS * 1.0)
    else:  # per token, groups of GROUP channels
        x3 = tl.reshape(x, [ROWS, HEAD_DIM // GROUP, GROUP])
        mx = tl.reduce(x3, 2, _MAX)
        mn = tl.reduce(x3, 2, _MIN)
        scale = tl.math.div_rn(mx - mn, LEVELS * 1.0)  # [ROWS, C // GROUP]
    # round to the storage dtype first (scale, then the offset): the codes are computed for the stored parameters
    if SCALE_BF16:  # round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates
        sb = scale.to(tl.uint32, bitcast=True)
        scale = ((sb + 0x7FFF + ((sb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif SCALE_FP16:
        scale = scale.to(tl.float16).to(tl.float32)
    offset = mn - BIAS * scale  # stored; the codes are relative to the minimum it stands for
    if SCALE_BF16:
        ob = offset.to(tl.uint32, bitcast=True)
        offset = ((ob + 0x7FFF + ((ob >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif SCALE_FP16:
        offset = offset.to(tl.float16).to(tl.float32)
    mn = offset + BIAS * scale
    live = scale > 0.0
    safe = tl.where(live, scale, 1.0)
    if KEYS:
        y = tl.where(live[None, :], tl.math.div_rn(x - mn[None, :], safe[None, :]), 0.0)
        tl.store(Scale + s_base + pid_t.to(tl.int64) * stride_sr + offs_d, scale.to(Scale.dtype.element_ty))
        tl.store(Offset + s_base + pid_t.to(tl.int64) * stride_sr + offs_d, offset.to(Offset.dtype.element_ty))
    else:
        y3 = tl.where(live[:, :, None], tl.math.div_rn(x3 - mn[:, :, None], safe[:, :, None]), 0.0)
        y = tl.reshape(y3, [ROWS, HEAD_DIM])
        offs_g = tl.arange(0, HEAD_DIM // GROUP)
        s_ptrs = s_base + rows[:, None] * stride_sr + offs_g[None, :]
        tl.store(Scale + s_ptrs, scale.to(Scale.dtype.element_ty), mask=r_valid[:, None])
        tl.store(Offset + s_ptrs, offset.to(Offset.dtype.element_ty), mask=r_valid[:, None])
    codes = tl.floor(tl.minimum(tl.maximum(y, 0.0), LEVELS * 1.0) + 0.5).to(tl.uint32)  # [ROWS, C]
    # pack: channel j*PER + 2k + h into bits [16h + k*BITS, ...) of word j (disjoint bits: the sum is an OR)
    c3 = tl.reshape(codes, [ROWS, HEAD_DIM // PER, PER])
    offs_i = tl.arange(0, PER)
    shifts = (16 * (offs_i % 2) + BITS * (offs_i // 2)).to(tl.uint32)
    words = tl.reduce(c3 << shifts[None, None, :], 2, _SUM)  # [ROWS, C // PER] uint32
    offs_w = tl.arange(0, HEAD_DIM // PER)
    tl.store(Codes + b * stride_cb + h * stride_ch + rows[:, None] * stride_ct + offs_w[None, :],
             words.to(tl.int32, bitcast=True), mask=r_valid[:, None])


_QUANTIZE_JIT = JITFunction(_quantize_kernel, do_not_specialize=["T", "H"])
_VALUE_ROWS = 32  # tokens per program when quantizing values


def _check_out(out: Quantized, want: Quantized) -> None:
    if not isinstance(out, Quantized):
        raise ValueError(f"out must be a Quantized or None, got {type(out).__name__}")
    if (out.bits, out.group, out.kind) != (want.bits, want.group, want.kind):
        raise ValueError(f"out has (bits, group, kind) {(out.bits, out.group, out.kind)}, the call "
                         f"{(want.bits, want.group, want.kind)}")
    for name in ("codes", "scale", "offset"):
        got, exp = getattr(out, name), getattr(want, name)
        if tuple(got.shape) != tuple(exp.shape) or got.dtype != exp.dtype or got.device != exp.device:
            raise ValueError(f"out.{name} must be {exp.dtype} {tuple(exp.shape)} on {exp.device}, got {got.dtype} "
                             f"{tuple(got.shape)} on {got.device}")
        if got.shape[-1] > 1 and got.stride(-1) != 1:
            raise ValueError(f"out.{name} must have a contiguous last dim")
        if got.stride(-2) == 0 and got.shape[-2] > 1:
            raise ValueError(f"out.{name} must not broadcast over tokens")


def quantize(x: Tensor, kind: str, bits: int, group: int, *, scale_dtype: torch.dtype = torch.float16,
             out: Quantized | None = None) -> Quantized:
    """Quantize and pack ``x [B, H, T, C]`` (any float dtype, contiguous last dim) with the Triton kernel.

    keys: ``T`` a multiple of ``group``; values: ``C`` a multiple of ``group``; ``C`` a multiple of ``32 // bits``
    and a power of two.  ``out`` (optional): storage of the right shapes to write into (views of a larger cache, any
    strides with a contiguous last dim).  Equals :func:`quantize_reference` bit for bit.
    """
    _check_x(x)
    B, H, T, C = x.shape
    check_quant_args(kind, bits, group, C, T)
    _check_scale_dtype(scale_dtype)
    if C & (C - 1) or group & (group - 1):
        raise ValueError(f"the Triton quantizer needs a power-of-two head_dim and group, got head_dim {C}, "
                         f"group {group} (use quantize_reference)")
    if x.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dim")
    if kind == "keys" and group * C > 256 * 256:
        raise ValueError(f"key group {group} x head_dim {C} is too large for one program")
    want = empty_quantized(B, H, T, C, kind, bits, group, scale_dtype=scale_dtype, device=x.device)
    if out is None:
        out = want
    else:
        _check_out(out, want)
    if x.numel() == 0:
        return out
    interpret = x.device.type != "cuda" or _da.triton_interpreting()
    rows = group if kind == "keys" else _VALUE_ROWS
    grid = (B * H, -(-T // rows))
    codes, scale, offset = out.codes, out.scale, out.offset
    kernel = _da._interpreted(_quantize_kernel) if interpret else _QUANTIZE_JIT
    kernel[grid](
        x, codes, scale, offset,
        x.stride(0), x.stride(1), x.stride(2),
        codes.stride(0), codes.stride(1), codes.stride(2),
        scale.stride(0), scale.stride(1), scale.stride(2),
        T, H,
        BITS=bits, GROUP=group, HEAD_DIM=C, ROWS=rows, KEYS=kind == "keys",
        SCALE_BF16=scale_dtype == torch.bfloat16, SCALE_FP16=scale_dtype == torch.float16,
        BIAS=float(offset_bias(bits)),
        num_warps=4 if rows * C <= 64 * 128 else 8,
    )
    return out
