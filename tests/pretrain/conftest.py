"""Importing one_torch_thread (autouse, tests/kiln_testlib.py) runs each test module here on one
thread."""

from kiln_testlib import one_torch_thread  # noqa: F401
