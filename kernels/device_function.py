"""``DeviceFunction``: a Triton device helper (like ``@triton.jit``) that interpreted kernels can call as well.

Compiled kernels inline it like any ``@triton.jit`` helper (the code generator never calls the object). An interpreted
kernel runs its body as Python and calls the object: a plain ``JITFunction`` raises there unless triton itself was
imported under ``TRITON_INTERPRET=1``; this one runs the interpreter's rewrite of its body, under the triton.language
patches that the calling kernel's interpreter run has already installed. The interpreted body is made on the first
interpreted call, so a process on the GPU never makes one.
"""

from __future__ import annotations

import functools

from triton.runtime.jit import JITFunction

__all__ = ["DeviceFunction"]


class DeviceFunction(JITFunction):
    def __call__(self, *args, **kwargs):
        return _interpreted(self.fn)(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)
