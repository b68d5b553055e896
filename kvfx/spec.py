"""Spec v1: a declarative, versioned file that says what the KV cache does per layer and KV head.

A spec is YAML (``.yaml``/``.yml``) or JSON (``.json``)::

    version: 1
    default:                      # every attention layer and KV head
      evict:    {method: h2o, budget: 0.2}
      quantize: {method: kivi, bits: 4}
    overrides:                    # applied in order; later entries win
      - layers: "0-1"             # "all", 3, "3", "0-3", "-1", "-2--1", "0,2,4-6", or a list of those
        evict: {method: none}     # an override may set evict, quantize or both
      - layers: all
        heads: [0, 3]             # KV-head indices; omitted = all heads
        quantize: {method: none}

Loading validates everything that can be checked without a model (types, ranges, unknown keys,
cross-field rules); ``Spec.resolve(num_layers, num_kv_heads)`` checks the selectors against a
model and returns a ``Plan`` with one ``Policy`` per (layer, KV head). Every problem is reported
as a ``SpecError`` naming the file, the key path, the bad value and what is allowed.

This module is pure Python on purpose (no torch): specs are parsed and checked by the CLI and by
tests without paying for, or depending on, the compiler stack.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Callable, Literal, NoReturn, Union

import pydantic
import pydantic.dataclasses
import yaml
from pydantic import Field, PlainValidator, TypeAdapter, model_validator
from pydantic_core import ArgsKwargs, PydanticCustomError

__all__ = [
    "SUPPORTED_VERSIONS",
    "EVICT_METHODS",
    "QUANTIZE_METHODS",
    "SpecError",
    "EvictNone",
    "EvictWindow",
    "EvictH2O",
    "EvictKeyformer",
    "EvictSnapKV",
    "EvictRazor",
    "QuantizeNone",
    "QuantizeKIVI",
    "QuantizeGEAR",
    "EvictConfig",
    "QuantizeConfig",
    "Policy",
    "Override",
    "Spec",
    "Plan",
]

SUPPORTED_VERSIONS = (1,)
DICT_SOURCE = "<dict>"  # what messages call a spec that did not come from a file


class SpecError(ValueError):
    """A spec is invalid: the message is one line per problem, `source: key.path: what is wrong`."""


# --------------------------------------------------------------------------------------------
# Scalar validators. Each one is strict (no "4" -> 4, no True -> 1) and fails with a message of
# the form "<value> is not <what is allowed>", which the error translator prefixes with the
# file and key path.
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """repr() of a bad value, shortened so one error stays one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject(message: str, field: str | None = None) -> NoReturn:
    """Fail validation with a ready-made message; `field` names the key when raised by a whole-object check."""
    context = {"message": message} if field is None else {"message": message, "field": field}
    raise PydanticCustomError("kvfx_spec", "{message}", context)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _checked(accept: Callable[[Any], bool], allowed: str, convert: Callable[[Any], Any] = lambda v: v):
    """A pydantic validator that keeps values passing `accept` (converted) and rejects the rest."""

    def validate(value: Any) -> Any:
        if not accept(value):
            _reject(f"{_show(value)} is not {allowed}")
        return convert(value)

    return PlainValidator(validate)


def _int_at_least(low: int):
    return _checked(lambda v: _is_int(v) and v >= low, f"an int >= {low}")


def _number_in(low: float, high: float, *, include_low: bool, include_high: bool):
    """A float in an interval; ints are accepted and stored as floats."""
    above = (lambda v: v >= low) if include_low else (lambda v: v > low)
    below = (lambda v: v <= high) if include_high else (lambda v: v < high)
    interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
    return _checked(lambda v: _is_number(v) and above(v) and below(v), f"a number in {interval}", float)


def _one_of(*choices: Any, note: str | None = None):
    """One of a fixed set of ints or strings; `note` (e.g. the method) is appended to the message."""
    allowed = "one of " + ", ".join(str(c) for c in choices) + (f" ({note})" if note else "")
    return _checked(lambda v: any(type(v) is type(c) and v == c for c in choices), allowed)


