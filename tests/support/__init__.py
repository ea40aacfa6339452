"""Helpers shared by test modules: image factories, servers, runtimes."""
