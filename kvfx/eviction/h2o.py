"""H2O, the Heavy-Hitter Oracle (Zhang et al., 2023): keep the most recent tokens plus the "heavy hitters", the
tokens that have received the most attention so far.

A token's score is the softmax probability it received, summed over the query heads of its KV group and over
queries: every prompt query at prefill, then the one new query of each decode step. An evicted token's score is
gone with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.eviction.base import EvictionContext, EvictionPolicy, KeepRule, recent_tokens


class H2O(EvictionPolicy):
    scores = "softmax"

    def recent(self, budget: Tensor) -> Tensor:
        return recent_tokens(self.config.recent, budget)

    def rule(self, ctx: EvictionContext) -> KeepRule:
        """The ``recent`` most recent tokens are protected; the others rank by score."""
        return KeepRule(protect_below=torch.zeros_like(ctx.recent), protect_from=-ctx.recent, from_seen=True,
                        by_score=True)

    def prompt_scores(self, column_scores, q: Tensor, k: Tensor, ctx: EvictionContext) -> Tensor:
        return column_scores(q, None)
