"""Bounds checking for kernels run by the Triton interpreter.

Inside :func:`bounds_checked`, every load and store a kernel makes through the interpreter, for each lane its mask
enables, must fall inside the storage of one of that launch's tensor arguments; otherwise :class:`OutOfBounds` is
raised naming the kernel's access. On a GPU such a read faults only when the bytes past an allocation happen to be
unmapped (an illegal memory access that depends on where the caching allocator put the tensor), so tests cannot
rely on it; the interpreter reads host memory and would never fault at all.
"""

from __future__ import annotations

import contextlib

import numpy as np
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


@contextlib.contextmanager
def bounds_checked():
    spans: list[tuple[int, int]] = []  # (start, end) of each tensor argument's storage, this launch
    init_args, load, store = (interpreter.GridExecutor._init_args_hst, interpreter.InterpreterBuilder.create_masked_load,
                              interpreter.InterpreterBuilder.create_masked_store)

    def init_args_checked(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        storages = {}
        for arg in [*args_hst, *kwargs_hst.values()]:
            if hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                storages[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
        spans[:] = sorted(storages.items())
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        addr = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        addr = addr[np.broadcast_to(mask.data.astype(bool), addr.shape)].astype(np.uint64)
        if addr.size == 0:
            return
        starts = np.array([s for s, _ in spans], dtype=np.uint64)
        ends = np.array([e for _, e in spans], dtype=np.uint64)
        i = np.searchsorted(starts, addr, side="right") - 1
        inside = (i >= 0) & (addr + np.uint64(size) <= ends[np.maximum(i, 0)])
        if not inside.all():
            bad = addr[~inside]
            raise OutOfBounds(f"{what} of {bad.size} lane(s) outside every tensor argument's storage (first at "
                              f"{int(bad[0]):#x}; arguments at {[(hex(s), e - s) for s, e in spans]})")

    def load_checked(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "a load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store_checked(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "a store")
        return store(self, ptrs, value, mask, cache_policy)

    interpreter.GridExecutor._init_args_hst = init_args_checked
    interpreter.InterpreterBuilder.create_masked_load = load_checked
    interpreter.InterpreterBuilder.create_masked_store = store_checked
    try:
        yield
    finally:
        interpreter.GridExecutor._init_args_hst = init_args
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store
