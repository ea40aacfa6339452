"""Helpers for tests: image factories and servers shared by test modules."""
