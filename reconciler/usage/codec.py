"""Stream periods as JSON, so a planning replica can hand work to the others through the database."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

from reconciler.usage.model import BillingPeriod, Meter, Stream, StreamKind, StreamPeriod


def dump_work(work: StreamPeriod) -> str:
    stream = asdict(work.stream)
    stream["kind"] = work.stream.kind.value
    return json.dumps(
        {
            "stream": stream,
            "period": [work.period.start.isoformat(), work.period.end.isoformat()],
            "is_current": work.is_current,
        },
        sort_keys=True,
    )


def load_work(text: str) -> StreamPeriod:
    data = json.loads(text)
    stream = dict(data["stream"])
    meter = stream.pop("meter")
    start, end = (datetime.fromisoformat(v) for v in data["period"])
    return StreamPeriod(
        Stream(**{**stream, "kind": StreamKind(stream["kind"]), "meter": Meter(**meter) if meter else None}),
        BillingPeriod(start, end),
        is_current=data["is_current"],
    )
