"""Diffusion training loss, sampling with CFG (DDIM, DPM-Solver++), the sampler defaults, EMA
(docs/METHOD.md section 4)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from difflora.diffusion import (DEFAULT_GUIDANCE, DEFAULT_STEPS, diffusion_loss, make_ema, make_sample_scheduler,
                                make_sampler, make_train_scheduler, sample_latent)
from difflora.dit import DIT_CONFIGS, LoraDiT

T, C, D = 8, 4, 16


def ddim_sample(*args, **kwargs):
    """sample_latent with DDIM at guidance 3 unless told: the setting these tests were measured at."""
    return sample_latent(*args, **{"scheduler": make_sampler("ddim"), "guidance": 3.0, **kwargs})


class FixedX0(nn.Module):
    """Predicts x0 = target + cond_scale * mean(cond): a stand-in DiT with a known answer."""

    def __init__(self, target, cond_scale=0.0):
        super().__init__()
        self.target, self.cond_scale = target, cond_scale
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a dtype to read
        self.cfg = SimpleNamespace(tokens=target.shape[0], in_channels=target.shape[1])
        self.batches = []

    def forward(self, x, t, c):
        self.batches.append(x.shape[0])
        shift = self.cond_scale * c.float().mean(-1)[:, None, None]
        return (self.target + shift).to(self.anchor.dtype).expand(x.shape[0], -1, -1) + 0 * x


@pytest.fixture(scope="module")
def trained():
    """A tiny DiT trained for 300 steps on one (x0, cond) pair, with its loss curve."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, T, C, generator=g)
    cond = torch.randn(1, D, generator=g)
    null = torch.zeros(D)
    dit = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    sched = make_train_scheduler()
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = diffusion_loss(dit, x0.expand(16, -1, -1), cond.expand(16, -1), null, sched, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return SimpleNamespace(dit=dit.eval(), x0=x0, cond=cond, null=null, losses=losses)


def test_schedulers_share_betas_and_predict_x0():
    train, sample = make_train_scheduler(), make_sample_scheduler()
    assert torch.equal(train.betas, sample.betas)
    for s in (train, sample):
        assert s.config.prediction_type == "sample" and not s.config.clip_sample
    sample.set_timesteps(25)
    assert len(sample.timesteps) == 25 and sample.timesteps[0] == 999  # starts from pure noise


def test_diffusion_loss_finite_reproducible_and_drops_condition():
    torch.manual_seed(0)
    dit = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    with torch.no_grad():  # a non-trivial model, so the condition matters
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = make_train_scheduler()
    x0, cond, null = torch.randn(4, T, C), torch.randn(4, D), torch.randn(D)
    loss = lambda c, p, seed=1: diffusion_loss(dit, x0, c, null, sched, p, torch.Generator().manual_seed(seed))
    first = loss(cond, 0.1)
    assert first.ndim == 0 and torch.isfinite(first)
    assert torch.equal(first, loss(cond, 0.1))
    assert not torch.equal(first, loss(cond, 0.1, seed=2))
    assert not torch.equal(loss(cond, 0.0), loss(cond + 1, 0.0))
    assert torch.equal(loss(cond, 1.0), loss(cond + 1, 1.0))  # every row replaced by null


def test_training_loss_decreases(trained):
    first, last = sum(trained.losses[:20]) / 20, sum(trained.losses[-20:]) / 20
    print(f"tiny DiT: loss {first:.3f} -> {last:.4f}")
    assert all(torch.isfinite(torch.tensor(trained.losses)))
    assert last < 0.1 * first


def test_trained_dit_sample_recovers_x0(trained):
    out = ddim_sample(trained.dit, trained.cond, trained.null, steps=25, guidance=3.0, seed=0)
    rel = ((out - trained.x0) ** 2).mean() / (trained.x0 ** 2).mean()
    print(f"tiny DiT sample relative error {rel:.4f}")
    assert out.shape == (1, T, C) and out.dtype == torch.float32
    assert rel < 0.05


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_returns_the_model_x0_exactly(eta):
    target = torch.randn(T, C)
    out = ddim_sample(FixedX0(target), torch.randn(2, D), torch.zeros(D), steps=10, eta=eta, seed=3)
    torch.testing.assert_close(out, target.expand(2, -1, -1), atol=1e-5, rtol=1e-5)


def test_classifier_free_guidance_in_one_batched_call():
    target = torch.randn(T, C)
    model = FixedX0(target, cond_scale=1.0)
    cond, null = torch.randn(3, D), torch.randn(D)
    out = ddim_sample(model, cond, null, steps=5, guidance=4.0)
    assert model.batches == [6] * 5  # conditional and null rows together, once per step
    x_c, x_u = target + cond.mean(-1)[:, None, None], target + null.mean()
    torch.testing.assert_close(out, x_u + 4.0 * (x_c - x_u), atol=1e-4, rtol=1e-4)
    model.batches.clear()
    torch.testing.assert_close(ddim_sample(model, cond, null, steps=5, guidance=1.0), x_c, atol=1e-4, rtol=1e-4)
    assert model.batches == [3] * 5  # guidance 1 skips the null rows


def test_sampling_seeds_callback_and_interrupt(trained):
    args = (trained.dit, trained.cond, trained.null)
    a, b = ddim_sample(*args, steps=6, seed=11), ddim_sample(*args, steps=6, seed=11)
    assert torch.equal(a, b)
    # Different seeds: different initial noise and (for an untrained, condition-driven DiT) samples.
    torch.manual_seed(1)
    fresh = LoraDiT(DIT_CONFIGS["tiny"](T, C, D))
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s1, s2 = (ddim_sample(fresh, trained.cond, trained.null, steps=6, seed=s) for s in (1, 2))
    assert not torch.allclose(s1, s2)
    calls = []
    ddim_sample(*args, steps=7, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 7) for i in range(7)]

    class Interrupted(Exception):
        pass

    model = FixedX0(torch.zeros(T, C))

    def stop(i, n):
        if i == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        ddim_sample(model, torch.randn(1, D), torch.zeros(D), steps=10, guidance=1.0, callback=stop)
    assert len(model.batches) == 3  # no model call after the interrupt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_sampling(trained, dtype):
    ref = ddim_sample(trained.dit, trained.cond, trained.null, steps=10, seed=5)
    dit = LoraDiT(trained.dit.cfg)
    dit.load_state_dict(trained.dit.state_dict())
    out = ddim_sample(dit.to(dtype), trained.cond, trained.null, steps=10, seed=5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out - ref) ** 2).mean() / (ref ** 2).mean() < 0.05


