"""The kvfx user contract, runnable: compile an unmodified Hugging Face model with the kvfx backend and generate.

    python examples/generate.py [--model PATH] [--spec examples/specs/full.yaml] [--new-tokens 64]

No `import kvfx` is needed: torch finds the backend through its entry point.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvfx.assets import asset  # only to locate the shared example model and text

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="a local model folder (default: the shared codelm-27m)")
parser.add_argument("--spec", default="examples/specs/full.yaml")
parser.add_argument("--new-tokens", type=int, default=64)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
path = args.model or asset("codelm-27m")
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

model.forward = torch.compile(model.forward, backend="kvfx", options={"spec": args.spec})

prompts = ["def fibonacci(n):\n", "import os\n\n\ndef read_config(path):\n"]
tokenizer.padding_side = "left"
batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
for prompt, row in zip(prompts, out):
    print("-" * 60)
    print(prompt + tokenizer.decode(row[batch.input_ids.shape[1]:], skip_special_tokens=True))
