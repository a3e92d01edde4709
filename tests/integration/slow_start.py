"""`python -m tests.integration.slow_start ARGS…`: `reconciler ARGS…` started slowly, as on a loaded machine.

With `TESTS_SLOW_START_SECONDS=N` the test helpers start every `reconciler` command through this module: a
one-shot command starts N seconds late, and `reconciler run` logs "reconciler running" at once but runs the
first cycle of each job N seconds late. A test that passes only on a fast machine fails here.
"""

from __future__ import annotations

import functools
import os
import sys
import time

from reconciler import daemon
from reconciler.cli import main

DELAY_SECONDS = float(os.environ.get("TESTS_SLOW_START_SECONDS", "0"))


def _first_call_delayed(cycle):
    started = False

    @functools.wraps(cycle)
    def delayed(self, *args, **kwargs):
        nonlocal started
        if not started:
            started = True
            time.sleep(DELAY_SECONDS)
        return cycle(self, *args, **kwargs)

    return delayed


if __name__ == "__main__":
    if "run" in sys.argv[1:]:
        for name in ("usage_cycle", "balance_cycle", "plan_cycle"):
            setattr(daemon.Daemon, name, _first_call_delayed(getattr(daemon.Daemon, name)))
    else:
        time.sleep(DELAY_SECONDS)
    sys.argv[0] = "reconciler"
    main()
