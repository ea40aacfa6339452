"""The rootless runner: the workload in a user namespace, its rootfs on a tmpfs there."""
