"""One layer's decode step, captured once in a CUDA graph and replayed at every later step.

A fixed-budget cache's decode step launches the same few kernels on the same buffers at every step; what changes
(the new token's position, the number of tokens seen) lives in device memory. Launching them from Python costs far
more host time than the GPU spends on them (a Triton launch is tens of microseconds on the host), so after
``WARMUP`` eager steps (which compile and tune the kernels) the step is captured and later steps only copy their
inputs into the graph's static buffers and replay it.

What the graph bakes in is named by a key (shapes, dtypes, the mask's offset and kind); a step with another key, a
mask row longer than the static one, or a call made while the stream is already being captured (a caller's own
graph) runs eagerly, so nothing is ever replayed with stale arguments. ``KVFX_STEP_GRAPHS=0`` turns replay off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

WARMUP = 2  # eager steps before capture: the first compiles and tunes the kernels


def enabled() -> bool:
    return os.environ.get("KVFX_STEP_GRAPHS", "1").strip().lower() not in ("0", "false", "no", "off")


class CapturedStep:
    """``step(q, k_new, v_new, row, out=None) -> out`` run eagerly ``WARMUP`` times, then from a CUDA graph.

    ``q`` ``[B, Hq, D]``, ``k_new``/``v_new`` ``[B, Hkv, D]``, ``row``: None or a mask row ``[B|1, 1|Hq, Tk]`` whose
    columns past those the step reads may hold anything (the static row is longer than ``Tk`` and only its first
    ``Tk`` columns are copied). ``step`` writes its output into ``out`` where given, runs on the current stream and
    keeps every buffer it writes across calls. The static buffers are made at the first step, so that memory does
    not grow when the graph is captured (only when a longer mask row needs a longer static row).
    """

    def __init__(self, step: Callable[..., Tensor]):
        self.step = step
        self.eager_steps = 0
        self.replays = 0  # for tests and tools
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Hashable = None
        self.static: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None
        self.out: Tensor | None = None

    def __call__(self, q: Tensor, k_new: Tensor, v_new: Tensor, row: Tensor | None, key: Hashable) -> Tensor:
        key = (key, *(_layout(t) for t in (q, k_new, v_new)), None if row is None else (row.shape[:-1], row.dtype))
        if not enabled() or torch.cuda.is_current_stream_capturing():
            return self.step(q, k_new, v_new, row)
        static_row = self.static[3] if self.static is not None else None
        fits = row is None or (static_row is not None and row.shape[-1] <= static_row.shape[-1])
        if self.graph is not None and key == self.key and fits:
            return self._replay(q, k_new, v_new, row)
        if self.eager_steps < WARMUP:
            self.eager_steps += 1
            out = self.step(q, k_new, v_new, row)
            self._make_static(q, k_new, v_new, row, out, key)
            return out
        self._make_static(q, k_new, v_new, row, None, key)
        self._capture()
        return self._replay(q, k_new, v_new, row)

    def _make_static(self, q, k_new, v_new, row, out, key) -> None:
        """The graph's input and output buffers for this key; a row twice as long as ``row`` (room to grow)."""
        if self.static is None or self.key != key:
            self.graph = None
            srow = None if row is None else row.new_zeros(*row.shape[:-1], 2 * row.shape[-1])
            self.static = (*(_like(t) for t in (q, k_new, v_new)), srow)
            self.out = torch.empty_like(out) if out is not None else None
            self.key = key
        elif row is not None and row.shape[-1] > self.static[3].shape[-1]:
            self.graph = None
            self.static = (*self.static[:3], row.new_zeros(*row.shape[:-1], 2 * row.shape[-1]))

    def _replay(self, q, k_new, v_new, row) -> Tensor:
        sq, sk, sv, srow = self.static
        torch._foreach_copy_([sq, sk, sv], [q, k_new, v_new])
        if row is not None:
            srow[..., : row.shape[-1]].copy_(row)
        self.graph.replay()
        self.replays += 1
        return self.out.clone()

    def _capture(self) -> None:
        self.graph = None  # free the old graph before capturing a new one
        # Capture on a side stream, as torch.cuda.graph does, without its gc.collect() and empty_cache(): one
        # capture per layer and sequence must stay cheap.
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="relaxed")  # a kernel first compiled here loads a module
            try:
                out = self.step(*self.static, out=self.out)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self.graph, self.out = graph, out


def _layout(t: Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _like(t: Tensor) -> Tensor:
    """A buffer of ``t``'s shape and strides (the kernels were compiled for those strides)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
