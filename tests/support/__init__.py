"""Test helpers shared by the test modules (tests/ is on sys.path)."""
