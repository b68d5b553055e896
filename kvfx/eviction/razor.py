"""RazorAttention (Tang et al., 2024): retrieval heads keep every token; every other KV head keeps the first ``sink``
tokens, a recent window and one compensation token that stands for what was dropped.

Which heads are retrieval heads comes from a profile (``kvfx profile-heads``, :mod:`kvfx.head_profile`): the union
of the top ``echo_ratio`` KV heads by echo score and the top ``induction_ratio`` by induction score, re-selected
here from the profile's scores with the spec's ratios. The window of a non-retrieval head is
``max(min(min_window, T), T // compress_ratio)`` tokens for a ``T``-token (padded) prompt; the compensation token
holds the mean key and value of the dropped tokens and their count N_d, and attention treats it as N_d identical
tokens (its logit gets ``+ log N_d``). During decode, tokens that leave the window fold into the running means.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from kvfx.head_profile import HeadProfile, load_profile, select_retrieval_heads


@functools.lru_cache(maxsize=16)
def _profile(path: str, mtime: float) -> HeadProfile:
    return load_profile(path)


def retrieval_heads(config) -> set[tuple[int, int]]:
    """The (layer, KV head) pairs an ``evict: {method: razor}`` config keeps whole."""
    path = Path(config.profile)
    profile = _profile(str(path), path.stat().st_mtime if path.is_file() else 0.0)
    return set(select_retrieval_heads(torch.tensor(profile.echo), torch.tensor(profile.induction),
                                      config.echo_ratio, config.induction_ratio))


def check_profile(config, num_layers: int, num_kv_heads: int, model_config=None) -> None:
    """Raise :class:`kvfx.head_profile.ProfileError` unless the config's profile exists, is valid, has this
    model's number of attention layers and KV heads and, where the model's transformers config is known
    (``model_config``), was made for that model (its config hash): the compile step's check."""
    from kvfx.head_profile import COMMAND, ProfileError, check_made_for

    path = Path(config.profile)
    profile = _profile(str(path), path.stat().st_mtime if path.is_file() else 0.0)
    if (profile.num_layers, profile.num_kv_heads) != (num_layers, num_kv_heads):
        raise ProfileError(f"{path} profiles {profile.num_layers} layers x {profile.num_kv_heads} KV heads "
                           f"({profile.model}), but this model has {num_layers} x {num_kv_heads}: it was made for "
                           f"another model; profile this one with: {COMMAND}")
    if model_config is not None:
        check_made_for(profile, model_config, path)


def window_size(config, prompt: int) -> int:
    """Recent tokens a non-retrieval head keeps: max(min(min_window, T), T // compress_ratio)."""
    return max(1, max(min(config.min_window, prompt), int(prompt // config.compress_ratio)))
