"""The engine side: one Ray Serve deployment per model around vLLM, and what it needs before it starts.

- `deployment`: the engine deployment (vLLM's `AsyncLLM` behind vLLM's OpenAI handlers, batched byte streams, routing stats)
- `provision`: each model's weights on local disk from its `source` (cached, atomic, locked)
- `capacity`: whether every replica and the router fit the nodes, decided before deploying (pure)
"""
