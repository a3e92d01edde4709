"""`reconciler balances resolve`: a person settles a Moesif transaction the balance job cannot settle itself.

What a person can resolve: a transaction whose outcome is unknown and that was not resent, one held (never
forwarded), one marked for attention, and a drift correction the comparison reports `unsettled`. The person
checked Moesif and says whether the money is there:

- `applied`: it is (for a held one: the person moved it by hand). The transaction is closed: sent, no longer
  flagged; a correction counts as seen landing.
- `not_applied`: it is not. The transaction is sent once more under its own transaction_id. The decision is
  committed first and the transaction goes back to pending, so a crash during the resend is settled by the balance
  job as any interrupted send is (resent if no request left, else flagged as outcome unknown) and a second
  `not_applied` is refused: one person's "not applied" never turns into two credits.

Every decision is written to `balance_resolutions` (who, when, what it was, the note) and shown in `report`. It
runs under the balance job's lock, exclusively (reconciler.ledger.balance_lock): refused while a cycle runs.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from reconciler.balances.drift import DriftAction
from reconciler.balances.model import StoredTransaction
from reconciler.balances.money import to_units
from reconciler.balances.transactions import moesif_transaction
from reconciler.config import Config
from reconciler.errors import RefusedError, SetupError
from reconciler.ledger.balance_ledger import BalanceLedger
from reconciler.ledger.schema import BalanceObservation, BalanceResolution, MoesifTransaction
from reconciler.redact import redact
from reconciler.upstream.errors import PermanentError, UpstreamError
from reconciler.upstream.moesif_api import MoesifGateway
from reconciler.usage.model import IntentState

APPLIED, NOT_APPLIED = "applied", "not_applied"


def resolve_transaction(
    config: Config, transaction_id: str, *, applied: bool, by: str | None, note: str | None, tell: Callable[[str], None]
) -> Resolved:
    """`reconciler balances resolve`: `tell` the person the customer's latest balance comparison, then decide (by
    default as the login name) under the balance job's lock."""
    from reconciler.app import opened_ledger
    from reconciler.clock import utc_now

    moesif_config = config.moesif
    if moesif_config is None:
        raise SetupError("no moesif section in the config: nothing to resolve against")
    with opened_ledger(config) as engine:
        resolver = Resolver(config, engine, utc_now)
        tell(resolver.comparison_for(transaction_id))
        moesif = partial(MoesifGateway, moesif_config)
        return resolver.resolve(transaction_id, applied=applied, by=by or login_name(), note=note, moesif=moesif)


def login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no $USER/$LOGNAME and no passwd entry (a bare container)
        return "unknown"


class ResolveRefusedError(RefusedError):
    """The resolution was refused; nothing was changed or sent."""


@dataclass(frozen=True)
class Resolved:
    transaction_id: str
    action: str
    was: str  # why it needed a person
    resend: str | None = None  # not_applied: what became of the resend
    resend_failed: bool = False  # it was refused or its outcome is unknown: a person must look again

    def lines(self) -> list[str]:
        """What a person is told."""
        done = f"{self.transaction_id}: {self.action.replace('_', ' ')} (was {self.was})"
        return [done] + ([f"{self.transaction_id}: {self.resend}"] if self.resend else [])


class Resolver:
    def __init__(self, config: Config, engine: Engine, clock: Callable[[], datetime]):
        self._config = config
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._ledger = BalanceLedger(engine, clock)
        self._clock = clock

    def find(self, transaction_id: str) -> StoredTransaction:
        stored = self._ledger.get(transaction_id)
        if stored is None:
            raise ResolveRefusedError(f"no Moesif transaction {transaction_id} in the ledger")
        return stored

    def comparison_for(self, transaction_id: str) -> str:
        """The latest balance comparison of the transaction's customer (ResolveRefusedError: no such transaction)."""
        return self.latest_comparison(self.find(transaction_id).planned.account.customer_id)

    def latest_comparison(self, customer_id: str) -> str:
        """The customer's latest balance comparison, as a person reads it before deciding."""
        with self._sessions() as session:
            o = _latest_observation(session, customer_id)
        if o is None:
            return f"no balance comparison recorded for {customer_id}"

        def units(minor: int) -> str:
            return f"{to_units(minor, o.currency)} {o.currency.upper()}"

        return (
            f"latest balance comparison for {customer_id} at {o.observed_at:%Y-%m-%d %H:%M} UTC: Stripe expects "
            f"{units(o.expected_minor)}, Moesif showed {units(o.moesif_minor)} (difference "
            f"{to_units(o.difference_minor, o.currency):+}): {o.action}, {o.reason}"
        )

    def resolve(
        self, transaction_id: str, *, applied: bool, by: str, note: str | None, moesif: Callable[[], MoesifGateway]
    ) -> Resolved:
        """Decide (and for `not_applied` resend) under the balance job's lock; BalanceJobBusyError while a cycle
        runs, ResolveRefusedError when there is nothing this decision may do."""
        with self._ledger.job_lock(exclusive=True):
            action = APPLIED if applied else NOT_APPLIED
            stored, was = self._decide(transaction_id, action, by, note)
            if applied:
                return Resolved(transaction_id, action, was)
            gateway = moesif()
            try:
                return self._resend(stored, was, gateway)
            finally:
                gateway.close()

    def _decide(self, transaction_id: str, action: str, by: str, note: str | None) -> tuple[StoredTransaction, str]:
        """Check and record the decision in one database transaction, before anything is sent."""
        now = self._clock()
        with self._sessions.begin() as session:
            row = session.scalars(
                select(MoesifTransaction).where(MoesifTransaction.transaction_id == transaction_id).with_for_update()
            ).one_or_none()
            if row is None:
                raise ResolveRefusedError(f"no Moesif transaction {transaction_id} in the ledger")
            if action == NOT_APPLIED:
                _refuse_a_second_resend(session, row)
            was = _needs_a_person(session, row)
            if was is None:
                raise ResolveRefusedError(f"{transaction_id} ({row.state}) does not need a person: nothing to resolve")
            if action == NOT_APPLIED:
                _refuse_resend(session, row)
            session.add(
                BalanceResolution(
                    transaction_id=transaction_id,
                    customer_id=row.customer_id,
                    action=action,
                    was=was,
                    note=note,
                    resolved_by=by,
                    resolved_at=now,
                )
            )
            row.outcome_unknown = False
            row.attention = None
            if action == APPLIED:
                row.state = IntentState.SENT
                row.sent_at = row.sent_at or now
                if row.kind == "correction":
                    row.verified_at = now
            else:
                # Pending and never attempted: should this process die before the request leaves, the next cycle
                # sends it; once `mark_attempted` commits, it would flag it as outcome unknown instead.
                row.state = IntentState.PENDING
                row.attempted_at = None
            session.flush()
        stored = self._ledger.get(transaction_id)
        assert stored is not None
        return stored, was

    def _resend(self, stored: StoredTransaction, was: str, moesif: MoesifGateway) -> Resolved:
        planned = stored.planned
        transaction = moesif_transaction(planned, f"{planned.description} (resent: not applied, per a person)")

        def resolved(resend: str, failed: bool = False) -> Resolved:
            return Resolved(planned.transaction_id, NOT_APPLIED, was, resend, failed)

        try:
            outcome = moesif.post_transaction(transaction, before_send=lambda: self._ledger.mark_attempted(stored))
        except PermanentError as exc:
            error = self._redact(str(exc))
            self._ledger.mark_failed(stored, error)
            return resolved(f"Moesif refused the resend: {error}", failed=True)
        except UpstreamError as exc:
            # As the job does when Moesif may not deduplicate: never sent a third time without a person.
            error = self._redact(str(exc))
            self._ledger.mark_sent(stored, outcome_was_unknown=True, error=error)
            return resolved(
                f"the resend's outcome is unknown ({error}): check Moesif; only --applied can close it now", True
            )
        self._ledger.mark_sent(stored, outcome_was_unknown=outcome.had_unknown_outcome)
        return resolved("resent to Moesif with the same transaction_id")

    def _redact(self, text: str) -> str:
        return redact(text, self._config.secret_values())


