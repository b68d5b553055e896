"""Cache state: kvfx owns the KV storage of every sequence batch it serves.

The graph never sees transformers' ``DynamicCache`` object, only its tensors. kvfx hands transformers zero-storage
views of a 1-element *handle* tensor as the cache's keys and values: they carry the sequence length that
transformers reads (``get_seq_length``, mask sizes) and cost 4 bytes. In the next decode step the past-key input
of the graph is such a view, so its storage identifies the sequence's state without a host sync.

The registry maps a handle's storage to its :class:`SequenceState` through a weak reference to the storage:
when transformers drops the cache (the end of ``generate()``), the storage dies, the weak reference expires and the
state is freed at the next :func:`collect` (run at every new sequence).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# Storage grows in whole chunks of tokens, so that decode appends copy the cache rarely (amortised O(1) per step).
GROWTH_CHUNK = 64


class KvfxCacheError(RuntimeError):
    """A cache operation kvfx cannot follow (beam-search reordering, cropping, a cache kvfx did not make)."""


class LayerCache:
    """The full (uncompressed) KV cache of one attention layer of one sequence batch.

    Storage is preallocated in chunks: ``k``/``v`` are ``[B, Hkv, capacity, D]`` and tokens ``start:end`` are live.
    ``keep_last`` mirrors a sliding-window layer of transformers (``DynamicSlidingWindowLayer``), which keeps only
    the last ``keep_last`` tokens after each update: kvfx then moves ``start`` forward instead of copying.
    """

    def __init__(self, keep_last: int = 0):
        self.keep_last = keep_last
        self.k: torch.Tensor | None = None  # [B, Hkv, capacity, D]
        self.v: torch.Tensor | None = None  # [B, Hkv, capacity, Dv]
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity included)."""
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def used_bytes(self) -> int:
        """Bytes of the live tokens."""
        if self.k is None:
            return 0
        return self.nbytes * len(self) // self.k.shape[2]

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Append ``[B, Hkv, Tn, D]`` new keys and values (as transformers' cache update would)."""
        tn = k_new.shape[-2]
        if self.k is None:
            self._allocate(k_new, v_new, tn)
        elif (k_new.shape[0], k_new.shape[1], k_new.shape[3]) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise KvfxCacheError(
                f"new keys of shape {tuple(k_new.shape)} do not fit the cache of shape "
                f"{tuple(self.k.shape[:2]) + (len(self), self.k.shape[3])}: the batch changed under kvfx "
                "(beam search and cache reordering are not supported)"
            )
        if self.end + tn > self.k.shape[2]:
            self._make_room(tn)
        self.k[:, :, self.end : self.end + tn] = k_new
        self.v[:, :, self.end : self.end + tn] = v_new
        self.end += tn

    def trim(self) -> None:
        """Drop all but the last ``keep_last`` tokens (sliding-window layers), after attention read them."""
        if self.keep_last and len(self) > self.keep_last:
            self.start = self.end - self.keep_last

    def keys(self) -> torch.Tensor:
        return self.k[:, :, self.start : self.end]  # [B, Hkv, T, D], a view

    def values(self) -> torch.Tensor:
        return self.v[:, :, self.start : self.end]  # [B, Hkv, T, Dv], a view

    def _allocate(self, k_new: torch.Tensor, v_new: torch.Tensor, tokens: int) -> None:
        capacity = _round_up(tokens, GROWTH_CHUNK)
        b, h, _, d = k_new.shape
        self.k = k_new.new_empty(b, h, capacity, d)
        self.v = v_new.new_empty(b, h, capacity, v_new.shape[-1])

    def _make_room(self, tokens: int) -> None:
        live, needed, capacity = len(self), len(self) + tokens, self.k.shape[2]
        if needed > capacity:
            # Grow by at least 1/8 so that repeated appends stay amortised O(1); one layer at a time, so the
            # transient extra memory is one layer's old storage, never the whole model's.
            capacity = _round_up(max(needed, capacity + capacity // 8), GROWTH_CHUNK)
            new_k = self.k.new_empty(*self.k.shape[:2], capacity, self.k.shape[3])
            new_v = self.v.new_empty(*self.v.shape[:2], capacity, self.v.shape[3])
            new_k[:, :, :live] = self.keys()
            new_v[:, :, :live] = self.values()
            self.k, self.v = new_k, new_v
        else:
            # A sliding window left dead tokens in front: compact in place (clone: the ranges may overlap).
            self.k[:, :, :live] = self.keys().clone()
            self.v[:, :, :live] = self.values().clone()
        self.start, self.end = 0, live


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class SequenceState:
    """Everything kvfx keeps for one sequence batch: one cache per attention layer (made by ``kvfx.ops`` on first
    use: a full ``LayerCache`` or an ``EvictingLayerCache``)."""

    plan_id: int
    layers: dict[int, LayerCache] = field(default_factory=dict)
    causal_masks: dict[tuple, bool] = field(default_factory=dict)  # prompt mask factors -> plain causal or not

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def used_bytes(self) -> int:
        return sum(layer.used_bytes for layer in self.layers.values())


class Registry:
    """Maps handle storages to sequence states; states die with their handle storage."""

    def __init__(self) -> None:
        self._states: dict[int, tuple[StorageWeakRef, SequenceState]] = {}
        self._lock = threading.Lock()
        self.sequences_started = 0  # how many sequence batches kvfx has served (for tests and tools)

    def begin(self, like: torch.Tensor, plan_id: int) -> torch.Tensor:
        """Start a new sequence batch: returns its handle, a 1-element tensor of ``like``'s dtype and device."""
        self.collect()
        handle = torch.zeros(1, 1, 1, 1, dtype=like.dtype, device=like.device)
        storage = handle.untyped_storage()
        with self._lock:
            self._states[storage.data_ptr()] = (StorageWeakRef(storage), SequenceState(plan_id))
            self.sequences_started += 1
        return handle

    def lookup(self, past: torch.Tensor) -> SequenceState:
        """The state whose handle ``past`` (a past-key tensor the graph received) is a view of."""
        storage = past.untyped_storage()
        entry = self._states.get(storage.data_ptr())
        if entry is None or entry[0].expired() or not _same_storage(entry[0], storage):
            raise KvfxCacheError(
                "the past_key_values given to a kvfx-compiled model were not produced by kvfx for this sequence: "
                "kvfx owns the KV storage and cannot follow caches that were copied, reordered (beam search), "
                "filled by another model, or kept across a recompilation without kvfx. Start from an empty cache."
            )
        return entry[1]

    def collect(self) -> int:
        """Free the states whose cache transformers dropped; returns how many were freed."""
        with self._lock:
            dead = [ptr for ptr, (ref, _) in self._states.items() if ref.expired()]
            for ptr in dead:
                del self._states[ptr]
        return len(dead)

    def states(self) -> list[SequenceState]:
        self.collect()
        return [state for _, state in self._states.values()]


def _same_storage(ref: StorageWeakRef, storage: torch.UntypedStorage) -> bool:
    return ref.cdata == storage._cdata


REGISTRY = Registry()
