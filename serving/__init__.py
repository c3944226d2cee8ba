"""Self-hosted LLM serving: Ray Serve deployments around vLLM engines behind one OpenAI-compatible router.

`config` (models.yaml) and `app` (`serving.app:build_app`) at the top; the parts below them:
`engine`, `router`, `routing` (pure policy), `tenants`, `protocol`, `control`.
"""
