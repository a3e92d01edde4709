"""An in-memory fake of OpenMeter's meter API (``/api/v1/meters`` and ``/api/v1/meters/{slug}/query``).

Wire formats follow ``/work/shared/contracts/openmeter-openapi.yaml`` (``Meter``, ``MeterQueryResult``,
``MeterQueryRow``, RFC 7807 problems). Query semantics follow the server: ``from`` inclusive, ``to``
exclusive, rows only for groups/windows with data, windows aligned to the calendar in
``windowTimeZone``. Serve with :class:`reconciler_sandbox.httpserver.LoopbackServer`.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reconciler_sandbox.httpserver import FakeService, Response

__all__ = ["AGGREGATIONS", "WINDOW_SIZES", "FakeOpenMeter", "OpenMeterEvent"]

AGGREGATIONS = ("SUM", "COUNT", "UNIQUE_COUNT", "AVG", "MIN", "MAX", "LATEST")
WINDOW_SIZES = ("MINUTE", "HOUR", "DAY", "MONTH")
_SLUG_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
_RFC3339_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    412: "Precondition Failed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Problem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _positive(query: Mapping[str, list[str]], name: str, default: int, maximum: int | None) -> int:
    raw = (query.get(name) or [str(default)])[0]
    if not raw.isdigit() or int(raw) < 1 or (maximum is not None and int(raw) > maximum):
        raise Problem(400, f"{name} must be an integer from 1" + (f" to {maximum}" if maximum else "") + f": {raw!r}")
    return int(raw)


def _ulid(ms: int) -> str:
    value = (ms << 80) | secrets.randbits(80)
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def format_time(dt: datetime) -> str:
    """UTC ``YYYY-MM-DDTHH:MM:SSZ`` (with a fraction only when there is one)."""
    dt = dt.astimezone(UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(raw: str, name: str) -> datetime:
    m = _RFC3339_RE.match(raw.strip())
    if not m:
        raise Problem(400, f"invalid {name} parameter: {raw!r} is not an RFC 3339 date-time")
    date, clock, frac, offset = m.groups()
    frac = ((frac or "") + "000000")[:6]
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return datetime.fromisoformat(f"{date}T{clock}.{frac}{offset}").astimezone(UTC)
    except ValueError as exc:
        raise Problem(400, f"invalid {name} parameter: {exc}") from exc


def _as_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


@dataclass
class OpenMeterEvent:
    subject: str
    time: datetime  # UTC
    value: Decimal | str | None
    group_by: dict[str, str | None] = field(default_factory=dict)
    customer_id: str | None = None
    seq: int = 0


class FakeOpenMeter(FakeService):
    def __init__(
        self,
        token: str = "om_sandbox_token",
        clock: Callable[[], float] | None = None,  # nosec B107
    ) -> None:
        super().__init__(clock)
        self.token = token
        self._init_state()

    def _init_state(self) -> None:
        self.meters: dict[str, dict[str, Any]] = {}  # slug -> Meter JSON
        self.ignores_paging = False
        self.events: dict[str, list[OpenMeterEvent]] = {}  # slug -> events
        self._by_subject: dict[str, dict[str, list[OpenMeterEvent]]] = {}  # slug -> subject -> events
        self._seq = 0

    def reset(self) -> None:
        """Forget meters, events, recorded requests and pending faults."""
        with self.lock:
            self._reset_base()
            self._init_state()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # -- seeding ----------------------------------------------------------------------------------

    def add_meter(
        self,
        slug: str,
        aggregation: str = "SUM",
        event_type: str | None = None,
        value_property: str | None = "$.value",
        group_by: Mapping[str, str] | list[str] | None = None,
        *,
        name: str | None = None,
    ) -> dict[str, Any]:
        if not _SLUG_RE.match(slug) or len(slug) > 64:
            raise ValueError(f"invalid meter slug {slug!r}")
        aggregation = aggregation.upper()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}")
        gb = {k: f"$.{k}" for k in group_by} if isinstance(group_by, list) else dict(group_by or {})
        with self.lock:
            now = self._now()
            meter: dict[str, Any] = {
                "id": _ulid(int(now.timestamp() * 1000)),
                "slug": slug,
                "name": name or slug,
                "aggregation": aggregation,
                "eventType": event_type or slug,
                "groupBy": gb,
                "createdAt": format_time(now),
                "updatedAt": format_time(now),
            }
            if value_property is not None and aggregation != "COUNT":
                meter["valueProperty"] = value_property
            self.meters[slug] = meter
            self.events.setdefault(slug, [])
            return json.loads(json.dumps(meter))

    def ingest(
        self,
        slug: str,
        subject: str,
        time: datetime,
        value: Any = 1,
        group_by: Mapping[str, str | None] | None = None,
        *,
        customer_id: str | None = None,
    ) -> OpenMeterEvent:
        """Record one event for meter ``slug`` (naive ``time`` is taken as UTC)."""
        with self.lock:
            meter = self.meters[slug]
            agg = meter["aggregation"]
            parsed: Decimal | str | None
            if agg == "UNIQUE_COUNT":
                parsed = None if value is None else str(value)
            elif agg == "COUNT":
                parsed = None
            else:
                try:
                    parsed = Decimal(str(value))
                except InvalidOperation as exc:
                    raise ValueError(f"value {value!r} is not a number") from exc
            unknown = set(group_by or {}) - set(meter["groupBy"])
            if unknown:
                raise ValueError(f"meter {slug!r} has no groupBy keys {sorted(unknown)}")
            self._seq += 1
            event = OpenMeterEvent(
                subject=subject,
                time=_as_utc(time),
                value=parsed,
                group_by=dict(group_by or {}),
                customer_id=customer_id,
                seq=self._seq,
            )
            self.events[slug].append(event)
            self._by_subject.setdefault(slug, {}).setdefault(subject, []).append(event)
            return event

    # -- HTTP -------------------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        method = method.upper()
        hdrs = {k.lower(): v for k, v in headers.items()}
        params: dict[str, Any] = {k: (v if len(v) > 1 else v[0]) for k, v in query.items() if v}
        if body and hdrs.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError, TypeError):
                params = {**params, **json.loads(body)}
        return self._serve(
            method, path, query, hdrs, params, body, lambda: self._handle_locked(method, path, query, hdrs, body)
        )

    def _default_fault_content_type(self) -> str:
        return "application/problem+json"

    def _default_fault_body(self, status: int) -> bytes:
        return json.dumps(self._problem_body(status, f"sandbox injected fault ({status})")).encode()

    @staticmethod
    def _problem_body(status: int, detail: str) -> dict[str, Any]:
        return {
            "type": "about:blank",
            "title": _TITLES.get(status, "Error"),
            "status": status,
            "detail": detail,
            "instance": f"urn:request:local/{secrets.token_hex(8)}",
        }

    def _problem(self, status: int, detail: str) -> Response:
        body = json.dumps(self._problem_body(status, detail)).encode()
        return status, {"Content-Type": "application/problem+json"}, body

    def _handle_locked(
        self, method: str, path: str, query: dict[str, list[str]], hdrs: Mapping[str, str], body: bytes
    ) -> Response:
        auth = hdrs.get("authorization", "")
        if not auth.lower().startswith("bearer ") or auth[7:].strip() != self.token:
            return self._problem(401, "unauthorized: missing or invalid bearer token")
        try:
            payload = self._route(method, path, query, body)
        except Problem as p:
            return self._problem(p.status, p.detail)
        return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()

    def _meters_page(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        """`GET /api/v1/meters` pages as the contract says (listMeters in shared/contracts/openmeter-openapi.yaml,
        OpenMeter's own spec: `page` from 1, `pageSize` 1..1000, default 100; no documentation page beyond it was
        found). The spec is silent on an out-of-range value: refused (400) rather than clamped, the answer worse
        for a client. `ignores_paging` plays a server that returns every meter on every page, which a client must
        survive."""
        meters = [json.loads(json.dumps(m)) for m in self.meters.values()]
        if self.ignores_paging:
            return meters
        page, size = _positive(query, "page", 1, None), _positive(query, "pageSize", 100, 1000)
        return meters[(page - 1) * size : page * size]

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Any:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:3] != ["api", "v1", "meters"]:
            raise Problem(404, f"no route for {method} {path}")
        rest = parts[3:]
        if method == "POST" and len(rest) == 2 and rest[1] == "query":
            return self._query(self._find_meter(rest[0]), _query_of_body(body))
        if method != "GET":
            raise Problem(405, f"method {method} is not supported by the sandbox on {path}")
        if not rest:
            return self._meters_page(query)
        meter = self._find_meter(rest[0])
        if len(rest) == 1:
            return json.loads(json.dumps(meter))
        if rest[1:] == ["query"]:
            return self._query(meter, query)
        if rest[1:] == ["subjects"]:
            return sorted({e.subject for e in self.events[meter["slug"]]})
        raise Problem(404, f"no route for {method} {path}")

    def _find_meter(self, id_or_slug: str) -> dict[str, Any]:
        meter = self.meters.get(id_or_slug)
        if meter is None:
            meter = next((m for m in self.meters.values() if m["id"] == id_or_slug), None)
        if meter is None:
            raise Problem(404, f"meter not found: {id_or_slug}")
        return meter

    # -- query ------------------------------------------------------------------------------------

    @staticmethod
    def _window(t: datetime, size: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
        local = t.astimezone(tz)
        if size in ("MINUTE", "HOUR"):
            floored = local.replace(second=0, microsecond=0)
            if size == "HOUR":
                floored = floored.replace(minute=0)
            # Step back by the local distance so odd offsets (e.g. +05:30) keep calendar alignment.
            start = t - (local - floored)
            step = timedelta(minutes=1) if size == "MINUTE" else timedelta(hours=1)
            return start, start + step
        if size == "DAY":
            d0 = local.date()
            d1 = d0 + timedelta(days=1)
        else:  # MONTH
            d0 = local.date().replace(day=1)
            d1 = d0.replace(year=d0.year + 1, month=1) if d0.month == 12 else d0.replace(month=d0.month + 1)
        start = datetime(d0.year, d0.month, d0.day, tzinfo=tz).astimezone(UTC)
        end = datetime(d1.year, d1.month, d1.day, tzinfo=tz).astimezone(UTC)
        return start, end

    @staticmethod
    def _aggregate(aggregation: str, events: list[OpenMeterEvent]) -> float:
        if aggregation == "COUNT":
            return float(len(events))
        if aggregation == "UNIQUE_COUNT":
            return float(len({e.value for e in events if e.value is not None}))
        nums = [e.value for e in events if isinstance(e.value, Decimal)]
        if aggregation == "LATEST":
            latest = max(events, key=lambda e: (e.time, e.seq))
            return float(latest.value) if isinstance(latest.value, Decimal) else 0.0
        if not nums:
            return 0.0
        if aggregation == "SUM":
            return float(sum(nums, Decimal(0)))
        if aggregation == "MIN":
            return float(min(nums))
        if aggregation == "MAX":
            return float(max(nums))
        return float(sum(nums, Decimal(0)) / len(nums))  # AVG

    def _query(self, meter: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        raw_from, raw_to = one("from"), one("to")
        start = parse_rfc3339(raw_from, "from") if raw_from else None
        end = parse_rfc3339(raw_to, "to") if raw_to else None
        if start is not None and end is not None and start >= end:
            raise Problem(400, "invalid time range: from must be before to")
        window_size = one("windowSize")
        if window_size is not None and window_size not in WINDOW_SIZES:
            raise Problem(400, f"invalid windowSize {window_size!r}: must be one of {', '.join(WINDOW_SIZES)}")
        tz_name = one("windowTimeZone") or "UTC"
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            raise Problem(400, f"invalid windowTimeZone: unknown time zone {tz_name!r}") from None
        subjects = [s for s in query.get("subject", []) if s != ""]
        customers = [c for c in query.get("filterCustomerId", []) if c != ""]
        if len(customers) > 100:
            raise Problem(400, "filterCustomerId: at most 100 customers")
        group_keys: list[str] = []
        group_subject = bool(subjects)
        for g in query.get("groupBy", []):
            if g == "subject":
                group_subject = True
            elif g not in meter["groupBy"]:
                raise Problem(400, f"invalid groupBy {g!r}: not a group by key of meter {meter['slug']}")
            elif g not in group_keys:
                group_keys.append(g)

        effective_end = end if end is not None else self._now()
        by_subject = self._by_subject.get(meter["slug"], {})
        candidates = (
            [e for s in dict.fromkeys(subjects) for e in by_subject.get(s, [])]
            if subjects
            else self.events[meter["slug"]]
        )
        selected = [
            e
            for e in candidates
            if (start is None or e.time >= start)
            and e.time < effective_end
            and (not customers or e.customer_id in customers)
        ]

        groups: dict[tuple[Any, ...], list[OpenMeterEvent]] = {}
        windows: dict[tuple[Any, ...], tuple[datetime, datetime]] = {}
        for e in selected:
            if window_size is not None:
                win = self._window(e.time, window_size, tz)
            else:
                win = (start if start is not None else e.time, effective_end)
            key = (
                win[0] if window_size is not None else None,
                e.subject if group_subject else None,
                e.customer_id if customers else None,
                tuple(e.group_by.get(k) for k in group_keys),
            )
            groups.setdefault(key, []).append(e)
            if key in windows and window_size is None:
                windows[key] = (min(windows[key][0], win[0]), win[1])
            else:
                windows.setdefault(key, win)

        def sort_key(k: tuple[Any, ...]) -> tuple[Any, ...]:
            return (windows[k][0], k[1] or "", k[2] or "", tuple(v or "" for v in k[3]))

        rows = []
        for key in sorted(groups, key=sort_key):
            win_start, win_end = windows[key]
            if window_size is None and start is None:
                win_start = win_start.replace(second=0, microsecond=0)
            row: dict[str, Any] = {
                "value": self._aggregate(meter["aggregation"], groups[key]),
                "windowStart": format_time(win_start),
                "windowEnd": format_time(win_end),
                "subject": key[1],
                "groupBy": dict(zip(group_keys, key[3], strict=True)),
            }
            if customers:
                row["customerId"] = key[2]
            rows.append(row)

        result: dict[str, Any] = {}
        if start is not None:
            result["from"] = format_time(start)
        if end is not None:
            result["to"] = format_time(end)
        if window_size is not None:
            result["windowSize"] = window_size
        result["data"] = rows
        return result


def _query_of_body(body: bytes) -> dict[str, list[str]]:
    """`POST /api/v1/meters/{meter}/query`'s JSON body (MeterQueryRequest, queryMeterPost in
    shared/contracts/openmeter-openapi.yaml) as the GET query's parameters: OpenMeter serves both with one handler,
    its server mapping the GET parameters onto this body. The body's own limit is kept (`subject`: maxItems 100);
    what the sandbox does not model (`filterGroupBy`, `advancedMeterGroupByFilters`: objects) is refused, not
    ignored, so that a client relying on it finds out here."""
    try:
        request = json.loads(body or b"null")
    except ValueError:
        raise Problem(400, "the query's body is not JSON") from None
    if not isinstance(request, dict):
        raise Problem(400, "the query's body must be a JSON object (MeterQueryRequest)")
    query: dict[str, list[str]] = {}
    for name, value in request.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            query[name] = value
        elif isinstance(value, str):
            query[name] = [value]
        else:
            raise Problem(400, f"{name}: not supported by the sandbox as {type(value).__name__}")
    if len(query.get("subject", [])) > 100:
        raise Problem(400, "subject: at most 100 subjects")
    return query
