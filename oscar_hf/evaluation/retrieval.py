"""Long-range retrieval on code: plant an assignment early in a stretch of real code and ask for its value at the end.

A case looks like this (about 3,000 tokens of held-out code around it):

```
    ...code...
    parser_vector_secret = "c41d07be"        <- the needle, indented like the line after it, at a chosen depth
    ...code (thousands of tokens)...

parser_vector_secret = "                     <- the query: the model must continue with c41d07be"
```

The greedy continuation must start with the value and the closing quote (exact match). Keys are built from ordinary
identifier words: the reference code model copies such names far more reliably than `SECRET_3f9a`-style keys of
single characters (measured on a handful of cases while choosing the format), so the test measures the cache rather
than the model's weakness with odd names. The haystack ends at a top-level line boundary, so the query is read as a
new statement rather than as the inside of an unfinished call or docstring.

**Feeding.** The first forward through an `OscarQuantizedCache` (prefill) attends over the exact prompt: a case fed in
one forward would never read a quantized token. Cases are therefore fed in chunks of `chunk_tokens` (chunked
prefill, as serving engines do): the first chunk prefills, every later chunk attends over the stored history (the
2-bit body plus the exact windows) and itself, and the answer is decoded one token per step. With the default
windows (64 sink, 256 recent) and 512-token chunks, a needle below depth ~0.7 of a 3,072-token case is read from the
2-bit body by the last chunk and every decode step.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..cache import cache_keyword

# Identifier words for needle keys; three of them give 27,000 distinct keys.
KEY_WORDS = (
    "alpha", "beta", "gamma", "delta", "kernel", "buffer", "parser", "token", "cache", "widget", "vector", "matrix",
    "socket", "plugin", "router", "sensor", "ledger", "folder", "signal", "module", "cursor", "bucket", "filter",
    "packet", "tensor", "worker", "client", "server", "record", "handle",
)
HEX_DIGITS = "0123456789abcdef"
# A line that starts a top-level statement (no indentation): a safe place to end the haystack and ask the question.
_TOP_LEVEL_LINE = re.compile(r"\n(?=[A-Za-z_@])")
NEEDLE_TEMPLATE = '\n{indent}{key} = "{value}"'
QUERY_TEMPLATE = '\n{indent}{key} = "'


@dataclass
class RetrievalCase:
    """One haystack with a planted needle: `input_ids` ends with the query; the answer is `value` + `"`."""

    input_ids: list[int]
    key: str
    value: str
    needle_index: int  # token index where the needle starts
    needle_tokens: int
    source_offset: int  # index, in the token array handed to `build_cases`, of the window the haystack came from

    @property
    def depth(self) -> float:
        """Where the needle sits, as a fraction of the case's length."""
        return self.needle_index / len(self.input_ids)


def _documents(tokens: np.ndarray, separator_id: int | None, min_length: int) -> list[tuple[int, int]]:
    """`(start, end)` of every document (split at `separator_id`) of at least `min_length` tokens."""
    if separator_id is None:
        bounds = [(0, len(tokens))]
    else:
        cuts = np.flatnonzero(tokens == separator_id)
        starts = np.concatenate([[0], cuts + 1])
        ends = np.concatenate([cuts, [len(tokens)]])
        bounds = list(zip(starts.tolist(), ends.tolist()))
    return [(s, e) for s, e in bounds if e - s >= min_length]


def haystack_windows(tokens: np.ndarray, window_tokens: int, separator_id: int | None) -> list[int]:
    """Start offsets of non-overlapping `window_tokens`-long windows that each lie inside one document, so that a
    haystack never spans two unrelated files (the model learnt to ignore what precedes a document separator)."""
    starts = []
    for s, e in _documents(tokens, separator_id, window_tokens):
        starts.extend(range(s, e - window_tokens + 1, window_tokens))
    return starts


