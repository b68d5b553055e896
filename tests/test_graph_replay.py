"""Decode graphs split into stages (kvfx.passes.partition) and replayed from CUDA graphs (kvfx.graph_replay,
backend option ``cuda_graphs``): the split computes what the graph computes, static stages hold no attention and no
symbolic size, prompts are never split, and on a GPU the replays give what the unsplit graph gives."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import free_symbols

import kvfx
from families import left_padded_batch, tiny_model
from kvfx.backend import rewrite_graph
from kvfx.graph_replay import WARMUP, ReplayedStage
from kvfx.passes.partition import ATTENTION, DYNAMIC, STATIC, split_stages
from kvfx.spec import Spec

WINDOW = {"version": 1, "default": {"evict": {"method": "window", "sink": 2, "budget": 6}}}
H2O = {"version": 1, "default": {"evict": {"method": "h2o", "budget": 6, "recent": 2}}}


def compile_kvfx(fn, **options):
    torch._dynamo.reset()
    kvfx.REPORTS.clear()
    counters.clear()
    return torch.compile(fn, backend="kvfx", options={"compiler": "aot_eager", "verbose": False, **options})


def _decode_graphs(family: str, attn: str, spec: dict, new_tokens: int = 4):
    """The rewritten graphs dynamo hands the backend during one generate(), split where they continue a cache."""
    graphs = []
    resolved = Spec.coerce(spec)

    def backend(gm, example_inputs):
        rewrite_graph(gm, resolved)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = tiny_model(family, attn)
    model.forward = torch.compile(model.forward, backend=backend)
    ids, mask = left_padded_batch([7, 5], seed=1)
    model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return model.config.num_hidden_layers, graphs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_decode_graph_splits_into_one_static_stage_per_gap_between_attention_calls(attn):
    layers, graphs = _decode_graphs("llama", attn, WINDOW)
    assert len(graphs) == 3  # the prompt, the first decode step (static sizes), later steps (symbolic length)
    for gm in graphs[1:]:
        nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        split, stages = split_stages(gm)
        kinds = [s.kind for s in stages]
        assert kinds.count(ATTENTION) == layers and kinds.count(STATIC) == layers + 1
        assert kinds.count(DYNAMIC) <= 2
        assert sum(s.nodes for s in stages) == len(nodes)
        for stage in stages:
            sub = getattr(split, stage.name)
            has_attention = any(n.target is torch.ops.kvfx.attention.default for n in sub.graph.nodes)
            assert has_attention == (stage.kind == ATTENTION)
            if stage.kind == STATIC:  # nothing a CUDA graph would bake in changes from step to step
                for node in sub.graph.nodes:
                    value = node.meta.get("example_value", node.meta.get("val"))
                    if isinstance(value, torch.Tensor):
                        assert not free_symbols(value), f"{stage.name}: {node.name} has a symbolic size"
                    assert not isinstance(value, torch.SymInt), f"{stage.name}: {node.name} is a SymInt"
        # the logits leave the last static stage and must outlive the next replay
        assert stages[-1].kind == STATIC and stages[-1].escaping


def test_the_symbolic_length_graph_keeps_its_mask_and_cache_views_out_of_static_stages():
    _, graphs = _decode_graphs("llama", "sdpa", WINDOW, new_tokens=5)
    split, stages = split_stages(graphs[-1])
    dynamic = [getattr(split, s.name) for s in stages if s.kind == DYNAMIC]
    targets = {str(n.target) for sub in dynamic for n in sub.graph.nodes}
    assert "expand" in targets and "narrow" in targets  # transformers' cache views are built on the host
    assert any(n.op == "placeholder" and free_symbols(n.meta["example_value"])
               for sub in dynamic for n in sub.graph.nodes
               if isinstance(n.meta.get("example_value"), torch.Tensor))


@pytest.mark.parametrize("family,attn,spec", [
    ("llama", "sdpa", WINDOW),
    ("llama", "eager", H2O),
    ("llama", "sdpa", None),
    ("mistral", "sdpa", WINDOW),  # sliding-window layers: their own cache views
])
def test_cuda_graphs_option_generates_what_the_unsplit_graph_does(family, attn, spec):
    """On the CPU the stages run without capture: the split alone must not change a token or a logit."""
    plain, split = tiny_model(family, attn), tiny_model(family, attn)
    ids, mask = left_padded_batch([7, 5, 6], seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    options = {} if spec is None else {"spec": spec}
    plain.forward = compile_kvfx(plain.forward, **options)
    expected = plain.generate(ids, **kwargs)
    split.forward = compile_kvfx(split.forward, cuda_graphs=True, **options)
    actual = split.generate(ids, **kwargs)
    layers = split.config.num_hidden_layers
    # the decode graphs with a symbolic size are split (one or two, by family and mask); never the prompt's
    assert counters["kvfx"]["replayed_stages"] in (layers + 1, 2 * (layers + 1))
    assert torch.equal(expected.sequences, actual.sequences)
    for e, a in zip(expected.scores, actual.scores, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same ops in the same order


@pytest.mark.parametrize("value", ["yes", 1])
def test_bad_cuda_graphs_option_is_rejected(value):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + 1, backend="kvfx", options={"cuda_graphs": value})
    with pytest.raises(Exception, match=f"options\\['cuda_graphs'\\] is {value!r}, not True or False"):
        fn(torch.ones(2))


def test_a_stage_on_the_cpu_runs_its_compiled_function_without_capture():
    stage = torch.fx.symbolic_trace(lambda x, w: (x @ w,))
    calls = []

    def compile_stage(gm, args):
        calls.append(len(args))
        return gm.forward

    replayed = ReplayedStage(stage, compile_stage, escaping=(0,))
    x, w = torch.randn(2, 3), torch.randn(3, 4)
    for _ in range(WARMUP + 2):
        torch.testing.assert_close(replayed(x, w)[0], x @ w)
    assert calls == [2] and replayed.captures == 0 and replayed.replays == 0


# ---- GPU: capture and replay ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_a_replayed_stage_copies_moved_inputs_reads_weights_in_place_and_clones_escaping_outputs():
    device = torch.device("cuda")
    weight = torch.nn.Parameter(torch.randn(64, 32, device=device), requires_grad=False)
    stage = torch.fx.symbolic_trace(lambda x, w: (torch.relu(x @ w), x.sum(dim=-1)))
    replayed = ReplayedStage(stage, lambda gm, args: gm.forward, escaping=(0,))
    results = []
    for step in range(WARMUP + 3):
        x = torch.randn(8, 64, device=device)  # a new tensor (a new address, most steps) at every call
        out, total = replayed(x, weight)
        results.append((out, x @ weight))
        torch.testing.assert_close(total, x.sum(dim=-1))
    assert replayed.captures == 1 and replayed.replays == 3
    for out, expected in results:  # escaping outputs are copies: later replays did not overwrite them
        torch.testing.assert_close(out, torch.relu(expected))
    other = torch.nn.Parameter(torch.randn(64, 32, device=device), requires_grad=False)
    x = torch.randn(8, 64, device=device)
    torch.testing.assert_close(replayed(x, other)[0], torch.relu(x @ other))  # a moved weight: no stale replay
    assert replayed.replays == 3


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [WINDOW, H2O, None])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_cuda_graph_replays_generate_what_the_unsplit_graph_does_on_a_gpu(spec, compiler):
    """fp32 on the GPU: every decode step after the warm-up replays the static stages; tokens equal and logits within
    1e-4 of the unsplit graph (inductor compiles each stage on its own, so its fusions differ from the whole
    graph's; aot_eager runs the same kernels in the same order)."""
    device = torch.device("cuda")
    plain, split = tiny_model("llama", "sdpa").to(device), tiny_model("llama", "sdpa").to(device)
    ids, mask = left_padded_batch([7, 5, 6], seed=4)
    ids, mask = ids.to(device), mask.to(device)
    new_tokens = 12
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    options = {"compiler": compiler} if spec is None else {"compiler": compiler, "spec": spec}
    plain.forward = compile_kvfx(plain.forward, **options)
    expected = plain.generate(ids, **kwargs)
    split.forward = compile_kvfx(split.forward, cuda_graphs=True, **options)
    actual = split.generate(ids, **kwargs)
    again = split.generate(ids, **kwargs)  # a second sequence replays the graphs captured for the first
    layers = split.config.num_hidden_layers
    assert counters["kvfx"]["replayed_stages"] == layers + 1  # the first step's graph has static sizes: not split
    # steps 2.. of the first call run the symbolic-length graph (the only one split): WARMUP eager calls, then
    # replays; the second call replays from its first decode step on (dynamo tries its newest graph first)
    replays = counters["kvfx"]["stage_replays"]
    assert replays % (layers + 1) == 0 and replays // (layers + 1) >= (new_tokens - 2 - WARMUP) + (new_tokens - 2)
    assert counters["kvfx"]["stage_captures"] == layers + 1
    tolerance = 0 if compiler == "aot_eager" else 1e-4
    for result in (actual, again):
        assert torch.equal(expected.sequences, result.sequences)
        for e, a in zip(expected.scores, result.scores, strict=True):
            torch.testing.assert_close(a, e, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
def test_a_stage_that_cannot_be_captured_raises_an_error_naming_the_option():
    """A stage that syncs with the host (``.item()``) cannot be captured: the error says so and names the option.
    Run in a subprocess: a failed capture leaves the CUDA RNG's capture bookkeeping unusable for the process."""
    script = (
        "import torch\n"
        "from kvfx.graph_replay import ReplayedStage, WARMUP\n"
        "stage = torch.fx.symbolic_trace(lambda x: (x + 1,))\n"
        "syncing = lambda x: (x * (2.0 if x.sum().item() > -1e30 else 0.0),)\n"
        "replayed = ReplayedStage(stage, lambda gm, args: syncing, escaping=(0,))\n"
        "for _ in range(WARMUP + 1):\n"
        "    replayed(torch.randn(4, 8, device='cuda'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "could not be captured in a CUDA graph" in result.stderr
    assert "compile without options['cuda_graphs']" in result.stderr
