"""Quality of a compressed KV cache: teacher-forced perplexity and passkey retrieval, for any spec.

    from kvfx.evaluate import evaluate_specs, write_table, plot_quality
    rows = evaluate_specs("../shared/assets/codelm-27m", {"full": None, "h2o@0.2": h2o_spec},
                          "../shared/assets/text/heldout-code.txt", device="cpu")
    write_table(rows, "quality.json", "quality.md")
    plot_quality(rows, "quality.png")

Both measures read the cache the way decoding does, so that an eviction policy is measured on what it keeps:

- :func:`continuation_perplexity` prefills a prompt in one forward, then feeds the continuation one token at a time
  through ``past_key_values`` (teacher forcing): every scored token attends to the (compressed) cache, never to a
  fresh full-attention forward over the whole text.
- :func:`passkey_retrieval` hides a line ``passkey_<name> = <5 digits>`` at a given depth of a haystack of held-out
  code and asks for it with a prompt ending in ``assert passkey_<name> ==`` (no trailing space: the answer's first
  token is `` <digit>...``; see the shared assets' README), decoded greedily by ``model.generate``.

:func:`evaluate_specs` runs both for each spec (``None`` = the model without kvfx: the full-cache baseline), with the
model's forward compiled by the kvfx backend; a spec whose method kvfx does not implement yet becomes a ``skipped``
row. :func:`write_table` and :func:`plot_quality` write the rows as JSON, Markdown and a PNG.
"""

from __future__ import annotations

import math
import random
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvfx.results import save_figure
from kvfx.spec import Spec, SpecError

__all__ = [
    "DEFAULT_DEPTHS",
    "continuation_perplexity",
    "passkey_prompt",
    "passkey_cases",
    "passkey_retrieval",
    "evaluate_specs",
    "find_spec_error",
    "write_table",
    "plot_quality",
]

DEFAULT_DEPTHS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0, 0.1, ..., 0.9

# Identifiers for passkey names: ordinary English words, as a variable in code would be named.
_NAMES = (
    "alpha", "amber", "anchor", "apple", "arrow", "aspen", "badger", "banner", "beacon", "birch", "bishop",
    "bramble", "bronze", "cactus", "canyon", "cedar", "cobalt", "comet", "copper", "coral", "cricket", "delta",
    "ember", "falcon", "fern", "flint", "garnet", "glacier", "granite", "harbor", "hazel", "heron", "indigo",
    "iris", "jasper", "juniper", "kestrel", "lantern", "lemon", "lotus", "maple", "marble", "meadow", "mercury",
    "nectar", "nimbus", "oak", "onyx", "orbit", "otter", "pebble", "pepper", "pine", "plum", "quartz", "quill",
    "raven", "reef", "river", "saffron", "sage", "silver", "spruce", "summit", "thistle", "thunder", "tulip",
    "umber", "velvet", "violet", "walnut", "willow", "zephyr",
)


# ----------------------------------------------------------------------------------------------------------------
# Perplexity.
# ----------------------------------------------------------------------------------------------------------------


