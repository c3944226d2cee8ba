"""How hard is a request? A score in [0, 1] that sends easy prompts to a small model, hard ones to a large one.

Two signals, both learned from labelled exemplars (serving/routing/data/exemplars.jsonl):
  - rule features of the last user turn: length, code, math, proof, multi-step reasoning and
    planning cues, and cues of easy work (greetings, rewriting, translation, short summaries);
  - the prompt's sentence embedding (all-MiniLM-L6-v2, 384 dims, from the stack's embed
    deployment): a logistic regression over [embedding, rules] blended with a cosine kNN vote.
Without a vector (embedding unavailable) the classifier uses a rules-only regression.

Two priors the exemplars cannot teach (they are single-turn with no max_tokens) nudge the score:
a long requested answer and a deep conversation make a request a little harder.

Calibration on the exemplars' out-of-fold scores: the base threshold keeps 95 % of hard exemplars
on the large side; as RouteLLM does, the (1 - max_large_share) quantile caps what goes large (the
threshold is the higher of the two); a fixed `threshold` overrides both. Pure: numpy only, no I/O after construction (~1 ms per call).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

import numpy as np

from serving.routing.text import prompt_text, user_turns

KNN_K = 7
KNN_WEIGHT = 0.5  # share of the kNN vote in the blended score (the rest: logistic regression)
L2 = 1.0  # ridge penalty of the regression (features are standardized)
FOLDS = 5
# Sending a hard prompt to the small model costs quality; sending an easy one large costs only
# money. So the base threshold keeps this share of the hard exemplars (out of fold) on the large
# side; the share knob can only raise it. A route that wants other trade-offs sets `threshold`.
HARD_RECALL = 0.95
EMBED_CHARS = 1000  # MiniLM reads 256 tokens; the head of the last user turn is what matters

_CUES = {
    "code": r"```|\bdef |\bclass \w|\bfunction\b|\bimplement|\bregex|regular expression|\bsql\b|\bquery\b|\bbug\b|\bdebug|"
            r"\bpython\b|\bjava(script)?\b|\btypescript\b|\bc\+\+|\brust\b|\bgolang\b|\bin go\b|\bbash\b|\bscript\b|\bprogram\b|"
            r"\bcompile|\balgorithm|\bcomplexity|\bo\(n|\bapi\b|\bunit tests?\b|\brefactor|\bdocker|\bkubernetes|\bdatabase|"
            r"\bschema\b|\brecursion|\bthread|\bconcurren|\barray\b|\blinked list|\bhash ?map|\bstack trace|error:|exception",
    "math": r"\bsolve\b|\bequation|\bintegral|\bderivative|\bprobabilit|\bexpected value|\bmatrix|\beigen|\blimit\b|"
            r"\bremainder\b|\bdivisible|\bhow many ways|\bcompute\b|\bcalculate|\bsum of\b|\bproduct of\b|\bprime|"
            r"\bfactorial|\blog\s*\d|\bsqrt|\^\d|\d\s*[-+*/=<>]\s*\d|\bx\s*[-+=<>]|\barea\b|\bradius|\bvolume\b|%|\bper cent",
    "proof": r"\bprove\b|\bproof\b|\bshow that\b|\blemma\b|\btheorem\b|\binduction\b|if and only if|\biff\b|\bderive\b",
    "reasoning": r"step by step|\bexplain why\b|\bwhy\b|\breason|\bjustify|\bpuzzle|\briddle|\bwho is telling|\bliar|\blying\b|"
                 r"\bhow many\b|\bwhat position|\bconclude|\bfollows?\b|\bconsistent|\btrue, false|\bdeduc|\blogic",
    "analysis": r"\banaly[sz]|\bcompare\b|\bcomparison|\btrade-?offs?\b|\bevaluate\b|\bassess|\bcritique|\bimplications|"
                r"\bpros and cons|\bcauses\b|\bconsequences|\bmechanism|\bweigh",
    "planning": r"\bplan\b|\bplanning|\bdesign\b|\barchitecture|\bschedule|\bconstraints?\b|\bitinerary|\bcurriculum|"
                r"\bstrategy|\broadmap|\bmigrat|\boptimi[sz]|\bbudget|\bmilestone|\btimeline",
    "easy": r"^\s*(hi|hello|hey|good (morning|evening|afternoon)|thanks|thank you)\b|\btranslate|\brewrite|\brephrase|"
            r"\bparaphrase|\bsummari[sz]e|\btl;?dr|\bgrammar|\bspelling|\bpoem|\bhaiku|\blimerick|\bslogan|\bcaption|"
            r"\bpretend\b|\bact (as|like)\b|\broleplay|\byou are a\b|\bextract|\bwhat is the capital|\bwho (wrote|painted)|"
            r"\bjoke\b|\bemail\b|\bletter\b|\bblog post|\bstory\b|\bdescription\b|\bsentiment|\bclassify|\brecommend",
}
_CUE_RES = {name: re.compile(pattern, re.IGNORECASE | re.MULTILINE) for name, pattern in _CUES.items()}
_STEP_RE = re.compile(r"^\s*(\d+[.)]|[-*•])\s", re.MULTILINE)


@dataclass(frozen=True)
class Exemplar:
    text: str
    label: str  # "easy" | "hard"
    category: str = ""
    source: str = ""


@dataclass(frozen=True)
class DifficultyResult:
    score: float  # 0 (easy) .. 1 (hard)
    hard: bool  # score >= threshold: route to the large side
    reason: str  # short, for x-route-reason: "hard 0.81>=0.46 (code, knn code)"


def load_exemplars(path: str | None = None) -> list[Exemplar]:
    """The shipped exemplars (or a JSONL file with the same fields)."""
    if path is None:
        text = resources.files("serving.routing").joinpath("data/exemplars.jsonl").read_text()
    else:
        with open(path) as f:
            text = f.read()
    out = []
    for line in text.splitlines():
        if line.strip():
            raw = json.loads(line)
            out.append(Exemplar(raw["text"], raw["label"], raw.get("category", ""), raw.get("source", "")))
    return out


def embedding_text(messages_or_prompt: Any) -> str:
    """What to embed for a request (and for each exemplar): the head of the last user turn."""
    turns = user_turns(messages_or_prompt)
    return (turns[-1] if turns else prompt_text(messages_or_prompt))[:EMBED_CHARS]


def cue_counts(text: str) -> dict[str, int]:
    """How often each cue occurs in one user turn (the regexes are most of classify's time: run once)."""
    return {name: len(rx.findall(text)) for name, rx in _CUE_RES.items()}


def rule_features(text: str, counts: dict[str, int] | None = None) -> np.ndarray:
    """Rule features of one user turn, each in [0, 1]."""
    counts = cue_counts(text) if counts is None else counts
    length = min(1.0, math.log1p(len(text)) / math.log1p(2000))
    questions = min(1.0, text.count("?") / 3)
    steps = min(1.0, len(_STEP_RE.findall(text)) / 4)
    cues = [min(1.0, counts[name] / 2) for name in _CUE_RES]
    return np.array([length, questions, steps, *cues], dtype=np.float64)


def cue_names(counts: dict[str, int]) -> list[str]:
    return [name for name, n in counts.items() if name != "easy" and n]


def _prior(max_tokens: int | None, depth: int) -> float:
    """Logit shift for what exemplars cannot show: requested answer length and conversation depth."""
    shift = 0.0
    if max_tokens is not None and max_tokens > 0:
        shift += max(-1.0, min(1.0, math.log2(max_tokens / 512) / 3))  # 64 tokens: -1, 4096: +1
    shift += 0.25 * min(max(depth - 1, 0), 4)
    return shift


class _Logistic:
    """L2-regularized logistic regression on standardized features (full-batch Newton steps)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, l2: float = L2):
        self.mean = x.mean(axis=0)
        self.std = x.std(axis=0) + 1e-6
        z = np.hstack([(x - self.mean) / self.std, np.ones((len(x), 1))])
        w = np.zeros(z.shape[1])
        penalty = np.full(z.shape[1], l2)
        penalty[-1] = 0.0  # no penalty on the bias
        for _ in range(25):
            p = 1 / (1 + np.exp(-z @ w))
            grad = z.T @ (p - y) + penalty * w
            hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-6:
                break
        self.w = w

    def logit(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(x) - self.mean) / self.std
        return z @ self.w[:-1] + self.w[-1]


def l2_normalize(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms == 0, 1, norms)


class _Model:
    """One scorer: rules-only, or [embedding, rules] regression + kNN over the exemplar vectors."""

    def __init__(self, rules: np.ndarray, y: np.ndarray, vectors: np.ndarray | None, categories: list[str]):
        self.vectors = vectors
        self.y = y
        self.categories = categories
        x = rules if vectors is None else np.hstack([vectors, rules])
        self.reg = _Logistic(x, y)

    def score(self, rules: np.ndarray, vector: np.ndarray | None, shift: float = 0.0) -> tuple[float, str | None]:
        if self.vectors is None:
            return float(1 / (1 + math.exp(-(self.reg.logit(rules)[0] + shift)))), None
        logit = self.reg.logit(np.concatenate([vector, rules]))[0] + shift
        sims = self.vectors @ vector
        top = np.argpartition(-sims, min(KNN_K, len(sims) - 1))[:KNN_K]
        weights = np.maximum(sims[top], 0) + 1e-6
        knn = float((weights * self.y[top]).sum() / weights.sum())
        nearest = self.categories[int(top[np.argmax(sims[top])])]
        p = 1 / (1 + math.exp(-logit))
        # The priors move the kNN vote too, so max_tokens and depth count in both halves.
        knn = 1 / (1 + math.exp(-(math.log((knn + 1e-3) / (1 - knn + 1e-3)) + shift)))
        return KNN_WEIGHT * knn + (1 - KNN_WEIGHT) * p, nearest


class DifficultyClassifier:
    """Scores prompts against labelled exemplars; `exemplar_vectors` row i embeds `embedding_text(exemplars[i].text)`."""

    def __init__(self, exemplars: Sequence[Exemplar], exemplar_vectors: Sequence[Sequence[float]] | None = None, seed: int = 0):
        if len({e.label for e in exemplars}) < 2 or any(e.label not in ("easy", "hard") for e in exemplars):
            raise ValueError("exemplars need both labels, 'easy' and 'hard', and no other")
        if exemplar_vectors is not None and len(exemplar_vectors) != len(exemplars):
            raise ValueError(f"{len(exemplar_vectors)} vectors for {len(exemplars)} exemplars")
        self.exemplars = list(exemplars)
        self.y = np.array([e.label == "hard" for e in exemplars], dtype=np.float64)
        self.rules = np.vstack([rule_features(e.text) for e in exemplars])
        self.vectors = None if exemplar_vectors is None else l2_normalize(np.asarray(exemplar_vectors, dtype=np.float64))
        categories = [e.category for e in exemplars]
        self.rules_model = _Model(self.rules, self.y, None, categories)
        self.vector_model = None if self.vectors is None else _Model(self.rules, self.y, self.vectors, categories)
        self._thresholds: dict[tuple[float, bool], float] = {}
        # Out-of-fold scores of the exemplars: the reference distribution the threshold is calibrated on.
        folds = np.random.default_rng(seed).permutation(len(exemplars)) % FOLDS
        self.oof = {"rules": np.zeros(len(exemplars)), "vector": np.zeros(len(exemplars)) if self.vectors is not None else None}
        for k in range(FOLDS):
            train, test = folds != k, np.flatnonzero(folds == k)
            sub = [categories[i] for i in np.flatnonzero(train)]
            rules_k = _Model(self.rules[train], self.y[train], None, sub)
            vec_k = None if self.vectors is None else _Model(self.rules[train], self.y[train], self.vectors[train], sub)
            for i in test:
                self.oof["rules"][i] = rules_k.score(self.rules[i], None)[0]
                if vec_k is not None:
                    self.oof["vector"][i] = vec_k.score(self.rules[i], self.vectors[i])[0]

    def threshold(self, max_large_share: float = 0.5, with_vector: bool = True) -> float:
        """The score above which a request goes large: at most `max_large_share` of exemplars score above it."""
        key = (max_large_share, with_vector and self.vector_model is not None)
        if key not in self._thresholds:  # fixed once built: quantiles computed once per setting
            self._thresholds[key] = self._threshold(*key)
        return self._thresholds[key]

    def _threshold(self, max_large_share: float, with_vector: bool) -> float:
        oof = self.oof["vector"] if with_vector and self.vector_model is not None else self.oof["rules"]
        if max_large_share <= 0:
            return 1.0 + 1e-9
        cap = float(np.quantile(oof, 1 - max_large_share)) if max_large_share < 1 else 0.0
        return max(float(np.quantile(oof[self.y == 1], 1 - HARD_RECALL)), cap)

    def classify(
        self,
        messages_or_prompt: Any,
        max_tokens: int | None = None,
        vector: Sequence[float] | None = None,
        *,
        max_large_share: float = 0.5,
        threshold: float | None = None,
    ) -> DifficultyResult:
        turns = user_turns(messages_or_prompt)
        text = turns[-1] if turns else prompt_text(messages_or_prompt)
        counts = cue_counts(text)
        rules = rule_features(text, counts)
        shift = _prior(max_tokens, len(turns))
        use_vector = vector is not None and self.vector_model is not None
        if use_vector:
            v = l2_normalize(np.asarray(vector, dtype=np.float64))
            if v.shape != (self.vectors.shape[1],):
                raise ValueError(f"vector has {v.shape} dims, exemplars {self.vectors.shape[1]}")
            value, nearest = self.vector_model.score(rules, v, shift)
        else:
            value, nearest = self.rules_model.score(rules, None, shift)
        cut = threshold if threshold is not None else self.threshold(max_large_share, use_vector)
        hard = value >= cut
        cues = cue_names(counts)
        detail = ",".join(cues[:3]) or "no cues"
        if nearest:
            detail += f"; like {nearest}"
        if not use_vector:
            detail += "; rules only"
        return DifficultyResult(round(value, 4), hard, f"{'hard' if hard else 'easy'} {value:.2f}{'>=' if hard else '<'}{cut:.2f} ({detail})")
