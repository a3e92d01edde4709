"""JSON as the fakes write it, through orjson: the benchmark runs the fakes in its own process on the product's
2 cores, so every millisecond a fake spends rendering is a millisecond the product is measured as waiting.

Stripe answers pretty-printed JSON with two-space indents; rendering a page of 100 subscriptions that way took
the standard library's pure-Python encoder ~14 ms (its C encoder does not indent), orjson ~0.3 ms for the same
bytes. What orjson refuses (a type it does not know) falls back to the standard library. One difference remains:
a non-ASCII character is written as itself in UTF-8, where json.dumps wrote a \\u escape; both are the same JSON
text (RFC 8259), and Stripe's documentation does not say which it sends, so no client may depend on either."""

from __future__ import annotations

import json
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS  # as json.dumps, which writes an int key as a string


def dumps(payload: Any, *, pretty: bool = False) -> bytes:
    """`payload` as JSON bytes; `pretty` indents by two spaces, as Stripe's answers are."""
    try:
        return orjson.dumps(payload, option=_OPTIONS | (orjson.OPT_INDENT_2 if pretty else 0))
    except TypeError:
        return json.dumps(payload, indent=2 if pretty else None).encode()


def copy(obj: Any) -> Any:
    """A deep copy of plain JSON data, as a fake hands out its stored objects (the caller may change it)."""
    return orjson.loads(dumps(obj))
