"""Helpers shared by the tests and the benchmarks: image and tar factories, servers, daemons,
runtimes."""
