"""Fixtures the project builds itself for tests and offline checks: tiny models with random weights."""
