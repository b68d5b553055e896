"""Retrieval-head profiling (kvfx.head_profile, ``kvfx profile-heads``): score definitions on hand-built attention,
chunked scoring == scoring the whole softmax, head selection, determinism on a real model, and bad profiles."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from kvfx.assets import asset
from kvfx.cli import main
from kvfx.head_profile import (
    COPIES,
    HeadProfile,
    ProfileError,
    config_hash,
    copy_scores,
    layer_scores,
    load_profile,
    probe_ids,
    probe_length,
    profile_heads,
    select_retrieval_heads,
)

L = 3  # probe length of the hand-built cases: BOS + 4 copies of 3 tokens = 13 positions


def _hand_built_attention() -> torch.Tensor:
    """Rows of the probe tokens r = L .. 4L - 1 (positions r + 1) for four heads whose scores are known:
    0 attends the previous occurrence of its token, 1 the token after it, 2 is uniform over its causal prefix,
    3 attends the occurrence two copies back where there is one, else BOS."""
    t = 1 + COPIES * L
    rows = list(range(L, COPIES * L))
    probs = torch.zeros(4, len(rows), t)
    for n, r in enumerate(rows):
        probs[0, n, r - L + 1] = 1.0
        probs[1, n, r - L + 2] = 1.0
        probs[2, n, : r + 2] = 1.0 / (r + 2)
        probs[3, n, r - 2 * L + 1 if r >= 2 * L else 0] = 1.0
    return probs, torch.tensor(rows)


def test_echo_and_induction_scores_on_hand_built_attention():
    probs, rows = _hand_built_attention()
    echo, induction = copy_scores(probs, rows, L)
    n = len(rows)
    # head 2: uniform over r + 2 positions, of which floor(r / L) are earlier copies of the token (and as many
    # are the tokens after them)
    uniform = sum((r // L) / (r + 2) for r in rows.tolist())
    assert echo.tolist() == pytest.approx([n, 0.0, uniform, 2 * L])  # sums over the rows
    assert induction.tolist() == pytest.approx([0.0, n, uniform, 0.0])


def test_chunked_layer_scores_equal_the_whole_softmax():
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, length = 4, 2, 8, 5
    t = 1 + COPIES * length
    q, k = torch.randn(hq, t, d, generator=gen), torch.randn(hkv, t, d, generator=gen)
    logits = torch.einsum("htd,hsd->hts", q, k.repeat_interleave(2, dim=0)) * 0.3
    probs = torch.softmax(logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
    rows = torch.arange(length, COPIES * length)
    echo, induction = copy_scores(probs[:, rows + 1], rows, length)
    for chunk in (1, 3, 64):
        got_echo, got_induction = layer_scores(q, k, scale=0.3, length=length, chunk=chunk)
        torch.testing.assert_close(got_echo, echo / len(rows))
        torch.testing.assert_close(got_induction, induction / len(rows))


def test_selection_is_a_union_ranked_across_layers():
    echo = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.0, 0.0]])
    induction = torch.tensor([[0.0, 0.5], [0.6, 0.0], [0.7, 0.1]])
    # 6 heads: echo top max(1, round(0.1 * 6)) = 1 -> (0, 0); induction top round(0.4 * 6) = 2 -> (2, 0), (1, 0)
    assert select_retrieval_heads(echo, induction, 0.1, 0.4) == [(0, 0), (1, 0), (2, 0)]
    assert select_retrieval_heads(torch.zeros(2, 2), torch.zeros(2, 2), 0.3, 0.3) == [(0, 0)]  # ties: lower first
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"echo_ratio must be a fraction in \(0, 1\)"):
            select_retrieval_heads(echo, induction, bad, 0.1)


def test_probe_is_four_copies_of_ordinary_tokens():
    assert probe_length(4096) == 1023 and probe_length(None) == 2500 and probe_length(100_000) == 2500
    with pytest.raises(ProfileError, match="too short"):
        probe_length(8)
    ids = probe_ids(50, [0, 1, None], 0, 7, seed=3)
    assert ids.shape == (1, 1 + COPIES * 7) and ids[0, 0] == 0
    body = ids[0, 1:].view(COPIES, 7)
    assert (body == body[0]).all() and not torch.isin(body, torch.tensor([0, 1])).any()
    assert torch.equal(ids, probe_ids(50, [0, 1], 0, 7, seed=3))
    assert not torch.equal(ids, probe_ids(50, [0, 1], 0, 7, seed=4))


@pytest.fixture(scope="module")
def stories():
    return AutoModelForCausalLM.from_pretrained(asset("stories260K"), dtype=torch.float32).eval()


def test_profiling_a_real_model_is_deterministic(stories):
    first = profile_heads(stories, model_name="stories260K", progress=False)
    again = profile_heads(stories, model_name="stories260K", progress=False)
    other = profile_heads(stories, model_name="stories260K", seed=1, progress=False)
    assert first == again
    assert first.echo != other.echo
    assert first.probe_length == (512 - 1) // 4 and first.num_layers == 5 and first.num_kv_heads == 4
    # 20 KV heads: 1 by echo, round(0.14 * 20) = 3 by induction
    assert 3 <= len(first.retrieval_heads) <= 4
    # a KV head's score is the max over its query heads
    per_query = torch.tensor(first.induction_per_query_head).view(5, 4, 2)
    assert torch.tensor(first.induction).tolist() == per_query.amax(-1).tolist()


def test_profile_file_round_trip_and_bad_files(stories, tmp_path):
    profile = profile_heads(stories, model_name="stories260K", progress=False, length=20)
    path = profile.save(tmp_path / "p.json")
    assert load_profile(path, stories.config) == profile

    with pytest.raises(ProfileError, match="no retrieval-head profile at .*kvfx profile-heads MODEL"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not a valid retrieval-head profile"):
        load_profile(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    for key, value, message in (("echo_ratio", 1.5, "echo_ratio"), ("induction_ratio", 0.0, "induction_ratio"),
                                ("echo", [[0.1]], "echo must be 5 layers x 4 heads"),
                                ("retrieval_heads", [[9, 0]], r"retrieval head \(9, 0\) is outside")):
        (tmp_path / "edited.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(ProfileError, match=message):
            load_profile(tmp_path / "edited.json")
    codelm = AutoConfig.from_pretrained(asset("codelm-27m"))
    assert config_hash(codelm) != config_hash(stories.config)
    with pytest.raises(ProfileError, match="made for another model .*stories260K"):
        load_profile(path, codelm)


def test_committed_codelm_profile_is_valid_for_codelm():
    profile = load_profile("examples/profiles/codelm-27m.json", AutoConfig.from_pretrained(asset("codelm-27m")))
    share = len(profile.retrieval_heads) / (profile.num_layers * profile.num_kv_heads)
    assert 0.1 <= share <= 0.2  # "about 15%" of the KV heads


def test_cli_writes_profile_and_heatmap(tmp_path):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["profile-heads", str(asset("stories260K")), "--out", str(out),
                                       "--length", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "KV heads are retrieval heads" in result.output
    assert isinstance(load_profile(out), HeadProfile)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(main, ["profile-heads", str(asset("stories260K")), "--out", str(out),
                                    "--echo-ratio", "1.2"])
    assert bad.exit_code != 0 and "must be a fraction in (0, 1)" in bad.output
