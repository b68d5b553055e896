"""Retrieval-head profiling (RazorAttention): which attention heads look back across the whole context.

The probe is a BOS token followed by ``L`` random token ids repeated 4 times (uniform over the ordinary vocabulary,
special tokens excluded); ``L`` is 2500, or for short-context models the largest ``L`` with ``4L + 1`` positions.
One forward pass. For each layer and query head, from the post-RoPE attention probabilities ``P`` (causal, the
model's own scale), over the probe tokens ``r >= L`` (probe index ``r``, absolute position ``r + 1``) and each
earlier copy of the same token at probe index ``r - mL`` (``m >= 1``):

    echo[r]      = sum over m of P[r + 1, r - mL + 1]   (attention on the earlier occurrences of this token)
    induction[r] = sum over m of P[r + 1, r - mL + 2]   (attention on the tokens that followed them)
    echo, induction = the mean over r of echo[r], induction[r]

GQA: a KV head's score is the max over its query heads. KV heads are ranked globally across layers; the retrieval
heads are the union of the top ``echo_ratio`` by echo score and the top ``induction_ratio`` by induction score
(``max(1, round(ratio * heads))`` heads each, ties to the lower (layer, head)).

The profile file (JSON) records the model's name and config hash, every score, the chosen heads and the parameters;
:func:`load_profile` checks it against the model it is used with.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated

import pydantic
import torch
from pydantic import Field, model_validator
from torch import Tensor

from kvfx.results import save_figure

__all__ = ["HeadProfile", "ProfileError", "check_made_for", "config_hash", "copy_scores", "layer_scores",
           "load_profile", "probe_ids", "probe_length", "profile_heads", "select_retrieval_heads"]

COPIES = 4
MAX_PROBE_LENGTH = 2500
PROFILE_VERSION = 1
COMMAND = "kvfx profile-heads MODEL --out profile.json"

Ratio = Annotated[float, Field(gt=0.0, lt=1.0)]


class ProfileError(ValueError):
    """A retrieval-head profile is missing, malformed, or belongs to another model."""


class HeadProfile(pydantic.BaseModel):
    """What ``kvfx profile-heads`` writes: scores per layer and head, and the retrieval heads chosen from them."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    version: int = PROFILE_VERSION
    model: str
    config_hash: str
    num_layers: int = Field(gt=0)
    num_query_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    probe_length: int = Field(ge=2)
    seed: int
    echo_ratio: Ratio
    induction_ratio: Ratio
    echo: list[list[float]]  # [layer][kv head]: max over the query heads of the group
    induction: list[list[float]]
    echo_per_query_head: list[list[float]]  # [layer][query head]
    induction_per_query_head: list[list[float]]
    retrieval_heads: list[tuple[int, int]]  # (layer, kv head), sorted

    @model_validator(mode="after")
    def _consistent(self) -> HeadProfile:
        if self.version != PROFILE_VERSION:
            raise ValueError(f"profile version {self.version} is not supported (this kvfx reads {PROFILE_VERSION})")
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_query_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        for name, width in (("echo", self.num_kv_heads), ("induction", self.num_kv_heads),
                            ("echo_per_query_head", self.num_query_heads),
                            ("induction_per_query_head", self.num_query_heads)):
            rows = getattr(self, name)
            if len(rows) != self.num_layers or any(len(row) != width for row in rows):
                raise ValueError(f"{name} must be {self.num_layers} layers x {width} heads")
            if not all(math.isfinite(x) and 0.0 <= x <= 1.0 + 1e-6 for row in rows for x in row):
                raise ValueError(f"{name} scores must be probabilities in [0, 1]")
        for layer, head in self.retrieval_heads:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
                raise ValueError(f"retrieval head ({layer}, {head}) is outside {self.num_layers} layers x "
                                 f"{self.num_kv_heads} KV heads")
        if sorted(set(map(tuple, self.retrieval_heads))) != [tuple(h) for h in self.retrieval_heads]:
            raise ValueError("retrieval_heads must be sorted and without repeats")
        return self

    def is_retrieval(self) -> list[list[bool]]:
        """``[layer][kv head]``: whether the head keeps its whole cache."""
        chosen = set(map(tuple, self.retrieval_heads))
        return [[(layer, head) in chosen for head in range(self.num_kv_heads)] for layer in range(self.num_layers)]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path


# --------------------------------------------------------------------------------------------- the model side


