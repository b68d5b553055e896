"""Keyformer (Adnan et al., 2024): like H2O, but the score a key receives is a Gumbel-softmax probability.

At step t (0 for the prompt, then one per decode step) the score logits are ``(x + g) / tau_t`` with x the
attention logit (scaled q.k, plus any positional bias such as ALiBi), g fresh Gumbel(0, 1) noise and
``tau_t = tau_init + t (tau_end - tau_init) / max_new_tokens`` (held at tau_end afterwards). The attention output
itself uses the ordinary softmax. Of the budget k, ``recent`` x k are the most recent tokens and the rest the
top-score key tokens.

Deliberate difference from the official code: the official implementation shares one kept set across the batch;
kvfx keeps one set per sequence (and per layer and KV head), so a row's choice never depends on the other rows.
The noise is a hash of (seed, layer, row, query head, query position, key position): reproducible from ``seed``.
"""

from __future__ import annotations

from torch import Tensor

from kvfx.eviction.base import EvictionContext
from kvfx.eviction.h2o import H2O
from kvfx.kernels.scored_decode_attention import GumbelScores


class Keyformer(H2O):
    """H2O's selection (recent window + top scores) over Gumbel-softmax scores."""

    scores = "gumbel"

    def prompt_scores(self, column_scores, q: Tensor, k: Tensor, ctx: EvictionContext) -> Tensor:
        return column_scores(q, self.gumbel(ctx))

    def gumbel(self, ctx: EvictionContext) -> GumbelScores:
        return GumbelScores(seed=self.config.seed, layer=ctx.layer, tau=self.temperature(ctx.seen - ctx.prompt_end))

    def temperature(self, step: int) -> float:
        tau_init, tau_end = self.config.tau
        steps = self.config.max_new_tokens
        return tau_init + min(step, steps) * (tau_end - tau_init) / steps
