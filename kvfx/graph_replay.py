"""Decode graphs replayed from CUDA graphs, stage by stage (backend option ``cuda_graphs``).

:func:`kvfx.passes.partition.split_stages` cuts a rewritten decode graph into static stages (everything between
two attention calls), dynamic stages (the mask built from the growing attention mask, the cache views handed back
to transformers) and the attention calls. Here each static stage is compiled on its own and wrapped in a
:class:`ReplayedStage`: after ``WARMUP`` eager calls (which compile and autotune its kernels) it is captured once in
a CUDA graph, and every later call copies only the inputs whose storage moved (the attention output, the new token's
ids) into the graph's static buffers and replays it. The dynamic stages and the attention calls run on the host as
before, between the replays.

What a replay relies on, and what happens when it does not hold:

- Weights (parameters), the static outputs of stages already captured, and large buffers seen at one address on
  the last two eager calls are read in place; every other tensor input is copied (one multi-tensor copy). If an
  input read in place later comes at another address, the stage drops its graph and warms up again; so does a
  stage whose inputs change shape, stride or dtype.
- Outputs live in the graph's memory and are overwritten by the next replay: those that leave the forward (the
  logits) are cloned; the others are consumed within the step by the stages and ops after them (kvfx's attention
  copies its inputs into its cache).
- Only CUDA tensors are captured; on the CPU a stage simply runs its compiled function. A call made while the
  stream is already being captured (a caller's own graph) also runs it directly. A stage whose capture fails (a
  host sync inside it, say) raises an error that names the option: a failed capture can leave CUDA state unusable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._dynamo.utils import counters
from torch.fx import GraphModule

from kvfx.ops import attention_impl
from kvfx.passes.partition import ATTENTION, STATIC, Stage, is_attention, output_node, returns_tuple

WARMUP = 2  # eager calls before capture: the first compiles and autotunes the stage's kernels
IN_PLACE_BYTES = 1 << 20  # a non-parameter input at least this large, at one address while warming up, is not copied
_STATIC_OUTPUTS: dict[int, int] = {}  # data_ptr -> how many captured stages' outputs live there


class ReplayedStage(torch.nn.Module):
    """One static stage: ``compile(stage, example_args) -> fn`` on the first call, then eager, then replayed."""

    def __init__(self, stage: GraphModule, compile: Callable[[GraphModule, list], Callable], escaping: Sequence[int]):
        super().__init__()
        self.bare = _return_tuple(stage)  # the compilers take tuple outputs; the split module expects it bare
        self.stage = stage
        self._compile = compile
        self.fn: Callable | None = None
        self.escaping = frozenset(escaping)
        self.eager_calls = 0
        self.replays = 0  # for tests and tools
        self.captures = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._last_ptrs: tuple[int, ...] | None = None
        self._static_in: list[Tensor] = []
        self._copied: tuple[int, ...] = ()  # the inputs copied into static buffers before each replay
        self._in_place: tuple[int, ...] = ()  # the tensor inputs a replay reads where they are
        self._static_out: tuple = ()

    def forward(self, *args):
        out = self._run(args)
        return out[0] if self.bare else out

    def _run(self, args) -> tuple:
        if self.fn is None:
            self.fn = self._compile(self.stage, list(args))
        if not _capturable(args):
            return self.fn(*args)
        if self.graph is not None:
            if self._fits(args):
                return self._replay(args)
            self._release()
        ptrs = tuple(a.data_ptr() if isinstance(a, Tensor) else 0 for a in args)
        if self.eager_calls < WARMUP:
            self.eager_calls += 1
            self._last_ptrs = ptrs
            return self.fn(*args)
        try:
            self._capture(args, stable=[_in_place(a, p, q) for a, p, q in zip(args, ptrs, self._last_ptrs)])
        except RuntimeError as error:  # e.g. a host sync inside the stage
            # A failed capture can leave CUDA state (the RNG's capture bookkeeping) unusable: no quiet fallback.
            raise RuntimeError(f"kvfx: a decode stage of {len(self.stage.graph.nodes)} nodes could not be captured "
                               f"in a CUDA graph ({error}); compile without options['cuda_graphs']") from error
        return self._replay(args)

    def _fits(self, args) -> bool:
        """Whether a replay computes this call: the inputs read in place are where the graph reads them, and the
        copied ones have the static buffers' layout (dynamo's guards already fixed every input's shape, stride and
        dtype; this catches what a stage's eager neighbours hand it)."""
        static_in = self._static_in
        for i in self._in_place:
            if args[i].data_ptr() != static_in[i].data_ptr():
                return False  # an input read in place moved
        for i in self._copied:
            a, s = args[i], static_in[i]
            if a.shape != s.shape or a.stride() != s.stride() or a.dtype != s.dtype:
                return False
        return True

    def _capture(self, args, stable: list[bool]) -> None:
        static_in, copied = [], []
        for i, (a, keep) in enumerate(zip(args, stable)):
            if isinstance(a, Tensor) and not keep:
                static_in.append(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device))
                copied.append(i)
            else:
                static_in.append(a)
        for i in copied:
            static_in[i].copy_(args[i])
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="relaxed")  # a kernel first loaded here loads its module
            try:
                out = self.fn(*static_in)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self.graph, self._static_in, self._copied = graph, static_in, tuple(copied)
        self._in_place = tuple(i for i, a in enumerate(args) if isinstance(a, Tensor) and i not in copied)
        self._static_out = tuple(out)
        for t in self._static_out:
            if isinstance(t, Tensor):
                _STATIC_OUTPUTS[t.data_ptr()] = _STATIC_OUTPUTS.get(t.data_ptr(), 0) + 1
        self.captures += 1
        counters["kvfx"]["stage_captures"] += 1

    def _replay(self, args):
        if self._copied:
            torch._foreach_copy_([self._static_in[i] for i in self._copied], [args[i] for i in self._copied])
        self.graph.replay()
        self.replays += 1
        counters["kvfx"]["stage_replays"] += 1
        return tuple(t.clone() if i in self.escaping and isinstance(t, Tensor) else t
                     for i, t in enumerate(self._static_out))

    def _release(self) -> None:
        """Drop the graph (an input moved or changed layout): warm up again, then capture anew."""
        for t in self._static_out:
            if isinstance(t, Tensor):
                left = _STATIC_OUTPUTS.get(t.data_ptr(), 0) - 1
                if left > 0:
                    _STATIC_OUTPUTS[t.data_ptr()] = left
                else:
                    _STATIC_OUTPUTS.pop(t.data_ptr(), None)
        self.graph, self._static_in, self._static_out, self._copied, self._in_place = None, [], (), (), ()
        self.eager_calls = 0
        self._last_ptrs = None


