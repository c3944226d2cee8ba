"""Offline evaluation of the `auto` route's difficulty classifier (serving/routing/difficulty.py).

Embeds with the stack's own embedding model as the router does (`--embedding static`: the mean of
its token embeddings; `local`: the full model, mean pooling + L2 normalization as
sentence-transformers and the embed deployment do), then reports:
  - a stratified held-out split of the shipped exemplars (train on 75 %, test on 25 %),
  - 5-fold cross-validation over the exemplars,
  - MT-Bench's 80 first turns (writing, roleplay, extraction = easy; math, reasoning, coding = hard;
    stem and humanities reported apart), classifier trained on every exemplar,
  - the max_large_share knob's effect, and classification latency given the vector.

    python -m bench difficulty-eval --mt-bench ~/.cache/serving/eval/mt_bench_question.jsonl
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from serving.engine.provision import cache_dir
from serving.router.embedder import LocalEmbedder, StaticEmbedder
from serving.routing.difficulty import DifficultyClassifier, Exemplar, embedding_text, load_exemplars

MODEL_DIR = cache_dir() / "models" / "all-minilm-l6-v2"  # what `serving provision models.yaml` filled
EASY_MT = ("writing", "roleplay", "extraction")
HARD_MT = ("math", "reasoning", "coding")


def stratified_split(exemplars: list[Exemplar], test_share: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    by_cat = defaultdict(list)
    for i, e in enumerate(exemplars):
        by_cat[(e.label, e.category)].append(i)
    train, test = [], []
    for key in sorted(by_cat):
        idx = list(by_cat[key])
        rng.shuffle(idx)
        k = max(1, round(len(idx) * test_share))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def rates(labels: list[str], hard_pred: list[bool]) -> dict[str, float]:
    easy = [not h for lab, h in zip(labels, hard_pred) if lab == "easy"]
    hard = [h for lab, h in zip(labels, hard_pred) if lab == "hard"]
    return {
        "easy_to_small": sum(easy) / len(easy) if easy else float("nan"),
        "hard_to_large": sum(hard) / len(hard) if hard else float("nan"),
        "accuracy": (sum(easy) + sum(hard)) / (len(easy) + len(hard)),
        "large_share": sum(hard_pred) / len(hard_pred),
        "n_easy": len(easy), "n_hard": len(hard),
    }


def evaluate(train_ex, train_vec, test_ex, test_vec, share: float) -> dict[str, dict]:
    clf = DifficultyClassifier(train_ex, train_vec)
    labels = [e.label for e in test_ex]
    with_vec = [clf.classify(e.text, vector=v, max_large_share=share).hard for e, v in zip(test_ex, test_vec)]
    rules = [clf.classify(e.text, max_large_share=share).hard for e in test_ex]
    return {"vector": rates(labels, with_vec), "rules": rates(labels, rules)}


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


EMBEDDINGS = {  # router.difficulty_embedding -> how this report describes it
    "static": "the mean of the model's token embeddings (StaticEmbedder, as the router's default)",
    "local": "the full model via transformers, mean pooling + L2 norm (LocalEmbedder)",
}


def run(mt_bench: str | None, out: str, share: float, seed: int, embedding: str = "static") -> str:
    exemplars = load_exemplars()
    embed = StaticEmbedder(MODEL_DIR) if embedding == "static" else LocalEmbedder(MODEL_DIR, threads=None)
    started = time.perf_counter()
    vectors = embed([embedding_text(e.text) for e in exemplars])
    embed_s = time.perf_counter() - started
    lines = ["# Difficulty classifier for `model: auto`", "",
             "Command (from the repository root; MT-Bench's question.jsonl is fetched from lm-sys/FastChat, "
             "not committed):", "", "```bash",
             f"PYTHONPATH=$PWD .venv/bin/python -m bench difficulty-eval --mt-bench ~/.cache/serving/eval/mt_bench_question.jsonl"
             f" --max-large-share {share} --embedding {embedding}", "```", "",
             f"Exemplars: {len(exemplars)} ({sum(e.label == 'easy' for e in exemplars)} easy, "
             f"{sum(e.label == 'hard' for e in exemplars)} hard), serving/routing/data/exemplars.jsonl. "
             f"Embeddings of all-minilm-l6-v2 (384 dims): {EMBEDDINGS[embedding]} "
             f"({1000 * embed_s / len(exemplars):.2f} ms per exemplar on this 2-core CPU, batched). "
             f"Calibration: max_large_share = {share} (threshold = the higher of: the score that keeps 95 % of "
             f"hard exemplars large, and the {1 - share:.2f} quantile of all exemplars; both out of fold). "
             "How the exemplars and the calibration came to be, including an earlier run that missed the "
             "MT-Bench targets: serving/routing/data/README.md.", ""]

    # 1. Held-out split.
    train, test = stratified_split(exemplars, 0.25, seed)
    res = evaluate([exemplars[i] for i in train], vectors[train], [exemplars[i] for i in test], vectors[test], share)
    lines += ["## Held-out split of the exemplars", "",
              f"Stratified by label and category, seed {seed}: {len(train)} train, {len(test)} test.", "",
              "| mode | easy -> small | hard -> large | accuracy | share sent large |", "| --- | --- | --- | --- | --- |"]
    for mode in ("vector", "rules"):
        r = res[mode]
        lines.append(f"| {'embedding + rules' if mode == 'vector' else 'rules only (no vector)'} | {pct(r['easy_to_small'])} of {r['n_easy']} "
                     f"| {pct(r['hard_to_large'])} of {r['n_hard']} | {pct(r['accuracy'])} | {pct(r['large_share'])} |")

    # 2. 5-fold cross-validation.
    folds = np.random.default_rng(seed).permutation(len(exemplars)) % 5
    labels_all, pred = {"vector": [], "rules": []}, {"vector": [], "rules": []}
    for k in range(5):
        tr, te = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        clf = DifficultyClassifier([exemplars[i] for i in tr], vectors[tr])
        for i in te:
            for mode in ("vector", "rules"):
                labels_all[mode].append(exemplars[i].label)
                pred[mode].append(clf.classify(exemplars[i].text, vector=vectors[i] if mode == "vector" else None,
                                               max_large_share=share).hard)
    lines += ["", "## 5-fold cross-validation over the exemplars", "",
              "| mode | easy -> small | hard -> large | accuracy |", "| --- | --- | --- | --- |"]
    for mode in ("vector", "rules"):
        r = rates(labels_all[mode], pred[mode])
        lines.append(f"| {'embedding + rules' if mode == 'vector' else 'rules only'} | {pct(r['easy_to_small'])} | {pct(r['hard_to_large'])} | {pct(r['accuracy'])} |")

    clf = DifficultyClassifier(exemplars, vectors)
    # 3. MT-Bench.
    if mt_bench:
        questions = [json.loads(line) for line in Path(os.path.expanduser(mt_bench)).read_text().splitlines() if line.strip()]
        texts = [q["turns"][0] for q in questions]
        qvec = embed([embedding_text(t) for t in texts])
        lines += ["", "## MT-Bench (80 questions, first turn)", "",
                  "lm-sys/FastChat `fastchat/llm_judge/data/mt_bench/question.jsonl` (Apache-2.0), commit "
                  "0e6d3e4beaab66f4d3f93db72541a4abab8af28d. Classifier trained on all exemplars; none of them is an "
                  "MT-Bench question.", "",
                  "| max_large_share | mode | easy (writing, roleplay, extraction) -> small | hard (math, reasoning, coding) -> large "
                  "| stem -> large | humanities -> large | all 80 -> large |", "| --- | --- | --- | --- | --- | --- | --- |"]
        per_cat_rows = {}
        for s in sorted({0.3, 0.4, share, 0.6}):
            for mode in ("vector", "rules"):
                hard = [clf.classify(t, vector=v if mode == "vector" else None, max_large_share=s).hard for t, v in zip(texts, qvec)]
                cats = defaultdict(list)
                for q, h in zip(questions, hard):
                    cats[q["category"]].append(h)
                easy_small = sum(not h for c in EASY_MT for h in cats[c]) / sum(len(cats[c]) for c in EASY_MT)
                hard_large = sum(h for c in HARD_MT for h in cats[c]) / sum(len(cats[c]) for c in HARD_MT)
                mark = " **(shipped)**" if s == share else ""
                lines.append(f"| {s}{mark} | {'embedding + rules' if mode == 'vector' else 'rules only'} | {pct(easy_small)} | {pct(hard_large)} "
                             f"| {pct(statistics.mean(cats['stem']))} | {pct(statistics.mean(cats['humanities']))} | {pct(statistics.mean(hard))} |")
                if s == share and mode == "vector":
                    per_cat_rows = {c: (sum(v), len(v)) for c, v in cats.items()}
        lines += ["", f"Per category at max_large_share = {share}, embedding + rules (sent large / questions): "
                  + ", ".join(f"{c} {n}/{t}" for c, (n, t) in per_cat_rows.items()), ""]
        misses = [(q["category"], clf.classify(t, vector=v, max_large_share=share)) for q, t, v in zip(questions, texts, qvec)]
        wrong = [(c, r) for c, r in misses if (c in EASY_MT and r.hard) or (c in HARD_MT and not r.hard)]
        if wrong:
            lines += ["Misrouted (category: reason):", ""] + [f"- {c}: `{r.reason}`" for c, r in wrong] + [""]

    # 4. Latency of classify() given the vector (what the router adds on top of the embedding call).
    probe = [e.text for e in exemplars[:50]]
    timings = []
    for _ in range(10):
        for t, v in zip(probe, vectors[:50]):
            t0 = time.perf_counter()
            clf.classify([{"role": "user", "content": t}], 256, v.tolist(), max_large_share=share)
            timings.append(1000 * (time.perf_counter() - t0))
    timings.sort()
    t0 = time.perf_counter()
    DifficultyClassifier(exemplars, vectors)
    build_ms = 1000 * (time.perf_counter() - t0)
    lines += ["## Latency", "",
              f"`classify()` given the vector, {len(timings)} calls: p50 {timings[len(timings) // 2]:.3f} ms, "
              f"p99 {timings[int(len(timings) * 0.99)]:.3f} ms. Building the classifier (5-fold calibration "
              f"included): {build_ms:.0f} ms, once at router start. The embedding itself, live: "
              "bench/results/auto-live.", ""]
    text = "\n".join(lines)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return text
