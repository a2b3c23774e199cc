"""Fixtures for the decision, integrity and general-mode tests."""
