"""Our own small types for the balance job; the adapters return these."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal


@dataclass(frozen=True)
class TopUp:
    """A succeeded PaymentIntent: money the customer paid in, to be credited in Moesif."""

    payment_intent_id: str
    customer_id: str | None
    amount_minor: int  # amount_received
    currency: str
    created: datetime
    metadata: dict[str, str]
    disputed: bool


@dataclass(frozen=True)
class InvoicePayment:
    """Stripe's record that a PaymentIntent paid an invoice (https://docs.stripe.com/api/invoice-payment/object):
    a subscription's bill, not a top-up, unless the invoice sells nothing but top-up prices."""

    payment_intent_id: str
    invoice_id: str
    # The prices on the invoice's lines, when they were read and fit on the invoice's first page of lines;
    # None otherwise (nothing about the invoice's content is then assumed).
    line_prices: frozenset[str] | None


@dataclass(frozen=True)
class Refund:
    refund_id: str
    payment_intent_id: str | None
    amount_minor: int
    currency: str
    created: datetime
    status: str


@dataclass(frozen=True)
class BalanceAccount:
    """A Stripe customer as Moesif knows it: company = customer, subscription = the mapped subscription."""

    customer_id: str
    subscription_id: str
    currency: str


@dataclass(frozen=True)
class MoesifBalance:
    current_balance: Decimal
    available_balance: Decimal
    pending_activity: Decimal

    def field(self, name: str) -> Decimal:
        return {"current_balance": self.current_balance, "available_balance": self.available_balance}[name]


# What the balance ledger stores and loads (reconciler.ledger.balance_ledger): declared here, with the domain,
# so that the domain never imports the ledger.


class AlreadyRecordedError(Exception):
    """Another run already recorded this transaction id."""


@dataclass(frozen=True)
class PlannedTransaction:
    kind: str  # topup | refund | correction
    source_id: str
    transaction_id: str
    account: BalanceAccount
    amount_minor: int  # positive
    type: str  # credit | debit
    description: str


@dataclass(frozen=True)
class StoredTransaction:
    id: int
    planned: PlannedTransaction
    state: str
    outcome_unknown: bool
    attempted: bool  # a request may have left for Moesif; False: it never did, so sending it is safe


@dataclass(frozen=True)
class OpenUsage:
    """Usage reported to Stripe in a period whose invoice has not finalized: Moesif burned it already."""

    stripe_target: str
    meter_id: str | None
    kind: str
    subscription_item_id: str
    reported_total: int
