"""Stripe's request parameters and error answers: the bracket form encoding (``a[b][c]=x``, ``expand[]``),
the integer and ``created`` filters every list shares, object ids, and :class:`StripeError` with its JSON body."""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

# --------------------------------------------------------------------------------------------------
# Form decoding (Stripe's bracket encoding)


class _Seq(dict):
    """A node created for ``key[]`` / ``key[0]``: becomes a list when finalised."""


_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def _split_key(key: str) -> list[str]:
    m = _KEY_RE.match(key)
    if not m:
        return [key]
    return [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))]


def _is_index(part: str) -> bool:
    return part == "" or part.isdigit()


def _finalise(node: Any) -> Any:
    if isinstance(node, _Seq):
        if all(k.isdigit() for k in node):
            return [_finalise(node[k]) for k in sorted(node, key=int)]
        return {k: _finalise(v) for k, v in node.items()}
    if isinstance(node, dict):
        return {k: _finalise(v) for k, v in node.items()}
    return node


def parse_stripe_params(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode ``a[b][c]=x``, ``expand[0]=x`` and ``expand[]=x`` pairs into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = _split_key(key)
        node: dict[str, Any] = root
        for i, part in enumerate(parts):
            if part == "":
                part = str(len(node))
            if i == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            if not isinstance(child, dict):
                child = _Seq() if _is_index(parts[i + 1]) else {}
                node[part] = child
            node = child
    return _finalise(root)


def _query_pairs(query: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, values in query.items() for v in values]


# --------------------------------------------------------------------------------------------------
# Errors and helpers


class StripeError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.param is not None:
            err["param"] = self.param
        if self.code is not None:
            err["code"] = self.code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        return {"error": err}


def _missing(param: str) -> StripeError:
    return StripeError(400, f"Missing required param: {param}.", param=param, code="parameter_missing")


def _no_such(kind: str, ident: str, param: str = "id", status: int = 404) -> StripeError:
    return StripeError(status, f"No such {kind}: '{ident}'", param=param, code="resource_missing")


def _int_param(params: Mapping[str, Any], name: str, *, required: bool = False) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise _missing(name)
        return None
    if isinstance(raw, int):
        return raw
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw.strip()):
        raise StripeError(400, f"Invalid integer: {raw}", param=name, code="parameter_invalid_integer")
    return int(raw.strip())


def _json_number(value: Decimal) -> int | float:
    if value == value.to_integral_value():
        return int(value)
    return float(value)


def _new_id(prefix: str, n: int = 24) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    return [str(value)]


def _filter_created(objs: Iterable[dict[str, Any]], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Apply Stripe's ``created`` list filter: an exact timestamp or ``created[gt|gte|lt|lte]``."""
    raw = params.get("created")
    objs = list(objs)
    if raw is None or raw == "":
        return objs
    if not isinstance(raw, dict):
        exact = _int_param(params, "created")
        return [o for o in objs if o["created"] == exact]
    checks: list[Callable[[int], bool]] = []
    for op, value in raw.items():
        name = f"created[{op}]"
        if op not in ("gt", "gte", "lt", "lte"):
            raise StripeError(400, f"Received unknown parameter: {name}", param=name, code="parameter_unknown")
        bound = _int_param({name: value}, name, required=True)
        assert bound is not None
        checks.append(
            {
                "gt": lambda t, b=bound: t > b,
                "gte": lambda t, b=bound: t >= b,
                "lt": lambda t, b=bound: t < b,
                "lte": lambda t, b=bound: t <= b,
            }[op]
        )
    return [o for o in objs if all(check(o["created"]) for check in checks)]
