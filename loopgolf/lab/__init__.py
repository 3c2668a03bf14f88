"""Sweeps, the results store, significance tests and reports (the hypothesis ledger)."""
