"""The containerd runner: layers unpacked into snapshots, the workload run as a task."""