def _count_or_fraction(value: Any, *, low_fraction_ok: bool, min_count: int) -> int | float | None:
    """Read a budget-like value: a float is a fraction, an int a token count; None if it is neither.

    A float > 1 with an integral value (512.0) is read as the count 512, because "fraction of the
    prompt" only makes sense up to 1.0. Python int 1 is one token; float 1.0 is 100%.
    """
    if _is_int(value):
        return value if value >= min_count else None
    if isinstance(value, float):
        if 0 < value <= 1 or (low_fraction_ok and value == 0):
            return value
        if value > 1 and value.is_integer():
            return int(value)
    return None


def _validate_budget(value: Any) -> int | float:
    budget = _count_or_fraction(value, low_fraction_ok=False, min_count=1)
    if budget is None:
        _reject(f"{_show(value)} is not a fraction in (0, 1] or a token count >= 1")
    return budget


def _validate_recent(value: Any) -> int | float:
    recent = _count_or_fraction(value, low_fraction_ok=True, min_count=0)
    if recent is None:
        _reject(f"{_show(value)} is not a fraction of the budget in [0, 1] or a token count >= 0")
    return recent


def _validate_tau(value: Any) -> tuple[float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(t) and t > 0 for t in value)):
        _reject(f"{_show(value)} is not a pair [tau_init, tau_end] of numbers > 0")
    return (float(value[0]), float(value[1]))


