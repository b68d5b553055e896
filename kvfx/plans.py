"""Resolved plans, by id: the rewritten graphs pass an int to the ops, and the ops find the plan here.

Also the list of methods implemented so far: a spec that asks for any other is rejected at compile time, never
ignored.
"""

from __future__ import annotations

from kvfx.spec import Plan, Spec, SpecError

IMPLEMENTED = {"evict": {"none", "window", "h2o", "keyformer", "snapkv", "razor"},
               "quantize": {"none", "kivi", "gear"}}

_PLANS: list[Plan] = []


def check_implemented(spec: Spec) -> None:
    """Raise a SpecError naming each method in ``spec`` that kvfx does not implement yet."""
    policies = [("default", spec.default)] + [(f"overrides[{i}]", o) for i, o in enumerate(spec.overrides)]
    for where, policy in policies:
        for part in ("evict", "quantize"):
            rule = getattr(policy, part, None)
            if rule is not None and rule.method not in IMPLEMENTED[part]:
                raise SpecError(
                    f"{spec.source or '<spec>'}: {where}.{part}.method: {rule.method!r} is valid but not "
                    f"implemented yet (implemented: {', '.join(sorted(IMPLEMENTED[part]))})"
                )


def check_prompt_budgets(resolved: Plan, prompt_tokens: int) -> None:
    """Raise a SpecError if a token-count budget cannot be met by a prompt of ``prompt_tokens`` tokens."""
    for layer, row in enumerate(resolved.policies):
        for head, policy in enumerate(row):
            budget = getattr(policy.evict, "budget", None)
            if isinstance(budget, int) and budget > prompt_tokens:
                raise SpecError(
                    f"{resolved.source or '<spec>'}: layer {layer}, KV head {head}: evict.budget {budget} tokens is "
                    f"larger than the {prompt_tokens}-token prompt this graph was compiled for: nothing would be "
                    "evicted; use a smaller budget or a fraction of the prompt"
                )


def check_profiles(resolved: Plan, model_config=None) -> None:
    """Raise a SpecError unless every razor policy's retrieval-head profile exists, is valid, and fits the model
    (its layers and KV heads; with ``model_config``, the model's transformers config, its config hash too)."""
    from kvfx.eviction.razor import check_profile
    from kvfx.head_profile import ProfileError

    configs = {p.evict.describe(): p.evict for row in resolved.policies for p in row if p.evict.method == "razor"}
    for config in configs.values():
        try:
            check_profile(config, resolved.num_layers, resolved.num_kv_heads, model_config)
        except ProfileError as err:
            raise SpecError(f"{resolved.source or '<spec>'}: evict.profile: {err}") from None


def check_quantization(resolved: Plan, head_dims: tuple[int, int] | None) -> None:
    """Raise a SpecError where kvfx's caches would refuse the plan's quantization at the first prefill: several
    quantize configs in one layer, razor with quantization, settings that cannot pack this model's keys or values
    (``head_dims``: key and value head dims, None if the graph does not tell)."""
    from kvfx.quantization import make_quantizer
    from kvfx.quantization.layer_rules import layer_quantize_config
    from kvfx.state import KvfxCacheError

    where = resolved.source or "<spec>"
    checked = set()
    try:
        for layer, row in enumerate(resolved.policies):
            config = layer_quantize_config(layer, row)
            if config is None or head_dims is None or config.describe() in checked:
                continue
            checked.add(config.describe())
            for kind, head_dim in zip(("keys", "values"), head_dims):
                make_quantizer(config, kind).check(layer, head_dim)
    except KvfxCacheError as error:
        raise SpecError(f"{where}: {error}") from None


def compact_layers(resolved: Plan) -> frozenset[int]:
    """The layers with a KV head whose policy re-rotates kept keys to cache positions (``positions: compact``)."""
    return frozenset(layer for layer, row in enumerate(resolved.policies)
                     if any(getattr(p.evict, "positions", "original") == "compact" for p in row))


def register_plan(spec: Spec, num_layers: int, num_kv_heads: int) -> int:
    """Resolve ``spec`` for a model's attention layers and KV heads; returns the plan's id."""
    _PLANS.append(spec.resolve(num_layers, num_kv_heads))
    return len(_PLANS) - 1


def plan(plan_id: int) -> Plan:
    return _PLANS[plan_id]
