"""Operating the stack from outside it: the `serving` command and what it reads.

- `cli`: `serving check / provision / up / status` (and `keys`)
- `keys_cli`: `serving keys create / list / revoke`
- `status`: Ray Serve's own view of the application (per deployment status, message, replicas)
- `haproxy_launcher`: `serving-haproxy`, the ingress HAProxy Ray Serve starts, without splice
"""
