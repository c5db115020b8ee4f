"""torch's own varlen kernel in the packed forward (domain/adapters/varlen.py): the call's plumbing runs here
against the per-sample loop, with the kernel replaced by a reference that keeps its contract ((T, heads, d)
tensors, int32 cumulative lengths, the causal keyword of one torch release or the other); the kernel itself
runs on CUDA only (tests/gpu/test_gpu_kinds.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from domain.adapters import varlen

LENGTHS = [5, 9, 3]


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts as a new process would: torch's kernel not yet tried, no failure recorded."""
    monkeypatch.setattr(varlen, "_torch_varlen_state", varlen._TorchVarlenState())
    varlen.reset_kernels()


def _qkv(heads=4, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    return (torch.randn(1, heads, n, d, generator=g), torch.randn(1, kv_heads, n, d, generator=g),
            torch.randn(1, kv_heads, n, d, generator=g))


def _loop(q, k, v, scaling):
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    with varlen.segments(LENGTHS):
        out, _ = varlen._attention(module, q, k, v, None, scaling=scaling)
    return out


class Reference:
    """Computes what torch's varlen_attn computes, per sample with sdpa, and records how it was called."""

    def __init__(self, style: str):
        self.style, self.calls = style, []

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), is_causal=False,
                 enable_gqa=False):
        self.calls.append({"scale": scale, "window_size": window_size, "is_causal": is_causal,
                           "enable_gqa": enable_gqa, "heads": (q.shape[1], k.shape[1]), "cu": cu_q.tolist()})
        causal = window_size == (-1, 0) if self.style == "window_size" else is_causal
        assert causal, "the packed forward is causal"
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        assert max_q == max_k == max(b - a for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()))
        assert q.shape[1] == k.shape[1] or enable_gqa, "grouped heads need enable_gqa or repeated key/values"
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            groups = qs.shape[0] // ks.shape[0]
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
        return torch.cat(outs)


def test_the_spec_is_read_off_this_torchs_signature():
    spec = varlen._torch_varlen_spec()
    if spec is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    fn, causal, takes_scale, takes_gqa = spec
    assert causal in ({"window_size": (-1, 0)}, {"is_causal": True})
    assert fn.__name__ == "varlen_attn" and takes_scale in (True, False) and takes_gqa in (True, False)


@pytest.mark.parametrize("scaling", [None, 0.35])
def test_newer_keywords_window_size_scale_and_gqa_give_the_loops_output(monkeypatch, scaling):
    ref = Reference("window_size")
    monkeypatch.setattr(varlen, "_torch_varlen_spec", lambda: (ref, {"window_size": (-1, 0)}, True, True))
    q, k, v = _qkv()
    out = varlen._torch_varlen(q, k, v, LENGTHS, scaling)
    assert out.shape == (1, sum(LENGTHS), 4, 8)
    assert torch.allclose(out, _loop(q, k, v, scaling), atol=1e-6)
    call = ref.calls[0]
    assert call["window_size"] == (-1, 0) and call["enable_gqa"] and call["heads"] == (4, 2)
    assert call["scale"] == scaling and call["cu"] == [0, 5, 14, 17]


def test_first_release_keywords_is_causal_and_repeated_heads_give_the_loops_output(monkeypatch):
    ref = Reference("is_causal")
    monkeypatch.setattr(varlen, "_torch_varlen_spec", lambda: (ref, {"is_causal": True}, False, False))
    q, k, v = _qkv()
    out = varlen._torch_varlen(q, k, v, LENGTHS, 8 ** -0.5)  # the default scale: this kernel may run
    assert torch.allclose(out, _loop(q, k, v, 8 ** -0.5), atol=1e-6)
    assert ref.calls[0]["is_causal"] and ref.calls[0]["heads"] == (4, 4) and not ref.calls[0]["enable_gqa"]
    # a scale it cannot be told: not called, the caller uses the loop
    assert varlen._torch_varlen(q, k, v, LENGTHS, 0.35) is None and len(ref.calls) == 1


def test_gradients_flow_through_the_call_like_through_the_loop(monkeypatch):
    ref = Reference("window_size")
    monkeypatch.setattr(varlen, "_torch_varlen_spec", lambda: (ref, {"window_size": (-1, 0)}, True, True))
    grads = []
    for use_kernel in (True, False):
        q, k, v = (t.requires_grad_() for t in _qkv(seed=3))
        out = varlen._torch_varlen(q, k, v, LENGTHS, None) if use_kernel else _loop(q, k, v, None)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_a_kernel_that_refuses_its_first_call_is_given_up_once_and_the_loop_runs(monkeypatch, caplog):
    """torch's real kernel on CPU tensors raises NotImplementedError (no CPU backend): the stand-in for a GPU
    it does not support. Recorded once, the kernel is not tried again."""
    if varlen._torch_varlen_spec() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    with caplog.at_level("WARNING", logger="domain.adapters.varlen"):
        assert varlen._torch_varlen(q, k, v, LENGTHS, None) is None
        assert varlen._torch_varlen(q, k, v, LENGTHS, None) is None
    assert (varlen._torch_varlen_state.failed or "").startswith("NotImplementedError")
    assert not varlen.torch_varlen_available()
    assert len([r for r in caplog.records if "per-sample loop" in r.getMessage()]) == 1


def test_errors_after_the_kernel_has_run_are_raised_not_swallowed(monkeypatch):
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("an illegal memory access")
        return Reference("window_size")(*args, **kwargs)

    monkeypatch.setattr(varlen, "_torch_varlen_spec", lambda: (flaky, {"window_size": (-1, 0)}, True, True))
    q, k, v = _qkv()
    assert varlen._torch_varlen(q, k, v, LENGTHS, None) is not None
    with pytest.raises(RuntimeError, match="illegal memory access"):
        varlen._torch_varlen(q, k, v, LENGTHS, None)
    assert varlen._torch_varlen_state.failed is None


def test_out_of_memory_on_the_first_call_is_raised_for_the_oom_path(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(varlen, "_torch_varlen_spec", lambda: (oom, {"window_size": (-1, 0)}, True, True))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        varlen._torch_varlen(*_qkv(), LENGTHS, None)
    assert varlen._torch_varlen_state.failed is None


def test_on_the_cpu_packed_forwards_record_the_loop():
    q, k, v = _qkv()
    _loop(q, k, v, None)
    assert varlen.kernels_used() == {varlen.KERNEL_LOOP}
    varlen.reset_kernels()
    with varlen.loop_only():
        _loop(q, k, v, None)
    assert varlen.kernels_used() == {varlen.KERNEL_LOOP}
