"""kvfx: a torch.compile backend that gives any Hugging Face model a compressed KV cache.

    model.forward = torch.compile(model.forward, backend="kvfx", options={"spec": "examples/specs/full.yaml"})

The backend is found through the ``torch_dynamo_backends`` entry point: ``import kvfx`` is not needed. Importing
this package stays light (no torch) so that the spec tools work anywhere; the torch-side names load on first use.
"""

from kvfx.spec import Plan, Spec, SpecError

__version__ = "0.1.0"

_LAZY = {
    "KvfxCacheError": "kvfx.state",
    "REGISTRY": "kvfx.state",
    "kvfx_backend": "kvfx.backend",
    "REPORTS": "kvfx.backend",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvfx' has no attribute {name!r}")


__all__ = ["Plan", "Spec", "SpecError", *_LAZY]
