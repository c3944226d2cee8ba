"""The fixes applied to the pinned vLLM (serving/engine/vllm_fixes.py), on vLLM's own functions.
Through the real stack: tests/test_e2e_adapters.py (a base answer batched with adapter requests)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)


@pytest.fixture
def lora_ops():
    torch = pytest.importorskip("torch")
    from vllm.lora.ops.torch_ops import lora_ops as ops

    # vLLM's own functions, even where its plugins (this fix among them) were loaded in this process already
    original = {name: _unfixed(getattr(ops, name)) for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}
    for name, op in original.items():
        setattr(ops, name, op)
    yield torch, ops, original
    import vllm.lora.ops.torch_ops as package

    for name, op in original.items():  # the fix is process-wide: leave the module as found
        setattr(ops, name, op)
        setattr(package, name, op)


def _unfixed(op):
    from serving.engine.vllm_fixes import _PATCHED

    return op.__wrapped__ if getattr(op, _PATCHED, False) else op


def test_base_rows_get_no_lora_delta_and_adapter_rows_are_unchanged(lora_ops):
    torch, ops, original = lora_ops
    from serving.engine.vllm_fixes import fix_no_lora_rows

    generator = torch.Generator().manual_seed(0)
    slots, rank, width, out = 3, 4, 8, 6
    x = torch.randn(4, width, generator=generator)
    a = torch.randn(slots, rank, width, generator=generator)  # shrink weights: (slot, rank, in)
    b = torch.randn(slots, out, rank, generator=generator)  # expand weights: (slot, out, rank)
    indices = torch.tensor([0, -1, 2, -1])

    def run(shrink, expand):
        mid, y = torch.zeros(4, rank), torch.ones(4, out)
        shrink(x, a, mid, indices, 0.5)
        expand(mid, b, y, indices, add_inputs=True)
        return y

    buggy = run(original["bgmv_shrink"], original["bgmv_expand"])
    assert not torch.equal(buggy[1], torch.ones(out))  # the bug: a base row got the last slot's delta
    fix_no_lora_rows()
    fixed = run(ops.bgmv_shrink, ops.bgmv_expand)
    assert torch.equal(fixed[1], torch.ones(out)) and torch.equal(fixed[3], torch.ones(out))
    assert torch.equal(fixed[0], buggy[0]) and torch.equal(fixed[2], buggy[2])
    sliced = torch.ones(4, out + 2)
    ops.bgmv_expand_slice(torch.randn(4, rank, generator=generator), b, sliced, indices, 2, out, add_inputs=True)
    assert torch.equal(sliced[1], torch.ones(out + 2)) and not torch.equal(sliced[0], torch.ones(out + 2))
    fix_no_lora_rows()  # vLLM may load its plugins again in a process: still one wrapper
    assert ops.bgmv_shrink.__wrapped__ is original["bgmv_shrink"]


def test_the_fix_is_a_vllm_plugin_for_the_buggy_versions_only():
    from importlib.metadata import entry_points

    from serving.engine import vllm_fixes

    assert any(e.value == "serving.engine.vllm_fixes:apply" for e in entry_points(group="vllm.general_plugins"))
    assert vllm_fixes.BUGGY_LORA_OPS == ("0.32.0",)  # re-check vllm#48421 when the pin moves
