"""Helpers shared by test modules (servers, factories, runtimes)."""
