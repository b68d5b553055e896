"""The eviction policy interface, and the per-sequence facts policies decide with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kvfx.kernels.scored_decode_attention import GumbelScores
from kvfx.kernels.slot_decode import keep_priority

INF = float("inf")
NEVER = 2**62  # a protect_from that protects nothing


class EvictionError(ValueError):
    """A policy cannot serve this prompt (e.g. its budget is larger than the prompt)."""


@dataclass(frozen=True)
class KeepRule:
    """How a policy ranks tokens, in a form the decode kernels evaluate (``kvfx.kernels.slot_decode.keep_priority``).

    Tokens at positions below ``protect_below`` or from ``protect_from`` on (counted back from the current length
    ``seen`` when ``from_seen``) are never evicted; the others are ranked by their accumulated score (``by_score``)
    or by position (the oldest goes first)."""

    protect_below: Tensor  # [B] int64
    protect_from: Tensor  # [B] int64 (added to seen when from_seen)
    from_seen: bool
    by_score: bool


@dataclass(frozen=True)
class EvictionContext:
    """What one sequence batch looks like to a policy.

    Positions are *cache positions*: 0 is the first column of the (left-padded) prompt, so padding occupies
    ``0 .. first_valid[b] - 1`` of row ``b``.
    """

    layer: int
    prompt_end: int  # the padded prompt length: positions >= prompt_end were generated
    seen: int  # tokens written so far, the current one included
    first_valid: Tensor  # [B] int64: the first real (non-padding) position of each row
    budget: Tensor  # [B] int64: this policy's token budget per row
    recent: Tensor  # [B] int64: how many of the most recent tokens are protected


class EvictionPolicy:
    """Base of all eviction policies. Subclasses set ``scores`` and implement ``rule``.

    ``scores`` says what attention statistic the policy reads: ``None`` (positions only), ``"softmax"`` (H2O:
    accumulated attention probability) or ``"gumbel"`` (Keyformer: accumulated Gumbel-softmax probability).
    """

    scores: str | None = None

    def __init__(self, config) -> None:
        self.config = config

    # ---- sizes --------------------------------------------------------------------------------

    def budget(self, prompt_tokens: Tensor, padded_prompt: int) -> Tensor:
        """Tokens to keep per row, ``[B]`` int64, from each row's real prompt length ``prompt_tokens``."""
        budget = self.config.budget
        if isinstance(budget, int):
            if budget > padded_prompt:
                raise EvictionError(f"{self.config.method} budget {budget} tokens is larger than the "
                                    f"{padded_prompt}-token prompt: nothing would be evicted; use a smaller "
                                    "budget or a fraction of the prompt")
            return torch.full_like(prompt_tokens, budget)
        return (prompt_tokens.double() * budget).floor().long().clamp_min(1)

    def capacity(self, padded_prompt: int) -> int:
        """An upper bound of ``budget`` over rows, known on the host without a device sync."""
        budget = self.config.budget
        return budget if isinstance(budget, int) else max(1, math.floor(padded_prompt * budget))

    def recent(self, budget: Tensor) -> Tensor:
        """How many of the most recent tokens are protected, per row (0 unless the policy has a recent window)."""
        return torch.zeros_like(budget)

    def check(self, budget: Tensor, prompt_tokens: Tensor) -> None:
        """Raise :class:`EvictionError` if the policy cannot run with these budgets (host-side, at prefill)."""

    # ---- decisions ----------------------------------------------------------------------------

    def rule(self, ctx: EvictionContext) -> KeepRule:
        """Which tokens are protected and how the others rank, at this step (``ctx.seen``)."""
        raise NotImplementedError

    def priority(self, pos: Tensor, score: Tensor, ctx: EvictionContext) -> Tensor:
        """Keep-priority of tokens at cache positions ``pos`` ``[B, H, N]`` with accumulated ``score``: the rule
        evaluated. Higher is kept; ``inf`` is never evicted. Prefill keeps the ``budget`` highest; decode evicts the
        lowest (in the kernels, from the same rule)."""
        rule = self.rule(ctx)
        heads = pos.shape[1]
        protect_from = rule.protect_from + (ctx.seen if rule.from_seen else 0)
        return keep_priority(pos, score, rule.protect_below.view(-1, 1).expand(-1, heads),
                             protect_from.view(-1, 1).expand(-1, heads),
                             torch.full((heads,), rule.by_score, device=pos.device))

    def prompt_scores(self, column_scores, q: Tensor, k: Tensor, ctx: EvictionContext) -> Tensor | None:
        """The score of each prompt token at the end of the prefill, ``[B, Hkv, T]`` float32, or None.

        ``column_scores(q, gumbel)`` returns the column sums of the prompt's attention probabilities for the given
        queries (the last ``q.shape[2]`` prompt positions).
        """
        return None

    def gumbel(self, ctx: EvictionContext) -> GumbelScores | None:
        """The Gumbel-softmax parameters of the scores at this step (Keyformer only)."""
        return None


def recent_tokens(recent, budget: Tensor) -> Tensor:
    """A ``recent`` setting (a fraction of the budget, or a token count) in tokens per row, at most the budget."""
    if isinstance(recent, int):
        return torch.clamp(torch.full_like(budget, recent), max=budget)
    return (budget.double() * recent).floor().long()


def make_policy(config) -> EvictionPolicy | None:
    """The policy of an ``evict`` spec config; None for ``method: none`` (keep everything)."""
    from kvfx.eviction.h2o import H2O
    from kvfx.eviction.keyformer import Keyformer
    from kvfx.eviction.snapkv import SnapKV
    from kvfx.eviction.window import Window

    policies = {"window": Window, "h2o": H2O, "keyformer": Keyformer, "snapkv": SnapKV}
    if config.method == "none":
        return None
    if config.method not in policies:
        raise ValueError(f"no eviction policy named {config.method!r}")
    return policies[config.method](config)
