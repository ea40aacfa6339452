"""The error every failure to reach or log in to a registry raises.

Kept apart from the modules that raise it (credentials, TLS, auth, session) so that each
can import it without importing the others. Its message is one line that names the
registry and never holds a secret.
"""

from __future__ import annotations

from estargz_opt.errors import EstargzOptError


class RegistryAccessError(EstargzOptError):
    """The registry cannot be reached, its certificate is not trusted, or it refused our
    credentials."""
