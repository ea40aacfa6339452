"""Helpers the tests share: servers and factories."""
