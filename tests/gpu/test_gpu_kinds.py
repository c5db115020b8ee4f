"""Every job kind on a CUDA device, on tiny models and the embedded default (SQLite ledger, in process):
no Redis, PostgreSQL or broker needed. Skipped without CUDA. ``bench/gpu_check.sh`` runs them on the GPU machine.

    python -m pytest -q -m gpu tests/gpu
"""

from __future__ import annotations

import contextlib
import math
import uuid
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import select

from domain import artifacts, device, jobs
from domain.adapters.data import IGNORE, TokenizedExample
from domain.config import reset_settings
from domain.errors import is_out_of_memory
from domain.ledger.db import session_scope
from domain.ledger.models import Artifact, UsageCost, new_id
from domain.models import load_causal_lm
from domain.review.runtime import AdapterHandle, Runtime
from tests.conftest import add_tenant
from tests.fixtures.adapters import seed_feedback, stdlib_review_pairs
from tests.fixtures.review import make_adapter, save_lively_tiny_model
from tests.fixtures.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RETRAIN = {"max_steps": 12, "learning_rate": 5e-3, "max_seq_len": 384, "batch_size": 2, "lora_r": 4,
           "target_modules": ["q_proj", "v_proj"], "checkpoint_every": 5, "promotion_margin": 0.0}


@pytest.fixture
def on_cuda(sqlite_ledger, monkeypatch):
    """The embedded default with this worker on CUDA; a test may set FOUNDRY_COMPUTE_DTYPE before asking."""
    monkeypatch.setenv("FOUNDRY_DEVICE", "cuda")
    reset_settings()
    add_tenant(sqlite_ledger, "acme")
    yield sqlite_ledger
    device.release()


def _set(monkeypatch, **env) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    reset_settings()


def _usage(job_id: str) -> UsageCost:
    with session_scope() as s:
        return s.scalar(select(UsageCost).where(UsageCost.job_id == job_id))


def test_a_real_cuda_out_of_memory_error_becomes_cuda_oom():
    with pytest.raises(torch.OutOfMemoryError) as err:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB
    assert is_out_of_memory(err.value) and device.oom_code(err.value) == "cuda_oom"
    failure = device.oom_failure(err.value, "test")
    assert failure.code == "cuda_oom" and "GPU free" in str(failure)


@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_mixed_adapter_review_batch_equals_solo_rows_on_cuda(on_cuda, tmp_path, monkeypatch, dtype):
    _set(monkeypatch, FOUNDRY_COMPUTE_DTYPE=dtype)
    base = save_lively_tiny_model(tmp_path / "base")
    cpu_base = load_causal_lm(str(base), device="cpu").model
    adapters = {f"v{i}": make_adapter(base, tmp_path / f"a{i}", seed=i, base_model=cpu_base) for i in (1, 2, 3)}
    rt = Runtime(load_causal_lm(str(base), device="cuda"), "test", "tiny", max_adapters=4)
    assert rt.device.type == "cuda" and next(rt.model.parameters()).dtype is device.compute_dtype("cuda", dtype)
    names = ["v1", None, "v3", "v2", "v1", None]
    texts = ["def add(a, b):\n    return a - b\n", "import json\n", "class P:\n    def parse(self, t):\n        pass\n",
             "x = [i for i in range(10)]\n"]
    prompts = [rt.tokenizer(texts[i % 4], add_special_tokens=False)["input_ids"] for i in range(len(names))]
    slots = [rt.ensure_adapter(AdapterHandle(n, lambda n=n: adapters[n]), set(filter(None, names))) if n else None
             for n in names]
    limits = [12, 12, 12, 12, 7, 12]
    batched = rt.generate(prompts, slots, limits)
    solo = [rt.generate([p], [s], [m])[0] for p, s, m in zip(prompts, slots, limits)]
    assert all(len(row) == m for row, m in zip(batched, limits))
    assert len(set(batched[0])) > 3, "the test model must produce varied tokens, or equality proves nothing"
    if dtype == "fp32":
        assert batched == solo
    else:  # bf16: batch shapes pick other kernels; greedy rows may part after a near-tie, rarely
        same = sum(a == b for row_b, row_s in zip(batched, solo) for a, b in zip(row_b, row_s))
        assert same / sum(limits) >= 0.8, (batched, solo)
    # evicting an adapter deletes its slot and hands its memory back
    before = torch.cuda.memory_allocated()
    assert rt.evict("v3")
    assert "v3" not in rt.slots and torch.cuda.memory_allocated() < before
    for name in ("v1", "v2"):  # the last one unwraps PEFT: the bare base's memory, and it still generates
        rt.evict(name)
    assert not any("lora_" in n for n, _ in rt.model.named_parameters())
    bare = rt.generate([prompts[1]], [None], [12])[0]
    assert len(bare) == 12
    if dtype == "fp32":  # bf16 kernels may pick other tiles without the PEFT wrapper
        assert bare == solo[1]


