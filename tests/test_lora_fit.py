"""The one LoRA-fitting loop (difflora/train/lora_fit.py) on a tiny SDXL UNet: refining from zero IS
identity-loras' training, a given LoRA is where refining starts, the loss falls, and starts of
one identity never leak into another's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from difflora.errors import DiffLoRAError
from difflora.lora_format import to_kohya
from difflora.refine import RefineSettings, refine_identity_lora, require_one_person
from difflora.train.lora_fit import fit_loras, refine_lora, start_loras
from difflora.train.loop import StopRequest
from tests.test_train_batched import random_inputs, trainer


def same_dw(a: dict, b: dict, rtol: float = 1e-5) -> bool:
    """Every layer's up @ down agrees (factors of one dW differ by a rescaling)."""
    return a.keys() == b.keys() and all(
        (a[n][1] @ a[n][0] - b[n][1] @ b[n][0]).norm() <= rtol * (b[n][1] @ b[n][0]).norm() for n in a)


def layers_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))


def random_lora(spec, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {layer.name: (scale * torch.randn(spec.rank, layer.in_features, generator=g),
                         scale * torch.randn(layer.out_features, spec.rank, generator=g)) for layer in spec.layers}


def test_refining_from_zero_is_identity_loras_training_bit_for_bit():
    data = random_inputs(trainer("free").unet, 3, seed=1)
    t = trainer("free")
    with StopRequest() as stop:
        trained = t.train_group([data], stop)[0]
    refined = refine_lora(t.denoiser, t.spec, data, t.noise, t.fit)
    assert layers_equal(refined, trained)


def test_a_given_lora_is_where_refining_starts_and_it_never_leaks_into_another_identity():
    t = trainer("free")
    data = random_inputs(t.unet, 3, seed=1)
    given = random_lora(t.spec, seed=5)
    started = start_loras(t.denoiser, t.spec, t.fit, [given]).layers(0)
    assert same_dw(started, given)  # the given LoRA's dW, its factors sized as the recipe's start
    assert all(torch.allclose(started[n][0].norm(), t.down[n].norm()) for n in given)
    plain = start_loras(t.denoiser, t.spec, dataclasses.replace(t.fit, balance_start=False), [given]).layers(0)
    assert layers_equal(plain, given)
    with StopRequest() as stop:  # (groups of one size: another batch size rounds differently)
        alone = t.train_group([data, data], stop)[1]
        beside = t.train_group([data, data], stop, inits=[given, None])
    assert layers_equal(beside[1], alone)                 # its neighbour's start changed nothing
    assert not layers_equal(beside[0], alone)
    tiny_step = dataclasses.replace(t.fit, steps=1, lr=1e-12)
    nudged = refine_lora(t.denoiser, t.spec, data, t.noise, tiny_step, init=given)
    assert same_dw(nudged, given, rtol=1e-6)


def test_the_loop_descends_the_loss_it_is_given():
    """On one fixed batch (the random-noise loss of a random tiny UNet is otherwise flat), 30 steps
    of the loop bring the loss down: gradients reach the hooked factors and the optimizer uses them.
    Measured: 1.094 -> 0.747; the bound leaves room for other thread counts."""
    t = trainer("free")
    data = random_inputs(t.unet, 4, seed=2)
    losses = t.step_losses([data])
    one_batch = lambda step: losses(1)  # noqa: E731
    fit = dataclasses.replace(t.fit, steps=30, batch_size=2, lr=1e-2, max_grad_norm=1.0)
    loras = start_loras(t.denoiser, t.spec, fit, [None])
    with torch.no_grad(), loras:
        before = float(one_batch(1)[0])
    fit_loras(loras, one_batch, fit)
    with torch.no_grad(), loras:
        after = float(one_batch(1)[0])
    assert after < 0.85 * before


def test_a_diverging_refine_is_a_sentence_and_a_cancel_keeps_nothing():
    t = trainer("free")
    data = random_inputs(t.unet, 3, seed=1)
    poisoned = {**data, "mean": torch.full_like(data["mean"], float("nan"))}
    settings = RefineSettings(steps=2, learning_rate=1e-2, batch_size=2)
    with pytest.raises(DiffLoRAError, match="Refining stopped: the loss became NaN/inf at step 1"):
        refine_identity_lora(t.denoiser, t.spec, poisoned, t.noise, settings)

    def cancel(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        refine_identity_lora(t.denoiser, t.spec, data, t.noise, settings, on_step=cancel)
    assert not any(m._forward_hooks for m in t.unet.modules())  # the hooks went with it


def test_refine_keeps_the_start_loras_keys_and_metadata_and_records_its_own():
    t = trainer("free")
    data = random_inputs(t.unet, 3, seed=1)
    start = to_kohya(t.spec, random_lora(t.spec, seed=3))
    state, meta = refine_identity_lora(t.denoiser, t.spec, data, t.noise, RefineSettings(steps=2, batch_size=2),
                                       start, {"difflora_hypernet": "h.safetensors"}, prompt="a photo of sks person")
    assert set(state) == set(start)
    assert meta["difflora_hypernet"] == "h.safetensors" and meta["difflora_refine_steps"] == "2"
    assert meta["difflora_refine_start"] == "given LoRA" and meta["difflora_refine_prompt"] == "a photo of sks person"


@pytest.mark.parametrize("lr", [float("nan"), float("-inf"), 0.0, -1.0])
def test_settings_refuse_a_learning_rate_that_is_not_positive(lr):
    with pytest.raises(DiffLoRAError, match="learning_rate is .* give a finite number above 0"):
        RefineSettings(learning_rate=lr)
    with pytest.raises(DiffLoRAError, match="steps is 0"):
        RefineSettings(steps=0)


def test_photos_of_two_people_are_refused():
    same = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.98, -0.2]])
    require_one_person(same, 0.8)
    with pytest.raises(DiffLoRAError, match=r"more than one person: image 3 \(0\.14\) differ from image 2"):
        require_one_person(torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]]), 0.8)
