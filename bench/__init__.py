"""Load generator and analysis tools for OpenAI-compatible LLM servers.

Deliberately independent of `serving`: it must be able to measure a bare
vLLM server or any other deployment with nothing but a base URL.
"""

__version__ = "0.1.0"
