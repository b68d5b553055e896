"""benchmarks/quant_ablation.py (GEAR's ablation): the three reconstruction errors on a synthetic block with planted
low-rank structure and outliers, and a --quick run of the script on codelm-27m (skipped without the shared assets).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kvfx.kernels.gear import gear_compress_reference, gear_reconstruct

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("quant_ablation", ROOT / "benchmarks/quant_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = load_script()


def planted(seed: int = 0, tokens: int = 256, channels: int = 64) -> torch.Tensor:
    """[1, 2, T, C]: a rank-2 signal, small noise, and one large entry (either sign) in every key row (a channel of
    128 tokens) and every value row (a token)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, 2, tokens, 2, generator=gen)
    v = torch.randn(1, 2, 2, channels, generator=gen)
    x = u @ v + 0.3 * torch.randn(1, 2, tokens, channels, generator=gen)
    sign = lambda *shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1  # noqa: E731
    for t0 in range(0, tokens, 128):  # keys: one outlier per channel per 128-token group
        at = torch.randint(t0, t0 + 128, (channels,), generator=gen)
        x[0, :, at, torch.arange(channels)] += 12 * sign(2, channels)
    at = torch.randint(0, channels, (tokens,), generator=gen)  # values: one outlier per token
    x[0, :, torch.arange(tokens), at] += 12 * sign(2, tokens)
    return x


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["keys", "values"])
def test_errors_strictly_fall_on_planted_structure(kind, bits):
    x = planted()
    config = ablation.CONFIGS["outliers-on"][kind]
    errors = [ablation.rel_error(x, ablation.reconstruct(x, kind, variant, bits, config["group"], 2,
                                                         config["outliers"])[0])
              for variant in ablation.VARIANTS]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.8 * errors[0]  # the planted outliers dominate the ranges: removing them is a clear gain


def test_quant_variant_is_gear_without_terms_and_defaults_keep_no_outliers_at_head_dim_64():
    x = planted(1)
    for kind in ("keys", "values"):
        quant, _ = ablation.reconstruct(x, kind, "quant", 4, 32, 2, 0.02)
        qt, terms = gear_compress_reference(x, kind, 4, 32, 0, 0.0)
        assert torch.equal(quant, gear_reconstruct(qt, terms))
        # the spec defaults (group 32, outliers 0.02) keep no outliers in 32-token key rows or 64-channel value rows
        low, _ = ablation.reconstruct(x, kind, "+lowrank", 4, 32, 2, 0.02)
        out, _ = ablation.reconstruct(x, kind, "+outliers", 4, 32, 2, 0.02)
        assert torch.equal(low, out)


def test_judge_marks_steps_and_failures():
    row = {"config": "outliers-on", "rank": 2, "outliers_per_side": 1,
           "error": {"quant": 0.3, "+lowrank": 0.2, "+outliers": 0.2},
           "error_per_layer": {"quant": [0.3], "+lowrank": [0.2], "+outliers": [0.2]}}
    defaults = dict(row, config="defaults", outliers_per_side=0)
    judged = ablation.judge([row, defaults])
    assert judged[0]["falls"] == {"quant>+lowrank": True, "+lowrank>+outliers": False} and not judged[0]["passed"]
    assert judged[1]["judged"] == {"quant>+lowrank": True, "+lowrank>+outliers": False} and judged[1]["passed"]


def test_quick_run_writes_results(tmp_path, monkeypatch):
    try:
        from kvfx.assets import asset

        asset("codelm-27m")
    except FileNotFoundError as missing:
        pytest.skip(f"shared assets not found (set KVFX_ASSETS): {missing}")
    monkeypatch.setenv("KVFX_RESULTS_DIR", str(tmp_path))
    assert ablation.main(["--quick", "--ranks", "2"]) == 0
    saved = json.loads((tmp_path / "quant_ablation_quick.json").read_text())
    meta, rows = saved["meta"], saved["rows"]
    assert meta["tokens"] == 256 and meta["criterion_met"] and meta["layers"] == 8 and meta["head_dim"] == 64
    assert {(r["config"], r["bits"], r["kind"]) for r in rows} == {
        (c, b, k) for c in ablation.CONFIGS for b in (2, 4) for k in ("keys", "values")}
    for r in rows:
        assert len(r["error_per_layer"]["quant"]) == 8 and set(r["attention_error"]) == set(ablation.VARIANTS)
        assert r["outliers_per_side"] == (1 if r["config"] == "outliers-on" else 0)
    assert (tmp_path / "quant_ablation_quick.md").read_text().count("| outliers-on |") == 4
    assert (tmp_path / "quant_ablation_quick.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
