"""Paper-faithful references of the eviction policies: the full cache is kept and evicted tokens are masked to
-inf, as the papers' own code works. Written independently of the slot cache (positions, not slots; explicit loops
over rows and heads; no shared selection code), it is the ground truth the fast path is tested against.

:class:`FaithfulAttention` is one attention layer's reference: call it with the layer's query and its *whole*
cache (every token so far, as transformers' ``DynamicCache`` holds them) and it returns the attention output the
policy allows and remembers which positions it keeps. ``register_faithful_attention`` installs it as a transformers
attention implementation, so a whole model can run under the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kvfx.kernels.gumbel import gumbel_noise_reference


def _tokens(budget, prompt_tokens: int) -> int:
    return budget if isinstance(budget, int) else max(1, math.floor(prompt_tokens * budget))


def _recent(recent, budget: int) -> int:
    return min(recent, budget) if isinstance(recent, int) else math.floor(budget * recent)


class FaithfulAttention:
    """One layer, policies per KV head (spec ``evict`` configs; ``method: none`` keeps everything)."""

    def __init__(self, layer: int, configs, inv_freq: Tensor | None = None):
        self.layer = layer
        self.configs = list(configs)
        self.inv_freq = inv_freq  # RoPE frequencies, for StreamingLLM's compact positions
        self.kept: list[list[set[int]]] | None = None  # [row][kv head] -> kept cache positions
        self.scores: Tensor | None = None  # [B, Hkv, T] accumulated score per position (0 once evicted)
        self.seen = 0
        self.prompt_end = 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, scale: float,
                 softcap: float = 0.0) -> Tensor:
        """q ``[B, Hq, Tq, D]``; k/v ``[B, Hkv, Tk, D]``: the last Tk tokens of the cache; mask additive or bool,
        ``[B|1, 1|Hq, Tq, Tk]`` (causality included), or None for plain causal attention. Returns ``[B, Hq, Tq, Dv]``."""
        b, hq, tq, _ = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        group = hq // hkv
        logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float().repeat_interleave(group, 1)) * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits + self._additive(mask, b, hq, tq, tk)
        first = self.kept is None
        self.seen = tk if first else self.seen + tq
        offset = self.seen - tk  # cache position of k[:, :, 0]
        if first:
            if tq != tk:
                raise ValueError("the reference expects the whole prompt first")
            self.prompt_end = tk
            real = (logits[:, 0] > -1e30).any(dim=-2)  # [B, Tk]: not padding (some query attends it)
            eligible = real & (logits[:, 0, -1] > -1e30)  # and the last query still sees it (sliding windows)
            self.first_valid = [int(row.nonzero()[0]) if row.any() else 0 for row in real]
            self.prompt_tokens = [int(row.sum()) for row in real]
            probs = _softmax(logits)  # the prompt attends to itself in full
            self.scores = torch.zeros(b, hkv, tk)
            self.kept = [[None] * hkv for _ in range(b)]
            for row in range(b):
                for head in range(hkv):
                    self.kept[row][head] = self._select_prompt(row, head, q, k, logits, real[row], eligible[row])
        else:
            if tq != 1:
                raise ValueError("the reference decodes one token at a time")
            self.scores = F.pad(self.scores, (0, 1))
            allowed = torch.zeros(b, hq, 1, tk, dtype=torch.bool)
            for row in range(b):
                for head in range(hkv):
                    self.kept[row][head].add(self.seen - 1)
                    columns = [p - offset for p in self.kept[row][head] if p >= offset]
                    allowed[row, head * group:(head + 1) * group, :, columns] = True
                    if getattr(self.configs[head], "positions", "original") == "compact":
                        logits[row, head * group:(head + 1) * group] = self._compact_logits(
                            row, head, q, k, mask, scale, softcap, offset, group)
            logits = logits.masked_fill(~allowed, float("-inf"))
            probs = _softmax(logits)
            for row in range(b):
                for head in range(hkv):
                    self._decode_step(row, head, logits, probs, offset, group)
        out = torch.einsum("bhij,bhjd->bhid", probs, v.float().repeat_interleave(group, 1))
        return out.to(q.dtype)

    # ---- prefill selection ------------------------------------------------------------------------

    def _select_prompt(self, row, head, q, k, logits, real, eligible) -> set[int]:
        config = self.configs[head]
        valid = [j for j in range(len(eligible)) if eligible[j]]
        if config.method == "none":
            return set(valid)
        budget = _tokens(config.budget, self.prompt_tokens[row])
        group = q.shape[1] // k.shape[1]
        heads = range(head * group, (head + 1) * group)
        if config.method == "window":
            sinks = {j for j in range(len(real)) if real[j]}
            sinks = set(sorted(sinks)[: config.sink]) & set(valid)
            rest = budget - len(sinks)
            return sinks | set([j for j in valid if j not in sinks][-rest:] if rest else [])
        if config.method in ("h2o", "keyformer"):
            if config.method == "h2o":
                probs = torch.softmax(logits[row, heads], dim=-1)  # [G, T, T]
            else:
                probs = self._gumbel_probs(row, heads, logits[row, heads], query_positions=range(logits.shape[2]),
                                           tau=config.tau[0])
            query_ok = real.view(1, -1, 1).float()
            score = torch.nan_to_num(probs * query_ok).sum(dim=(0, 1))  # [T]
            self.scores[row, head] = score
            recent = _recent(config.recent, budget)
            keep = {j for j in valid if j >= logits.shape[-1] - recent}
            others = [j for j in valid if j not in keep]
            ranked = sorted(others, key=lambda j: (float(score[j]), j), reverse=True)  # ties: the newer stays
            return keep | set(ranked[: budget - recent])
        if config.method == "snapkv":
            t = logits.shape[-1]
            window = min(config.window, t)
            probs = torch.softmax(logits[row, heads, t - window:], dim=-1)  # [G, W, T]
            votes = (probs * real[t - window:].view(1, -1, 1).float()).sum(dim=(0, 1))
            prefix = votes[: t - window].view(1, 1, -1)
            pool = F.max_pool1d if config.pooling == "max" else F.avg_pool1d
            pooled = pool(prefix, config.pool, stride=1, padding=config.pool // 2).view(-1)
            candidates = [j for j in valid if j < t - window]
            ranked = sorted(candidates, key=lambda j: (float(pooled[j]), j), reverse=True)
            return set(ranked[: budget - window]) | {j for j in valid if j >= t - window}
        raise ValueError(f"no reference for {config.method}")

    # ---- decode -----------------------------------------------------------------------------------

    def _decode_step(self, row, head, logits, probs, offset, group) -> None:
        config = self.configs[head]
        kept = self.kept[row][head]
        heads = range(head * group, (head + 1) * group)
        if config.method in ("h2o", "keyformer"):
            if config.method == "keyformer":
                step = self.seen - self.prompt_end
                tau = config.tau[0] + min(step, config.max_new_tokens) * (config.tau[1] - config.tau[0]) / \
                    config.max_new_tokens
                gain = self._gumbel_probs(row, heads, logits[row, heads], [self.seen - 1], tau, offset)
            else:
                gain = probs[row, heads]
            gain = torch.nan_to_num(gain).sum(dim=(0, 1))  # [Tk]
            self.scores[row, head, offset:] += gain
        if config.method == "none":
            return
        budget = _tokens(config.budget, self.prompt_tokens[row])
        if len(kept) <= budget:
            return
        unseeable = sorted(p for p in kept if p < offset or logits[row, head * group, 0, p - offset] == -math.inf)
        if unseeable:
            victim = unseeable[0]
        elif config.method == "window":
            sinks = self.first_valid[row] + config.sink
            victim = min(p for p in kept if p >= sinks)
        elif config.method in ("h2o", "keyformer"):
            recent = _recent(config.recent, budget)
            candidates = [p for p in kept if p < self.seen - recent]
            victim = min(candidates, key=lambda p: (float(self.scores[row, head, p]), p))
        else:  # snapkv: tokens the vote did not select leave oldest first
            victim = min(p for p in kept if p >= self.prompt_end - config.window)
        kept.remove(victim)
        self.scores[row, head, victim] = 0.0

    # ---- helpers ----------------------------------------------------------------------------------

    def _compact_logits(self, row, head, q, k, mask, scale, softcap, offset, group) -> Tensor:
        """StreamingLLM's positions within the cache: the kept tokens, in order, at positions 0, 1, ..., the new
        token last; keys and query are turned from the positions the model gave them (cache position - padding)
        to those, as complex numbers (pair i is x[i] + 1j x[i + D/2])."""
        kept = sorted(self.kept[row][head])
        pad = self.first_valid[row]
        keys = k[row, head].float().clone()  # [Tk, D]
        for rank, position in enumerate(kept):
            if position >= offset:
                keys[position - offset] = _turn(keys[position - offset], rank - (position - pad), self.inv_freq)
        queries = q[row, head * group:(head + 1) * group, 0].float()  # [G, D]
        queries = _turn(queries, (len(kept) - 1) - (self.seen - 1 - pad), self.inv_freq)
        logits = (queries @ keys.T * scale).unsqueeze(1)  # [G, 1, Tk]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        heads = slice(head * group, (head + 1) * group)
        return logits + self._additive(mask, q.shape[0], q.shape[1], 1, k.shape[2])[row, heads]

    def _gumbel_probs(self, row, heads, logits, query_positions, tau, offset=0) -> Tensor:
        """Gumbel-softmax probabilities of ``logits`` ``[G, Tq, Tk]`` with kvfx's hashed noise."""
        config = self.configs[heads[0] // len(heads)]
        hq = torch.tensor(list(heads)).view(-1, 1, 1)
        qpos = torch.tensor(list(query_positions)).view(1, -1, 1)
        kpos = torch.arange(offset, offset + logits.shape[-1]).view(1, 1, -1)
        noise = gumbel_noise_reference(config.seed, self.layer, row, hq, qpos, kpos)
        return torch.softmax((logits + noise) / tau, dim=-1)

    @staticmethod
    def _additive(mask, b, hq, tq, tk) -> Tensor:
        if mask is None:
            causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
            return torch.zeros(tq, tk).masked_fill(~causal, float("-inf"))
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape).masked_fill(~mask.cpu(), float("-inf")).expand(b, hq, tq, tk)
        additive = mask.float().cpu()
        return additive.masked_fill(additive <= torch.finfo(mask.dtype).min / 2, float("-inf")).expand(b, hq, tq, tk)

    def kept_positions(self) -> list[list[set[int]]]:
        return [[set(s) for s in row] for row in self.kept]


def _turn(x: Tensor, positions: int, inv_freq: Tensor) -> Tensor:
    """Advance rotate-half RoPE vectors ``x [..., D]`` by ``positions`` (as complex multiplication)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones(half, dtype=torch.float64), positions * inv_freq.double())
    return torch.cat([z.real, z.imag], dim=-1).float()


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim; a row with no attendable key (a padding query) gives zeros, not NaN."""
    return torch.nan_to_num(torch.softmax(logits, dim=-1))


def register_faithful_attention(layers: dict[int, FaithfulAttention], name: str = "kvfx_faithful") -> str:
    """Install ``layers`` (by layer index) as a transformers attention implementation called ``name``.

    Set ``model.config._attn_implementation = name`` (or ``model.set_attn_implementation(name)``) to use it.
    Masks are built as for eager attention (additive, always materialised).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    def attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        reference = layers[module.layer_idx]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = reference(query.cpu(), key.cpu(), value.cpu(), attention_mask, scale=scale, softcap=softcap or 0.0)
        return out.to(query.device).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    return name