def _needs_a_person(session: Session, row: MoesifTransaction) -> str | None:
    """Why the transaction waits for a person, or None: the job settles it (or did) by itself."""
    if row.state == IntentState.HELD:
        return f"held, never forwarded: {row.error}"
    if row.attention:
        return f"marked for attention: {row.attention}"
    if row.outcome_unknown and row.state == IntentState.SENT:
        return f"outcome unknown: {row.error}" if row.error else "outcome unknown"
    if row.kind == "correction" and row.state == IntentState.SENT and row.verified_at is None:
        latest = _latest_observation(session, row.customer_id)
        if latest is not None and latest.action == DriftAction.UNSETTLED.value and _newest_correction(session, row):
            return f"unsettled correction: {latest.reason}"
    return None


def _refuse_a_second_resend(session: Session, row: MoesifTransaction) -> None:
    """One resend per transaction, whatever became of it: a third send could only be a guess."""
    earlier = session.scalars(
        select(BalanceResolution)
        .where(BalanceResolution.transaction_id == row.transaction_id, BalanceResolution.action == NOT_APPLIED)
        .order_by(BalanceResolution.id)
    ).first()
    if earlier is not None:
        raise ResolveRefusedError(
            f"{row.transaction_id} was already resent once (--not-applied by {earlier.resolved_by} at "
            f"{earlier.resolved_at:%Y-%m-%d %H:%M} UTC); it is not sent again: check Moesif, and if it still "
            "needs a person close it with --applied or settle it by hand"
        )


def _refuse_resend(session: Session, row: MoesifTransaction) -> None:
    if row.state == IntentState.HELD:
        raise ResolveRefusedError(
            f"{row.transaction_id} is held ({row.error}): the job will not forward it, so neither does resolve; "
            "move the money by hand and close it with --applied"
        )
    if row.attention:
        raise ResolveRefusedError(
            f"{row.transaction_id} is marked for attention ({row.attention}): resending it would forward it again; "
            "settle it in Moesif by hand and close it with --applied"
        )
    if row.sent_at is not None:
        correction = session.scalars(
            select(MoesifTransaction.transaction_id).where(
                MoesifTransaction.subscription_id == row.subscription_id,
                MoesifTransaction.kind == "correction",
                MoesifTransaction.id != row.id,
                MoesifTransaction.created_at > row.sent_at,
            )
        ).first()
        if correction is not None:
            # The comparison saw the money missing and made up for it: resending would credit it twice.
            raise ResolveRefusedError(
                f"drift correction {correction} for this subscription was sent after {row.transaction_id}: it may "
                "already make up for it; check Moesif and close it with --applied"
            )


def _latest_observation(session: Session, customer_id: str) -> BalanceObservation | None:
    return session.scalars(
        select(BalanceObservation)
        .where(BalanceObservation.customer_id == customer_id)
        .order_by(BalanceObservation.id.desc())
        .limit(1)
    ).first()


def _newest_correction(session: Session, row: MoesifTransaction) -> bool:
    """The unsettled comparison is about the subscription's newest correction: an older one is not its subject."""
    newest = session.scalars(
        select(MoesifTransaction.id)
        .where(MoesifTransaction.subscription_id == row.subscription_id, MoesifTransaction.kind == "correction")
        .order_by(MoesifTransaction.id.desc())
        .limit(1)
    ).first()
    return newest == row.id
