"""StreamingLLM (Xiao et al., 2023): the first ``sink`` tokens (attention sinks) plus the most recent ones."""

from __future__ import annotations

import torch
from torch import Tensor

from kvfx.eviction.base import INF, EvictionContext, EvictionError, EvictionPolicy


class Window(EvictionPolicy):
    """Keep the ``sink`` first real tokens of each row and the ``budget - sink`` most recent: evict the oldest
    token that is not a sink."""

    def check(self, budget: Tensor, prompt_tokens: Tensor) -> None:
        sink = self.config.sink
        if bool((budget <= sink).any()):
            raise EvictionError(f"window budget {self.config.budget} is {int(budget.min())} tokens for a "
                                f"{int(prompt_tokens[budget.argmin()])}-token prompt, which leaves no room beside "
                                f"the {sink} sink tokens; use a larger budget or fewer sinks")

    def priority(self, pos: Tensor, score: Tensor, ctx: EvictionContext) -> Tensor:
        sink = pos < (ctx.first_valid.view(-1, 1, 1) + self.config.sink)
        return torch.where(sink, INF, pos.to(torch.float32))
