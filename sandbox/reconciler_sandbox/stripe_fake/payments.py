"""Payments, read-only and seeded through helpers: PaymentIntents with their charges, refunds and disputes; paid
invoices with the PaymentIntent each created and the InvoicePayment mapping the two; the customer cash balance
(``customer.balance``, minor units, negative = credit). Charges are served only inside their PaymentIntent
(``expand[]=latest_charge``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reconciler_sandbox.stripe_fake.params import StripeError, _filter_created, _missing, _new_id, _no_such
from reconciler_sandbox.stripe_fake.state import StripeState

_PAYMENT_INTENT_STATUSES = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "canceled",
    "succeeded",
)
# PaymentIntent status -> status of the charge it made (statuses absent here have no charge yet).
_CHARGE_STATUS_FOR = {"succeeded": "succeeded", "processing": "pending", "requires_capture": "succeeded"}
_REFUND_STATUSES = ("pending", "requires_action", "succeeded", "failed", "canceled")
_REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer", "expired_uncaptured_charge")
# Refunds in these states count towards ``charge.amount_refunded`` (failed/canceled ones are reversed).
_REFUND_COUNTED = ("pending", "requires_action", "succeeded")


class PaymentMixin(StripeState):
    """Seeding and the GET endpoints of payment intents (with their charges), invoices, invoice payments and
    refunds; the customer cash balance."""

    def add_payment_intent(
        self,
        customer: str | None,
        amount: int,
        currency: str = "usd",
        *,
        status: str = "succeeded",
        metadata: Mapping[str, str] | None = None,
        created: int | None = None,
        id: str | None = None,
        description: str | None = None,
    ) -> dict[str, Any]:
        """A PaymentIntent (and, once it has been attempted, its charge): a top-up as Stripe serves it."""
        if status not in _PAYMENT_INTENT_STATUSES:
            raise ValueError(f"unknown payment intent status {status!r}")
        if amount < 1:
            raise ValueError("amount must be a positive integer in minor units")
        with self.lock:
            if customer is not None and customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            pid = id or _new_id("pi_", 24)
            created = created if created is not None else self._now()
            payment_method = _new_id("pm_", 24)
            charge_id: str | None = None
            charge_status = _CHARGE_STATUS_FOR.get(status)
            if charge_status is not None:
                charge_id = _new_id("ch_", 24)
                captured = status == "succeeded"
                self.charges[charge_id] = {
                    "id": charge_id,
                    "object": "charge",
                    "amount": amount,
                    "amount_captured": amount if captured else 0,
                    "amount_refunded": 0,
                    "application": None,
                    "application_fee": None,
                    "application_fee_amount": None,
                    "balance_transaction": _new_id("txn_", 24) if captured else None,
                    "billing_details": {"address": None, "email": None, "name": None, "phone": None},
                    "calculated_statement_descriptor": "SANDBOX",
                    "captured": captured,
                    "created": created,
                    "currency": currency,
                    "customer": customer,
                    "description": description,
                    "disputed": False,
                    "failure_balance_transaction": None,
                    "failure_code": None,
                    "failure_message": None,
                    "fraud_details": {},
                    "livemode": False,
                    "metadata": dict(metadata or {}),
                    "on_behalf_of": None,
                    "outcome": {
                        "network_status": "approved_by_network",
                        "reason": None,
                        "risk_level": "normal",
                        "seller_message": "Payment complete.",
                        "type": "authorized",
                    },
                    "paid": charge_status == "succeeded",
                    "payment_intent": pid,
                    "payment_method": payment_method,
                    "payment_method_details": {
                        "card": {"brand": "visa", "country": "US", "exp_month": 12, "exp_year": 2034, "last4": "4242"},
                        "type": "card",
                    },
                    "receipt_email": None,
                    "receipt_number": None,
                    "receipt_url": None,
                    "refunded": False,
                    "review": None,
                    "shipping": None,
                    "source_transfer": None,
                    "statement_descriptor": None,
                    "statement_descriptor_suffix": None,
                    "status": charge_status,
                    "transfer_data": None,
                    "transfer_group": None,
                }
                self._register(charge_id)
            self.payment_intents[pid] = {
                "id": pid,
                "object": "payment_intent",
                "amount": amount,
                "amount_capturable": amount if status == "requires_capture" else 0,
                "amount_details": {"tip": {}},
                "amount_received": amount if status == "succeeded" else 0,
                "application": None,
                "application_fee_amount": None,
                "automatic_payment_methods": {"allow_redirects": "always", "enabled": True},
                "canceled_at": created if status == "canceled" else None,
                "cancellation_reason": "requested_by_customer" if status == "canceled" else None,
                "capture_method": "automatic_async",
                "client_secret": f"{pid}_secret_{_new_id('', 25)}",
                "confirmation_method": "automatic",
                "created": created,
                "currency": currency,
                "customer": customer,
                "description": description,
                "last_payment_error": None,
                "latest_charge": charge_id,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "next_action": None,
                "on_behalf_of": None,
                "payment_method": payment_method if charge_id else None,
                "payment_method_configuration_details": None,
                "payment_method_options": {},
                "payment_method_types": ["card"],
                "processing": None,
                "receipt_email": None,
                "review": None,
                "setup_future_usage": None,
                "shipping": None,
                "source": None,
                "statement_descriptor": None,
                "statement_descriptor_suffix": None,
                "status": status,
                "transfer_data": None,
                "transfer_group": None,
            }
            self._register(pid)
            return self._render_payment_intent(self.payment_intents[pid], set())

    def open_invoice(
        self,
        customer: str,
        lines: list[tuple[str, int]],
        currency: str = "usd",
        *,
        subscription: str | None = None,
        created: int | None = None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """A finalized, unpaid invoice with one line per ``(price id, amount)``. Since API 2025-03-31 a line's price
        is at ``pricing.price_details.price``
        (https://docs.stripe.com/changelog/basil/2025-03-31/invoice-pricing-configurations)."""
        with self.lock:
            if customer not in self.customers:
                raise KeyError(f"unknown customer {customer!r}")
            created = created if created is not None else self._now()
            total = sum(amount for _, amount in lines)
            invoice_id = id or _new_id("in_", 24)
            self.invoices[invoice_id] = {
                "id": invoice_id,
                "object": "invoice",
                "amount_due": total,
                "amount_paid": 0,
                "amount_remaining": total,
                "created": created,
                "currency": currency,
                "customer": customer,
                "lines": {
                    "object": "list",
                    "data": [
                        {
                            "id": _new_id("il_", 24),
                            "object": "line_item",
                            "amount": amount,
                            "currency": currency,
                            "invoice": invoice_id,
                            "pricing": {"price_details": {"price": price, "product": None}, "type": "price_details"},
                            "quantity": 1,
                        }
                        for price, amount in lines
                    ],
                    "has_more": False,
                    "url": f"/v1/invoices/{invoice_id}/lines",
                },
                "parent": (
                    {"subscription_details": {"subscription": subscription}, "type": "subscription_details"}
                    if subscription
                    else None
                ),
                "status": "open",
                "status_transitions": {"finalized_at": created, "paid_at": None},
            }
            self._register(invoice_id)
            return json.loads(json.dumps(self.invoices[invoice_id]))

    def attach_payment(self, invoice_id: str, payment_intent_id: str, *, created: int | None = None) -> dict[str, Any]:
        """Attach a PaymentIntent to an invoice (https://docs.stripe.com/api/invoices/attach_payment): an
        InvoicePayment maps the two (https://docs.stripe.com/api/invoice-payment/object), created now. "If the
        PaymentIntent's status is already succeeded when it's attached, it's credited to the invoice immediately":
        so a PaymentIntent can succeed first and only later turn out to have paid an invoice. Returns the
        InvoicePayment."""
        with self.lock:
            invoice, intent = self.invoices[invoice_id], self.payment_intents[payment_intent_id]
            created = created if created is not None else self._now()
            paid = intent["status"] == "succeeded"
            payment_id = _new_id("inpay_", 24)
            self.invoice_payments[payment_id] = {
                "id": payment_id,
                "object": "invoice_payment",
                "amount_paid": intent["amount_received"] if paid else None,
                "amount_requested": intent["amount"],
                "created": created,
                "currency": intent["currency"],
                "invoice": invoice_id,
                "is_default": not any(p["invoice"] == invoice_id for p in self.invoice_payments.values()),
                "livemode": False,
                "payment": {"type": "payment_intent", "payment_intent": payment_intent_id},
                "status": "paid" if paid else "open",
                "status_transitions": {"canceled_at": None, "paid_at": created if paid else None},
            }
            self._register(payment_id)
            if paid:
                invoice["amount_paid"] += intent["amount_received"]
                invoice["amount_remaining"] = max(0, invoice["amount_due"] - invoice["amount_paid"])
                if invoice["amount_remaining"] == 0:
                    invoice["status"] = "paid"
                    invoice["status_transitions"]["paid_at"] = created
            return json.loads(json.dumps(self.invoice_payments[payment_id]))

    def pay_invoice(
        self,
        customer: str,
        lines: list[tuple[str, int]],
        currency: str = "usd",
        *,
        subscription: str | None = None,
        created: int | None = None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """An invoice finalized and paid by card, as Stripe bills a subscription period: the invoice creates its
        PaymentIntent (https://docs.stripe.com/billing/billing-apis), which since API 2025-03-31 names no invoice,
        and an InvoicePayment maps one to the other. The docs do not say when that InvoicePayment appears relative
        to the PaymentIntent; here both carry the same ``created`` second, so a listing bounded by the
        PaymentIntent's ``created`` finds it only when it uses that same bound (no slack for the product). Returns
        the invoice, with the id of the PaymentIntent that paid it as ``payment_intent``."""
        with self.lock:
            created = created if created is not None else self._now()
            invoice = self.open_invoice(customer, lines, currency, subscription=subscription, created=created, id=id)
            description = "Subscription update" if subscription else None
            intent = self.add_payment_intent(
                customer, invoice["amount_due"], currency, created=created, description=description
            )
            self.attach_payment(invoice["id"], intent["id"], created=created)
            return {**json.loads(json.dumps(self.invoices[invoice["id"]])), "payment_intent": intent["id"]}

    def dispute_charge(self, payment_intent_id: str) -> dict[str, Any]:
        """Mark the PaymentIntent's latest charge as disputed (``charge.disputed = true``)."""
        with self.lock:
            charge = self._charge_of(payment_intent_id)
            charge["disputed"] = True
            return json.loads(json.dumps(charge))

    def add_refund(
        self,
        payment_intent: str,
        amount: int | None = None,
        *,
        status: str = "succeeded",
        created: int | None = None,
        id: str | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Refund ``amount`` (default: all that is left) of the PaymentIntent's charge."""
        if status not in _REFUND_STATUSES:
            raise ValueError(f"unknown refund status {status!r}")
        if reason is not None and reason not in _REFUND_REASONS:
            raise ValueError(f"unknown refund reason {reason!r}")
        with self.lock:
            charge = self._charge_of(payment_intent)
            remaining = charge["amount_captured"] - charge["amount_refunded"]
            amount = remaining if amount is None else amount
            if amount < 1 or amount > remaining:
                raise ValueError(
                    f"refund amount {amount} is not within 1..{remaining} (charge {charge['id']} has "
                    f"{charge['amount_refunded']} of {charge['amount_captured']} refunded)"
                )
            rid = id or _new_id("re_", 24)
            refund = {
                "id": rid,
                "object": "refund",
                "amount": amount,
                "balance_transaction": _new_id("txn_", 24) if status == "succeeded" else None,
                "charge": charge["id"],
                "created": created if created is not None else self._now(),
                "currency": charge["currency"],
                "destination_details": {"card": {"reference_status": "pending", "type": "refund"}, "type": "card"},
                "metadata": dict(metadata or {}),
                "payment_intent": payment_intent,
                "reason": reason,
                "receipt_number": None,
                "source_transfer_reversal": None,
                "status": status,
                "transfer_reversal": None,
            }
            self.refunds[rid] = refund
            self._register(rid)
            self._update_refunded(charge)
            return json.loads(json.dumps(refund))

    def _charge_of(self, payment_intent_id: str) -> dict[str, Any]:
        pi = self.payment_intents[payment_intent_id]
        if pi["latest_charge"] is None:
            raise ValueError(f"payment intent {payment_intent_id!r} (status {pi['status']}) has no charge")
        return self.charges[pi["latest_charge"]]

    def _update_refunded(self, charge: dict[str, Any]) -> None:
        refunded = sum(
            r["amount"] for r in self.refunds.values() if r["charge"] == charge["id"] and r["status"] in _REFUND_COUNTED
        )
        charge["amount_refunded"] = refunded
        charge["refunded"] = refunded > 0 and refunded >= charge["amount_captured"]

    def adjust_customer_balance(self, customer: str, amount: int, *, currency: str | None = None) -> dict[str, Any]:
        """Add ``amount`` to the customer's cash balance (minor units; negative = credit to the customer), as an
        ``adjustment`` balance transaction would; returns the customer as served."""
        with self.lock:
            cust = self.customers[customer]
            if currency is not None and cust["currency"] not in (None, currency):
                raise ValueError(f"customer {customer!r} has currency {cust['currency']!r}, not {currency!r}")
            if cust["currency"] is None:
                cust["currency"] = currency or "usd"
            cust["balance"] += amount
            return json.loads(json.dumps(cust))

    def _render_payment_intent(self, pi: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        out = json.loads(json.dumps(pi))
        if "latest_charge" in expand and pi["latest_charge"] is not None:
            out["latest_charge"] = json.loads(json.dumps(self.charges[pi["latest_charge"]]))
        return out

    def _h_list_payment_intents(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        expand = self._expand(params, {"data.latest_charge"})
        objs = list(self.payment_intents.values())
        customer = params.get("customer")
        if customer:
            objs = [o for o in objs if o["customer"] == customer]
        objs = _filter_created(objs, params)
        charge_expand = {"latest_charge"} if "data.latest_charge" in expand else set()
        return self._paginate(
            self._newest_first(objs),
            params,
            "/v1/payment_intents",
            "payment_intent",
            lambda o: self._render_payment_intent(o, charge_expand),
        )

    def _h_get_payment_intent(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        expand = self._expand(params, {"latest_charge"})
        if id not in self.payment_intents:
            raise _no_such("payment_intent", id, param="intent")
        return self._render_payment_intent(self.payment_intents[id], expand)

    def _h_get_invoice(self, params: dict[str, Any], hdrs: Mapping[str, str], id: str) -> dict[str, Any]:
        """https://docs.stripe.com/api/invoices/retrieve (lines as of API 2025-03-31; see open_invoice)."""
        self._expand(params, set())
        if id not in self.invoices:
            raise _no_such("invoice", id, param="invoice")
        return json.loads(json.dumps(self.invoices[id]))

    def _render_invoice_payment(self, payment: dict[str, Any], expand: set[str]) -> dict[str, Any]:
        out = json.loads(json.dumps(payment))
        if "invoice" in expand:
            out["invoice"] = json.loads(json.dumps(self.invoices[payment["invoice"]]))
        return out

    def _h_list_invoice_payments(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        """https://docs.stripe.com/api/invoice-payment/list: filters ``invoice``, ``payment[type]``,
        ``payment[payment_intent]``, ``status`` and ``created``. The docs list ``payment.type`` as required within
        ``payment``; a filter by PaymentIntent without it is refused here, as the stricter reading."""
        expand = self._expand(params, {"data.invoice"})
        objs = list(self.invoice_payments.values())
        payment = params.get("payment")
        if payment not in (None, ""):
            if not isinstance(payment, dict):
                raise StripeError(400, "Invalid object", param="payment", code="parameter_invalid_object")
            kind = payment.get("type")
            if not kind:
                raise _missing("payment[type]")
            if kind not in ("payment_intent", "payment_record"):
                raise StripeError(
                    400, "Invalid payment[type]: must be one of payment_intent or payment_record", param="payment[type]"
                )
            objs = [o for o in objs if o["payment"]["type"] == kind]
            if payment.get("payment_intent"):
                objs = [o for o in objs if o["payment"].get("payment_intent") == payment["payment_intent"]]
        for name in ("invoice", "status"):
            if params.get(name):
                objs = [o for o in objs if o[name] == params[name]]
        objs = _filter_created(objs, params)
        invoice_expand = {"invoice"} if "data.invoice" in expand else set()
        return self._paginate(
            self._newest_first(objs),
            params,
            "/v1/invoice_payments",
            "invoice_payment",
            lambda o: self._render_invoice_payment(o, invoice_expand),
        )

    def _h_list_refunds(self, params: dict[str, Any], hdrs: Mapping[str, str]) -> dict[str, Any]:
        self._expand(params, set())
        objs = list(self.refunds.values())
        for name in ("payment_intent", "charge"):
            if params.get(name):
                objs = [o for o in objs if o[name] == params[name]]
        objs = _filter_created(objs, params)
        return self._paginate(self._newest_first(objs), params, "/v1/refunds", "refund")
