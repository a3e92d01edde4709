"""What can go wrong when talking to an upstream API, in the terms our code branches on.

    UpstreamError                 any failed call; `.api` names the upstream, `.status` the HTTP status
    ├── IdentifierTakenError      Stripe holds an event with the identifier, sent by none of our attempts that
    │                             we know of: whether it carries our quantity is unknown, and a resend cannot tell
    ├── PermanentError            the request was refused and was not applied: fix the input, don't retry
    └── TransientError            may succeed if tried again later
        ├── RateLimitedError      429: wait `.retry_after` seconds (or back off) before the next call
        └── OutcomeUnknownError   the request may or may not have been applied (dropped connection, 5xx,
                                  timeout): only ever resend it with the same identifier (and idempotency
                                  key, but a key a 5xx answer was saved to is burnt: reconciler.upstream.stripe_api)

The adapters translate SDK exceptions into these; the adapters' callers never see an SDK type.
"""

from __future__ import annotations


class UpstreamError(Exception):
    def __init__(self, api: str, message: str, *, status: int | None = None, request_id: str | None = None):
        self.api = api
        self.status = status
        self.request_id = request_id
        detail = f"{api}: {message}"
        if status is not None:
            detail += f" (HTTP {status})"
        if request_id:
            detail += f" [request {request_id}]"
        super().__init__(detail)


class IdentifierTakenError(UpstreamError):
    """A meter event refused because Stripe already holds one with its identifier, on a first attempt. Stripe
    answers so to any event with that identifier, whatever its quantity (e.g. one a lost ledger sent): the answer
    says nothing about our quantity, so it is neither "applied" nor "refused"; Stripe's summary settles it."""


class PermanentError(UpstreamError):
    """Refused and not applied; retrying the same request cannot help."""


class TransientError(UpstreamError):
    """Worth trying again later."""


class RateLimitedError(TransientError):
    def __init__(self, api: str, message: str, *, retry_after: float | None = None, **kwargs: object):
        super().__init__(api, message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class OutcomeUnknownError(TransientError):
    """The request may have been applied; resend only with the same idempotency key."""
