"""Two stacks on one host (tests, benchmarks) must not share any Ray Serve port or HAProxy file."""

from serving.app import ray_env
from serving.config import parse_config

CONFIG = parse_config({"models": [{"name": "m", "source": {"path": "/m"}}]})


def test_stacks_on_different_ports_share_no_port_and_no_haproxy_file():
    a, b = ray_env(CONFIG, 28000), ray_env(CONFIG, 28010)
    files = [k for k in a if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"} <= set(files)
    assert all(a[k] != b[k] for k in files)
    ports = lambda env: {int(v) for k, v in env.items() if k.endswith("_PORT")}  # noqa: E731
    assert not ports(a) & ports(b)