def continuation_perplexity(model, input_ids: torch.Tensor, prompt_tokens: int = 1024,
                            continuation_tokens: int = 1024, *,
                            on_token: Callable[[], None] | None = None) -> dict[str, Any]:
    """Perplexity of ``continuation_tokens`` tokens that follow a ``prompt_tokens``-token prompt, decoded one by one.

    The prompt is one prefill forward (``use_cache=True``); then each continuation token is fed alone with the
    cache (teacher forcing), so every scored token attends to whatever the cache kept. The prefill's last logit
    scores the first continuation token; the last continuation token is scored but never fed. ``input_ids`` is
    ``[B, T]`` or ``[T]`` with ``T >= prompt_tokens + continuation_tokens``; extra tokens are ignored.
    ``on_token`` is called once per scored token (progress bars).

    Returns ``nll`` (mean negative log-likelihood, nats/token), ``perplexity`` (``exp(nll)``), ``tokens`` (how many
    were scored, all rows together), ``prompt_tokens`` and ``seconds``.
    """
    if prompt_tokens < 1 or continuation_tokens < 1:
        raise ValueError(f"prompt_tokens ({prompt_tokens}) and continuation_tokens ({continuation_tokens}) "
                         "must be >= 1")
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    need = prompt_tokens + continuation_tokens
    if ids.shape[1] < need:
        raise ValueError(f"input_ids has {ids.shape[1]} tokens; {prompt_tokens} + {continuation_tokens} are needed")
    ids = ids[:, :need].to(model.device)
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    with torch.inference_mode():
        out = model(input_ids=ids[:, :prompt_tokens], use_cache=True)
        for step in range(continuation_tokens):
            target = ids[:, prompt_tokens + step]
            logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            total -= logprobs.gather(-1, target[:, None]).double().sum()
            if on_token is not None:
                on_token()
            if step + 1 < continuation_tokens:
                out = model(input_ids=target[:, None], past_key_values=out.past_key_values, use_cache=True)
        del out
    nll = total.item() / (continuation_tokens * ids.shape[0])
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": continuation_tokens * ids.shape[0],
            "prompt_tokens": prompt_tokens, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval.
# ----------------------------------------------------------------------------------------------------------------


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def passkey_prompt(tokenizer, haystack_text: str, depth: float, length: int, name: str, digits: str) -> dict[str, Any]:
    """A passkey prompt of about ``length`` tokens built from the start of ``haystack_text``.

    The haystack is the longest run of whole lines from the start of ``haystack_text`` that leaves room for the
    needle line ``passkey_<name> = <digits>`` and the question ``assert passkey_<name> ==``; the needle goes in at
    the line boundary nearest to fraction ``depth`` of the haystack's tokens, but never before its first line: the
    first tokens of a sequence are its attention sink, and codelm-27m (full cache, 2048 tokens) misses a needle at
    token 0 for 3 of 4 seeds (with a BOS token first, 5 of 5), while it finds it one line later for 5 of 5. The
    prompt ends with the question, without a trailing space: the expected answer is `` <digits>``.

    Returns ``text``, ``input_ids`` (a list, as ``tokenizer(text)`` gives it), ``tokens``, ``needle`` (the inserted
    line), ``needle_token`` (index of the needle's first token), ``depth`` (requested) and ``actual_depth``
    (``needle_token`` over the haystack's token count), ``name``, ``digits`` and ``answer`` (`` <digits>``).
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    needle = f"passkey_{name} = {digits}\n"
    question = f"assert passkey_{name} =="
    room = length - _token_count(tokenizer, needle) - _token_count(tokenizer, question)
    room -= len(tokenizer("", add_special_tokens=True).input_ids)  # a BOS token, for tokenizers that add one
    if room < 1:
        raise ValueError(f"length {length} leaves no room for a haystack")
    chars = 5 * length
    while True:  # tokenize enough text to cover `room` tokens (code runs about 4 characters per token)
        piece = haystack_text[:chars]
        encoding = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding.input_ids) > room or chars >= len(haystack_text):
            break
        chars *= 2
    offsets = encoding["offset_mapping"]
    if len(offsets) < room:
        raise ValueError(f"the haystack text has {len(offsets)} tokens; about {room} are needed")
    # The text of the first `room` tokens, cut back to its last whole line.
    end = piece.rfind("\n", 0, offsets[room - 1][1]) + 1
    if end <= 0:
        raise ValueError("the haystack text has no line break within the requested length")
    body = piece[:end]
    # Token index at each line start: the tokens that start before it (the haystack's own tokenization).
    starts = [0] + [i + 1 for i, ch in enumerate(body) if ch == "\n"]  # the last entry is the end of the body
    token_starts = [offset[0] for offset in offsets]
    haystack_tokens = _bisect_left(token_starts, end)
    target = depth * haystack_tokens
    if len(starts) < 3:
        raise ValueError("the haystack needs at least two lines within the requested length")
    token_at = [_bisect_left(token_starts, s) for s in starts]
    best = min(range(1, len(starts) - 1), key=lambda i: (abs(token_at[i] - target), i))
    position = starts[best]
    text = body[:position] + needle + body[position:] + question
    input_ids = tokenizer(text).input_ids
    needle_token = len(tokenizer(body[:position]).input_ids)
    return {
        "text": text, "input_ids": input_ids, "tokens": len(input_ids), "needle": needle.rstrip("\n"),
        "needle_token": needle_token, "depth": depth, "actual_depth": needle_token / max(1, haystack_tokens),
        "name": name, "digits": digits, "answer": f" {digits}",
    }


def _bisect_left(values: list[int], x: int) -> int:
    import bisect

    return bisect.bisect_left(values, x)


def passkey_cases(tokenizer, haystack_text: str, depths: Sequence[float] = DEFAULT_DEPTHS, length: int = 2048,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One :func:`passkey_prompt` per depth; the names, digits and haystack offsets come from ``seed`` alone.

    Each depth gets its own haystack: the held-out text from a random line start, so that the cases do not all
    share one stretch of code.
    """
    rng = random.Random(seed)
    span = 8 * length  # characters each haystack may need (about twice what `length` tokens of code take)
    if len(haystack_text) <= span:
        raise ValueError(f"the haystack text ({len(haystack_text)} characters) is too short for {length} tokens")
    cases = []
    for depth in depths:
        name = rng.choice(_NAMES)
        digits = str(rng.randrange(10_000, 100_000))
        at = rng.randrange(0, len(haystack_text) - span)
        at = haystack_text.find("\n", at) + 1 if at else 0
        case = passkey_prompt(tokenizer, haystack_text[at:at + 2 * span], depth, length, name, digits)
        case["haystack_offset"] = at
        cases.append(case)
    return cases


