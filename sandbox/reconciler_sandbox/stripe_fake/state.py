"""The fake's state, and what every resource shares: creation order, newest-first listing, pagination and
``expand`` checking. Each resource's mixin (catalog, meters, payments, ...) builds on :class:`StripeState`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from reconciler_sandbox.httpserver import FakeService
from reconciler_sandbox.stripe_fake.params import StripeError, _as_list, _int_param, _no_such

if TYPE_CHECKING:
    from reconciler_sandbox.stripe_fake.events import EventDestination
    from reconciler_sandbox.stripe_fake.fake import _IdempotencyEntry
    from reconciler_sandbox.stripe_fake.meters import MeterEvent

DEFAULT_API_VERSION = "2026-07-29.dahlia"
_MAX_EXPAND_DEPTH = 4


class StripeState(FakeService):
    """The objects the fake holds (all of them reset by :meth:`reset`) and the helpers shared by its resources."""

    # -- state ------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        # Stripe aggregates meter events asynchronously: "aggregated usage in meter event summaries ... might not
        # immediately reflect recently received meter events"
        # (https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api). The docs give no bound,
        # and say nothing about legacy usage record summaries; here an event or record created at `created` shows
        # in either summary only from `created + summary_lag_seconds`. 0 (the default, and after `reset`): at once,
        # which is the optimistic end, kept as the default only so that tests of other behaviours need not wait; the
        # summary-lag tests and the fault simulation (three seeds in four) turn a lag on.
        self.summary_lag_seconds: float = 0
        self._seq = 0
        self.customers: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, dict[str, Any]] = {}
        self.subscriptions: dict[str, dict[str, Any]] = {}  # stored without "items"
        self.subscription_items: dict[str, dict[str, Any]] = {}  # stored with "price" as an id
        self._sub_items: dict[str, list[str]] = {}
        self._order: dict[str, int] = {}
        # Subscriptions newest first, and each one's place in that order, as of a (sequence, count) version.
        self._subscription_order: tuple[tuple[int, int], list[dict[str, Any]], dict[str, int]] = ((-1, -1), [], {})
        self.meter_events: list[MeterEvent] = []
        self.rejected_meter_events: list[MeterEvent] = []
        self._rejections_reported = 0  # rejected_meter_events[:n] are in an error report already
        self._async_rejections: list[tuple[str, bool]] = []  # (code, reported) for the next valid events
        self.v2_events: dict[str, dict[str, Any]] = {}  # thin events as GET /v2/core/events/{id} returns them
        self.thin_events: list[dict[str, Any]] = []  # the pushed (thin) bodies, oldest first
        self.event_destinations: list[EventDestination] = []
        self.webhook_endpoints: dict[str, dict[str, Any]] = {}  # snapshot-payload endpoints, as served
        self._identifiers: dict[str, MeterEvent] = {}
        # item id -> {timestamp: quantity}
        self.usage_records: dict[str, dict[int, int]] = {}
        # item id -> (created, timestamp, action, quantity) of each record, for summaries that lag
        self._usage_record_log: dict[str, list[tuple[float, int, str, int]]] = {}
        self._past_periods: dict[str, list[tuple[int, int]]] = {}  # item id -> periods it rolled over from
        self._idempotency: dict[str, _IdempotencyEntry] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}  # stored with "latest_charge" as an id
        self.charges: dict[str, dict[str, Any]] = {}
        self.invoices: dict[str, dict[str, Any]] = {}
        self.invoice_payments: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.credit_grants: dict[str, dict[str, Any]] = {}
        # grant id -> minor units applied to finalized invoices / held on draft invoices
        self._grant_used: dict[str, int] = {}
        self._grant_held: dict[str, int] = {}

    def reset(self) -> None:
        """Forget all objects, events, idempotency keys, recorded requests and pending faults."""
        with self.lock:
            self._reset_base()
            self._init_state()

    def _now(self) -> int:
        return int(self.clock())

    def _register(self, obj_id: str) -> None:
        self._seq += 1
        self._order[obj_id] = self._seq

    def _newest_first(self, objs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(objs, key=lambda o: (o.get("created", 0), self._order.get(o["id"], 0)), reverse=True)

    # -- list helpers -----------------------------------------------------------------------------

    def _paginate(
        self,
        objs: list[dict[str, Any]],
        params: Mapping[str, Any],
        url: str,
        kind: str,
        render: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        positions: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """A page of `objs` as Stripe lists it. `positions`: each object's index in `objs`, when the caller keeps
        one (else it is built here, a pass over `objs` per page)."""
        limit = _int_param(params, "limit")
        if limit is None:
            limit = 10
        if limit < 1 or limit > 100:
            raise StripeError(
                400,
                "Invalid limit: must be between 1 and 100.",
                param="limit",
                code="parameter_invalid_integer",
            )
        if positions is None:
            positions = {o["id"]: i for i, o in enumerate(objs)}
        starting_after = params.get("starting_after")
        ending_before = params.get("ending_before")
        if starting_after:
            if starting_after not in positions:
                raise _no_such(kind, starting_after, param="starting_after", status=400)
            first = positions[starting_after] + 1
            page, has_more = objs[first : first + limit], len(objs) > first + limit
        elif ending_before:
            if ending_before not in positions:
                raise _no_such(kind, ending_before, param="ending_before", status=400)
            end = positions[ending_before]
            page, has_more = objs[max(0, end - limit) : end], end > limit
        else:
            page, has_more = objs[:limit], len(objs) > limit
        data = [render(o) if render else json.loads(json.dumps(o)) for o in page]
        return {"object": "list", "data": data, "has_more": has_more, "url": url}

    @staticmethod
    def _expand(params: Mapping[str, Any], allowed: set[str]) -> set[str]:
        requested = _as_list(params.get("expand"))
        for path in requested:
            if len(path.split(".")) > _MAX_EXPAND_DEPTH:
                raise StripeError(
                    400,
                    f"You cannot expand more than {_MAX_EXPAND_DEPTH} levels of a property. Property: {path}",
                    param="expand",
                )
            if path not in allowed:
                raise StripeError(400, f"This property cannot be expanded ({path}).", param="expand")
        return set(requested)
