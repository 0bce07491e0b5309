"""Dagster wiring: definitions, jobs, schedules, sensors, CLI."""
