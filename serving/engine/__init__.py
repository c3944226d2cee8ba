"""The engine side: one Ray Serve deployment per model around vLLM, and what it needs before it starts.

- `deployment`: the engine deployment (vLLM's `AsyncLLM` behind vLLM's OpenAI handlers, batched byte streams, routing stats)
- `vllm_args`: a model's `vllm serve` arguments (engine_args + serve_args) as vLLM's own parser reads them, and what `serving check` refuses
- `provision`: each model's weights on local disk from its `source` (cached, atomic, locked)
- `capacity`: whether every replica and the router fit the nodes, decided before deploying (pure)
"""
