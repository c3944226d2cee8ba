"""Fixes for known bugs of the pinned vLLM, applied in every vLLM process as a vLLM general plugin
(pyproject.toml `vllm.general_plugins`: vLLM loads it in the engine core and its workers, where
the model runs, not only in the replica). Each fix names the vLLM versions it is for and does
nothing on others, so a vLLM upgrade that carries the upstream fix drops it.

LoRA, no-LoRA rows (vllm-project/vllm#48421, open for 0.32): vLLM's PyTorch LoRA ops
(vllm/lora/ops/torch_ops/lora_ops.py, the ops of its CPU platform) gather each row's adapter
weights by the row's slot index, and a base-model row's index is -1, which selects the last slot.
So in a batch that mixes base and adapter requests, base rows got the delta of whatever adapter
sits in the last slot: wrong base answers, no error (bench/results/lora: 3 of 3 base answers
changed with 3 adapters in 3 slots). The fix zeroes those rows' inputs, so their delta is zero,
as vLLM's Triton kernels skip them.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger("serving.engine")

BUGGY_LORA_OPS = ("0.32.0",)  # vLLM versions whose torch LoRA ops apply the last slot to base rows
_PATCHED = "_serving_no_lora_rows_fixed"


def apply() -> None:
    """The plugin entry point; safe to call more than once per process (vLLM may)."""
    import vllm

    if vllm.__version__.split("+")[0] in BUGGY_LORA_OPS:
        fix_no_lora_rows()


def fix_no_lora_rows() -> None:
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        op = getattr(lora_ops, name)
        if getattr(op, _PATCHED, False):
            continue
        fixed = _skip_no_lora_rows(op)
        setattr(lora_ops, name, fixed)  # the sgmv_* ops call these by module name: fixed too
        setattr(torch_ops, name, fixed)  # what the CPU punica wrapper imports
    try:  # imported already: it holds its own references
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, getattr(lora_ops, name))


def _skip_no_lora_rows(op):
    @functools.wraps(op)
    def fixed(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        if bool(no_lora.any()):
            # a zero input row has a zero LoRA delta, whichever slot the clamped index names
            inputs = inputs.masked_fill(no_lora.view(-1, *([1] * (inputs.dim() - 1))), 0)
            lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    setattr(fixed, _PATCHED, True)
    return fixed
