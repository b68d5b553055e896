"""kvfx bench: the command's CUDA check, the byte and floor arithmetic, the configuration list, the report writers,
quanto's unpack, and a CPU smoke run of the timing loop (tiny Llama, DynamicCache and kvfx)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kvfx.bench import BenchError, build_configs, measure, run_bench, schedule
from kvfx.bench_models import (
    LLAMA_1B,
    LLAMA_1B_PARAMETERS,
    TINY_LLAMA,
    Workload,
    cache_bytes,
    floor_ms,
    kv_cache_bytes,
    load_model,
    parameter_count,
    parse_sizes,
    random_config,
    weight_bytes_read,
)
from kvfx.bench_report import (
    goals,
    latest,
    load_results,
    markdown,
    memory_cut,
    merge_rows,
    plot_bench,
    speedup,
    write_results,
)
from kvfx.cli import main

GiB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------------------------


def test_bench_command_says_it_needs_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["bench", "--sizes", "1x64", "--model-sizes", "none",
                                       "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    assert "needs CUDA" in result.output and "--plot-only" in result.output
    assert not (tmp_path / "b.json").exists()


def test_run_bench_refuses_cpu_unless_allowed():
    with pytest.raises(BenchError, match="needs CUDA"):
        run_bench([Workload(TINY_LLAMA, 1, 8)], build_configs(), device="cpu")


def test_bad_options_name_the_bad_value():
    with pytest.raises(ValueError, match="'8by32'"):
        parse_sizes("8by32", LLAMA_1B)
    with pytest.raises(ValueError, match="'0x32'"):
        parse_sizes("1x8,0x32", LLAMA_1B)
    with pytest.raises(ValueError, match="budget 1.5"):
        build_configs(budgets=(1.5,))
    with pytest.raises(ValueError, match=r"\['lru'\].*known: window"):
        build_configs(policies=("h2o", "lru"))
    with pytest.raises(ValueError, match=r"bits \[3\]"):
        build_configs(bits=(4, 3))
    with pytest.raises(ValueError, match=r"\['kvfx lru'\].*known: dynamic"):
        build_configs(only=("dynamic", "kvfx lru"))


def test_parse_sizes():
    assert parse_sizes("8x32768, 1X8192", LLAMA_1B) == [Workload(LLAMA_1B, 8, 32768), Workload(LLAMA_1B, 1, 8192)]
    assert parse_sizes("none", LLAMA_1B) == [] and parse_sizes("", LLAMA_1B) == []
    assert Workload("/x/codelm-27m", 8, 2048).label == "codelm-27m B=8 T=2048"


def test_configs_run_baselines_first_and_cover_every_policy(tmp_path):
    profile = tmp_path / "m.json"
    configs = build_configs(budgets=(0.25, 0.125), bits=(4, 2), new_tokens=48, profile=profile)
    names = [c.name for c in configs]
    assert names[:3] == ["dynamic", "static+compile", "kvfx"]
    for policy in ("window", "h2o", "keyformer", "snapkv"):
        assert f"kvfx {policy} 0.25" in names and f"kvfx {policy} 0.125" in names
    assert {"quanto-4", "quanto-2", "kvfx kivi-4", "kvfx gear-2", "kvfx razor"} <= set(names)
    by_name = {c.name: c for c in configs}
    assert [by_name[n].tier for n in ("kvfx", "quanto-4", "kvfx h2o 0.25", "quanto-2", "kvfx h2o 0.125")] == \
        [1, 2, 2, 3, 3]
    assert by_name["quanto-2"].x == 2 / 16 and by_name["kvfx snapkv 0.125"].x == 0.125
    assert by_name["kvfx keyformer 0.25"].spec["default"]["evict"]["max_new_tokens"] == 48
    assert by_name["kvfx razor"].spec["default"]["evict"]["profile"] == str(profile.resolve())
    assert by_name["kvfx razor"].model == "m"  # razor runs only on the model its profile was made for
    workloads = [Workload(LLAMA_1B, 1, 64), Workload("/models/m", 1, 64)]
    assert [w.model_name for w, c in schedule(workloads, configs) if c.name == "kvfx razor"] == ["m"]
    assert "kvfx razor" not in [c.name for c in build_configs()]  # no profile, no razor
    assert [c.name for c in build_configs(only=("kvfx", "dynamic"))] == ["dynamic", "kvfx"]


def test_schedule_puts_the_first_workload_first():
    configs = build_configs(budgets=(0.25, 0.125), policies=("h2o",), bits=(4,),
                            only=("dynamic", "kvfx", "quanto-4", "kvfx h2o 0.25", "kvfx h2o 0.125"))
    big, small = Workload(LLAMA_1B, 8, 32768), Workload(LLAMA_1B, 1, 8192)
    order = [(w.batch, c.name) for w, c in schedule([big, small], configs)]
    assert order == [(8, "dynamic"), (8, "kvfx"),  # priority 1: the first workload's baselines
                     (8, "quanto-4"), (8, "kvfx h2o 0.25"), (1, "dynamic"), (1, "kvfx"),  # 2
                     (8, "kvfx h2o 0.125"), (1, "quanto-4"), (1, "kvfx h2o 0.25"),  # 3
                     (1, "kvfx h2o 0.125")]


# ----------------------------------------------------------------------------------------------------------------
# Bytes and the floor.
# ----------------------------------------------------------------------------------------------------------------


def test_llama_1b_shape_has_llama_3_2_1b_parameter_count():
    from transformers import LlamaForCausalLM

    config = random_config(LLAMA_1B, 131072)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    # embedding 128256 x 2048 (tied to the head) + 16 x (attention 2 x 2048^2 + 2 x 2048 x 512, MLP 3 x 2048 x 8192,
    # two norms) + the final norm
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert parameter_count(model) == 128256 * 2048 + 16 * layer + 2048 == LLAMA_1B_PARAMETERS
    assert weight_bytes_read(model) == 2 * LLAMA_1B_PARAMETERS  # tied: the head reads the embedding once
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (16, 32, 8, 64)
    # B=8, T=32768: 2 (K, V) x 16 layers x 8 rows x 8 KV heads x 32768 x 64 x 2 bytes = 8 GiB
    assert kv_cache_bytes(config, 8, 32768, 2) == 8 * GiB


def test_untied_input_embedding_is_not_read_by_a_decode_step():
    model = load_model(TINY_LLAMA, "cpu", torch.float32, 64)
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is not embedding
    total = sum(p.numel() for p in model.parameters()) * 4
    assert weight_bytes_read(model) == total - embedding.numel() * 4


def test_floor_is_bytes_over_bandwidth():
    assert floor_ms(2_000_000_000, 1_000_000_000, 3e12) == pytest.approx(1.0)
    # the 1B shape at B=8, T=32768 on a 3 TB/s copy: (2.47 GB + 8.59 GB) / 3 TB/s
    assert floor_ms(2 * LLAMA_1B_PARAMETERS, 8 * GiB, 3e12) == pytest.approx(3.687, abs=1e-3)
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        floor_ms(1, 1, 0)


def test_cache_bytes_counts_each_storage_once():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(2, 3, 5, 4)
    cache.update(k, k.clone(), 0)
    assert cache_bytes(cache) == 2 * k.numel() * 4
    handle = torch.zeros(1, 1, 1, 1)  # kvfx's cache tensors: views of one 4-byte handle, in every layer
    views = DynamicCache()
    for layer in range(3):
        views.update(k, k, layer)
        views.layers[layer].keys = views.layers[layer].values = handle.expand(2, 3, 5, 4)
    assert cache_bytes(views) == 4


# ----------------------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------------------


def _row(config, kind, method, decode_ms, over_gib, kv_gib, x=None, bits=None, status="ok", message=""):
    row = {"model": "llama-1b", "batch": 8, "prompt": 32768, "new_tokens": 32, "config": config, "kind": kind,
           "method": method, "x": x, "bits": bits, "status": status, "message": message,
           "floor_ms": 3.5, "weight_bytes_read": 2 * LLAMA_1B_PARAMETERS, "kv_full_bytes": 8 * GiB,
           "floor_kv_bytes": 8_030_000_000, "bandwidth_bytes_per_s": 3e12}
    if status == "ok":
        row.update(decode_ms=decode_ms, tokens_per_s=8e3 / decode_ms, ttft_ms=2500.0,
                   per_repeat=[{"decode_ms": decode_ms * f} for f in (1.25, 1.0, 0.9)],
                   peak_bytes=int((over_gib + 2.3) * GiB), peak_over_weights_bytes=int(over_gib * GiB),
                   kv_bytes=int(kv_gib * GiB), kv_share=kv_gib / 8, x_floor=decode_ms / 3.5)
    return row


def _payload():
    rows = [
        _row("dynamic", "dynamic", "dynamic", 15.0, 22.0, 8.0),
        _row("static+compile", "static", "static", 10.0, 20.0, 8.0),
        _row("kvfx", "kvfx", "identity", 9.5, 19.0, 8.0),
        _row("quanto-4", "quanto", "quanto", 18.0, 19.5, 2.2, x=0.25, bits=4),
        _row("kvfx window 0.25", "kvfx", "window", 4.5, 6.0, 2.0, x=0.25),
        _row("kvfx h2o 0.25", "kvfx", "h2o", 4.0, 5.0, 2.0, x=0.25),
        _row("kvfx h2o 0.125", "kvfx", "h2o", 3.0, 4.0, 1.0, x=0.125),
        _row("kvfx kivi-4", "kvfx", "kivi", None, None, None, x=0.25, bits=4, status="skipped",
             message="kivi | not implemented yet"),
    ]
    codelm = {**_row("dynamic", "dynamic", "dynamic", 5.0, 0.5, 0.1), "model": "codelm-27m", "prompt": 2048}
    return {"meta": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.17.0",
                     "dtype": "bfloat16", "new_tokens": 32, "repeats": 3},
            "bandwidth": {"bytes_per_s": 3e12}, "rows": rows + [codelm]}


def test_speedup_and_memory_cut_are_against_the_faster_stock_baseline():
    rows = _payload()["rows"]
    baseline = rows[1]
    assert speedup(rows[5], baseline) == pytest.approx(2.5)
    assert memory_cut(rows[5], baseline) == pytest.approx(4.0, rel=1e-6)
    assert speedup(rows[7], baseline) is None  # a skipped row


def test_goals_are_checked_at_the_1b_shape_b8_t32768():
    lines = goals(_payload()["rows"])
    assert lines[0] == "- best stock baseline: static+compile (10.00 ms/step)"
    assert lines[1].endswith("1.05x its tokens/s: met")
    assert "best kvfx h2o 0.25: 2.50x tokens/s, 4.00x less: met" in lines[2]
    slow = [dict(r, decode_ms=12.0) if r["config"] == "kvfx" else r for r in _payload()["rows"]]
    assert goals(slow)[1].endswith("0.83x its tokens/s: not met")
    unmet = [r for r in _payload()["rows"] if r["config"] != "kvfx h2o 0.25"]  # window: 2.22x but only 3.33x
    assert goals(unmet)[2].endswith("best kvfx window 0.25: 2.22x tokens/s, 3.33x less: not met")
    assert goals([r for r in _payload()["rows"] if r["model"] == "codelm-27m"]) == []


def test_markdown_and_json_from_hand_made_rows(tmp_path):
    payload = _payload()
    json_path, md_path = write_results(payload, tmp_path / "out" / "bench_x.json")
    assert md_path == tmp_path / "out" / "bench_x.md"
    assert load_results(json_path) == json.loads(json.dumps(payload))
    text = md_path.read_text()
    assert text == markdown(payload)
    assert "# kvfx bench: NVIDIA H100 80GB HBM3" in text
    assert "## llama-1b B=8 T=32768" in text and "## codelm-27m B=8 T=2048" in text
    assert "floor 3.500 ms/step: 2.47 GB weights + 8.03 GB KV read at 3.00 TB/s" in text
    lines = text.splitlines()
    h2o = next(line for line in lines if line.startswith("| kvfx h2o 0.25 |"))
    assert h2o.split(" | ")[1:5] == ["4.00", "3.6-5.0", "2000", "2.50x"]  # median, calls min-max, tokens/s
    assert "| 4.00x |" in h2o
    kivi = next(line for line in lines if line.startswith("| kvfx kivi-4 |"))
    assert kivi.endswith("| skipped: kivi \\| not implemented yet |")  # the pipe in a message is escaped
    with pytest.raises(ValueError, match="no 'rows' list"):
        (tmp_path / "bad.json").write_text("{}")
        load_results(tmp_path / "bad.json")


def test_merge_keeps_measured_rows_a_new_run_did_not_measure():
    old = _payload()["rows"]
    new = [_row("kvfx", "kvfx", "identity", 9.0, 19.0, 8.0),  # re-measured: replaces
           _row("kvfx h2o 0.25", "kvfx", "h2o", None, None, None, status="skipped", message="time budget"),
           {**_row("dynamic", "dynamic", "dynamic", 7.0, 1.0, 1.0), "batch": 1},  # a new workload: appended
           _row("kvfx kivi-4", "kvfx", "kivi", 8.0, 3.0, 2.0, x=0.25, bits=4)]  # measured now: replaces a skip
    merged = merge_rows(old, new)
    assert [r["config"] for r in merged] == [r["config"] for r in old] + ["dynamic"]
    by_key = {(r["batch"], r["prompt"], r["config"]): r for r in merged}
    assert by_key[(8, 32768, "kvfx")]["decode_ms"] == 9.0
    assert by_key[(8, 32768, "kvfx h2o 0.25")]["decode_ms"] == 4.0  # the measured row stays
    assert by_key[(8, 32768, "kvfx kivi-4")]["status"] == "ok"
    assert by_key[(1, 32768, "dynamic")]["decode_ms"] == 7.0


def test_plot_from_hand_made_rows(tmp_path):
    pytest.importorskip("matplotlib")
    png = plot_bench(_payload(), tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(png).shape[:2]
    assert width > 1000 and height > 2 * 300  # two workloads: two rows of two panels
    with pytest.raises(ValueError, match="no measured rows"):
        plot_bench({"rows": [_row("kvfx kivi-4", "kvfx", "kivi", 0, 0, 0, status="skipped")]}, tmp_path / "n.png")


def test_plot_only_redraws_from_a_results_file(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench_gpu.json"
    path.write_text(json.dumps(_payload()))
    result = CliRunner().invoke(main, ["bench", "--plot-only", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench_gpu.png").exists()
    assert "## llama-1b B=8 T=32768" in (tmp_path / "bench_gpu.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# quanto's unpack.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rows", [8, 7, 1])
def test_torch_unpack_inverts_quanto_packing(bits, rows):
    packed_module = pytest.importorskip("optimum.quanto.tensor.packed")
    from kvfx.bench_quanto import unpack

    values = torch.randint(0, 2**bits, (rows, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = packed_module.pack_weights(values, bits)
    assert torch.equal(unpack(packed, bits)[:rows], values)


def test_unpack_rejects_other_widths():
    from kvfx.bench_quanto import prepare_quanto, unpack

    with pytest.raises(ValueError, match="bits must be 2 or 4, got 3"):
        unpack(torch.zeros(2, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="'fast' is not one of auto, torch, extension"):
        prepare_quanto("cpu", "fast")


# ----------------------------------------------------------------------------------------------------------------
# End to end on a CPU: the timing loop, the skips, the time budget.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run():
    configs = build_configs(policies=("kivi",), bits=(4,), new_tokens=4,
                            only=("dynamic", "static+compile", "kvfx", "quanto-4", "kvfx kivi-4"))
    workload = Workload(TINY_LLAMA, 1, 32)
    logged = []
    payload = run_bench([workload], configs, new_tokens=4, repeats=1, warmup_tokens=4, device="cpu",
                        allow_cpu=True, log=logged.append)
    return payload, logged


def test_kvfx_options_reach_every_kvfx_configuration_and_the_report():
    """``kvfx bench --cuda-graphs`` passes the backend option to the kvfx rows (their decode graph is split into
    stages: kvfx.graph_replay) and records it; the stock baseline is untouched."""
    from torch._dynamo.utils import counters

    counters.clear()
    payload = run_bench([Workload(TINY_LLAMA, 1, 16)], build_configs(only=("dynamic", "kvfx")), new_tokens=6,
                        repeats=1, warmup_tokens=6, device="cpu", allow_cpu=True, log=lambda _: None,
                        kvfx_options={"cuda_graphs": True})
    assert [r["status"] for r in payload["rows"]] == ["ok", "ok"]
    assert payload["meta"]["kvfx_options"] == {"cuda_graphs": True}
    assert counters["kvfx"]["replayed_stages"] >= 3  # the tiny model's 2 layers: 3 static stages per split graph
    assert "- kvfx backend options: cuda_graphs=True" in markdown(payload)


def test_cpu_smoke_run_times_dynamic_cache_and_kvfx(tiny_run):
    payload, logged = tiny_run
    rows = {r["config"]: r for r in payload["rows"]}
    assert payload["meta"]["compiler"] == "aot_eager" and payload["bandwidth"]["bytes_per_s"] > 0
    config = random_config(TINY_LLAMA, 4096)
    for name in ("dynamic", "kvfx"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["repeats"] == 1 and row["graphs_compiled_timed"] == 0 and row["discarded_repeats"] == 0
        assert row["run"] == payload["meta"]["date"]  # what keeps merged runs apart
        assert row["decode_ms"] > 0 and row["ttft_ms"] > 0 and row["peak_bytes"] is None
        assert row["tokens_per_s"] == pytest.approx(1e3 / row["decode_ms"])
        assert row["x_floor"] == pytest.approx(row["decode_ms"] / row["floor_ms"])
    # 4 new tokens: the prefill and 3 decode forwards, so the cache holds 32 + 3 tokens
    assert rows["dynamic"]["kv_bytes"] == kv_cache_bytes(config, 1, 35, 4) and not rows["dynamic"]["kvfx_state"]
    assert rows["kvfx"]["kvfx_state"] and rows["kvfx"]["kv_bytes"] >= kv_cache_bytes(config, 1, 35, 4)
    assert rows["kvfx"]["graphs_compiled_warmup"] >= 2  # the prefill and the decode graphs
    assert len(rows["kvfx"]["kvfx_rewritten"]) >= 2 and set(rows["kvfx"]["kvfx_rewritten"]) == {"2/2"}
    assert rows["dynamic"]["kvfx_rewritten"] == [] and rows["dynamic"]["graphs_compiled_warmup"] == 0
    assert rows["static+compile"]["status"] == "skipped" and "needs CUDA" in rows["static+compile"]["message"]
    # KIVI's default value group (32 channels) cannot split the tiny model's 16-channel heads: refused when compiling
    assert rows["kvfx kivi-4"]["status"] == "skipped"
    assert "group 32 must divide head_dim 16" in rows["kvfx kivi-4"]["message"], rows["kvfx kivi-4"]["message"]
    assert any(line.startswith("tiny-llama B=1 T=32 kvfx: decode") for line in logged)


def test_cpu_smoke_run_quanto_cache(tiny_run):
    rows = {r["config"]: r for r in tiny_run[0]["rows"]}
    quanto = rows["quanto-4"]
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        assert quanto["status"] == "skipped" and "optimum-quanto is not installed" in quanto["message"]
        return
    assert quanto["status"] == "ok", quanto
    assert quanto["graphs_compiled_timed"] == 0 and quanto["decode_ms"] > 0
    assert "torch ops" in tiny_run[0]["meta"]["quanto_unpack"]  # the C++ extension was not built
    # the 32-token prompt quantized to 4 bits (+ scales and shifts), the 3 decoded tokens in full precision
    assert quanto["kv_bytes"] < rows["dynamic"]["kv_bytes"] / 2


def test_time_budget_skips_and_records(tmp_path):
    saved = []
    payload = run_bench([Workload(TINY_LLAMA, 1, 16)], build_configs(only=("dynamic",)), new_tokens=2, repeats=1,
                        device="cpu", allow_cpu=True, time_budget=0.0, log=lambda _: None,
                        on_row=lambda p: saved.append(len(p["rows"])))
    (row,) = payload["rows"]
    assert row["status"] == "skipped" and row["message"].startswith("time budget")
    assert saved == [1]


def test_a_failure_that_loses_the_cuda_context_skips_the_rest_and_keeps_the_rows(monkeypatch):
    """An illegal memory access is sticky: the failing row keeps its error and traceback, every later configuration
    is listed as not run (instead of the run dying in the clean-up and losing every row)."""
    import kvfx.bench as bench

    broken = []

    def measure_fails(model, config, *args, **kwargs):
        if config.name == "kvfx":
            broken.append(config.name)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return measure(model, config, *args, **kwargs)

    def release(device):
        if broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "measure", measure_fails)
    monkeypatch.setattr(bench, "_release", release)
    saved = []
    payload = run_bench([Workload(TINY_LLAMA, 1, 16), Workload(TINY_LLAMA, 2, 16)],
                        build_configs(only=("dynamic", "kvfx")), new_tokens=2, repeats=1, device="cpu",
                        allow_cpu=True, log=lambda _: None, on_row=lambda p: saved.append(len(p["rows"])))
    rows = [(r["batch"], r["config"], r["status"]) for r in payload["rows"]]
    assert rows == [(1, "dynamic", "ok"), (1, "kvfx", "error"), (2, "dynamic", "skipped"), (2, "kvfx", "skipped")]
    failed = payload["rows"][1]
    assert "illegal memory access" in failed["message"] and "illegal memory access" in failed["traceback"]
    assert all(r["message"] == "not run: the CUDA context was lost when kvfx on tiny-llama B=1 T=16 failed "
               "(RuntimeError)" for r in payload["rows"][2:])
    assert saved == [1, 2, 3, 4]


def test_measure_rejects_too_few_tokens():
    model = load_model(TINY_LLAMA, "cpu", torch.float32, 64)
    with pytest.raises(ValueError, match=r"new_tokens \(1\) must be >= 2"):
        measure(model, build_configs(only=("dynamic",))[0], Workload(TINY_LLAMA, 1, 8), new_tokens=1)


# ----------------------------------------------------------------------------------------------------------------
# GPU.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_has_no_recompiles_in_the_timed_region():
    names = ["dynamic", "static+compile", "kvfx", "kvfx h2o 0.25", "quanto-4"]
    configs = build_configs(budgets=(0.25,), policies=("h2o",), bits=(4,), new_tokens=16, only=names)
    payload = run_bench([Workload(TINY_LLAMA, 2, 256)], configs, new_tokens=16, repeats=2, log=lambda _: None)
    rows = {r["config"]: r for r in payload["rows"]}
    config = random_config(TINY_LLAMA, 4096)
    for name in names:
        row = rows[name]
        if name == "quanto-4" and row["status"] == "skipped":  # where optimum-quanto is missing
            assert "optimum-quanto" in row["message"]
            continue
        assert row["status"] == "ok", row
        assert row["graphs_compiled_timed"] == 0 and row["repeats"] == 2
        assert row["peak_bytes"] > row["base_bytes"] >= row["resident_bytes"] > 0 and row["decode_ms"] > 0
        assert row["leftover_bytes"] < 256 * 2**20, "an earlier configuration left memory behind"
    assert rows["static+compile"]["graphs_compiled_warmup"] >= 1  # generate() compiled the decode step
    full = kv_cache_bytes(config, 2, 256 + 16, 2)  # bf16, max_cache_len = T + N slots
    assert full <= rows["static+compile"]["kv_bytes"] < full + 4096
    assert rows["kvfx h2o 0.25"]["kv_bytes"] < rows["kvfx"]["kv_bytes"] / 2


def _two_runs():
    """Run A measured everything; run B later measured dynamic again (faster, on a quieter host), kvfx identity again,
    kivi-4 (skipped in run A) and skipped h2o 0.25 (measured in run A)."""
    a, b = "2026-11-23T03:38:00+00:00", "2026-11-23T06:26:00+00:00"
    first = [dict(r, run=a) for r in _payload()["rows"]]
    second = [dict(r, run=b) for r in (
        _row("dynamic", "dynamic", "dynamic", 8.0, 22.0, 8.0),
        _row("kvfx", "kvfx", "identity", 9.0, 19.0, 8.0),
        _row("kvfx kivi-4", "kvfx", "kivi", 8.0, 3.0, 2.0, x=0.25, bits=4),
        _row("kvfx h2o 0.25", "kvfx", "h2o", None, None, None, status="skipped", message="time budget"))]
    return merge_rows(first, second)


def test_merge_keeps_every_runs_measured_rows_and_compares_rows_only_within_their_run():
    merged = _two_runs()
    goal = [(r["config"], r["run"][11:16], r["status"]) for r in merged if (r["batch"], r["prompt"]) == (8, 32768)]
    assert goal.count(("dynamic", "03:38", "ok")) == 1 and goal.count(("dynamic", "06:26", "ok")) == 1
    assert goal.count(("kvfx", "03:38", "ok")) == 1 and goal.count(("kvfx", "06:26", "ok")) == 1
    assert [g for g in goal if g[0] == "kvfx kivi-4"] == [("kvfx kivi-4", "06:26", "ok")]  # the skip is gone
    assert [g for g in goal if g[0] == "kvfx h2o 0.25"] == [("kvfx h2o 0.25", "03:38", "ok")]  # a later skip: not
    assert [r["decode_ms"] for r in latest(merged) if r["config"] == "kvfx"] == [9.0]  # what the plot draws
    lines = goals(merged)
    assert lines[:4] == ["- run 11-23 03:38:", "  - best stock baseline: static+compile (10.00 ms/step)",
                         "  - kvfx identity >= best stock baseline: 1.05x its tokens/s: met",
                         "  - 4-bit or 25% budget >= 2x tokens/s and >= 3.5x less peak memory above the weights: "
                         "best kvfx h2o 0.25: 2.50x tokens/s, 4.00x less: met"]
    # run B's rows are held to run B's dynamic (8 ms), never to run A's static+compile, and the reverse
    assert lines[4:7] == ["- run 11-23 06:26:", "  - best stock baseline: dynamic (8.00 ms/step)",
                          "  - kvfx identity >= best stock baseline: 0.89x its tokens/s: not met"]
    text = markdown({"meta": {}, "rows": merged})
    assert ("vs stock, by run: run 11-23 03:38: static+compile 10.00 ms/step; run 11-23 06:26: dynamic 8.00 "
            "ms/step (static+compile not measured)") in text
    rows = (line.split(" | ") for line in text.splitlines() if line.startswith("| kvfx"))
    cells = {(c[0][2:], c[12]): c for c in rows}
    assert cells[("kvfx", "11-23 03:38")][4] == "1.05x" and cells[("kvfx", "11-23 06:26")][4] == "0.89x"
    assert cells[("kvfx h2o 0.25", "11-23 03:38")][4] == "2.50x"
