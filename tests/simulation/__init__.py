"""Deterministic fault simulation: seeded scenarios of customers, usage, money and faults, played against the
sandbox fakes and the real product, with invariants checked after every run (see README, Reliability)."""
