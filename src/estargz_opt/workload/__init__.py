"""Run an image's workload once under the file-access monitor and record what it touched.

The runner (see `runner.Runner`) makes the rootfs and runs the sample container; the
spec steps, the monitor and the recorder are shared by every runner.
"""
