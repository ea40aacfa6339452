"""containerd as an image store and as the workload's runtime.

- model.py: containerd's records as dataclasses, and the shared defaults (no grpc);
- errors.py: the error classes (no grpc);
- rpcs.py, transport.py: the declared API methods and the one shared gRPC connection,
  with the table that maps gRPC status codes to errors;
- content.py, services.py: one object per containerd service (content with its
  ingest protocol; images, leases, snapshots, containers, tasks, diff, introspection);
- client.py: `Client`, which hands out those service objects;
- store.py: `ContainerdStore`, the Store the converter uses;
- owner.py: which process owns a lease or container (to reap what killed runs left).

This package's __init__ imports nothing, so importing model.py (e.g. from the privileged
monitor helper) does not load grpc.
"""