def passkey_retrieval(model, tokenizer, haystack_text: str, depths: Sequence[float] = DEFAULT_DEPTHS,
                      length: int = 2048, seed: int = 0, max_new_tokens: int = 6, *,
                      on_case: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Greedy passkey retrieval at each depth; a case is correct iff the continuation starts with `` <digits>``.

    Returns one dict per depth: ``depth``, ``length`` (the haystack length asked for), ``actual_depth``, ``tokens``
    (prompt length), ``needle_token``, ``name``, ``digits``, ``output`` (the decoded continuation) and ``correct``.
    """
    results = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for case in passkey_cases(tokenizer, haystack_text, depths, length, seed):
        ids = torch.tensor([case["input_ids"]], device=model.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        output = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        result = {key: case[key] for key in ("depth", "actual_depth", "tokens", "needle_token", "name", "digits")}
        result.update(length=length, output=output, correct=output.startswith(case["answer"]))
        results.append(result)
        if on_case is not None:
            on_case(result)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Many specs.
# ----------------------------------------------------------------------------------------------------------------


def find_spec_error(error: BaseException) -> SpecError | None:
    """The SpecError behind ``error``: dynamo wraps backend errors (BackendCompilerFailed, ``inner_exception``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SpecError):
            return error
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


def _describe_spec(spec: Spec | None) -> dict[str, Any]:
    """``method``, ``quantize``, ``budget``, ``params`` (the default evict rule's other parameters) and ``spec``."""
    if spec is None:
        return {"method": "full", "quantize": "none", "budget": None, "params": {}, "spec": None}
    data = spec.to_dict()
    evict = dict(data.get("default", {}).get("evict", {"method": "none"}))
    method = evict.pop("method")
    budget = evict.pop("budget", None)
    return {"method": method, "quantize": spec.default.quantize.method, "budget": budget, "params": evict,
            "spec": data}


def evaluate_specs(model_path: str | Path, specs: Mapping[str, Any], text_path: str | Path, *,
                   prompt_tokens: int = 1024, continuation_tokens: int = 1024, ppl_windows: int = 1,
                   passkey_length: int | Sequence[int] = 2048, depths: Sequence[float] = DEFAULT_DEPTHS,
                   seed: int = 0, max_new_tokens: int = 6, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, compiler: str | None = None, progress: bool = True,
                   on_row: Callable[[list], None] | None = None, model=None, tokenizer=None,
                   ) -> list[dict[str, Any]]:
    """Perplexity and passkey retrieval of one model under each spec; one row per spec, in order.

    ``specs`` maps a row name to a spec (a path, dict or :class:`~kvfx.spec.Spec`) or ``None``: the model without
    kvfx (the full-cache baseline). The model is loaded once (or ``model``/``tokenizer`` are used as given) and its
    forward is compiled with the kvfx backend for each spec (``torch._dynamo.reset()`` first, so no spec reuses
    another's compiled code; compiler ``aot_eager`` on CPU, ``inductor`` on CUDA unless ``compiler`` says), then
    restored. Perplexity is measured on ``ppl_windows`` stretches of ``text_path`` (each from the line start nearest
    to fraction ``(i + 0.5) / ppl_windows`` of the text: its middle for one window) and pooled over all their
    tokens; passkey haystacks are drawn from the whole text by ``seed``. dtype: float32 on CPU, bfloat16 on CUDA.
    ``passkey_length`` may be a sequence of haystack lengths: the depth x length grid, each length's cases drawn by
    ``seed`` as for that length alone (so a length's cases do not depend on the other lengths asked for).

    Each row: ``name``, ``status`` (``ok``; ``skipped`` when kvfx rejects the spec, e.g. a method not implemented
    yet; ``error`` for any other failure), ``message``, ``method``, ``quantize``, ``budget``, ``params``, ``spec``,
    ``ppl``, ``nll``, ``ppl_tokens``, ``ppl_per_window``, ``passkey_accuracy`` (None without depths), ``passkey``
    (per-depth results, one length after another), ``passkey_length`` (as given), ``seconds`` (compile included),
    ``ppl_seconds``, ``passkey_seconds``, ``graphs`` (graphs dynamo compiled for the spec).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kvfx.state

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    compiler = compiler or ("inductor" if device.type == "cuda" else "aot_eager")
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = Path(text_path).read_text()
    if ppl_windows < 1:
        raise ValueError(f"ppl_windows is {ppl_windows}; at least one window is needed")
    ppl_ids = [_perplexity_ids(tokenizer, text, (i + 0.5) / ppl_windows, prompt_tokens + continuation_tokens)
               for i in range(ppl_windows)]

    lengths = _passkey_lengths(passkey_length)
    per_spec = ppl_windows * continuation_tokens + len(depths) * len(lengths)
    bar = tqdm(total=per_spec * len(specs), disable=not progress, unit="step", dynamic_ncols=True)
    rows = []
    try:
        for name, given in specs.items():
            bar.set_description(name)
            row = {"name": name, "status": "ok", "message": ""}
            done = bar.n
            started = time.perf_counter()
            try:
                spec = None if given is None else Spec.coerce(given)
                row.update(_describe_spec(spec))
                row.update(_evaluate_one(model, tokenizer, spec, compiler, ppl_ids, prompt_tokens,
                                         continuation_tokens, text, passkey_length, depths, seed, max_new_tokens,
                                         step=lambda *_: bar.update()))
            except Exception as error:  # noqa: BLE001 - one bad spec must not end a long sweep
                spec_error = find_spec_error(error)
                if spec_error is not None:
                    row.update(status="skipped", message=str(spec_error).splitlines()[0])
                else:
                    row.update(status="error", message=f"{type(error).__name__}: {error}".splitlines()[0],
                               traceback=traceback.format_exc())
                bar.write(f"kvfx.evaluate: {name}: {row['status']}: {row['message']}")
            finally:
                kvfx.state.REGISTRY.collect()
            row["seconds"] = time.perf_counter() - started
            bar.update(done + per_spec - bar.n)
            if row["status"] == "ok":
                bar.set_postfix(ppl=f"{row['ppl']:.3f}", passkey=row["passkey_accuracy"])
            rows.append(row)
            if on_row is not None:  # e.g. save what is done, so a sweep cut short keeps its finished rows
                on_row(rows)
    finally:
        bar.close()
    return rows


def _passkey_lengths(passkey_length: int | Sequence[int]) -> list[int]:
    """``passkey_length`` as a list of haystack lengths (one int: the usual single length)."""
    lengths = [passkey_length] if isinstance(passkey_length, int) else list(passkey_length)
    if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
        raise ValueError(f"passkey_length is {passkey_length!r}; a positive int or a non-empty sequence of them "
                         "is allowed")
    return lengths


def _perplexity_ids(tokenizer, text: str, offset: float, tokens: int) -> torch.Tensor:
    """``tokens`` tokens of ``text`` from the line start nearest fraction ``offset`` of it (earlier near the end)."""
    at = min(int(offset * len(text)), max(0, len(text) - 8 * tokens))
    at = text.find("\n", at) + 1 if at else 0
    chars = 5 * tokens  # code runs about 4 characters per token; read more only if needed
    while True:
        ids = tokenizer(text[at:at + chars], return_tensors="pt").input_ids
        if ids.shape[1] >= tokens or at + chars >= len(text):
            break
        chars *= 2
    if ids.shape[1] < tokens:
        raise ValueError(f"the text has {ids.shape[1]} tokens from offset {offset}; {tokens} are needed")
    return ids[:, :tokens]


def _evaluate_one(model, tokenizer, spec: Spec | None, compiler: str, ppl_ids, prompt_tokens, continuation_tokens,
                  text, passkey_length, depths, seed, max_new_tokens, step) -> dict[str, Any]:
    """Compile ``model.forward`` for ``spec`` (None: leave it), measure, and restore the original forward."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    had_own_forward = "forward" in model.__dict__
    original = model.__dict__.get("forward")
    if spec is not None:
        model.forward = torch.compile(model.forward, backend="kvfx",
                                      options={"spec": spec, "compiler": compiler, "verbose": False})
    try:
        with warnings.catch_warnings():
            # Compilation chatter (dynamo, transformers) is noise here; kvfx's own warnings stay visible.
            warnings.filterwarnings("ignore", message="(?!kvfx)")
            ppl = [continuation_perplexity(model, ids, prompt_tokens, continuation_tokens, on_token=step)
                   for ids in ppl_ids]
            started = time.perf_counter()
            passkey = [result for length in _passkey_lengths(passkey_length)
                       for result in passkey_retrieval(model, tokenizer, text, depths, length, seed, max_new_tokens,
                                                       on_case=step)]
            passkey_seconds = time.perf_counter() - started
    finally:
        if had_own_forward:
            model.forward = original
        else:
            model.__dict__.pop("forward", None)
        graphs = counters["stats"]["unique_graphs"] - graphs
        torch._dynamo.reset()
    tokens = sum(p["tokens"] for p in ppl)
    nll = sum(p["nll"] * p["tokens"] for p in ppl) / tokens
    return {
        "ppl": math.exp(nll), "nll": nll, "ppl_tokens": tokens, "ppl_prompt_tokens": prompt_tokens,
        "ppl_per_window": [p["perplexity"] for p in ppl],
        "passkey_accuracy": sum(r["correct"] for r in passkey) / len(passkey) if passkey else None,
        "passkey": passkey,
        "passkey_length": passkey_length, "ppl_seconds": sum(p["seconds"] for p in ppl),
        "passkey_seconds": passkey_seconds, "graphs": graphs,
    }


# ----------------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------------


def _format_budget(budget: Any) -> str:
    if budget is None:
        return "full"
    return f"{budget:g}" if isinstance(budget, float) else f"{budget} tok"


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items()) or "-"