def test_ema_tracks_the_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ema = make_ema(model, decay=0.9)
    ema.step(model.parameters())  # warmup: the first step copies the model (decay 0)
    assert ema.cur_decay_value == 0
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the model moves by 1; the average follows by (1 - decay)
    ema.step(model.parameters())
    decay = ema.cur_decay_value
    assert 0 < decay <= 0.9
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    for p, p0 in zip(model.parameters(), start):
        torch.testing.assert_close(p, p0 + (1 - decay))
    ema.restore(model.parameters())  # back to the raw weights for training
    for p, p0 in zip(model.parameters(), start):
        torch.testing.assert_close(p, p0 + 1)


@pytest.mark.parametrize("steps", [3, 10])
def test_dpm_solver_returns_the_model_x0_exactly(steps):
    target = torch.randn(T, C)
    model = FixedX0(target)
    out = sample_latent(model, torch.randn(2, D), torch.zeros(D), steps=steps, seed=3,
                        scheduler=make_sampler("dpm++"))
    torch.testing.assert_close(out, target.expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    assert model.batches == [4] * steps  # one model call a step, as DDIM


def test_dpm_solver_agrees_with_ddim_on_a_trained_dit(trained):
    """Two solvers of one probability-flow ODE: at 25 steps both land near the 100-step DDIM answer."""
    ref = ddim_sample(trained.dit, trained.cond, trained.null, steps=100, seed=0)
    for name in ("ddim", "dpm++"):
        out = sample_latent(trained.dit, trained.cond, trained.null, steps=25, guidance=3.0, seed=0,
                            scheduler=make_sampler(name))
        assert float((out - ref).norm() / ref.norm()) < 0.05, name


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="ddim, dpm\\+\\+"):
        make_sampler("euler")


def test_sample_latent_defaults_are_the_packs_sampler_defaults(trained):
    """One set of sampler defaults: sample_latent's are diffusion.DEFAULT_* (the pipeline's and the node's)."""
    from difflora import diffusion, pipeline

    args = (trained.dit, trained.cond, trained.null)
    explicit = sample_latent(*args, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=4,
                             scheduler=make_sampler(diffusion.DEFAULT_SAMPLER))
    assert torch.equal(sample_latent(*args, seed=4), explicit)
    assert (pipeline.DEFAULT_SAMPLER, pipeline.DEFAULT_STEPS, pipeline.DEFAULT_GUIDANCE) == (
        diffusion.DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE)