def test_retrain_on_cuda_then_a_redelivered_job_resumes(on_cuda, tmp_path, monkeypatch):
    _set(monkeypatch, FOUNDRY_BASE_MODEL=save_tiny_model(tmp_path / "tiny"))
    pairs = stdlib_review_pairs(8, max_code_lines=8)
    seed_feedback("acme", pairs)
    body = {"tenant": "acme", **RETRAIN, "lora_dropout": 0.0}
    whole = jobs.execute("retrain", new_id(), body, "gpu-test")
    assert whole["status"] == "succeeded", whole
    assert whole["result"]["train_loss_final"] < 100 and _usage(whole["job_id"]).gpu_seconds > 0

    class Killed(BaseException):
        pass

    real = jobs.JobContext.progress

    def die_at_8(self, fraction=None, force=False, **info):
        if info.get("step") == 8:
            raise Killed()
        return real(self, fraction, force, **info)

    # the same feedback for a second tenant, which seed_feedback makes (acme's feedback is used up: its next
    # retrain has nothing new to train on)
    seed_feedback("beta", pairs)
    body = {**body, "tenant": "beta"}
    monkeypatch.setattr(jobs.JobContext, "progress", die_at_8)
    job_id = new_id()
    with pytest.raises(Killed):
        jobs.execute("retrain", job_id, body, "gpu-test")
    monkeypatch.setattr(jobs.JobContext, "progress", real)
    resumed = jobs.execute("retrain", job_id, body, "gpu-test:restarted")
    assert resumed["status"] == "succeeded", resumed
    r = resumed["result"]
    assert r["resumed_from_step"] == 5 and r["steps"] == 12
    assert r["train_loss_final"] == pytest.approx(whole["result"]["train_loss_final"], rel=1e-3)


def test_qlora_retrain_on_a_4bit_base_on_cuda(on_cuda, tmp_path, monkeypatch):
    _set(monkeypatch, FOUNDRY_BASE_MODEL=save_tiny_model(tmp_path / "tiny"))
    seed_feedback("acme", stdlib_review_pairs(6, max_code_lines=8))
    out = jobs.execute("retrain", new_id(), {"tenant": "acme", **RETRAIN, "max_steps": 6, "qlora": True}, "gpu-test")
    assert out["status"] == "succeeded", out
    assert math.isfinite(out["result"]["train_loss_final"])


