"""SnapKV (Li et al., 2024): the last ``window`` prompt queries vote, once, for the prompt tokens worth keeping.

Each prompt key is scored by the attention it gets from the last ``window`` prompt queries, summed over those
queries and over the query heads of its KV group (so GQA models keep one set per KV head and save memory), then
pooled along the sequence (``pooling`` over ``pool`` neighbours, stride 1, as SnapKV's clustering). The top
``budget - window`` tokens before the window are kept with the window itself.

Decode: new tokens are appended while there is room; then the oldest token that was not selected by the vote
leaves first (the observation window's tokens, then the oldest generated ones), so the voted prompt tokens stay
and the rest of the budget slides over the most recent tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvfx.eviction.base import NEVER, EvictionContext, EvictionError, EvictionPolicy, KeepRule


class SnapKV(EvictionPolicy):
    def check(self, budget: Tensor, prompt_tokens: Tensor) -> None:
        window = self.config.window
        if bool((budget <= window).any()):
            raise EvictionError(f"snapkv budget {self.config.budget} is {int(budget.min())} tokens for a "
                                f"{int(prompt_tokens[budget.argmin()])}-token prompt, not more than its "
                                f"{window}-token observation window; use a larger budget or a smaller window")

    def prompt_scores(self, column_scores, q: Tensor, k: Tensor, ctx: EvictionContext) -> Tensor:
        length = q.shape[2]
        window = min(self.config.window, length)
        votes = column_scores(q[:, :, length - window:], None)  # [B, Hkv, T]
        prefix = votes[..., : length - window]
        if prefix.shape[-1] == 0:
            return votes
        pool = {"max": F.max_pool1d, "avg": F.avg_pool1d}[self.config.pooling]
        pooled = pool(prefix, kernel_size=self.config.pool, stride=1, padding=self.config.pool // 2)
        return torch.cat([pooled, votes[..., length - window:]], dim=-1)

    def rule(self, ctx: EvictionContext) -> KeepRule:
        window_start = torch.full_like(ctx.budget, ctx.prompt_end - self.config.window)
        if ctx.seen == ctx.prompt_end:  # the vote: the observation window stays, the rest by pooled score
            return KeepRule(protect_below=torch.zeros_like(window_start), protect_from=window_start, from_seen=False,
                            by_score=True)
        # decode: the voted prompt tokens stay; the others leave oldest first
        return KeepRule(protect_below=window_start, protect_from=torch.full_like(window_start, NEVER),
                        from_seen=False, by_score=False)
