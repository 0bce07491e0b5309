"""The training loop: seeded, checkpointed, resumable to bit-identical weights, guarded against bad setups."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from ops.diffusion import lora, taca, training
from ops.diffusion.backbone import load_backbone

os.environ.setdefault("ANOMALY_FORGE_NO_PROGRESS", "1")
torch.set_num_threads(1)

STEPS, EVERY = 6, 2


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def bb():
    return load_backbone("tiny", device="cpu", dtype="float32", cache=False)


@pytest.fixture(scope="module")
def data(bb):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        cond = bb.encode_prompt(["a scratch", "a hole"])
    return latents, cond


def _lora_job(bb, data, fail_at=None):
    """A fresh LoRA (as a restarted process would build it) and a TACA denoising loss that may crash mid-run."""
    unet = copy.deepcopy(bb.unet)
    params = lora.add_lora(unet, rank=4, seed=5)
    latents, cond = data
    T = bb.scheduler.config.num_train_timesteps

    def loss_fn(step, rng):
        if step == fail_at:
            raise Interrupt(f"killed at step {step}")
        t = torch.randint(0, T, (latents.shape[0],), generator=rng)
        with taca.taca_context(unet, t, 1, 4, T):
            return training.denoising_loss(unet, bb.scheduler, latents, cond, rng, timesteps=t)

    return unet, params, loss_fn


def test_interrupted_run_resumes_to_exactly_the_weights_of_an_uninterrupted_one(bb, data, tmp_path):
    global_state = torch.get_rng_state()
    _, ref_params, ref_loss = _lora_job(bb, data)
    ref = training.train(ref_params, ref_loss, STEPS, lr=1e-2, ckpt_dir=tmp_path / "ref", ckpt_every=EVERY, seed=3)
    assert torch.equal(torch.get_rng_state(), global_state)  # the caller's RNG stream is not consumed

    _, params, crashing = _lora_job(bb, data, fail_at=3)
    with pytest.raises(Interrupt):
        training.train(params, crashing, STEPS, lr=1e-2, ckpt_dir=tmp_path / "run", ckpt_every=EVERY, seed=3)
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*.pt")] == ["checkpoint-00000002.pt"]

    unet, params, loss_fn = _lora_job(bb, data)  # a new process: fresh weights, fresh optimizer
    res = training.train(params, loss_fn, STEPS, lr=1e-2, ckpt_dir=tmp_path / "run", ckpt_every=EVERY, seed=3)
    assert res.resumed_from == 2
    assert res.losses == ref.losses
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert any(torch.count_nonzero(p) for n, p in unet.named_parameters() if "lora_B" in n)  # it did train
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*.pt")] == ["checkpoint-00000006.pt"]

    # a different seed gives different weights, so the equality above is not vacuous
    _, other, other_loss = _lora_job(bb, data)
    training.train(other, other_loss, STEPS, lr=1e-2, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(other, ref_params))


def test_rerun_of_a_finished_run_only_reloads_its_weights(bb, data, tmp_path):
    _, params, loss_fn = _lora_job(bb, data)
    first = training.train(params, loss_fn, 3, lr=1e-2, ckpt_dir=tmp_path, seed=0)
    _, again, _ = _lora_job(bb, data)
    second = training.train(again, lambda s, r: pytest.fail("no step may run"), 3, lr=1e-2, ckpt_dir=tmp_path,
                            seed=0)
    assert second.resumed_from == 3 and second.losses == first.losses
    assert second.checkpoint == first.checkpoint
    assert all(torch.equal(a, b) for a, b in zip(again, params))


def test_checkpoint_of_another_run_is_refused_with_the_file_named(bb, data, tmp_path):
    _, params, loss_fn = _lora_job(bb, data)
    training.train(params, loss_fn, 2, lr=1e-2, ckpt_dir=tmp_path, seed=0)
    with pytest.raises(ValueError, match="checkpoint-00000002.pt.*different run"):
        training.train(params, loss_fn, 4, lr=5e-2, ckpt_dir=tmp_path, seed=0)
    with pytest.raises(ValueError, match="only 1 steps"):
        training.train(params, loss_fn, 1, lr=1e-2, ckpt_dir=tmp_path, seed=0)


def test_trainable_set_and_loss_are_checked(bb, data):
    unet, params, loss_fn = _lora_job(bb, data)
    training.check_trainable(params, [unet])
    unet.conv_in.weight.requires_grad_(True)  # a base weight left trainable by mistake
    with pytest.raises(ValueError, match="conv_in.weight"):
        training.train(params, loss_fn, 1, lr=1e-2, frozen_modules=[unet])
    unet.conv_in.weight.requires_grad_(False)
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="does not require grad"):
        training.train([frozen], loss_fn, 1, lr=1e-2)
    with pytest.raises(FloatingPointError, match="step 0"):
        training.train(params, lambda s, r: params[0].sum() * float("nan"), 1, lr=1e-2)
    with pytest.raises(ValueError, match="needs CUDA"):
        training.train(params, loss_fn, 1, lr=1e-2, mixed_precision="fp16")


def test_cpu_bf16_autocast_runs_the_loss_in_bfloat16_with_float32_master_weights():
    w = torch.nn.Parameter(torch.ones(4, 4))
    seen = []

    def loss_fn(_s, _r):
        y = w @ torch.ones(4, 4)
        seen.append(y.dtype)
        return y.float().sum()

    res = training.train([w], loss_fn, 1, lr=1e-3, mixed_precision="bf16")
    assert seen == [torch.bfloat16] and res.precision == "bfloat16" and w.dtype == torch.float32
    seen.clear()
    assert training.train([w], loss_fn, 1, lr=1e-3).precision == "float32" and seen == [torch.float32]


def test_gradient_clipping_applies_before_the_step():
    scale = torch.tensor([300.0, 400.0, 0.0, 0.0])  # gradient norm 500
    for max_norm, expected in ((1.0, 1.0), (None, 500.0)):
        w = torch.nn.Parameter(torch.zeros(4))
        training.train([w], lambda s, r: (w * scale).sum(), 1, lr=1e-3, max_grad_norm=max_norm)
        assert w.grad.norm().item() == pytest.approx(expected, rel=1e-5)  # the gradient the optimizer used