Budget = Annotated[Union[int, float], PlainValidator(_validate_budget)]
"""A fraction in (0, 1] of the prompt length (float) or a token count >= 1 (int)."""
Recent = Annotated[Union[int, float], PlainValidator(_validate_recent)]
"""A fraction in [0, 1] of the budget (float) or a token count >= 0 (int)."""
Tau = Annotated[tuple[float, float], PlainValidator(_validate_tau)]
Count = Annotated[int, _int_at_least(1)]
NonNegativeInt = Annotated[int, _int_at_least(0)]
AnyInt = Annotated[int, _checked(_is_int, "an int")]
Flag = Annotated[bool, _checked(lambda v: isinstance(v, bool), "true or false")]
Path = Annotated[str, _checked(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty path string")]
OddCount = Annotated[int, _checked(lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd int >= 1")]
OpenUnit = Annotated[float, _number_in(0, 1, include_low=False, include_high=False)]


# --------------------------------------------------------------------------------------------
# Layer / head selectors: "all", 3, "3", "0-3", "-1", "-2--1", "0,2,4-6", or a list of those.
# Stored in a canonical string form ("0,2,4-6") so equal selections compare equal and dump
# the same; turned into concrete indices only by `resolve`, which knows the model's size.
# --------------------------------------------------------------------------------------------

_SELECTOR_SYNTAX = "use all, 3, '0-3', '-1', '-2--1', '0,2,4-6' or a list of those; ranges are inclusive"
_TERM = re.compile(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?")

Term = Union[None, tuple[int, int]]  # None = all, else an inclusive (start, stop) range


def _parse_term(text: str) -> Term:
    """One selector term; raises ValueError for bad syntax or a range that is empty in any model."""
    if text.strip() == "all":
        return None
    match = _TERM.fullmatch(text)
    if not match:
        raise ValueError(_SELECTOR_SYNTAX)
    start = int(match[1])
    stop = start if match[2] is None else int(match[2])
    if (start < 0) == (stop < 0) and start > stop:  # selects nothing whatever the model's size
        raise ValueError(f"range {start}-{stop} is empty; write ranges low-high")
    return (start, stop)


def _split_selector(value: Any) -> list[str]:
    """The raw text terms of a selector value (an int, a string, or a list of ints/strings)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    terms = []
    for item in items:
        if _is_int(item):
            terms.append(str(item))
        elif isinstance(item, str):
            terms.extend(item.split(","))
        else:
            raise ValueError(_SELECTOR_SYNTAX)
    if not terms:
        raise ValueError(_SELECTOR_SYNTAX)
    return terms


def _format_term(term: Term) -> str:
    if term is None:
        return "all"
    start, stop = term
    return str(start) if start == stop else f"{start}-{stop}"


def _selector_validator(noun: str):
    """Validate a selector of `noun`s (layer / KV head) and store it in canonical string form."""

    def validate(value: Any) -> str:
        try:
            terms = [_parse_term(text) for text in _split_selector(value)]
        except ValueError as error:
            _reject(f"{_show(value)} is not a {noun} selector ({error})")
        return ",".join(_format_term(term) for term in terms)

    return PlainValidator(validate)


def _select(selector: str, count: int, noun: str) -> list[int]:
    """The sorted indices a (validated) selector picks out of `count`; ValueError if any is out of range."""
    chosen: set[int] = set()
    for term in map(_parse_term, selector.split(",")):
        if term is None:
            chosen.update(range(count))
            continue
        start, stop = (index + count if index < 0 else index for index in term)
        for given, index in zip(term, (start, stop)):
            if not 0 <= index < count:
                raise ValueError(
                    f"{selector!r} selects {noun} {given}, but the model has {count} {noun}s "
                    f"(valid: 0 to {count - 1}, or -{count} to -1)"
                )
        chosen.update(range(start, stop + 1))
    if not chosen:
        raise ValueError(f"{selector!r} selects no {noun}s in a model with {count} {noun}s")
    return sorted(chosen)


def _format_indices(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs = itertools.groupby(enumerate(sorted(indices)), key=lambda pair: pair[1] - pair[0])
    terms = []
    for _, run in runs:
        members = [index for _, index in run]
        terms.append(_format_term((members[0], members[-1])))
    return ",".join(terms)


LayerSelector = Annotated[str, _selector_validator("layer")]
HeadSelector = Annotated[str, _selector_validator("KV head")]


# --------------------------------------------------------------------------------------------
# Config dataclasses.
# --------------------------------------------------------------------------------------------


def _content_fields(cls: type) -> list[str]:
    """The keys a spec file may give for `cls`: every compared field (`source` is bookkeeping, not content)."""
    return [f.name for f in dataclasses.fields(cls) if f.compare]


class _Config:
    """Base of all spec dataclasses: rejects unknown keys and non-mapping input with a useful message."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, ArgsKwargs):  # direct construction: Python keyword arguments
            given, allowed = data.kwargs or {}, [f.name for f in dataclasses.fields(cls)]
        elif isinstance(data, dict):
            given, allowed = data, _content_fields(cls)
        elif isinstance(data, cls):
            return data
        else:
            _reject(f"{_show(data)} is not a mapping (allowed keys: {', '.join(_content_fields(cls))})")
        for key in given:
            if key not in allowed:
                _reject(f"unknown key (allowed: {', '.join(allowed)})", field=str(key))
        return data


def _config(cls: type) -> type:
    """Make `cls` a frozen, keyword-only, validated dataclass whose constructor raises SpecError.

    Loading goes through pydantic directly (and translates its errors the same way); wrapping
    __init__ gives Python callers who build configs by hand the same one-line messages.
    """
    cls = pydantic.dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    validate = cls.__init__

    @functools.wraps(validate)
    def __init__(self, **kwargs: Any) -> None:
        try:
            validate(self, **kwargs)
        except pydantic.ValidationError as error:
            raise SpecError(_describe_errors(error, f"<{cls.__name__}>")) from None

    cls.__init__ = __init__
    return cls


def _plain(value: Any) -> Any:
    """A config as plain dicts/lists/scalars (YAML/JSON-ready); None-valued and non-content fields are left out."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.compare and getattr(value, f.name) is not None
        }
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class _Method(_Config):
    """Base of evict/quantize method configs; `method` is the discriminating field."""

    method: str

    def describe(self) -> str:
        """`h2o(budget=0.2, recent=0.1)`, or just the method name when it has no parameters."""
        params = [f"{key}={value}" for key, value in _plain(self).items() if key != "method"]
        return f"{self.method}({', '.join(params)})" if params else self.method


def _check_not_above(self: Any, field: str, limit_field: str, *, strict: bool) -> None:
    """Cross-field rule: a token count must stay below (or at most) the budget when both are counts."""
    value, limit = getattr(self, field), getattr(self, limit_field)
    if _is_int(value) and _is_int(limit) and (value >= limit if strict else value > limit):
        relation = "<" if strict else "<="
        _reject(f"{value} is not {relation} {limit_field} ({limit} tokens)", field=field)


def _check_multiple_of_group(self: Any) -> None:
    """Cross-field rule: the full-precision residual is flushed in whole quantization groups."""
    if self.residual % self.group:
        _reject(f"{self.residual} is not a multiple of group ({self.group})", field="residual")


@_config
class EvictNone(_Method):
    """Keep every token."""

    method: Literal["none"] = "none"


@_config
class EvictWindow(_Method):
    """StreamingLLM: keep `sink` first tokens plus the most recent tokens, `budget` in all."""

    method: Literal["window"] = "window"
    sink: NonNegativeInt = 4
    budget: Budget
    positions: Annotated[str, _one_of("original", "compact")] = "original"

    @model_validator(mode="after")
    def _cross_checks(self) -> EvictWindow:
        _check_not_above(self, "sink", "budget", strict=True)
        return self


@_config
class EvictH2O(_Method):
    """Heavy-Hitter Oracle: keep the `recent` window plus the tokens with most accumulated attention.

    The defaults are the paper's: a budget of 20% of the prompt, half of it (10% of the prompt) recent tokens.
    """

    method: Literal["h2o"] = "h2o"
    budget: Budget = 0.2
    recent: Recent = 0.5

    @model_validator(mode="after")
    def _cross_checks(self) -> EvictH2O:
        _check_not_above(self, "recent", "budget", strict=False)
        return self


@_config
class EvictKeyformer(_Method):
    """Keyformer: like H2O, but scores keys with a Gumbel-softmax whose temperature goes tau_init -> tau_end."""

    method: Literal["keyformer"] = "keyformer"
    budget: Budget = 0.5
    recent: Recent = 0.3
    tau: Tau = (1.0, 2.0)
    seed: AnyInt = 0
    max_new_tokens: Count = 256  # the decode steps over which tau goes from tau_init to tau_end (then stays)

    @model_validator(mode="after")
    def _cross_checks(self) -> EvictKeyformer:
        _check_not_above(self, "recent", "budget", strict=False)
        return self


@_config
class EvictSnapKV(_Method):
    """SnapKV: at prefill, keep the prompt tokens the last `window` queries attend to (pooled)."""

    method: Literal["snapkv"] = "snapkv"
    budget: Budget
    window: Count = 32
    pool: OddCount = 7
    pooling: Annotated[str, _one_of("max", "avg")] = "max"

    @model_validator(mode="after")
    def _cross_checks(self) -> EvictSnapKV:
        _check_not_above(self, "window", "budget", strict=True)
        return self


@_config
class EvictRazor(_Method):
    """RazorAttention: full cache for retrieval heads (from a profile), sink + window for the rest."""

    method: Literal["razor"] = "razor"
    profile: Path
    sink: NonNegativeInt = 4
    min_window: Count = 256
    compress_ratio: Annotated[float, _checked(lambda v: _is_number(v) and v >= 1, "a number >= 1", float)] = 5.0
    compensate: Flag = True
    echo_ratio: OpenUnit = 0.01
    induction_ratio: OpenUnit = 0.14


@_config
class QuantizeNone(_Method):
    """Keep the cache in the model's dtype."""

    method: Literal["none"] = "none"


@_config
class QuantizeKIVI(_Method):
    """KIVI: keys per-channel, values per-token, `bits` wide in groups; the last `residual` tokens stay exact."""

    method: Literal["kivi"] = "kivi"
    bits: Annotated[int, _one_of(2, 4, 8, note="kivi")] = 4
    group: Count = 32
    residual: Count = 128

    @model_validator(mode="after")
    def _cross_checks(self) -> QuantizeKIVI:
        _check_multiple_of_group(self)
        return self


@_config
class QuantizeGEAR(_Method):
    """GEAR: quantize, then correct with a rank-`rank` error approximation and sparse `outliers`."""

    method: Literal["gear"] = "gear"
    bits: Annotated[int, _one_of(2, 4, note="gear")] = 4
    group: Count = 32
    residual: Count = 128
    rank: Count = 2
    outliers: Annotated[float, _number_in(0, 0.5, include_low=True, include_high=False)] = 0.02
    prefill_rank: Count = 4

    @model_validator(mode="after")
    def _cross_checks(self) -> QuantizeGEAR:
        _check_multiple_of_group(self)
        return self


_EVICT_CLASSES = (EvictNone, EvictWindow, EvictH2O, EvictKeyformer, EvictSnapKV, EvictRazor)
_QUANTIZE_CLASSES = (QuantizeNone, QuantizeKIVI, QuantizeGEAR)
EVICT_METHODS: dict[str, type] = {cls.method: cls for cls in _EVICT_CLASSES}
QUANTIZE_METHODS: dict[str, type] = {cls.method: cls for cls in _QUANTIZE_CLASSES}
_METHODS_BY_KIND = {"evict": EVICT_METHODS, "quantize": QUANTIZE_METHODS}

EvictConfig = Annotated[Union[_EVICT_CLASSES], Field(discriminator="method")]
QuantizeConfig = Annotated[Union[_QUANTIZE_CLASSES], Field(discriminator="method")]


@_config
class Policy(_Config):
    """What the cache does for one (layer, KV head): an eviction method and a quantization method."""

    evict: EvictConfig = dataclasses.field(default_factory=EvictNone)
    quantize: QuantizeConfig = dataclasses.field(default_factory=QuantizeNone)

    def describe(self) -> str:
        """`evict=h2o(budget=0.2, recent=0.1) quantize=none`."""
        return f"evict={self.evict.describe()} quantize={self.quantize.describe()}"


@_config
class Override(_Config):
    """Replace evict and/or quantize for the selected layers and KV heads (the unset part is kept)."""

    layers: LayerSelector
    heads: HeadSelector = "all"
    evict: EvictConfig | None = None
    quantize: QuantizeConfig | None = None

    @model_validator(mode="after")
    def _sets_something(self) -> Override:
        if self.evict is None and self.quantize is None:
            _reject("sets neither evict nor quantize (give at least one)")
        return self


@_config
class Spec(_Config):
    """A whole spec file: the default policy plus ordered overrides. `source` names the file in messages."""

    version: Annotated[int, _one_of(*SUPPORTED_VERSIONS, note="supported spec versions")]
    default: Policy = dataclasses.field(default_factory=Policy)
    overrides: tuple[Override, ...] = ()
    source: str | None = dataclasses.field(default=None, compare=False)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def identity(cls) -> Spec:
        """The spec that changes nothing: every layer and head keeps a full-precision, full cache."""
        return cls(version=SUPPORTED_VERSIONS[-1])

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Spec:
        """Validate a parsed spec (a dict as YAML/JSON give it); `source` names it in error messages."""
        label = source or DICT_SOURCE
        if isinstance(data, Mapping):
            data = dict(data)
        _check_version_first(data, label)
        try:
            spec = _SPEC_ADAPTER.validate_python(data)
        except pydantic.ValidationError as error:
            raise SpecError(_describe_errors(error, label)) from None
        return dataclasses.replace(spec, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Spec:
        """Read and validate a spec file (.yaml/.yml as YAML, .json as JSON)."""
        source = str(os.fspath(path))
        return cls.from_dict(_parse_file(source), source=source)

    @classmethod
    def coerce(cls, value: Spec | Mapping | str | os.PathLike | None) -> Spec:
        """Whatever a caller passed as `spec=`: None (identity), a path, a dict, or a Spec."""
        if value is None:
            return cls.identity()
        if isinstance(value, Spec):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(
            f"a kvfx spec must be None, a path (str or os.PathLike), a dict or a Spec, not {type(value).__name__}"
        )

    # ---- output -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts/lists with every parameter spelled out; `Spec.from_dict(s.to_dict()) == s`."""
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def dump(self, path: str | os.PathLike) -> None:
        """Write the spec as YAML or JSON, chosen by the file's extension like `load`."""
        target = str(os.fspath(path))
        text = self.to_json() if _file_format(target) == "json" else self.to_yaml()
        with open(target, "w", encoding="utf-8") as file:
            file.write(text)

    def summary(self) -> str:
        """One line for logs, e.g. `h2o.yaml: evict=h2o quantize=none (+1 override)`."""
        text = f"evict={self.default.evict.method} quantize={self.default.quantize.method}"
        if self.source:
            text = f"{os.path.basename(self.source)}: {text}"
        if self.overrides:
            text += f" (+{len(self.overrides)} override{'s' if len(self.overrides) > 1 else ''})"
        return text

    # ---- resolution -------------------------------------------------------------------------

    def resolve(self, num_layers: int, num_kv_heads: int) -> Plan:
        """The policy of every (layer, KV head) of a model: the default, then each override in order."""
        for name, count in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
            if not (_is_int(count) and count >= 1):
                raise ValueError(f"{name} must be an int >= 1, not {count!r}")
        grid = [[self.default] * num_kv_heads for _ in range(num_layers)]
        for position, override in enumerate(self.overrides):
            layers = self._selected(override.layers, num_layers, "layer", f"overrides[{position}].layers")
            heads = self._selected(override.heads, num_kv_heads, "KV head", f"overrides[{position}].heads")
            for layer, head in itertools.product(layers, heads):
                grid[layer][head] = _apply(grid[layer][head], override)
        return Plan(policies=tuple(map(tuple, grid)), source=self.source)

    def _selected(self, selector: str, count: int, noun: str, path: str) -> list[int]:
        try:
            return _select(selector, count, noun)
        except ValueError as error:
            raise SpecError(f"{self.source or DICT_SOURCE}: {path}: {error}") from None


def _apply(policy: Policy, override: Override) -> Policy:
    """`policy` with the parts `override` sets replaced."""
    return Policy(evict=override.evict or policy.evict, quantize=override.quantize or policy.quantize)


_SPEC_ADAPTER = TypeAdapter(Spec)


def _check_version_first(data: Any, label: str) -> None:
    """Check `version` before anything else, so a file for another version fails with one clear line
    instead of a list of unknown keys."""
    if not isinstance(data, dict):
        return  # reported by validation as a wrong top-level type
    supported = ", ".join(map(str, SUPPORTED_VERSIONS))
    if "version" not in data:
        raise SpecError(f"{label}: version: missing (supported versions: {supported})")
    version = data["version"]
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise SpecError(
            f"{label}: version: {_show(version)} is not a supported version (supported versions: {supported})"
        )


# --------------------------------------------------------------------------------------------
# Plan: a resolved spec for one model shape.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The policy of every (layer, KV head), from `Spec.resolve`; `policies[layer][kv_head]`."""

    policies: tuple[tuple[Policy, ...], ...]
    source: str | None = dataclasses.field(default=None, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.policies)

    @property
    def num_kv_heads(self) -> int:
        return len(self.policies[0])

    def layer_policies(self, layer: int) -> tuple[Policy, ...]:
        """One policy per KV head of `layer` (negative indices count from the end)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer} is out of range for a plan of {self.num_layers} layers")
        return self.policies[layer]

    def policy(self, layer: int, kv_head: int) -> Policy:
        row = self.layer_policies(layer)
        if not -self.num_kv_heads <= kv_head < self.num_kv_heads:
            raise IndexError(f"KV head {kv_head} is out of range for a plan of {self.num_kv_heads} KV heads")
        return row[kv_head]

    def methods(self) -> set[tuple[str, str]]:
        """The (evict method, quantize method) pairs used anywhere, e.g. {("h2o", "kivi"), ("none", "none")}."""
        return {(p.evict.method, p.quantize.method) for row in self.policies for p in row}

    def describe(self) -> str:
        """A per-layer table; consecutive layers with the same per-head policies share one line."""
        header = f"kvfx plan: {self.num_layers} layers x {self.num_kv_heads} KV heads"
        lines = [header + (f" ({self.source})" if self.source else "")]
        rows = itertools.groupby(enumerate(self.policies), key=lambda pair: pair[1])
        for row, members in rows:
            layers = [layer for layer, _ in members]
            lines.extend(_describe_row(_plural("layer", layers), row))
        return "\n".join(lines)

    __str__ = describe


def _plural(noun: str, indices: list[int]) -> str:
    return f"{noun}{'s' if len(indices) > 1 else ''} {_format_indices(indices)}"


def _describe_row(label: str, row: tuple[Policy, ...]) -> list[str]:
    """One line when every head agrees, otherwise a line per group of heads sharing a policy."""
    heads_by_policy: dict[Policy, list[int]] = {}
    for head, policy in enumerate(row):
        heads_by_policy.setdefault(policy, []).append(head)
    if len(heads_by_policy) == 1:
        return [f"  {label}: {row[0].describe()}"]
    return [f"  {label}:"] + [
        f"    {_plural('head', heads)}: {policy.describe()}" for policy, heads in heads_by_policy.items()
    ]


# --------------------------------------------------------------------------------------------
# Translating pydantic's errors into `source: key.path: message` lines.
# --------------------------------------------------------------------------------------------


def _describe_errors(error: pydantic.ValidationError, label: str) -> str:
    return "\n".join(_describe_error(details, label) for details in error.errors(include_url=False))


def _describe_error(details: Any, label: str) -> str:
    """One pydantic error as a line. Union tags in the location (pydantic adds the method name after
    `evict`/`quantize`) are dropped, since they are not keys the user wrote."""
    path: list[Any] = []
    method = None
    for previous, part in zip((None,) + details["loc"], details["loc"]):
        if previous in _METHODS_BY_KIND and part in _METHODS_BY_KIND[previous]:
            method = part
        else:
            path.append(part)
    context = details.get("ctx") or {}
    kind, value = details["type"], details["input"]
    if kind == "kvfx_spec":
        message = context["message"]
        if "field" in context:
            path.append(context["field"])
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        methods = ", ".join(_METHODS_BY_KIND[path[-1]])
        path.append("method")
        if "method" in value:
            message = f"{_show(value['method'])} is not one of {methods}"
        else:
            message = f"missing (one of {methods})"
    elif kind == "model_attributes_type":
        message = f"{_show(value)} is not a mapping with a method key"
    elif kind == "tuple_type":
        message = f"{_show(value)} is not a list"
    elif kind == "missing":
        message = f"missing (required by {method})" if method else "missing (required)"
    else:  # a type this module does not expect: still one line, with pydantic's short message
        message = f"{_show(value)}: {details['msg']}"
    return f"{label}: {_format_path(path)}: {message}"


def _format_path(path: list[Any]) -> str:
    """("overrides", 1, "evict") -> "overrides[1].evict"; () -> "top level"."""
    text = ""
    for part in path:
        text += f"[{part}]" if _is_int(part) else (f".{part}" if text else str(part))
    return text or "top level"


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------

_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def _file_format(source: str) -> str:
    extension = os.path.splitext(source)[1].lower()
    if extension not in _FORMATS:
        raise SpecError(f"{source}: unsupported spec file extension {extension!r} (allowed: .yaml, .yml, .json)")
    return _FORMATS[extension]


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a repeated key is an error rather than silently last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key {duplicates[0]!r}")
    return dict(pairs)


def _parse_file(source: str) -> Any:
    """The parsed content of a spec file; every failure (missing, unreadable, malformed) is a SpecError."""
    file_format = _file_format(source)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise SpecError(f"{source}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"{source}: cannot read spec file ({error})") from None
    if file_format == "json":
        return _parse_json(text, source)
    return _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        raise SpecError(f"{source}: {where}: malformed YAML: {error.problem}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{source}: malformed YAML: {error}") from None


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise SpecError(f"{source}: line {error.lineno}, column {error.colno}: malformed JSON: {error.msg}") from None
    except ValueError as error:
        raise SpecError(f"{source}: malformed JSON: {error}") from None