def build_cases(
    tokenizer,
    tokens,
    num_cases: int,
    context_tokens: int = 3072,
    depth_range: tuple[float, float] = (0.05, 0.7),
    seed: int = 0,
    separator_id: int | None = -1,
    value_style: str = "hex8",
) -> list[RetrievalCase]:
    """`num_cases` retrieval cases of about `context_tokens` tokens each, drawn from the token array `tokens`.

    Needle depths are spread evenly over `depth_range` (case i at the middle of the i-th of `num_cases` slices),
    haystacks come from windows spread over the whole array, keys and values from `random.Random(seed)`.
    `separator_id` splits `tokens` into documents (default -1: the tokenizer's EOS id; `None`: no splitting).
    Cases hold exactly `context_tokens` tokens, or a few fewer when re-tokenizing the edited text merges tokens.
    """
    tokens = np.asarray(tokens)
    if separator_id == -1:
        separator_id = tokenizer.eos_token_id
    lo, hi = depth_range
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"depth_range must satisfy 0 <= low < high <= 1, got {depth_range}.")
    # Room to move the haystack's end back to a top-level line and still keep `context_tokens` of code.
    window = context_tokens + max(256, context_tokens // 4)
    starts = haystack_windows(tokens, window, separator_id)
    if not starts:
        raise ValueError(
            f"No document of {window} tokens in the {len(tokens)} tokens given (documents split at id "
            f"{separator_id}); use a shorter --retrieval-context or more tokens."
        )

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    # Windows spread evenly over the array first, then the others; a window without a usable top-level line is
    # skipped and the next one takes its place. More cases than windows reuse windows (with other needles).
    stride = max(1, len(starts) // max(num_cases, 1))
    spread = starts[::stride]
    order = spread + [s for s in starts if s not in set(spread)]
    rng = random.Random(seed)
    cases: list[RetrievalCase] = []
    for attempt in range(num_cases + len(order)):
        if len(cases) == num_cases:
            break
        start = order[attempt % len(order)]
        depth = lo + (hi - lo) * (len(cases) + 0.5) / num_cases
        key = "_".join(rng.sample(KEY_WORDS, 2)) + "_secret"
        value = make_value(rng, value_style)
        case = _make_case(encode, tokenizer.decode, tokens[start : start + window].tolist(), start, key, value, depth,
                          context_tokens)
        if case is not None:
            cases.append(case)
    if len(cases) < num_cases:
        raise ValueError(f"Could only build {len(cases)} of {num_cases} retrieval cases from the tokens given.")
    return cases


def make_value(rng: random.Random, style: str) -> str:
    """A needle value: `hexN` (N random hex digits) or `words` (two identifier words joined by a dash)."""
    if style == "words":
        return "-".join(rng.sample(KEY_WORDS, 2))
    if style.startswith("hex") and style[3:].isdigit():
        return "".join(rng.choice(HEX_DIGITS) for _ in range(int(style[3:])))
    raise ValueError(f"Unknown value style {style!r}: use 'hexN' (e.g. hex8) or 'words'.")


def _make_case(encode, decode, window_ids, offset, key, value, depth, context_tokens) -> RetrievalCase | None:
    query = encode(QUERY_TEMPLATE.format(indent="", key=key))  # for the length budget; re-encoded below
    text = decode(window_ids)
    # End the haystack just before the last top-level statement of the window.
    ends = [m.start() for m in _TOP_LEVEL_LINE.finditer(text) if m.start() > len(text) // 4]
    if not ends:
        return None
    # Keep the last tokens before that end, leaving room for the needle (about 10 tokens) and the query.
    body_ids = encode(text[: ends[-1]])
    keep = context_tokens - len(query) - 16
    if len(body_ids) < keep:
        return None
    text = decode(body_ids[-keep:])
    line = text.find("\n", int(len(text) * depth))
    if line < 0:
        return None
    rest = text[line + 1 :]
    indent = rest[: len(rest) - len(rest.lstrip(" \t"))]
    before, after = encode(text[:line]), encode(text[line:])
    needle = encode(NEEDLE_TEMPLATE.format(indent=indent, key=key, value=value))
    query = encode(QUERY_TEMPLATE.format(indent=indent, key=key))
    # Trim the oldest haystack tokens so that every case has the same length (a needle longer than budgeted).
    excess = len(before) + len(needle) + len(after) + len(query) - context_tokens
    if excess >= len(before):
        return None
    before = before[max(excess, 0) :]
    return RetrievalCase(before + needle + after + query, key, value, len(before), len(needle), offset)


def is_exact_match(continuation: str, value: str) -> bool:
    """The greedy continuation reproduces the value and closes the string."""
    return continuation.startswith(value + '"')


@torch.no_grad()
def feed_chunks(model, input_ids: torch.Tensor, cache, chunk_tokens: int | None) -> torch.Tensor:
    """Run `input_ids` `[1, n]` through `cache` in forwards of `chunk_tokens` (all at once when `None`); returns the
    logits of the last position `[vocab]`."""
    n = input_ids.shape[-1]
    step = n if not chunk_tokens else chunk_tokens
    out, keyword = None, cache_keyword(model)
    for pos in range(0, n, step):
        out = model(input_ids=input_ids[:, pos : pos + step], **{keyword: cache}, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@torch.no_grad()
def greedy_continuation(model, cache, last_logits: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy tokens after the prompt already in `cache`, one decode step each."""
    generated = [int(last_logits.argmax())]
    device, keyword = model.device, cache_keyword(model)
    for _ in range(max_new_tokens - 1):
        ids = torch.tensor([[generated[-1]]], device=device)
        logits = model(input_ids=ids, **{keyword: cache}, use_cache=True).logits[0, -1]
        generated.append(int(logits.argmax()))
    return generated


def run_retrieval(
    model,
    tokenizer,
    cases: Sequence[RetrievalCase],
    cache_factory: Callable[[], object] | None = None,
    chunk_tokens: int | None = 512,
    max_new_tokens: int = 12,
    progress: bool = False,
    desc: str = "retrieval",
) -> dict:
    """Exact-match rate of the greedy answers over `cases`, feeding each case in `chunk_tokens` chunks through a fresh
    cache from `cache_factory` (default: an exact `DynamicCache`).

    Returns `{"exact_match", "correct", "cases", "by_depth": {"0.05-0.25": rate, ...}, "answers": [...]}`.
    """
    answers = []
    for case in tqdm(cases, desc=desc, disable=not progress, leave=False):
        cache = cache_factory() if cache_factory is not None else DynamicCache(config=model.config)
        ids = torch.tensor([case.input_ids], device=model.device)
        last = feed_chunks(model, ids, cache, chunk_tokens)
        text = tokenizer.decode(greedy_continuation(model, cache, last, max_new_tokens))
        answers.append({"depth": round(case.depth, 4), "value": case.value, "continuation": text,
                        "correct": is_exact_match(text, case.value)})
    return summarize(answers)


def summarize(answers: list[dict], buckets: int = 4) -> dict:
    """Exact match overall and per depth bucket (equal-width over the depths present)."""
    correct = sum(a["correct"] for a in answers)
    result = {"exact_match": correct / len(answers) if answers else float("nan"), "correct": correct,
              "cases": len(answers), "by_depth": {}, "answers": answers}
    if answers:
        depths = [a["depth"] for a in answers]
        lo, hi = min(depths), max(depths) + 1e-9
        width = (hi - lo) / buckets
        for b in range(buckets):
            left, right = lo + b * width, lo + (b + 1) * width
            inside = [a for a in answers if left <= a["depth"] < right]
            if inside:
                result["by_depth"][f"{left:.2f}-{right:.2f}"] = sum(a["correct"] for a in inside) / len(inside)
    return result


def case_summary(cases: Sequence[RetrievalCase]) -> dict:
    """Lengths and depths of a case set, for the report."""
    lengths = [len(c.input_ids) for c in cases]
    depths = [c.depth for c in cases]
    return {"cases": len(cases), "min_tokens": min(lengths), "max_tokens": max(lengths),
            "min_depth": round(min(depths), 4), "max_depth": round(max(depths), 4),
            "needle_format": NEEDLE_TEMPLATE.strip("\n"), "query_format": QUERY_TEMPLATE.strip("\n")}
