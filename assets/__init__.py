"""Dagster software-defined assets and checks: thin wrappers over ``ops`` stage functions."""
