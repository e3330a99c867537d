"""Depth and size bounds for structures edgegpt reads from outside (request bodies, schemas, pickles, manifests).

A parser that recurses (Python's `json`, `json.dumps`, llguidance's schema compiler) turns deep nesting into a
RecursionError or a crash, and a walk that revisits shared references (a pickle's memo) turns 40 nested dicts
into 2^40 visits. So every such structure is checked here first, without recursion and visiting each
container once, and refused with a one-line `InputLimitError` (a 400 on the server) that names what is wrong.

Stdlib only.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgegpt.errors import InputLimitError

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "check_nesting", "deep_key", "loads_json"]

MAX_DEPTH = 64  # a request body, a JSON schema or a meta.pkl needs a handful of levels; serde_json stops at 128
MAX_ITEMS = 1_000_000  # containers and their entries, counted once each
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


def check_nesting(value: Any, what: str, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Refuse `value` (dicts, lists and tuples of anything) nested deeper than `max_depth` or holding more than
    `max_items` entries; iterative, and a container reached twice (a shared reference) is walked once.

    Raises:
        InputLimitError: "{what} is nested more than 64 levels deep (the limit)".

    >>> check_nesting({"a": [1, {"b": 2}]}, "x")
    >>> a = []; a.append(a); check_nesting(a, "x")  # a cycle is walked once
    >>> check_nesting([[[1]]], "body", max_depth=2)
    Traceback (most recent call last):
    ...
    edgegpt.errors.InputLimitError: body is nested more than 2 levels deep (the limit)
    """
    seen: set[int] = set()
    stack = [(value, 1)]
    items = 0
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list, tuple)) or id(item) in seen:
            continue
        if depth > max_depth:
            raise InputLimitError(f"{what} is nested more than {max_depth} levels deep (the limit)")
        seen.add(id(item))
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        items += 1 + len(children)
        if items > max_items:
            raise InputLimitError(f"{what} holds more than {max_items} entries (the limit)")
        stack.extend((child, depth + 1) for child in children)


def deep_key(text: str, max_depth: int = MAX_DEPTH) -> str | None:
    """The top-level key of a JSON object text under which the nesting first passes `max_depth` ("" when it is
    not under a key), or None if it never does. Scans the text without parsing it.

    >>> deep_key('{"a": 1, "b": [[["x]]]"]]]}', max_depth=3)
    'b'
    >>> deep_key('{"a": [1]}') is None
    True
    """
    depth, key = 0, ""
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token[0] == '"':
            if depth == 1 and text[match.end() :].lstrip()[:1] == ":":
                try:
                    key = json.loads(token)
                except ValueError:
                    key = token[1:-1]
            continue
        depth += 1 if token in "[{" else -1
        if depth > max_depth:
            return key
    return None


def loads_json(text: str | bytes, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` bounded in depth: InputLimitError instead of a RecursionError or a too-deep value.

    Raises:
        ValueError: not JSON (json.JSONDecodeError, UnicodeDecodeError), as `json.loads`.
        InputLimitError: nested deeper than `max_depth`.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise InputLimitError(f"{what} is nested more than {max_depth} levels deep (the limit)") from None
    check_nesting(value, what, max_depth)
    return value
