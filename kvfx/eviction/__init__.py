"""Token eviction: policies (one per file) over a fixed-budget slot cache.

A policy answers two questions about the tokens of one KV head: how many to keep (its budget, from the prompt
length) and which to lose first (a *keep rule*: a protected range of positions, the others ranked by accumulated
score or by age). The same rule ranks the prompt at its end (the top ``budget`` stay) and, evaluated inside the
decode kernels (``kvfx.kernels.slot_decode``), picks the one token to evict at each decode step (the lowest), so
prefill and decode cannot disagree about a policy's meaning.
"""

from kvfx.eviction.base import EvictionContext, EvictionPolicy, make_policy

__all__ = ["EvictionContext", "EvictionPolicy", "make_policy"]
