"""The runc runner: the image unpacked into a private tree, the workload run with the
runtime's own CLI (runc, crun or --runtime PATH), without containerd."""
