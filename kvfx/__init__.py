"""kvfx: a torch.compile backend that gives any Hugging Face model a compressed KV cache."""
