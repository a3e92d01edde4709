"""Which succeeded PaymentIntents are top-ups: a pure decision over what Stripe says about each one.

A subscription's invoice is paid by a PaymentIntent the invoice creates (https://docs.stripe.com/billing/billing-apis),
and since API 2025-03-31 a PaymentIntent no longer names its invoice: only Stripe's InvoicePayments
(https://docs.stripe.com/api/invoice-payment/list) say which PaymentIntents paid an invoice. Such a payment settles
a bill; crediting it in Moesif would hand the customer their subscription fee back as prepaid credit. So a
PaymentIntent an InvoicePayment names is never a top-up, unless the company sells top-ups through invoices and every
line of that invoice carries one of the prices it named for them (`balances.topups.invoice_prices`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from reconciler.balances.model import InvoicePayment


class PaymentRole(Enum):
    TOP_UP = "top_up"  # credited in Moesif
    INVOICE = "invoice"  # pays a bill: never forwarded
    UNCLEAR_INVOICE = "unclear_invoice"  # an invoice that may hold a top-up, but not only: held for a person
    OTHER = "other"  # not a top-up by the configured metadata: left alone


def role_of(
    metadata: Mapping[str, str],
    invoice: InvoicePayment | None,
    wanted_metadata: Mapping[str, str],
    invoice_top_up_prices: frozenset[str],
) -> PaymentRole:
    """What a succeeded PaymentIntent is, given the InvoicePayment naming it (None: it paid no invoice)."""
    if invoice is None:
        matches = all(metadata.get(key) == value for key, value in wanted_metadata.items())
        return PaymentRole.TOP_UP if matches else PaymentRole.OTHER
    if not invoice_top_up_prices:
        return PaymentRole.INVOICE
    if invoice.line_prices is None:  # the lines could not all be read: what it sold is not known
        return PaymentRole.UNCLEAR_INVOICE
    named = invoice.line_prices & invoice_top_up_prices
    if not named:
        return PaymentRole.INVOICE
    return PaymentRole.TOP_UP if named == invoice.line_prices else PaymentRole.UNCLEAR_INVOICE


def unclear_reason(invoice: InvoicePayment) -> str:
    return (
        f"paid invoice {invoice.invoice_id}, which sells a top-up price beside other lines (or more lines than one "
        "page): how much of it is prepaid credit is not guessed"
    )
