import json

import pytest

from bench.tokens import TokenCounter, load_tokenizer
from bench.workloads import (JsonlWorkload, MixedWorkload, RandomWorkload, SharedPrefixWorkload,
                             parse_jsonl_line, sample_len)

APPROX = TokenCounter(None)


def test_random_is_deterministic_per_seed_and_index():
    a, b = RandomWorkload(APPROX, 50, 10, 0.5, seed=7), RandomWorkload(APPROX, 50, 10, 0.5, seed=7)
    assert [a.get(i).prompt for i in range(5)] == [b.get(i).prompt for i in range(5)]
    # order independence: request 3 is the same whether or not 0-2 were made first
    assert RandomWorkload(APPROX, 50, 10, 0.5, seed=7).get(3).prompt == a.get(3).prompt
    assert RandomWorkload(APPROX, 50, 10, 0.5, seed=8).get(0).prompt != a.get(0).prompt


def test_random_lengths_respect_range_ratio():
    w = RandomWorkload(APPROX, 100, 20, 0.5, seed=0)
    reqs = [w.get(i) for i in range(200)]
    assert all(10 <= r.max_tokens <= 30 for r in reqs)
    assert len({r.max_tokens for r in reqs}) > 5
    # without a tokenizer: one word per token
    assert all(50 <= len(r.prompt.split()) <= 150 for r in reqs)
    fixed = RandomWorkload(APPROX, 100, 20, 0.0, seed=0)
    assert {fixed.get(i).max_tokens for i in range(20)} == {20}


def test_sample_len_bounds():
    import random
    rng = random.Random(0)
    assert all(1 <= sample_len(rng, 1, 0.9) <= 1 for _ in range(10))


def test_shared_prefix_groups_share_exact_prefixes():
    w = SharedPrefixWorkload(APPROX, num_prefixes=3, prefix_len=40, suffix_len=5, output_len=8, seed=1)
    reqs = [w.get(i) for i in range(30)]
    groups = {r.tags["prefix_group"] for r in reqs}
    assert groups == {0, 1, 2}
    for r in reqs:
        assert r.prompt.startswith(w.prefixes[r.tags["prefix_group"]])
    assert len({r.prompt for r in reqs}) == 30  # unique suffixes


def test_mixed_has_both_classes_with_their_lengths():
    w = MixedWorkload(APPROX, short_input=10, short_output=4, long_input=200, long_output=50,
                      long_fraction=0.3, seed=0)
    reqs = [w.get(i) for i in range(200)]
    longs = [r for r in reqs if r.tags["class"] == "long"]
    assert 30 < len(longs) < 90
    assert all(r.max_tokens == 50 for r in longs)
    assert all(r.max_tokens == 4 for r in reqs if r.tags["class"] == "short")


def test_jsonl_formats(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [{"prompt": "hello", "max_tokens": 5},
             {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
             {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    w = JsonlWorkload(APPROX, str(p))
    r0, r1, r2, r3 = (w.get(i) for i in range(4))
    assert r0.prompt == "hello" and r0.max_tokens == 5
    assert r1.as_messages()[1] == {"role": "user", "content": "u"} and r1.max_tokens is None
    assert r2.as_messages() == [{"role": "user", "content": "q"}]  # trailing answer dropped
    assert r3.prompt == "hello"  # cycles
    assert r1.as_prompt().endswith("assistant:")
    assert JsonlWorkload(APPROX, str(p), output_len=9).get(0).max_tokens == 9


def test_jsonl_bad_line_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=":2:"):
        JsonlWorkload(APPROX, str(p))
    with pytest.raises(ValueError):
        parse_jsonl_line({})


def test_approx_counter():
    assert APPROX.count("") == 0 and APPROX.count("abcdefgh") == 2 and APPROX.source == "approx"
    assert load_tokenizer(None).tok is None
