"""estargz-opt: make container images start fast under lazy pulling."""

__version__ = "0.1.0"
