"""The backend is found by name through the torch_dynamo_backends entry point, with or without ``import kvfx``.

torch's registry asserts on duplicate names, so kvfx must never register "kvfx" itself at import time; both orders
are checked in fresh interpreters.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

COMPILE_AND_RUN = """
import torch
fn = torch.compile(lambda x: torch.relu(x) + 1, backend="kvfx", options={"compiler": "eager", "verbose": False})
assert torch.equal(fn(torch.tensor([-1.0, 2.0])), torch.tensor([1.0, 3.0]))
"""


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_found_without_importing_kvfx():
    out = run_python("import sys\n" + COMPILE_AND_RUN + "\nprint('kvfx.backend' in sys.modules)")
    assert out.strip() == "True"  # loaded by torch from the entry point, not by the user


def test_importing_kvfx_first_does_not_clash():
    run_python("import kvfx, kvfx.backend, kvfx.ops\n" + COMPILE_AND_RUN + COMPILE_AND_RUN)


def test_listed_among_backends():
    assert "True" in run_python("import torch._dynamo\nprint('kvfx' in torch._dynamo.list_backends())")


@pytest.mark.parametrize("path", ["spec_file", "dict", "Spec"])
def test_spec_option_forms(path, tmp_path):
    import torch

    from kvfx.spec import Spec

    spec_file = tmp_path / "full.yaml"
    Spec.identity().dump(spec_file)
    spec = {"spec_file": str(spec_file), "dict": {"version": 1}, "Spec": Spec.identity()}[path]
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2, backend="kvfx", options={"spec": spec, "compiler": "eager"})
    assert torch.equal(fn(torch.ones(2)), torch.full((2,), 2.0))
