"""Capacity measurement: the standard workloads, the peers they are measured beside (a SQLite ledger
written the way most shops write one, pure-Python rule evaluation, per-code FF1), the operator's
``loyalty-engine bench`` runner and the ``loyalty-engine capacity`` planner."""
