"""Fixtures for tests/data_pipeline live in data_pipeline_testlib.py (importable from the tests)."""

from data_pipeline_testlib import data_dir  # noqa: F401