def write_table(rows: Sequence[Mapping[str, Any]], json_path: str | Path, md_path: str | Path,
                meta: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``rows`` as JSON (``{"meta": ..., "rows": [...]}``) and as a Markdown table; returns both paths."""
    from kvfx.results import write_json

    json_path = write_json(json_path, {"meta": dict(meta or {}), "rows": [dict(r) for r in rows]})
    lines = []
    if meta:
        lines += [f"- {key}: {value}" for key, value in meta.items()] + [""]
    lines += ["| spec | method | budget | params | perplexity | passkey | per depth | seconds | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ok = row.get("status", "ok") == "ok"
        passkey = row.get("passkey") or []
        grid = len({r.get("length") for r in passkey}) > 1  # several haystack lengths: say which each mark is
        depth_marks = " ".join((f"{r['length']}/" if grid else "") + f"{r['depth']:g}:{'Y' if r['correct'] else 'n'}"
                               for r in passkey) if ok else ""
        status = row.get("status", "ok") + (f": {row['message']}" if row.get("message") else "")
        cells = [
            row["name"], str(row.get("method", "")), _format_budget(row.get("budget")),
            _format_params(row.get("params") or {}),
            f"{row['ppl']:.3f}" if ok else "-",
            f"{sum(r['correct'] for r in passkey)}/{len(passkey)}" if ok and passkey else "-",
            depth_marks or "-", f"{row.get('seconds', 0):.1f}", status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def plot_quality(rows: Sequence[Mapping[str, Any]], png_path: str | Path, title: str | None = None) -> Path:
    """Perplexity vs budget (left) and passkey accuracy vs budget (right): one line per eviction method; rows
    without a budget (the full cache, or a spec without eviction) are horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    curves: dict[str, list[Mapping[str, Any]]] = {}
    references = []
    for row in ok:
        if row.get("budget") is None:
            references.append(row)
        else:
            curves.setdefault(row["method"], []).append(row)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["--", ":", "-."]
    for index, row in enumerate(references):
        for axis, key in ((left, "ppl"), (right, "passkey_accuracy")):
            if row.get(key) is None:
                continue
            axis.axhline(row[key], color="black" if index == 0 else f"C{7 + index}", linestyle=styles[index % 3],
                         linewidth=1.2, label=f"{row['name']} ({row[key]:.3g})")
    for index, (method, members) in enumerate(sorted(curves.items())):
        members = sorted(members, key=lambda r: r["budget"])
        budgets = [r["budget"] for r in members]
        style = dict(marker="osD^vP*X"[index % 8], color=f"C{index}", label=method, alpha=0.85)
        left.plot(budgets, [r["ppl"] for r in members], **style)
        scored = [r for r in members if r.get("passkey_accuracy") is not None]
        right.plot([r["budget"] for r in scored], [r["passkey_accuracy"] for r in scored], **style)
    ppls = [r["ppl"] for r in ok]
    if ppls and max(ppls) / min(ppls) > 5:
        left.set_yscale("log")
    counts = any(isinstance(r.get("budget"), int) for r in ok)
    xlabel = "KV budget (fraction of the prompt" + (", or tokens)" if counts else ")")
    budgets = sorted({r["budget"] for members in curves.values() for r in members})
    if budgets and not counts:  # fractions: the axis from 0, ticks at the measured budgets
        for axis in (left, right):
            axis.set_xlim(0, max(budgets) * 1.1)
            axis.set_xticks(budgets)
    left.set(xlabel=xlabel, ylabel="perplexity (teacher-forced decode)", title="Perplexity")
    right.set(xlabel=xlabel, ylabel="passkey accuracy", title="Passkey retrieval", ylim=(-0.05, 1.05))
    skipped = [r["name"] for r in rows if r.get("status", "ok") != "ok"]
    for axis in (left, right):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    suptitle = title or ""
    if skipped:
        suptitle += ("\n" if suptitle else "") + f"not measured: {len(skipped)} spec(s) (see the table)"
    if suptitle:
        figure.suptitle(suptitle, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, png_path)
