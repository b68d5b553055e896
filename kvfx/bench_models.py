"""Models and byte arithmetic for ``kvfx bench``: the workloads, the random Llama-3.2-1B-shaped model, and the
physical floor of a decode step.

The floor of one decode step is the time to read, once, everything a step must read: the weights and the KV cache.
It is measured against the device's copy bandwidth (a large device-to-device copy, bytes read + bytes written per
second), so ``decode ms / floor ms`` says how close a configuration comes to the memory system's limit.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA_1B = "llama-1b"  # the Llama-3.2-1B-shaped model with random weights
TINY_LLAMA = "tiny-llama"  # a two-layer Llama for CPU smoke tests
RANDOM_MODELS = (LLAMA_1B, TINY_LLAMA)

# Llama-3.2-1B: 16 layers, 32 query / 8 KV heads of 64, hidden 2048, MLP 8192, vocabulary 128256, tied embeddings.
LLAMA_1B_SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
LLAMA_1B_PARAMETERS = 1_235_814_400  # what Llama-3.2-1B has (embedding counted once)
TINY_LLAMA_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Workload:
    """One model at one batch size and prompt length (``model``: a random shape name or a local model folder)."""

    model: str
    batch: int
    prompt: int

    @property
    def model_name(self) -> str:
        return self.model if self.model in RANDOM_MODELS else Path(self.model).name

    @property
    def label(self) -> str:
        return f"{self.model_name} B={self.batch} T={self.prompt}"


def parse_sizes(text: str, model: str) -> list[Workload]:
    """``"8x32768,1x8192"`` -> workloads of ``model``; ``""`` or ``"none"`` -> none."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    workloads = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            raise ValueError(f"size {item.strip()!r} is not BATCHxPROMPT with both >= 1 (e.g. 8x32768)")
        workloads.append(Workload(model, int(match[1]), int(match[2])))
    return workloads


def random_config(shape: str, max_positions: int):
    """The ``LlamaConfig`` of a random model shape, with room for ``max_positions`` positions."""
    from transformers import LlamaConfig

    shapes = {LLAMA_1B: LLAMA_1B_SHAPE, TINY_LLAMA: TINY_LLAMA_SHAPE}
    if shape not in shapes:
        raise ValueError(f"unknown random model shape {shape!r} (known: {', '.join(shapes)})")
    return LlamaConfig(max_position_embeddings=max_positions, **shapes[shape])


def decode_probe_model(size: str, spec: str, new_tokens: int, **options):
    """``(model, prompt ids)`` for the decode probes in benchmarks/: the 1B-shaped random model in bf16 on CUDA, its
    forward compiled with the kvfx backend (``options`` beside ``spec``; ``spec`` 'dynamic': stock eager
    transformers), and a random prompt of ``size`` ``"BATCHxPROMPT"``."""
    batch, prompt = (int(x) for x in size.lower().split("x"))
    model = load_model(LLAMA_1B, "cuda", torch.bfloat16, prompt + new_tokens + 8)
    if spec != "dynamic":
        model.forward = torch.compile(model.forward, backend="kvfx", options={"spec": spec, "verbose": False,
                                                                               **options})
    return model, torch.randint(100, 30000, (batch, prompt), device="cuda")


def load_model(model: str, device: str | torch.device, dtype: torch.dtype, max_positions: int, seed: int = 0):
    """A model for ``Workload.model``: random weights (made on ``device``, seeded) or a local folder; SDPA
    attention, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if model in RANDOM_MODELS:
        config = random_config(model, max_positions)
        torch.manual_seed(seed)
        with torch.device(device):
            built = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
        return built.eval()
    built = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa")
    limit = getattr(built.config, "max_position_embeddings", None)
    if limit is not None and limit < max_positions:
        raise ValueError(f"{model}: max_position_embeddings is {limit}; prompt + new tokens need {max_positions}")
    return built.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# Bytes.
# ----------------------------------------------------------------------------------------------------------------


def parameter_count(model) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in _unique_parameters(model))


def weight_bytes_read(model) -> int:
    """Weight bytes one decode step reads: every parameter once, except an untied input embedding (a step gathers
    only B of its rows)."""
    total = sum(p.numel() * p.element_size() for p in _unique_parameters(model))
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def _unique_parameters(model) -> list[torch.Tensor]:
    seen, unique = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def kv_cache_bytes(config, batch: int, tokens: int, bytes_per_element: int) -> int:
    """Bytes of a full KV cache of ``tokens`` tokens: keys and values of every layer and KV head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * kv_heads * tokens * head_dim * bytes_per_element


def floor_ms(weight_bytes: int, kv_bytes: int, bandwidth: float) -> float:
    """Milliseconds to read ``weight_bytes + kv_bytes`` once at ``bandwidth`` bytes/s."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth}")
    return 1e3 * (weight_bytes + kv_bytes) / bandwidth


def cache_bytes(cache) -> int:
    """Bytes of the distinct storages a transformers cache holds: the tensor attributes of each of its layers,
    tensor subclasses (quanto's quantized tensors) through ``__tensor_flatten__``. kvfx's cache tensors are views of
    one small handle, so for kvfx this is a few bytes; its real storage is :func:`kvfx_state_bytes`."""
    storages: dict[int, int] = {}

    def visit(obj) -> None:
        if not isinstance(obj, torch.Tensor):
            return
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                visit(getattr(obj, name))
        elif obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            visit(value)
    return sum(storages.values())


def kvfx_state_bytes(cache) -> int | None:
    """Bytes kvfx allocated for the sequence behind ``cache`` (None if kvfx does not serve it)."""
    from kvfx.state import REGISTRY, KvfxCacheError

    layers = getattr(cache, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None:
        return None
    try:
        return REGISTRY.lookup(layers[0].keys).nbytes
    except KvfxCacheError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# Bandwidth.
# ----------------------------------------------------------------------------------------------------------------


def copy_bandwidth(device: str | torch.device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Measured copy bandwidth of ``device``: bytes read + written per second of ``dst.copy_(src)``, median of
    ``repeats`` copies of ``nbytes`` (default 2 GiB on CUDA, 64 MiB elsewhere) after warm-up."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or (2 << 30 if cuda else 64 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            dst.copy_(src)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            began = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    del src, dst
    return {"bytes_per_s": 2 * nbytes / seconds, "copy_bytes": nbytes, "copy_ms": 1e3 * seconds,
            "method": "dst.copy_(src), bytes read + written, median of %d" % repeats}