def _return_tuple(stage: GraphModule) -> bool:
    """Make ``stage`` return a tuple; True if it returned a bare value."""
    if returns_tuple(stage):
        return False
    output = output_node(stage)
    output.args = ((output.args[0],),)
    stage.recompile()
    return True


def _in_place(arg, ptr: int, last_ptr: int) -> bool:
    """Whether a replay may read ``arg`` where it is instead of copying it into a static buffer."""
    if not isinstance(arg, Tensor):
        return True
    if isinstance(arg, torch.nn.Parameter) or ptr in _STATIC_OUTPUTS:
        return True
    return ptr == last_ptr and arg.untyped_storage().nbytes() >= IN_PLACE_BYTES


def _capturable(args) -> bool:
    tensors = [a for a in args if isinstance(a, Tensor)]
    return bool(tensors) and all(t.is_cuda for t in tensors) and not torch.cuda.is_current_stream_capturing()


def replay_static_stages(split: GraphModule, stages: Sequence[Stage],
                         compile: Callable[[GraphModule, list], Callable]) -> GraphModule:
    """Replace every static stage of ``split`` by a :class:`ReplayedStage` compiling it with ``compile``; attention
    stages call kvfx's attention implementation directly (they run eagerly: the dispatcher's custom-op layers
    would only add host time)."""
    for stage in stages:
        if stage.kind == STATIC:
            setattr(split, stage.name, ReplayedStage(getattr(split, stage.name), compile, stage.escaping))
        elif stage.kind == ATTENTION:
            _call_directly(getattr(split, stage.name))
    return split


def _call_directly(stage: GraphModule) -> None:
    for node in stage.graph.nodes:
        if is_attention(node):
            node.target = attention_impl
    stage.recompile()


def replayed_stages(split: GraphModule) -> list[ReplayedStage]:
    """The replayed stages of a split module, in call order (for tests and tools)."""
    return [m for m in split.children() if isinstance(m, ReplayedStage)]


__all__ = ["ReplayedStage", "replay_static_stages", "replayed_stages", "WARMUP"]
