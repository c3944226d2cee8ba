"""Write a models file that serves only the chat model of models.yaml, as bare vLLM and Ray Serve
LLM do in the side-by-side runs: no routes, no fallbacks; optional overrides for the model entry
and the router section (JSON objects, merged key by key).

    python bench/scripts/chat_only_config.py OUT.yaml [--model-json '{"replicas": 2}'] [--router-json '{...}']
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHAT_MODEL = "smollm2-135m"


def chat_only(model_overrides: dict | None = None, router_overrides: dict | None = None) -> dict:
    raw = yaml.safe_load((REPO / "models.yaml").read_text())
    raw["models"] = [m for m in raw["models"] if m["name"] == CHAT_MODEL]
    raw.pop("routes", None)
    for model in raw["models"]:
        model.pop("fallbacks", None)
        model.update(model_overrides or {})
    if router_overrides:
        raw["router"] = {**(raw.get("router") or {}), **router_overrides}
    return raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model-json", default="{}", help="merged into the chat model's entry")
    ap.add_argument("--router-json", default="{}", help="merged into the router section")
    args = ap.parse_args()
    raw = chat_only(json.loads(args.model_json), json.loads(args.router_json))
    Path(args.out).write_text(yaml.safe_dump(raw, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
