"""What a balance cycle finds in Stripe to forward: succeeded top-ups in the look-back and succeeded refunds of
top-ups, by customer, with the PaymentIntents that paid an invoice told apart (reconciler.balances.invoices).

One listing each for all customers (100 a page), not one per customer, and one listing of InvoicePayments. A run
for a few customers (a webhook's) asks about each of their PaymentIntents instead of listing everyone's invoices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain

import structlog

from reconciler.balances.invoices import PaymentRole, role_of, unclear_reason
from reconciler.balances.model import InvoicePayment, Refund, TopUp
from reconciler.balances.ports import StripeBalanceReads
from reconciler.config import TopupsConfig
from reconciler.upstream.errors import UpstreamError

log = structlog.get_logger(__name__)

# The docs do not promise that an InvoicePayment is never created before the PaymentIntent it names.
INVOICE_PAYMENT_SLACK = timedelta(hours=1)

FORWARDED_ROLES = (PaymentRole.TOP_UP, PaymentRole.UNCLEAR_INVOICE)  # the unclear ones are held, once recorded


@dataclass
class StripeMoney:
    """What one cycle found in Stripe to forward, for all customers."""

    top_ups: dict[str, list[TopUp]] = field(default_factory=dict)  # by customer id
    refunds: dict[str, list[Refund]] = field(default_factory=dict)  # by the refunded top-up's customer id
    held: dict[str, str] = field(default_factory=dict)  # PaymentIntent id -> why its money waits for a person
    invoice_paid: dict[str, str] = field(default_factory=dict)  # PaymentIntent id -> the invoice it paid
    invoice_paid_since: datetime | None = None  # when the oldest of them was created
    unattributed: list[str] = field(default_factory=list)  # refunds whose PaymentIntent could not be read


class InvoicesOf:
    """Which invoice a PaymentIntent paid: looked up in one listing of every InvoicePayment created since
    `complete_since`, or, for a PaymentIntent older than that (or with no listing), asked of Stripe by id."""

    def __init__(
        self,
        stripe: StripeBalanceReads,
        with_lines: bool,
        listing: Iterable[InvoicePayment] = (),
        complete_since: datetime | None = None,
    ):
        self._stripe = stripe
        self._with_lines = with_lines
        self._listed = {payment.payment_intent_id: payment for payment in listing}
        self._complete_since = complete_since

    def of(self, payment_intent: TopUp) -> InvoicePayment | None:
        if self._complete_since is not None and payment_intent.created >= self._complete_since:
            return self._listed.get(payment_intent.payment_intent_id)
        return self._stripe.invoice_payment_of(payment_intent.payment_intent_id, with_lines=self._with_lines)


class StripeMoneyReader:
    def __init__(self, stripe: StripeBalanceReads, topups: TopupsConfig, redact: Callable[[str], str]):
        self._stripe = stripe
        self._topups = topups
        self._invoice_top_up_prices = frozenset(topups.invoice_prices)
        self._redact = redact

    def read(self, customers: frozenset[str], now: datetime) -> StripeMoney:
        """Every customer's (or only `customers`') top-ups and refunds of top-ups since the look-back."""
        since = now - self._topups.lookback
        with_lines = bool(self._invoice_top_up_prices)
        listing: Iterable[TopUp]
        if customers:
            listing = chain.from_iterable(self._stripe.succeeded_payment_intents(since, c) for c in sorted(customers))
            invoices = InvoicesOf(self._stripe, with_lines)
        else:
            # The docs do not say an InvoicePayment is never created before its PaymentIntent: an hour of slack.
            complete_since = since - INVOICE_PAYMENT_SLACK
            invoices = InvoicesOf(
                self._stripe,
                with_lines,
                self._stripe.invoice_payments(complete_since, with_lines=with_lines),
                complete_since,
            )
            listing = self._stripe.succeeded_payment_intents(since)
        money = StripeMoney()
        roles: dict[str, tuple[TopUp, PaymentRole]] = {}
        for payment_intent in listing:
            if payment_intent.customer_id:
                role = self._classify(payment_intent, invoices.of(payment_intent), money)
                roles[payment_intent.payment_intent_id] = (payment_intent, role)
                if role in FORWARDED_ROLES:
                    money.top_ups.setdefault(payment_intent.customer_id, []).append(payment_intent)
        self._attribute_refunds(money, roles, invoices, since)
        return money

    def _attribute_refunds(
        self, money: StripeMoney, roles: dict[str, tuple[TopUp, PaymentRole]], invoices: InvoicesOf, since: datetime
    ) -> None:
        """Succeeded refunds of top-ups, by the top-up's customer, and an error for each refund that could not be
        attributed. Refunds are listed by their own creation date, so a refund of a top-up older than the
        look-back is still seen; such a PaymentIntent is fetched by id, and whether it paid an invoice asked of
        InvoicePayments, once per cycle. One that cannot be read leaves its refund for the next cycle, and the
        rest goes on."""
        for refund in self._stripe.refunds(since):
            if refund.status != "succeeded" or not refund.payment_intent_id:
                continue
            if refund.payment_intent_id not in roles:
                try:
                    payment_intent = self._stripe.payment_intent(refund.payment_intent_id)
                    invoice = invoices.of(payment_intent)
                except UpstreamError as exc:
                    error = self._redact(f"refund {refund.refund_id}: its PaymentIntent could not be read: {exc}")
                    log.error("refund not forwarded this cycle", error=error)
                    money.unattributed.append(error)
                    continue
                roles[refund.payment_intent_id] = (payment_intent, self._classify(payment_intent, invoice, money))
            payment_intent, role = roles[refund.payment_intent_id]
            if payment_intent.customer_id and role in FORWARDED_ROLES:
                money.refunds.setdefault(payment_intent.customer_id, []).append(refund)

    def _classify(self, payment_intent: TopUp, invoice: InvoicePayment | None, money: StripeMoney) -> PaymentRole:
        role = role_of(
            payment_intent.metadata, invoice, self._topups.payment_intent_metadata, self._invoice_top_up_prices
        )
        if invoice is not None and role is PaymentRole.INVOICE:
            money.invoice_paid[payment_intent.payment_intent_id] = invoice.invoice_id
            money.invoice_paid_since = min(money.invoice_paid_since or payment_intent.created, payment_intent.created)
        elif invoice is not None and role is PaymentRole.UNCLEAR_INVOICE:
            money.held[payment_intent.payment_intent_id] = unclear_reason(invoice)
        return role
