"""Mean of vLLM's own histograms over each segment: python itl_diff.py DIR seg1-vllm seg2-stack ..."""
import json, sys
DIR = sys.argv[1]
for seg in sys.argv[2:]:
    b = json.load(open(f"{DIR}/{seg}-before.json")); a = json.load(open(f"{DIR}/{seg}-after.json"))
    d = {k: a[k] - b.get(k, 0) for k in a}
    out = {base[:-4]: round(1000 * d[base] / d[base[:-4] + "_count"], 1)
           for base in d if base.endswith("_sum") and d.get(base[:-4] + "_count")}
    print(seg, "mean ms:", out)
