"""Who may send what, and how much: API keys, per-key limits and usage shared by every router replica.

- `keys`: key records (hashed), the keys file and its reloads, allow-lists
- `limits`: per-key limits and usage as pure logic (sliding windows, reservations, leases)
- `limiter`: the shared limits actor, each router replica's client, the engine's `report_usage`
- `shared_actor`: how the cluster-wide named actors (limits, metrics) are made
"""