def config_hash(config) -> str:
    """sha256 of a transformers config's architecture fields (its JSON without names, versions, dtype and runtime
    switches), so a profile is tied to a model, not to where or how it was loaded."""
    volatile = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures",
                "_attn_implementation", "_attn_implementation_internal", "_commit_hash", "attn_implementation"}
    fields = {k: v for k, v in config.to_dict().items() if k not in volatile and not k.startswith("_")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def probe_length(max_positions: int | None) -> int:
    """``L``: 2500, or the largest ``L`` with ``4L + 1 <= max_positions``."""
    length = MAX_PROBE_LENGTH if not max_positions else min(MAX_PROBE_LENGTH, (int(max_positions) - 1) // COPIES)
    if length < 2:
        raise ProfileError(f"the model's context ({max_positions} positions) is too short for a {COPIES}-copy probe")
    return length


def probe_ids(vocab_size: int, special_ids, bos_id: int | None, length: int, seed: int) -> Tensor:
    """``[1, 4L + 1]``: BOS (if the model has one), then ``L`` random ordinary token ids repeated 4 times."""
    special = {int(i) for i in special_ids if i is not None}
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if len(ordinary) < 2:
        raise ProfileError(f"the vocabulary has {len(ordinary)} ordinary token ids: nothing to draw a probe from")
    gen = torch.Generator().manual_seed(seed)
    block = ordinary[torch.randint(0, len(ordinary), (length,), generator=gen)]
    head = [] if bos_id is None else [torch.tensor([bos_id])]
    return torch.cat(head + [block] * COPIES).view(1, -1)


def copy_scores(probs: Tensor, rows: Tensor, length: int, offset: int = 1) -> tuple[Tensor, Tensor]:
    """Echo and induction scores, summed over the given rows: ``probs`` ``[H, n, T]`` are the attention rows of the
    probe tokens ``rows`` ``[n]`` (probe indices, at absolute position ``rows + offset``). Returns two ``[H]``."""
    h, n, t = probs.shape
    m = torch.arange(1, COPIES, device=probs.device)  # earlier copies: 1 .. COPIES - 1 back
    earlier = rows.view(n, 1) - m.view(1, -1) * length  # [n, M] probe indices of the earlier occurrences
    present = earlier >= 0
    echo_cols = (earlier + offset).clamp(0, t - 1)
    induction_cols = (earlier + offset + 1).clamp(0, t - 1)

    def gathered(cols: Tensor) -> Tensor:
        picked = probs.gather(2, cols.view(1, n, -1).expand(h, n, cols.shape[1]))  # [H, n, M]
        return torch.where(present.view(1, n, -1), picked, 0.0).sum(dim=(1, 2))

    return gathered(echo_cols), gathered(induction_cols)


def layer_scores(q: Tensor, k: Tensor, *, scale: float, length: int, offset: int = 1,
                 chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Echo and induction scores ``[Hq]`` (means over the probe tokens ``r >= L``) of one layer from its post-RoPE
    queries ``[Hq, T, D]`` and keys ``[Hkv, T, D]``, in chunks of query rows (never the whole ``[T, T]``)."""
    hq, t, _ = q.shape
    group = hq // k.shape[0]
    keys = k.float().repeat_interleave(group, dim=0)  # [Hq, T, D]
    echo = torch.zeros(hq, dtype=torch.float64, device=q.device)
    induction = torch.zeros_like(echo)
    first, last = length, t - offset  # probe indices scored: L .. 4L - 1
    for start in range(first, last, chunk):
        rows = torch.arange(start, min(start + chunk, last), device=q.device)
        positions = rows + offset
        logits = torch.einsum("hnd,htd->hnt", q[:, positions].float(), keys) * scale  # [Hq, n, T]
        causal = torch.arange(t, device=q.device).view(1, -1) <= positions.view(-1, 1)
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        e, i = copy_scores(probs, rows, length, offset)
        echo += e.double()
        induction += i.double()
    count = last - first
    return (echo / count).float(), (induction / count).float()


def select_retrieval_heads(echo: Tensor, induction: Tensor, echo_ratio: float,
                           induction_ratio: float) -> list[tuple[int, int]]:
    """The union of the top ``echo_ratio`` KV heads by echo and the top ``induction_ratio`` by induction score, ranked
    across all layers (``[layers, kv heads]`` scores); sorted (layer, head) pairs."""
    for name, ratio in (("echo_ratio", echo_ratio), ("induction_ratio", induction_ratio)):
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
            raise ValueError(f"{name} must be a fraction in (0, 1), got {ratio!r}")
    layers, heads = echo.shape
    chosen = set()
    for scores, ratio in ((echo, echo_ratio), (induction, induction_ratio)):
        top = max(1, round(ratio * layers * heads))
        order = torch.sort(-scores.flatten().double(), stable=True).indices[:top]  # ties: lower index first
        chosen.update((int(i) // heads, int(i) % heads) for i in order)
    return sorted(chosen)


def profile_heads(model, *, model_name: str, seed: int = 0, echo_ratio: float = 0.01, induction_ratio: float = 0.14,
                  length: int | None = None, chunk: int = 256, progress: bool = True) -> HeadProfile:
    """Run the probe through ``model`` (a transformers causal LM) and score every head; see the module docstring."""
    from tqdm.auto import tqdm
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text_config.num_hidden_layers
    hq = text_config.num_attention_heads
    hkv = getattr(text_config, "num_key_value_heads", None) or hq
    length = length or probe_length(getattr(text_config, "max_position_embeddings", None))
    bos = getattr(text_config, "bos_token_id", None)
    special = [getattr(text_config, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")]
    special = [i for s in special for i in (s if isinstance(s, (list, tuple)) else [s])]
    ids = probe_ids(text_config.vocab_size, special, bos, length, seed).to(model.device)
    offset = 1 if bos is not None else 0

    scores: dict[int, tuple[Tensor, Tensor]] = {}
    bar = tqdm(total=layers, desc="profiling heads", unit="layer", disable=not progress)

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores[module.layer_idx] = layer_scores(query[0], key[0], scale=scale, length=length, offset=offset,
                                                chunk=chunk)
        bar.update(1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                               enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None

    name = "kvfx_head_profile"
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        config._attn_implementation = previous
        bar.close()
    if sorted(scores) != list(range(layers)):
        raise ProfileError(f"the probe reached attention layers {sorted(scores)}, expected 0..{layers - 1}: "
                           "this model's attention does not go through transformers' attention interface")
    echo_q = torch.stack([scores[i][0] for i in range(layers)])  # [layers, Hq]
    induction_q = torch.stack([scores[i][1] for i in range(layers)])
    echo = echo_q.view(layers, hkv, hq // hkv).amax(dim=-1)
    induction = induction_q.view(layers, hkv, hq // hkv).amax(dim=-1)
    return HeadProfile(
        model=model_name, config_hash=config_hash(config), num_layers=layers, num_query_heads=hq, num_kv_heads=hkv,
        probe_length=length, seed=seed, echo_ratio=echo_ratio, induction_ratio=induction_ratio,
        echo=echo.tolist(), induction=induction.tolist(), echo_per_query_head=echo_q.tolist(),
        induction_per_query_head=induction_q.tolist(),
        retrieval_heads=select_retrieval_heads(echo, induction, echo_ratio, induction_ratio))


def load_profile(path: str | Path, config=None) -> HeadProfile:
    """Read a profile; with ``config`` (the model's), check it was made for that model."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"no retrieval-head profile at {path}; make one with: {COMMAND}")
    try:
        profile = HeadProfile.model_validate_json(path.read_text())
    except pydantic.ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in err.errors())
        raise ProfileError(f"{path} is not a valid retrieval-head profile ({problems}); make one with: {COMMAND}") \
            from None
    if config is not None:
        check_made_for(profile, config, path)
    return profile


def check_made_for(profile: HeadProfile, config, path: str | Path) -> None:
    """Raise :class:`ProfileError` unless ``profile`` (read from ``path``) was made for the model of ``config``."""
    if profile.config_hash != config_hash(config):
        raise ProfileError(f"{path} was made for another model ({profile.model}, config hash "
                           f"{profile.config_hash[:12]}, this model's is {config_hash(config)[:12]}); profile this "
                           f"model with: {COMMAND}")


def plot_profile(profile: HeadProfile, path: str | Path) -> Path:
    """A heatmap PNG of both scores per layer and query head, the retrieval KV heads' query heads outlined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise ProfileError("the heatmap needs matplotlib: pip install 'kvfx[plots]' (or pass --no-heatmap)") from None
    group = profile.num_query_heads // profile.num_kv_heads
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.9 * profile.num_query_heads, 1.5 + 0.45 * profile.num_layers),
                             constrained_layout=True)
    for ax, name, values in ((axes[0], "echo", profile.echo_per_query_head),
                             (axes[1], "induction", profile.induction_per_query_head)):
        image = ax.imshow(values, cmap="viridis", vmin=0.0, aspect="auto")
        for layer, head in profile.retrieval_heads:
            ax.add_patch(Rectangle((head * group - 0.5, layer - 0.5), group, 1, fill=False, edgecolor="red", lw=2))
        ax.set_title(f"{name} score")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(profile.num_query_heads))
        ax.set_yticks(range(profile.num_layers))
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{profile.model}: retrieval heads (red: {len(profile.retrieval_heads)} of "
                 f"{profile.num_layers * profile.num_kv_heads} KV heads), probe L={profile.probe_length}")
    return save_figure(fig, path, dpi=110)
