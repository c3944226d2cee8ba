"""The difficulty classifier behind `model: auto`: pure, fast, calibrated; vectors are synthetic here
(a real embedding model is exercised offline by `python -m bench difficulty-eval`)."""

from __future__ import annotations

import json
import time
from importlib import resources

import numpy as np
import pytest

from serving.routing.difficulty import DifficultyClassifier, DifficultyResult, Exemplar, embedding_text, load_exemplars, rule_features
from serving.routing.text import estimate_tokens, prompt_text, user_turns

EXEMPLARS = load_exemplars()


@pytest.fixture(scope="module")
def rules_only() -> DifficultyClassifier:
    return DifficultyClassifier(EXEMPLARS)


def synthetic_vectors(exemplars, dims=384, seed=0):
    """Two noisy clusters (one per label) in 384 dims, normalized like MiniLM's output."""
    rng = np.random.default_rng(seed)
    centers = {"easy": rng.normal(size=dims), "hard": rng.normal(size=dims)}
    vecs = np.array([centers[e.label] + 1.5 * rng.normal(size=dims) for e in exemplars])
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True), centers


def test_shipped_exemplars_are_many_labelled_and_varied():
    raw = [json.loads(line) for line in resources.files("serving.routing").joinpath("data/exemplars.jsonl").read_text().splitlines()]
    assert len(raw) >= 240 and all(set(r) == {"text", "label", "category", "source"} for r in raw)
    labels = [r["label"] for r in raw]
    assert set(labels) == {"easy", "hard"} and min(labels.count("easy"), labels.count("hard")) >= 100
    cats = {r["category"] for r in raw}
    assert {"chit-chat", "lookup", "rewriting", "summary", "math", "code", "proof", "planning", "analysis"} <= cats
    assert len({r["text"] for r in raw}) == len(raw)  # no duplicates


def test_rules_only_separates_obvious_cases(rules_only):
    assert not rules_only.classify("Hi! How are you today?").hard
    assert not rules_only.classify("Translate 'good night' into Italian.").hard
    assert rules_only.classify("Prove that there are infinitely many primes of the form 4k+3.").hard
    assert rules_only.classify("Implement a concurrent hash map in Rust with lock striping and write unit tests.").hard
    assert rules_only.classify([{"role": "user", "content": "Solve x^2 - 5x + 6 = 0 and explain each step."}]).hard


def test_result_shape_and_reason(rules_only):
    result = rules_only.classify("Write a Python function that merges two sorted lists.")
    assert isinstance(result, DifficultyResult) and 0 <= result.score <= 1
    assert result.reason.startswith("hard ") and "code" in result.reason and "rules only" in result.reason


def test_vector_path_uses_similarity():
    vecs, centers = synthetic_vectors(EXEMPLARS)
    clf = DifficultyClassifier(EXEMPLARS, vecs.tolist())
    near_hard = centers["hard"] / np.linalg.norm(centers["hard"])
    near_easy = centers["easy"] / np.linalg.norm(centers["easy"])
    text = "Tell me about it."  # no cues: only the vector can decide
    hard, easy = clf.classify(text, vector=near_hard.tolist()), clf.classify(text, vector=near_easy.tolist())
    assert hard.hard and not easy.hard and hard.score > easy.score + 0.3
    assert "like " in hard.reason and "rules only" not in hard.reason
    assert clf.classify(text).reason.endswith("rules only)")  # degrades without a vector
    with pytest.raises(ValueError):
        clf.classify(text, vector=[0.1] * 10)


def test_share_knob_caps_what_goes_large(rules_only):
    texts = [e.text for e in EXEMPLARS]
    def share(s):
        return np.mean([rules_only.classify(t, max_large_share=s).hard for t in texts])
    low, mid, none = share(0.2), share(0.5), share(0.0)
    assert low <= 0.2 + 0.08  # in-sample scores are a little higher than the out-of-fold ones calibrated on
    assert low < mid and none == 0.0
    assert rules_only.threshold(0.2) >= rules_only.threshold(0.5)
    fixed = rules_only.classify("Hi there", threshold=0.0)
    assert fixed.hard


def test_max_tokens_and_depth_shift_the_score(rules_only):
    text = "Describe the water cycle."
    short = rules_only.classify(text, max_tokens=32).score
    long = rules_only.classify(text, max_tokens=4096).score
    deep = rules_only.classify([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 4
                               + [{"role": "user", "content": text}]).score
    assert short < rules_only.classify(text).score < long and deep > rules_only.classify(text).score


def test_classification_is_fast():
    vecs, _ = synthetic_vectors(EXEMPLARS)
    clf = DifficultyClassifier(EXEMPLARS, vecs)
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": EXEMPLARS[200].text}]
    timings = []
    for v in vecs[:200]:
        t0 = time.perf_counter()
        clf.classify(messages, 256, v.tolist())
        timings.append(time.perf_counter() - t0)
    assert sorted(timings)[100] < 0.005


def test_bad_exemplars_are_rejected():
    with pytest.raises(ValueError):
        DifficultyClassifier([Exemplar("a", "easy"), Exemplar("b", "easy")])
    with pytest.raises(ValueError):
        DifficultyClassifier([Exemplar("a", "easy"), Exemplar("b", "medium")])
    with pytest.raises(ValueError):
        DifficultyClassifier([Exemplar("a", "easy"), Exemplar("b", "hard")], [[1.0, 0.0]])


def test_text_helpers():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"},
                {"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Second"}]
    assert user_turns(messages) == ["Hi", "Second"] and embedding_text(messages) == "Second"
    assert prompt_text(messages).startswith("system: Be brief.\nuser: Hi\n")
    assert prompt_text(["a", "b"]) == "a\nb" and user_turns("just text") == ["just text"]
    assert estimate_tokens([1, 2, 3]) == 3 and estimate_tokens("x" * 400) == 100
    assert embedding_text("y" * 5000) == "y" * 1000
    # the Responses API's input items (input_text parts) count as user turns too
    responses_input = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Prove it."}]}]
    assert user_turns(responses_input) == ["Prove it."] and prompt_text(responses_input) == "user: Prove it."
    assert rule_features("").shape == rule_features("```def f(): pass```").shape
