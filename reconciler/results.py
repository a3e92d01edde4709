"""The one shape every job's result shows the rest of the service: its run, how the run ended, what it counted,
what failed and what waits for a person. The daemon, the webhook worker, the run log behind `status` and
`report`, and /metrics read a result through `JobResult` only; each job's own fields (a usage cycle's plan, a
balance cycle's customers) are for that job's renderers."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Protocol, runtime_checkable


class RunStatus(StrEnum):
    """How a run ended, as the run log stores it (and `status` shows it)."""

    RUNNING = "running"  # the run log's row until the job finishes: never a result's status
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # ran to the end; some items failed or were left for a person
    FAILED = "failed"  # stopped early: it could not even list what to do
    INTERRUPTED = "interrupted"  # a stop was requested before every item was done
    DRY_RUN = "dry_run"  # nothing sent or written: not a run


# A run that went through everything it found, whatever happened to single items.
COMPLETED = frozenset({RunStatus.SUCCEEDED, RunStatus.PARTIAL})


def run_status(
    *, dry_run: bool, failed: int, left_for_a_person: int = 0, interrupted: bool = False, aborted: bool = False
) -> RunStatus:
    """The one rule every job ends its run by: a dry run is not a run; a job that could not list its work failed;
    one stopped early was interrupted; one that left items undone (failed, or held for a person) is partial."""
    if dry_run:
        return RunStatus.DRY_RUN
    if aborted:
        return RunStatus.FAILED
    if interrupted:
        return RunStatus.INTERRUPTED
    return RunStatus.PARTIAL if failed or left_for_a_person else RunStatus.SUCCEEDED


@runtime_checkable
class JobResult(Protocol):
    """What any job's cycle returns, seen from outside the job."""

    job: ClassVar[str]  # the run log's and the metrics' name for the job
    run_id: str | None  # None: a dry run

    @property
    def status(self) -> RunStatus: ...

    @property
    def failures(self) -> list[str]:
        """One line per item that failed, naming the customer or item: a retry may succeed."""
        ...

    @property
    def attention(self) -> list[str]:
        """One line per item a person must look at (held money, out-of-reach usage, a skipped customer...)."""
        ...

    def counts(self) -> dict[str, int]:
        """The summary the run log keeps for the run (and `status` shows)."""
        ...


def failure_text(result: JobResult) -> str | None:
    """The result's failures as one line (for a webhook item's retry), None when nothing failed."""
    return "; ".join(result.failures) or None
