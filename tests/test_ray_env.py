"""Two stacks on one host (tests, benchmarks) must not share any Ray Serve port."""

import inspect
import re

from ray.serve._private import constants

from serving.app import ray_env
from serving.config import parse_config

CONFIG = parse_config({"models": [{"name": "m", "source": {"path": "/m"}}]})


def fixed_default_ports() -> set[str]:
    """Every Ray Serve environment setting for a port that has a fixed default, read from the
    installed Ray's constants so a new one in a Ray upgrade fails this test."""
    found = re.findall(r'\(\s*"(RAY_SERVE_\w*_PORT)",\s*"?([^),\s"]+)', inspect.getsource(constants))
    return {name for name, default in found if default != "None"}  # None: follows the main port


def test_ray_env_covers_every_fixed_port_of_ray_serve():
    ports = fixed_default_ports()
    assert "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" in ports and "RAY_SERVE_HAPROXY_STATS_PORT" in ports
    assert ports <= set(ray_env(CONFIG, 28000))


def test_stacks_on_different_ports_share_no_port():
    a, b = ray_env(CONFIG, 28000), ray_env(CONFIG, 28010)
    ports = lambda env: {int(v) for k, v in env.items() if k.endswith("_PORT")}  # noqa: E731
    assert not ports(a) & ports(b)
    # direct-ingress ranges are inclusive: the two stacks' ranges must not overlap either
    spans = lambda env: set(range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),  # noqa: E731
                                  int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) + 1)) | ports(env)
    assert not spans(a) & spans(b)
    assert len(ports(a)) == len([k for k in a if k.endswith("_PORT")])  # no port used twice in a stack


def test_derived_ports_stay_valid_for_any_router_port():
    for port in (80, 8000, 1399, 1400, 2799, 2800, 28000, 65535):
        assert all(1024 < int(v) <= 65535 for k, v in ray_env(CONFIG, port).items() if k.endswith("_PORT"))
