"""StreamingLLM (Xiao et al., 2023): the first ``sink`` tokens (attention sinks) plus the most recent ones."""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.eviction.base import NEVER, EvictionContext, EvictionError, EvictionPolicy, KeepRule


class Window(EvictionPolicy):
    """Keep the ``sink`` first real tokens of each row and the ``budget - sink`` most recent: evict the oldest
    token that is not a sink."""

    def check(self, budget: Tensor, prompt_tokens: Tensor) -> None:
        sink = self.config.sink
        if bool((budget <= sink).any()):
            raise EvictionError(f"window budget {self.config.budget} is {int(budget.min())} tokens for a "
                                f"{int(prompt_tokens[budget.argmin()])}-token prompt, which leaves no room beside "
                                f"the {sink} sink tokens; use a larger budget or fewer sinks")

    def rule(self, ctx: EvictionContext) -> KeepRule:
        """The sinks are protected; the others leave oldest first."""
        return KeepRule(protect_below=ctx.first_valid + self.config.sink,
                        protect_from=torch.full_like(ctx.budget, NEVER), from_seen=False, by_score=False)
