"""The LoRA training loop on a tiny model: packing keeps samples apart, loss falls, resume is exact."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from domain import checkpoints
from domain.adapters import training as T
from domain.adapters.data import IGNORE, FeedbackExample, TokenizedExample, tokenize
from tests.fixtures.adapters import stdlib_review_pairs
from tests.fixtures.tiny_models import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine makes OpenMP spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_examples(lengths, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 500, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _feedback_examples(tok, n=8, max_seq_len=384):
    pairs = stdlib_review_pairs(n, max_code_lines=8)
    return [tokenize(tok, FeedbackExample(code, path, None, False, review, "accepted", None), max_seq_len)
            for path, code, review in pairs]


def test_pack_first_fit_decreasing_respects_capacity():
    exs = _random_examples([30, 5, 20, 12, 9, 40, 3])
    rows = T.pack(exs, 48)
    assert sorted(len(e.input_ids) for row in rows for e in row) == sorted(len(e.input_ids) for e in exs)
    assert all(sum(len(e.input_ids) for e in row) <= 48 for row in rows)
    assert len(rows) == 3  # 119 tokens in rows of 48: first-fit decreasing needs the minimum, 3
    assert T.pack(exs, 48) == rows  # deterministic


def test_packed_loss_equals_unpacked_loss(tiny_tokenizer):
    """Restarted position ids give a block-diagonal mask: no sample sees another one."""
    model = tiny_model(tiny_tokenizer)
    exs = _random_examples([5, 9, 3, 12, 7])
    packed = T.make_batches(exs, 8, 64, True, tiny_tokenizer.pad_token_id)
    unpacked = T.make_batches(exs, 8, 64, False, tiny_tokenizer.pad_token_id)
    assert len(packed) == 1 and packed[0].input_ids.shape == (1, 36) and packed[0].attention_mask is None
    with torch.no_grad():
        lp, np_, _ = T.completion_loss(model, packed[0])
        lu, nu, _ = T.completion_loss(model, unpacked[0])
    assert np_ == nu == sum(len(e.input_ids) - 3 for e in exs)
    assert torch.allclose(lp, lu, rtol=1e-5)
    # and a wrong (non-restarting) position layout would let samples attend to each other:
    leaky = T.Batch(packed[0].input_ids, packed[0].labels, torch.arange(36)[None], None, 36, 5)
    with torch.no_grad():
        assert not torch.allclose(T.completion_loss(model, leaky)[0], lu, rtol=1e-3)


def _loss_and_grads(tokenizer, batch):
    """Loss, completion tokens and LoRA gradients of one batch on a fresh tiny LoRA model (no dropout)."""
    model = T.setup_model(tiny_model(tokenizer), T.TrainConfig(lora_dropout=0.0, max_steps=1))
    loss, n, _ = T.completion_loss(model, batch)
    loss.backward()
    assert model.get_base_model().config._attn_implementation == "sdpa"  # switched for the forward only
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@contextmanager
def _attention_lengths():
    """The query length of every scaled_dot_product_attention call made inside the block."""
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **k):
        calls.append(q.shape[2])
        return sdpa(q, *a, **k)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def test_unpadded_packed_batches_match_the_block_diagonal_mask(tiny_tokenizer):
    """Packed rows run as one unpadded row with attention per sample (domain/adapters/varlen.py): same loss
    and same LoRA gradients as the padded rows under transformers' block-diagonal mask, and the model still
    behaves like sdpa outside a packed forward."""
    from domain.adapters import varlen

    exs = _random_examples([5, 9, 3, 12, 7, 20, 11, 4, 16], seed=1)
    batch = T.make_batches(exs, 4, 24, True, tiny_tokenizer.pad_token_id)[0]
    assert batch.input_ids.shape[0] > 1 and batch.tokens < batch.input_ids.numel()  # several rows, tail padding
    masked = T.Batch(batch.input_ids, batch.labels, batch.position_ids, None, batch.tokens, batch.samples)
    with _attention_lengths() as calls:
        lv, nv, gv = _loss_and_grads(tiny_tokenizer, batch)
    assert calls == [n for row in batch.segments for n in row] * 2  # per sample, in each of the 2 layers
    lm, nm, gm = _loss_and_grads(tiny_tokenizer, masked)
    assert nv == nm
    assert torch.allclose(lv, lm, rtol=1e-5)
    assert all(torch.allclose(gv[k], gm[k], rtol=1e-4, atol=1e-6) for k in gm)
    # inside packed(...) but outside a segments row, the switched model is plain sdpa (another thread serving)
    model = tiny_model(tiny_tokenizer)
    ids = torch.randint(5, 500, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with varlen.packed(model, [4, 6]):
            assert model.config._attn_implementation == varlen.NAME
            with varlen.segments(None):
                after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-6)


def test_unpacked_batches_run_unpadded_with_the_padded_loss_and_gradients(tiny_tokenizer):
    """An unpacked batch (samples right-padded to the longest, attention mask) runs as one row of its real
    tokens with attention per sample: same loss and LoRA gradients as the padded rows, no padding computed."""
    exs = _random_examples([5, 17, 3, 12], seed=2)
    batch = T.make_batches(exs, 4, 64, False, tiny_tokenizer.pad_token_id)[0]
    assert batch.attention_mask is not None and batch.segments == [[5], [17], [3], [12]]
    assert batch.input_ids.shape == (4, 17)
    padded = T.Batch(batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask, batch.tokens,
                     batch.samples)  # no segments: the attention-mask path
    with _attention_lengths() as calls:
        lu, nu, gu = _loss_and_grads(tiny_tokenizer, batch)
    assert calls == [5, 17, 3, 12] * 2  # per sample, only its real tokens, in each of the 2 layers
    lp, np_, gp = _loss_and_grads(tiny_tokenizer, padded)
    assert nu == np_ == sum(len(e.input_ids) - 3 for e in exs)
    assert torch.allclose(lu, lp, rtol=1e-5)
    assert all(torch.allclose(gu[k], gp[k], rtol=1e-4, atol=1e-6) for k in gp)


def test_batches_count_real_tokens_and_mask_prompt(tiny_tokenizer):
    exs = _feedback_examples(tiny_tokenizer, 6)
    for packing in (True, False):
        batches = T.make_batches(exs, 2, 384, packing, tiny_tokenizer.pad_token_id)
        assert sum(b.tokens for b in batches) == sum(len(e.input_ids) for e in exs)
        assert sum(b.samples for b in batches) == len(exs)
        labelled = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches)
        assert labelled == sum(e.completion_tokens for e in exs)  # completion tokens only
    ex = exs[0]
    first = ex.labels.index(next(x for x in ex.labels if x != IGNORE))
    assert tiny_tokenizer.decode(ex.input_ids[:first]).rstrip().endswith("assistant")  # chat template prompt
    assert ex.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_training_lowers_loss_on_feedback(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    exs = _feedback_examples(tiny_tokenizer, 8)
    cfg = T.TrainConfig(max_steps=30, batch_size=2, max_seq_len=384, learning_rate=5e-3, lora_r=8,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], checkpoint_every=1000)
    batches = T.make_batches(exs, cfg.batch_size, cfg.max_seq_len, True, tiny_tokenizer.pad_token_id)
    peft_model = T.setup_model(model, cfg)
    before = T.evaluate(peft_model, batches)
    opt, sched = T.make_optimizer(peft_model, cfg)
    result = T.train(peft_model, batches, cfg, opt, sched)
    after = T.evaluate(peft_model, batches)
    assert result.steps == 30 and len(result.losses) == 30 and result.tokens > 0
    assert after["loss"] < before["loss"] - 0.1
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    base = T.cleanup(peft_model)
    assert not any("lora" in n for n, _ in base.named_parameters())  # the resident base is clean again


class Killed(Exception):
    pass


def test_resume_from_checkpoint_ends_at_the_same_loss(tiny_tokenizer, tmp_path):
    """torchtune-style: a run killed after a checkpoint and resumed matches an uninterrupted run."""
    exs = _feedback_examples(tiny_tokenizer, 8)
    cfg = T.TrainConfig(max_steps=12, batch_size=2, max_seq_len=384, learning_rate=5e-3, lora_r=4, lora_dropout=0.1,
                        target_modules=["q_proj", "v_proj"], checkpoint_every=5, seed=3)

    def fresh():
        model = T.setup_model(tiny_model(tiny_tokenizer), cfg)
        return model, *T.make_optimizer(model, cfg)

    batches = T.make_batches(exs, cfg.batch_size, cfg.max_seq_len, True, tiny_tokenizer.pad_token_id)
    model, opt, sched = fresh()
    full = T.train(model, batches, cfg, opt, sched)

    saved = {}
    model, opt, sched = fresh()

    def checkpoint(step, reason):
        saved[step] = checkpoints.write(tmp_path / f"step-{step}", T.adapter_weights(model), step=step, optimizer=opt,
                                        scheduler=sched, config=cfg.hyperparams(),
                                        extra={"reason": reason, "losses": losses_so_far[:step]}).folder

    losses_so_far: list[float] = []
    hooks = T.Hooks(progress=lambda step, loss, tps: losses_so_far.append(loss), checkpoint=checkpoint,
                    check=lambda: (_ for _ in ()).throw(Killed()) if len(losses_so_far) == 7 else None)
    with pytest.raises(Killed):
        T.train(model, batches, cfg, opt, sched, hooks=hooks)
    assert sorted(saved) == [5]
    torch.manual_seed(12345)  # the killed process's RNG is gone; the checkpoint must restore it

    model, opt, sched = fresh()
    ckpt = checkpoints.read(saved[5])
    step, losses = T.resume(ckpt, model, opt, sched)
    assert step == 5 and ckpt.extra["reason"] == "interval" and losses == full.losses[:5]
    resumed = T.train(model, batches, cfg, opt, sched, start_step=step, losses=losses)
    assert resumed.steps == 12 and len(resumed.losses) == 12
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-6)


def test_checkpoint_is_safetensors_plus_weights_only_state(tiny_tokenizer, tmp_path):
    cfg = T.TrainConfig(max_steps=2, target_modules=["q_proj"], lora_r=2)
    model = T.setup_model(tiny_model(tiny_tokenizer), cfg)
    opt, sched = T.make_optimizer(model, cfg)
    checkpoints.write(tmp_path / "ck", T.adapter_weights(model), step=2, optimizer=opt, scheduler=sched,
                      config=cfg.hyperparams(), extra={"k": "v", "losses": [1.0, 0.5]})
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == sorted([checkpoints.MANIFEST, checkpoints.WEIGHTS, checkpoints.STATE])
    state = torch.load(tmp_path / "ck" / checkpoints.STATE, weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "rng"}
    assert checkpoints.read(tmp_path / "ck").step == 2


def test_data_order_depends_only_on_step():
    batches = [T.Batch(torch.tensor([[i]]), torch.tensor([[i]]), torch.tensor([[0]]), None, 1, 1) for i in range(5)]
    order = [int(T.batch_for_step(batches, s, seed=1).input_ids) for s in range(15)]
    assert order == [int(T.batch_for_step(batches, s, seed=1).input_ids) for s in range(15)]
    for epoch in range(3):
        assert sorted(order[epoch * 5:(epoch + 1) * 5]) == [0, 1, 2, 3, 4]  # every batch once per epoch


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=True):
    """flash-attn's varlen contract ((T, heads, d) tensors, int32 cumulative lengths, grouped key/value heads),
    computed with sdpa per sample: stands in for the CUDA kernel so the plumbing around it runs here."""
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        groups = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal,
                                                                     scale=softmax_scale).transpose(0, 1))
    assert max_q == max(b - a for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())) and cu_q.dtype == torch.int32
    return torch.cat(outs)


def test_the_flash_varlen_call_gets_the_samples_boundaries_and_shapes_the_loop_uses():
    """The flash-attn branch (CUDA, fp16/bf16) hands the kernel (T, heads, d) tensors and int32 cumulative
    lengths, grouped key/value heads as they are, and returns what the per-sample sdpa loop returns."""
    from types import SimpleNamespace

    from domain.adapters import varlen

    torch.manual_seed(0)
    lengths = [5, 9, 3]
    q = torch.randn(1, 4, sum(lengths), 8)
    k, v = torch.randn(1, 2, sum(lengths), 8), torch.randn(1, 2, sum(lengths), 8)
    module = SimpleNamespace(num_key_value_groups=2, training=False)
    with varlen.segments(lengths):
        loop, _ = varlen._attention(module, q, k, v, None, scaling=0.35)
    flash, _ = varlen._flash(_reference_varlen, q, k, v, lengths, 0.0, 0.35)
    assert flash.shape == loop.shape == (1, sum(lengths), 4, 8)
    assert torch.allclose(flash, loop, atol=1e-6)
