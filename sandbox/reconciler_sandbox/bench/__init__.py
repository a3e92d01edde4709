"""`reconciler bench`: the product against the sandbox with real latency and enforced request budgets, side by
side with the naive sequential loop of the seed example, for growing numbers of metered items."""
