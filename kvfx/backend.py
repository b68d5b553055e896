"""The ``kvfx`` torch.compile backend.

Found by torch through the ``torch_dynamo_backends`` entry point (pyproject.toml), so users need no ``import kvfx``.
kvfx never registers the name itself at import time: torch registers the entry point on first lookup, and a second
registration would trip the registry's duplicate-name assertion.

    model.forward = torch.compile(model.forward, backend="kvfx", options={"spec": "examples/specs/full.yaml"})

Options: ``spec`` (a path to YAML/JSON, a dict, or a :class:`kvfx.spec.Spec`; default: the identity policy),
``compiler`` ("inductor" (default), "aot_eager" or "eager": what runs the rewritten graph), ``verbose`` (default
True: print one summary line per compiled graph), ``cpp_wrapper`` (default False: inductor's C++ wrapper instead of
its Python one, which launches a graph's kernels with less host time per launch and compiles more slowly),
``cuda_graphs`` (default False: replay each decode graph's stretches between two attention calls from CUDA graphs,
kvfx.graph_replay; the attention calls and the mask built from the growing attention mask stay on the host),
``mlp_chunk_mib`` (default 256: an MLP whose intermediate ``[tokens, I]`` would exceed this many MiB, i.e. a long
prompt's, runs a block of tokens at a time, kvfx.passes.chunk_mlp, and inductor stores that graph's residual sums as
it goes, :data:`LONG_PROMPT_INDUCTOR`; 0 turns both off).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule

import kvfx.ops  # noqa: F401  (registers the kvfx custom ops the rewritten graphs call)
from kvfx.graph_replay import replay_static_stages
from kvfx.passes.chunk_mlp import chunk_mlps
from kvfx.passes.partition import is_growing_decode_graph, split_stages
from kvfx.passes.rewrite import (RewriteReport, find_attention_sites, head_dims, kv_heads, prompt_length,
                                 rewrite_attention)
from kvfx.plans import (check_implemented, check_profiles, check_prompt_budgets, check_quantization, compact_layers,
                        plan, register_plan)
from kvfx.spec import Spec, SpecError

COMPILERS = ("inductor", "aot_eager", "eager")
REPORTS: list[RewriteReport] = []  # one per compiled graph, newest last (for tests and tools)


@dataclass(frozen=True)
class BackendOptions:
    spec: Spec
    compiler: str = "inductor"
    verbose: bool = True
    cpp_wrapper: bool = False
    cuda_graphs: bool = False
    mlp_chunk_mib: float = 256

    @classmethod
    def parse(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        allowed = ("spec", "compiler", "verbose", "cpp_wrapper", "cuda_graphs", "mlp_chunk_mib")
        unknown = set(options) - set(allowed)
        if unknown:
            raise ValueError(f"kvfx: unknown backend option(s) {sorted(unknown)} (allowed: {', '.join(allowed)})")
        compiler = options.get("compiler", "inductor")
        if compiler not in COMPILERS:
            raise ValueError(f"kvfx: options['compiler'] is {compiler!r}, not one of {', '.join(COMPILERS)}")
        flags = {}
        for name in ("cpp_wrapper", "cuda_graphs"):
            flags[name] = options.get(name, False)
            if not isinstance(flags[name], bool):
                raise ValueError(f"kvfx: options[{name!r}] is {flags[name]!r}, not True or False")
        if flags["cpp_wrapper"] and compiler != "inductor":
            raise ValueError(f"kvfx: options['cpp_wrapper'] is inductor's; the compiler is {compiler!r}")
        chunk = options.get("mlp_chunk_mib", cls.mlp_chunk_mib)
        if isinstance(chunk, bool) or not isinstance(chunk, (int, float)) or not 0 <= chunk < float("inf"):
            raise ValueError(f"kvfx: options['mlp_chunk_mib'] is {chunk!r}, not a number of MiB >= 0 "
                             "(0 turns MLP chunking off)")
        return cls(Spec.coerce(options.get("spec")), compiler, bool(options.get("verbose", True)), **flags,
                   mlp_chunk_mib=chunk)


def kvfx_backend(gm: GraphModule, example_inputs, options: dict[str, Any] | None = None, mode: str | None = None):
    """Rewrite every attention of ``gm`` into kvfx ops, then compile the graph with the chosen compiler."""
    if mode not in (None, "default"):
        raise ValueError(f"kvfx: mode={mode!r} is not supported (kvfx's cache state advances on the host); "
                         "options={'cuda_graphs': True} replays a decode step's stretches between attention calls "
                         "from CUDA graphs")
    opts = BackendOptions.parse(options)
    report = rewrite_graph(gm, opts.spec)
    chunked = chunk_mlps(gm, int(opts.mlp_chunk_mib * 2**20))
    counters["kvfx"]["mlp_chunked"] += chunked
    if opts.verbose and report.sites:
        print(report.summary(opts.spec.summary()), file=sys.stderr)
    if opts.cuda_graphs and is_growing_decode_graph(gm):  # (the prompt's and first step's graphs run once a sequence)
        return _compile_replayed(gm, opts)
    return _compile(gm, example_inputs, opts.compiler, opts.cpp_wrapper, long_prompt=chunked > 0)


def _compile_replayed(gm: GraphModule, opts: BackendOptions):
    """A decode graph split into stages; each static stage compiled on its first call and then replayed from a CUDA
    graph (kvfx.graph_replay). The rewrite has already removed dead code, so no stage computes what nothing reads."""
    split, stages = split_stages(gm)
    counters["kvfx"]["replayed_stages"] += sum(stage.kind == "static" for stage in stages)

    def compile_stage(stage: GraphModule, example_args: list):
        return _compile(stage, example_args, opts.compiler, opts.cpp_wrapper)

    return replay_static_stages(split, stages, compile_stage).forward


def rewrite_graph(gm: GraphModule, spec: Spec) -> RewriteReport:
    """The graph pass alone: resolve the spec for this graph's attention layers and rewrite them."""
    check_implemented(spec)
    sites = find_attention_sites(gm.graph)
    plan_id = register_plan(spec, len(sites), kv_heads(sites)) if sites else -1
    tokens = prompt_length(sites)
    if plan_id >= 0:
        check_profiles(plan(plan_id), traced_model_config())
        check_quantization(plan(plan_id), head_dims(sites))
    if plan_id >= 0 and tokens is not None:  # a prefill graph of a known length: budgets can be checked now
        check_prompt_budgets(plan(plan_id), tokens)
    rope_layers = compact_layers(plan(plan_id)) if plan_id >= 0 else frozenset()
    report = rewrite_attention(gm, sites, plan_id, rope_layers)
    missing = [site.layer for site in report.rewritten if site.rope_missing]
    if missing:
        raise SpecError(f"{spec.source or '<spec>'}: evict.positions: 'compact' re-rotates kept keys, which "
                        "needs full-width rotate-half RoPE on the keys (Llama, Mistral, Qwen, Gemma); attention "
                        f"layers {missing} of this model have none kvfx recognises")
    counters["kvfx"]["attention_rewritten"] += len(report.rewritten)
    counters["kvfx"]["attention_unsupported"] += len(report.unsupported)
    counters["kvfx"]["mask_factored"] += sum(site.mask_factored for site in report.rewritten)
    for site in report.unsupported:
        warnings.warn(f"kvfx: attention layer {site.layer} ({site.kind}) left unchanged: {site.reason}", stacklevel=2)
    for site, name in report.leftovers:
        warnings.warn(f"kvfx: layer {site.layer}: the cache update {name} is still computed after the rewrite")
    for name in report.unrecognised:
        warnings.warn(f"kvfx: the KV-cache update {name} feeds an attention kvfx does not recognise; left unchanged")
    REPORTS.append(report)
    return report


