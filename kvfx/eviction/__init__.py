"""Token eviction: policies (one per file) over a fixed-budget slot cache.

A policy answers two questions about the tokens of one KV head: how many to keep (its budget, from the prompt
length) and which to lose first (a *priority* per token: the lowest goes). The same priority chooses the kept set
at the end of the prompt (the top ``budget``) and the one token to evict at each decode step (the lowest), so
prefill and decode cannot disagree about a policy's meaning.
"""

from kvfx.eviction.base import EvictionContext, EvictionPolicy, make_policy

__all__ = ["EvictionContext", "EvictionPolicy", "make_policy"]
