"""Fixtures for the loop tests: a fake trainer and harness, a stub Messages API, a fake `claude`."""