def traced_model_config():
    """The transformers config of the model whose forward dynamo is compiling now, or None where it cannot be seen
    (a graph handed to :func:`rewrite_graph` directly, an object without a config).

    A graph carries no config, but the frame dynamo traces does: for ``torch.compile(model.forward)`` its first
    local is the model. Read through dynamo's current instruction translator (internal API; any failure: None)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        names = tx.f_code.co_varnames if tx is not None else ()
        owner = tx.f_locals.get(names[0]) if names else None
    except Exception:  # noqa: BLE001 - internal API: absent or changed means "unknown", never an error
        return None
    config = getattr(owner, "config", None)
    return config if callable(getattr(config, "to_dict", None)) else None


# Inductor settings for a long prompt's graph (one whose MLPs kvfx chunks). Inductor keeps a pointwise sum unstored
# until it reads 8 buffers, so the residual stream h + attn_0 + mlp_0 + attn_1 + ... lives as up to 8 summands of
# [tokens, hidden] each (1 GiB at B=8, T=32768 in the 1B shape); storing every sum as soon as it reads more than one
# buffer cut kvfx's window-25% prefill peak above the weights from 9.5 to 6.0 GiB on an H100 and did not slow the
# prompt (benchmarks/results/prefill_inductor_realize_h100.txt). Decode graphs keep inductor's defaults.
LONG_PROMPT_INDUCTOR = {"realize_acc_reads_threshold": 1}


def _compile(gm: GraphModule, example_inputs, compiler: str, cpp_wrapper: bool = False, long_prompt: bool = False):
    if compiler == "eager":
        return gm.forward
    if torch.is_grad_enabled():
        warnings.warn("kvfx: the model was compiled with gradients enabled; kvfx serves inference: no gradient "
                      "flows through its attention and cache (call the model under torch.no_grad() or "
                      "torch.inference_mode(), as generate() does)", stacklevel=3)
    if compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = {**({"cpp_wrapper": True} if cpp_wrapper else {}), **(LONG_PROMPT_INDUCTOR if long_prompt else {})}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


__all__ = ["kvfx_backend", "rewrite_graph", "traced_model_config", "BackendOptions", "REPORTS"]