@pytest.mark.parametrize("method,linear_cls", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantize_on_cuda(on_cuda, tiny_model_dir, method, linear_cls):
    out = jobs.execute("quantize", uuid.uuid4().hex, {"tenant": "acme", "source_model": str(tiny_model_dir),
                                                      "method": method, "eval_max_tokens": 512}, "gpu-test")
    assert out["status"] == "succeeded", out
    with session_scope() as s:
        art = s.get(Artifact, out["result"]["artifact_id"])
    r = art.report
    assert r["device"] == "cuda" and r["memory_footprint_after_bytes"] < r["memory_footprint_before_bytes"]
    assert math.isfinite(r["perplexity_after"]) and r["top1_agreement"] > 0
    served = artifacts.load_serving_model(art, device="cuda")
    assert any(type(m).__name__ == linear_cls for m in served.model.modules())
    assert next(served.model.parameters()).device.type == "cuda"


def test_distill_on_cuda(on_cuda, tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", layers=4, hidden=64, seed=3)
    out = jobs.execute("distill", uuid.uuid4().hex, {"tenant": "acme", "teacher": str(teacher), "max_steps": 12,
                                                     "batch_size": 2, "seq_len": 32, "eval_max_tokens": 128,
                                                     "learning_rate": 3e-3}, "gpu-test")
    assert out["status"] == "succeeded", out
    r = out["result"]["report"]
    assert r["student_layers"] == 2 and math.isfinite(r["final_loss"]) and r["trained_tokens"] == 12 * 2 * 32
    assert _usage(out["job_id"]).gpu_seconds > 0


def test_an_nccl_group_binds_rank_0_to_its_gpu_and_reduces_on_it(on_cuda, tmp_path):
    """The nccl path of domain/data_parallel.py on the one GPU there is: the group is made with rank 0 bound to
    its GPU (``device_id``) and an all_reduce runs on it."""
    import torch.distributed as dist

    from domain import data_parallel

    with data_parallel.process_group("retrain", 1, tmp_path / "w", device="cuda", args={}, data={}):
        assert dist.get_backend() == "nccl" and torch.cuda.current_device() == 0
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        assert x.tolist() == [1.0] * 4
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nccl, one process per GPU)")
def test_two_process_retrain_on_two_gpus(on_cuda, tmp_path, monkeypatch):
    _set(monkeypatch, FOUNDRY_BASE_MODEL=save_tiny_model(tmp_path / "tiny"))
    pairs = stdlib_review_pairs(8, max_code_lines=8)
    seed_feedback("acme", pairs)
    body = {"tenant": "acme", **RETRAIN, "lora_dropout": 0.0}
    one = jobs.execute("retrain", new_id(), body, "gpu-test")
    seed_feedback("twin", pairs)  # makes the tenant
    two = jobs.execute("retrain", new_id(), {**body, "tenant": "twin", "procs": 2}, "gpu-test")
    assert one["status"] == two["status"] == "succeeded", (one, two)
    assert two["result"]["train_loss_final"] == pytest.approx(one["result"]["train_loss_final"], rel=1e-3)


def test_packed_attention_uses_flash_attn_varlen_on_cuda_and_matches_the_loop():
    from domain.adapters import varlen

    if varlen.flash_varlen() is None:
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    lengths = [37, 64, 5]
    q = torch.randn(1, 8, sum(lengths), 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    module = SimpleNamespace(num_key_value_groups=4, training=False)
    with varlen.segments(lengths):
        flash, _ = varlen._attention(module, q, k, v, None, scaling=0.125)
        loop, _ = varlen._attention(module, q.float(), k.float(), v.float(), None, scaling=0.125)  # fp32: the loop
    assert torch.allclose(flash.float(), loop, atol=2e-2)


def test_packed_attention_runs_torchs_own_varlen_kernel_on_cuda_and_matches_the_loop(tiny_tokenizer):
    """Without flash-attn, torch's varlen_attn (in CUDA torch) is the packed forward's kernel: output and
    gradients equal the fp32 per-sample loop within bf16 tolerance, and a packed training forward of a tiny
    model under bf16 autocast runs it (``kernels_used``) with the loop's loss."""
    from domain.adapters import training as T
    from domain.adapters import varlen
    from tests.fixtures.tiny_models import tiny_model

    if varlen._torch_varlen_spec() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    lengths = [37, 64, 5]
    q = torch.randn(1, 8, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, sum(lengths), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    out = varlen._torch_varlen(q, k, v, lengths, 0.125)
    assert out is not None, varlen._torch_varlen_state.failed
    weights = torch.randn_like(out, dtype=torch.float32)
    (out.float() * weights).sum().backward()
    kernel_grads = [t.grad.float() for t in (q, k, v)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    module = SimpleNamespace(num_key_value_groups=4, training=False)
    with varlen.segments(lengths):
        loop, _ = varlen._attention(module, q32, k32, v32, None, scaling=0.125)  # fp32: the loop
    (loop * weights).sum().backward()
    assert torch.allclose(out.float(), loop, atol=2e-2)
    for got, want in zip(kernel_grads, (q32.grad, k32.grad, v32.grad)):
        assert (got - want).norm() <= 0.02 * want.norm() + 1e-3
    # the same kernel inside a packed training forward (bf16 autocast over fp32 weights, as retrain runs)
    model = tiny_model(tiny_tokenizer).to("cuda")
    g = torch.Generator().manual_seed(1)
    exs = [TokenizedExample(ids, [IGNORE] * 3 + ids[3:])
           for ids in (torch.randint(5, 500, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 20))]
    batch = T.make_batches(exs, 2, 32, True, tiny_tokenizer.pad_token_id)[0]
    losses = {}
    for name, ctx in (("kernel", contextlib.nullcontext()), ("loop", varlen.loop_only())):
        varlen.reset_kernels()
        with ctx, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            total, n, _ = T.completion_loss(model, batch)
        losses[name] = float(total) / n
        kernels = varlen.kernels_used()
        assert kernels == ({varlen.KERNEL_LOOP} if name == "loop" else
                           {varlen.KERNEL_FLASH_ATTN if varlen.flash_varlen() else varlen.KERNEL_TORCH}), kernels
    assert losses["kernel"] == pytest.approx(losses["loop"], rel=2e-2)


def test_fsdp_shards_a_student_on_cuda_and_gathers_the_one_process_step(on_cuda, tmp_path):
    """Strategy fsdp's pieces on nccl and CUDA (one GPU: a group of one): ``fsdp_shard`` puts DTensor shards
    of a student on the GPU, and of a frozen teacher loaded in host memory (``keep_on_cpu``, as the job loads
    it); a step through ``sharded_step(fsdp=True)`` with both sharded equals the plain step, the sharded
    teacher's logits equal the plain one's, and ``fsdp_full_state`` gathers weights and Adam moments in the
    one-process form."""
    import copy

    from domain import data_parallel, distillation, heldout

    path = str(save_tiny_model(tmp_path / "teacher", layers=4, hidden=64, seed=3))
    teacher = load_causal_lm(path, device="cuda").model.eval().requires_grad_(False)
    host = load_causal_lm(path, device="cuda", keep_on_cpu=True).model.eval().requires_grad_(False)
    assert {p.device.type for p in host.parameters()} == {"cpu"} and host.dtype == teacher.dtype
    student, _ = distillation.reduce_layers(teacher, 2)
    plain = copy.deepcopy(student).cuda().train()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 32), device="cuda")
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.0)
    want = distillation.train_step(plain, teacher, ids, opt, distillation.make_scheduler(opt, 4), 2.0, 0.5, None)
    with data_parallel.process_group("distill", 1, tmp_path / "w", device="cuda", args={}, data={}):
        data_parallel.fsdp_shard(student.train(), "cuda")
        data_parallel.fsdp_shard(host, "cuda", frozen=True)
        for model in (student, host):
            assert all(type(p).__name__ == "DTensor" and p.device.type == "cuda" for p in model.parameters())
        with torch.no_grad():  # as the job runs it: FSDP2 all-gathers refuse inference tensors
            assert torch.allclose(host(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4)
        heldout.reference_passes(host, ids.cpu(), batch_size=1)
        sharded_opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
        got = distillation.sharded_step(student, host, ids, sharded_opt, distillation.make_scheduler(sharded_opt, 4),
                                        2.0, 0.5, None, rank=0, world=1, fsdp=True)
        weights, state = data_parallel.fsdp_full_state(student, sharded_opt)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-4)
    ref = plain.state_dict()
    assert all(torch.allclose(weights[k], ref[k].cpu(), atol=1e-5) for k in ref)
    assert state["state"].keys() == opt.state_dict()["state"].keys()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nccl, one process per GPU)")
def test_two_process_fsdp_distill_on_two_gpus(on_cuda, tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", layers=4, hidden=64, seed=3)
    body = {"tenant": "acme", "teacher": str(teacher), "max_steps": 8, "batch_size": 2, "seq_len": 32,
            "eval_max_tokens": 128, "learning_rate": 3e-3}
    one = jobs.execute("distill", uuid.uuid4().hex, body, "gpu-test")
    two = jobs.execute("distill", uuid.uuid4().hex, {**body, "procs": 2, "strategy": "fsdp"}, "gpu-test")
    assert one["status"] == two["status"] == "succeeded", (one, two)
    assert two["result"]["report"]["strategy"] == "fsdp"
    assert two["result"]["report"]["final_loss"] == pytest.approx(one["result"]["report"]["final_loss"], rel=1e-3)
    whole, half = (r["result"]["report"]["teacher_bytes_per_rank"] for r in (one, two))
    assert whole / 2 <= half < whole / 2 * 1.05, (whole, half)  # the teacher sharded over the two GPUs
