"""The group commits of outcomes (reconciler.usage.outcomes): a replica's marks for many claims in one transaction
while every lease holds, claim by claim when one lapsed; a claim completed only once its sync and every outcome it
left buffered are done; completions many to a transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from reconciler.clock import utc_now
from reconciler.usage.model import Claim, Fence, LeaseLostError
from reconciler.usage.outcomes import Completions, SentMarks, Settlement


@dataclass(frozen=True)
class Sent:
    identifier: str


def fence(item: int) -> Fence:
    return Fence(item, 1, "replica", utc_now, timedelta(seconds=30))


@dataclass
class Book:
    """A claimed item's ledger: records each mark_all_sent call; a lapsed lease refuses any transaction holding it."""

    fence: Fence | None
    calls: list[tuple[list[str], list[int]]]
    lapsed: set[int] = field(default_factory=set)

    def mark_all_sent(self, intents, also_fenced_by=()):
        fences = [f.item_id for f in ([self.fence] if self.fence else []) + list(also_fenced_by)]
        if self.lapsed & set(fences):
            raise LeaseLostError("lapsed")
        self.calls.append(([intent.identifier for intent in intents], fences))


def test_marks_for_many_claims_go_in_one_transaction_holding_every_lease():
    calls: list = []
    books = [Book(fence(n), calls) for n in range(3)]
    written: list[int] = []
    marks = SentMarks(flush_at=3)
    for n, book in enumerate(books):
        marks.add(book, Sent(f"intent-{n}"), lambda n=n: written.append(n))
    assert calls == [(["intent-0", "intent-1", "intent-2"], [0, 1, 2])]
    assert written == [0, 1, 2]


def test_a_lapsed_lease_leaves_only_its_own_claims_marks_unwritten():
    calls: list = []
    lapsed = {1}
    books = [Book(fence(n), calls, lapsed) for n in range(3)]
    written: list[int] = []
    marks = SentMarks(flush_at=10)
    for n, book in enumerate(books):
        marks.add(book, Sent(f"intent-{n}"), lambda n=n: written.append(n))
    marks.flush()
    assert calls == [(["intent-0"], [0]), (["intent-2"], [2])]  # claim by claim once the group was refused
    assert written == [0, 1, 2]  # every outcome settled: the lapsed claim's completion is refused on its own


def test_a_claim_completes_after_its_sync_and_each_buffered_outcome():
    completed: list[str] = []
    settlement = Settlement(lambda: completed.append("done"))
    first, second = settlement.expect(), settlement.expect()
    first()
    settlement.synced()
    assert completed == []
    second()
    assert completed == ["done"]


def test_completions_go_many_to_a_transaction_and_on_flush():
    transactions: list[list[int]] = []

    def complete_all(claims: list[Claim]) -> int:
        transactions.append([c.item_id for c in claims])
        return len(claims)

    completions = Completions(complete_all, flush_at=2)
    for n in range(3):
        completions.add(Claim(n, "{}", fence(n)))
    assert transactions == [[0, 1]]
    completions.flush()
    assert transactions == [[0, 1], [2]]
