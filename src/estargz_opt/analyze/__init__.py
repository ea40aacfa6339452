"""Choosing the prioritized files: from a workload run, a saved record, or a prefetch list."""
