"""Images in a registry, over the distribution API (the OCI distribution spec), with no
daemon in between.

- `options.py`: what the command line says about one side (source or destination):
  credentials, auth file, TLS verification. No HTTP here.
- `session.py`: one HTTP session per registry host: the scheme and TLS configuration
  (certs.d directories), and authentication (auth files, credential helpers, basic auth
  and bearer tokens) as an `httpx.Auth` flow, so callers never see a 401.
- `limits.py`: each request's deadline, minimum rate and byte cap, enforced in the
  socket reads and writes; bodies read whole are decoded only under a cap.
- `client.py`: the distribution API over a session: manifests, blob reads, existence
  checks, cross-repository mounts and uploads, with retries.
- `store.py`: `RegistryStore`, the `Store` protocol on top of the client.
"""
