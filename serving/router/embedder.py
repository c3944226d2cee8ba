"""Sentence embeddings computed inside the router process, for the `auto` route's classifier.

A request to the embed deployment crosses Ray twice and waits behind the engines for a core
(31 ms mean on 2 CPU cores, bench/results/auto-live). Two ways to embed here instead, both from
the stack's own embed model folder:

- `StaticEmbedder`: the mean of the model's input token embeddings (a Model2Vec-style static
  embedding): a table lookup in numpy, ~0.3 ms per prompt, no torch at request time. On the
  exemplars it classifies as well as the full model (bench/results/auto-live/README.md).
- `LocalEmbedder`: the full transformer on one thread (~13 ms for a 40-token prompt on this CPU);
  same math as sentence-transformers and vLLM's pooling runner for MiniLM: mean pooling over the
  attention mask, then L2 normalisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.routing.difficulty import l2_normalize

MAX_TOKENS = 256  # MiniLM's window; longer prompts are cut (embedding_text already keeps the head)


class StaticEmbedder:
    def __init__(self, path: str | Path):
        from safetensors import safe_open
        from tokenizers import Tokenizer

        folder = Path(path)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        with safe_open(str(folder / "model.safetensors"), framework="np") as weights:
            name = next(k for k in weights.keys() if k.endswith("word_embeddings.weight"))
            self.table = weights.get_tensor(name).astype(np.float32)
        self.dims = int(self.table.shape[1])

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dims), dtype=np.float32)
        # encode, not encode_batch: the batch call hands work to a thread pool, and waiting for a
        # pool thread to get a core beside busy engines costs more than encoding a prompt
        return l2_normalize(np.vstack([self.table[self.tokenizer.encode(t).ids].mean(axis=0) for t in texts]))


class LocalEmbedder:
    def __init__(self, path: str | Path, threads: int | None = 1):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            # one thread: the router process does nothing else with torch, and the engines own the cores
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.dims = int(self.model.config.hidden_size)

    def __call__(self, texts: list[str], batch: int = 32) -> np.ndarray:
        out = []
        with self.torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = self.tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=MAX_TOKENS,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(self.torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.vstack(out) if out else np.zeros((0, self.dims))
