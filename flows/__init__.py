"""Prefect flows and tasks chaining the curriculum stages."""
