"""The router deployment: the only HTTP ingress, and everything it keeps per request and per replica.

- `http`: routes only (FastAPI)
- `core`: authenticate, read what routing needs, decide, hand to forwarding
- `forward`: dispatch over handles, failover, deadline, byte relay
- `replica_router`: Ray Serve's `RequestRouter` subclass: which replica of an engine deployment
- `loads`: the load view from the engines' routing stats
- `registry`: the objects Ray Serve constructs in a router replica, found by name (the one registry)
- `auto`, `embedder`: `model: "auto"` routes: the prompt's difficulty, its embedding in the router
- `listing`: `GET /v1/models` (vLLM's ModelList / ModelCard shape plus the router's fields)
- `accounting`: metrics, usage and cost, the overhead split, the request log
- `metrics`, `metrics_export`: every Prometheus metric; one /metrics across router replicas
- `requestlog`: the JSON request log
- `drain`: graceful stop (503 to new requests while the ones in flight finish)
"""
