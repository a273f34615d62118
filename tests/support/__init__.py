"""Helpers shared by the test files (no tests here): importable by spawned ranks as `tests.support.<module>`."""
