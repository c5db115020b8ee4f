"""domain/device.py: dtype resolution, attention-kernel choice, out-of-memory classification, autocast."""

from __future__ import annotations

import pytest
import torch

from domain import device
from domain.config import reset_settings
from domain.device import DeviceError
from domain.errors import JobFailed, is_out_of_memory
from domain.models import load_causal_lm

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("pref, expected", [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
                                            ("fp16", torch.float16), ("BF16", torch.bfloat16), ("", torch.float32)])
def test_compute_dtype_on_the_cpu(pref, expected):
    assert device.compute_dtype("cpu", pref) is expected  # auto keeps the CPU's float32 (unchanged behaviour)


def test_an_unknown_dtype_is_refused_naming_the_setting():
    with pytest.raises(DeviceError, match="FOUNDRY_COMPUTE_DTYPE.*'int3'") as err:
        device.compute_dtype("cpu", "int3")
    assert err.value.code == "dtype_unsupported" and isinstance(err.value, JobFailed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_dtype_on_cuda_is_bf16_where_supported():
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert device.compute_dtype("cuda", "auto") is want


def test_attention_kernel_choice(monkeypatch):
    assert device.attn_implementation("sdpa") == "sdpa" and device.attn_implementation("eager") == "eager"
    assert device.attn_implementation(None) == "sdpa"
    with pytest.raises(DeviceError, match="FOUNDRY_ATTN_IMPLEMENTATION.*'flex'"):
        device.attn_implementation("flex")
    monkeypatch.setattr(device, "flash_attn_available", lambda: False)
    with pytest.raises(DeviceError, match="needs the flash-attn package") as err:
        device.attn_implementation("flash_attention_2")
    assert err.value.code == "attn_unavailable"
    monkeypatch.setattr(device, "flash_attn_available", lambda: True)  # installed, but this worker is on the CPU
    with pytest.raises(DeviceError, match="CUDA only"):
        device.attn_implementation("flash_attention_2", "cpu")
    assert device.attn_implementation("flash_attention_2", "cuda:0") == "flash_attention_2"


def test_the_settings_reach_the_model_loader(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FOUNDRY_ATTN_IMPLEMENTATION", "eager")
    monkeypatch.setenv("FOUNDRY_COMPUTE_DTYPE", "bf16")
    reset_settings()
    try:
        loaded = load_causal_lm(str(tiny_model_dir), device="cpu")
        assert loaded.model.config._attn_implementation == "eager"
        assert next(loaded.model.parameters()).dtype is torch.bfloat16
        monkeypatch.setenv("FOUNDRY_ATTN_IMPLEMENTATION", "flash_attention_2")
        monkeypatch.setattr(device, "flash_attn_available", lambda: False)
        reset_settings()
        with pytest.raises(DeviceError, match="flash-attn"):
            load_causal_lm(str(tiny_model_dir), device="cpu")
    finally:
        monkeypatch.delenv("FOUNDRY_ATTN_IMPLEMENTATION")
        monkeypatch.delenv("FOUNDRY_COMPUTE_DTYPE")
        reset_settings()
    loaded = load_causal_lm(str(tiny_model_dir), device="cpu")
    assert loaded.model.config._attn_implementation == "sdpa" and next(loaded.model.parameters()).dtype is torch.float32


def test_a_real_cuda_out_of_memory_error_is_classified():
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    assert isinstance(exc, torch.OutOfMemoryError) and is_out_of_memory(exc)
    assert device.oom_code(exc) == "cuda_oom"
    failure = device.oom_failure(exc, "retrain", "lower batch_size")
    assert isinstance(failure, JobFailed) and failure.code == "cuda_oom"
    assert "out of memory in retrain" in str(failure) and "lower batch_size" in str(failure)
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    assert is_out_of_memory(cpu) and device.oom_code(cpu) == "out_of_memory"
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
    bare = device.oom_failure(MemoryError(), "retrain")  # no message at all: still a clear failure
    assert bare.code == "out_of_memory" and str(bare).startswith("out of memory in retrain: lower the batch size")


def test_oom_as_failure_turns_only_out_of_memory_into_a_failure():
    with pytest.raises(JobFailed) as err, device.oom_as_failure("distill", "lower seq_len"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
    assert err.value.code == "cuda_oom" and isinstance(err.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="shape"), device.oom_as_failure("distill"):
        raise RuntimeError("shape mismatch")


def test_autocast_is_a_no_op_on_the_cpu():
    model = torch.nn.Linear(4, 4)
    with device.train_autocast(model), device.autocast("cpu", torch.bfloat16):
        out = model(torch.randn(2, 4))
    assert out.dtype is torch.float32  # CPU training numerics unchanged
    assert device.memory("cpu") == {} and device.to_device(torch.ones(2), "cpu").device.type == "cpu"
    assert device.describe("cpu")["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_autocast_and_memory_on_cuda():
    model = torch.nn.Linear(64, 64).cuda()
    with device.train_autocast(model):
        out = model(device.to_device(torch.randn(8, 64), "cuda"))
    assert out.dtype is device.compute_dtype("cuda", "auto")
    mem = device.memory("cuda")
    assert mem["total_mb"] > mem["free_mb"] > 0 and mem["allocated_mb"] > 0
    device.release()


def test_adamw_is_torchs_default_on_the_cpu():
    """CPU results must not change: no fused kernel there (nor foreach forced), whatever torch offers."""
    opt = device.adamw(torch.nn.Linear(4, 4).parameters(), 1e-3, 0.01)
    assert not opt.defaults.get("fused") and opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.01


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_adamw_on_cuda_is_fused_and_steps_like_the_default():
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 64).cuda()
    b = torch.nn.Linear(64, 64).cuda()
    b.load_state_dict(a.state_dict())
    fused, plain = device.adamw(a.parameters(), 1e-2, 0.01), torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01)
    assert fused.defaults["fused"] is True
    x = torch.randn(8, 64, device="cuda")
    for _ in range(3):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    plain.load_state_dict(fused.state_dict())  # the same checkpoint format either way
