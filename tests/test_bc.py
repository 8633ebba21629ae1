"""Behaviour cloning's loss against a hand-computed value; the update step against CORL's BC.train written out with
plain Adam; the network, compiled and bf16 variants, the per-domain table against CORL's configs, and the refusal of
out-of-range values and of --online-steps."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_bf16_close,
    assert_compiled_equals_eager,
    assert_invalid,
    assert_same_networks,
    assert_user_error,
    compiled_and_eager_updates,
    fixed_batch,
    metrics_and_moved_networks,
    run_script,
)

import bc

OBS, ACT, B = 3, 2, 64


def test_bc_loss_is_the_mse_to_the_dataset_action_over_batch_and_action_dimensions():
    pi, actions = torch.tensor([[0.5, 0.0], [-1.0, 1.0]]), torch.tensor([[0.0, 0.0], [-1.0, 0.0]])
    assert bc.bc_loss(pi, actions).item() == pytest.approx((0.25 + 0 + 0 + 1) / 4)


# ---- the update step against CORL's BC -------------------------------------------------------------------
def build(**overrides):
    """A small BC learner as the script builds it, fixed initial weights, and a fixed batch."""
    args = bc.Args(**{"hidden_dim": 16, **overrides})
    torch.manual_seed(0)
    nets = bc.make_networks(args, OBS, ACT)
    update = bc.make_update(nets, bc.make_optimizers(nets, args), args)
    return args, nets, update, fixed_batch(B, OBS, ACT, next_actions=False)  # BC never reads next actions


@pytest.mark.parametrize("steps", [1, 3])
def test_updates_equal_corls_sequential_bc_steps(steps):
    """CORL's BC.train (any_percent_bc.py): pi = actor(s), F.mse_loss(pi, a), one Adam step (lr 3e-4), every step."""
    args, nets, update, batch = build()
    ref = copy.deepcopy(nets)
    opt = torch.optim.Adam(ref["actor"].parameters(), lr=3e-4)
    for step in range(1, steps + 1):
        loss = F.mse_loss(ref["actor"](batch["obs"]), batch["actions"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = update(batch, step)
    assert_same_networks(nets, ref)
    torch.testing.assert_close(metrics["losses/actor_loss"], loss.detach(), rtol=1e-5, atol=1e-6)


def test_every_step_moves_the_actor_and_reads_neither_rewards_nor_next_observations():
    _, nets, update, batch = build()
    batch.update(rewards=batch["rewards"] * float("nan"), next_obs=batch["next_obs"] * float("nan"))
    metrics, moved = metrics_and_moved_networks(nets, update, batch, 3)
    assert moved == [{"actor"}] * 3 and set(metrics[0]) == {"losses/actor_loss"}
    assert all(torch.isfinite(p).all() for p in nets["actor"].parameters())


def test_the_actor_is_a_two_hidden_layer_tanh_mlp():
    _, nets, _, _ = build(hidden_dim=256)
    linears = [m for m in nets["actor"].net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(256, OBS), (256, 256), (ACT, 256)]
    assert isinstance(linears[-1], bc.common.OutputLinear) and set(nets) == {"actor"}
    assert nets["actor"](torch.randn(100, OBS) * 100).abs().max() <= 1.0


def test_compiled_update_equals_the_eager_one_and_compiles_once():
    runs = compiled_and_eager_updates(lambda compile: build(compile=compile, n_hidden=1))
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] == graphs[6], graphs
    assert_compiled_equals_eager(runs)


def test_bf16_update_stays_close_to_float32():
    _, _, fp32, batch = build()
    _, _, bf16, _ = build(bf16=True)
    assert_bf16_close(fp32, bf16, batch, 2, "actor_loss", ("actor_loss",))


# ---- per-domain settings and refused values -------------------------------------------------------------
# CORL's configs/offline/bc/<env>/<dataset>.yaml (eval_freq, n_episodes; every other key the same in every file)
CORL = {
    "hopper-medium-v0": dict(eval_every=5000, eval_episodes=10),  # halfcheetah|hopper|walker2d/*_v2.yaml
    "door-human-v2": dict(eval_every=5000, eval_episodes=10),  # {pen,door,hammer,relocate}/*_v1.yaml
    "antmaze-umaze-v1": dict(eval_every=5000, eval_episodes=100),  # antmaze/*_v2.yaml
    "pointmaze-umaze-v2": dict(eval_every=5000, eval_episodes=100),  # maze2d/*_v1.yaml
}
EVERY_DATASET = dict(batch_size=256, actor_lr=3e-4, hidden_dim=256, n_hidden=2, normalize_states=True, discount=0.99)


@pytest.mark.parametrize("env", CORL)
def test_per_domain_settings_are_corls(env):
    args, _ = bc.parse_args(["--env", env])
    assert {k: getattr(args, k) for k in CORL[env]} == CORL[env]
    assert {k: getattr(args, k) for k in EVERY_DATASET} == EVERY_DATASET
    assert set(bc.DOMAIN_SETTINGS) <= set(bc.DATASET_NAMES) and not bc.DATASET_SETTINGS and not bc.FINETUNE_SETTINGS


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(actor_lr=0.0), "actor_lr must be > 0"),
        (dict(n_hidden=0), "hidden_dim and n_hidden must be >= 1"),
        (dict(discount=1.5), "discount must be in [0, 1]"),
        (dict(online_steps=10), "bc.py does not fine-tune online"),
        (dict(mixing_ratio=0.5), "bc.py does not fine-tune online"),
        (dict(reward_scale=2.0), "bc.py reads no rewards"),
        (dict(normalize_reward=True), "bc.py reads no rewards"),
    ],
)
def test_out_of_range_values_and_fine_tuning_are_refused(flags, message):
    assert_invalid(bc, flags, message)


def test_online_steps_are_refused_on_the_command_line_before_any_data_is_read(pendulum):
    assert_user_error(run_script("bc.py", "--env", pendulum, "--online-steps", "10"), "does not fine-tune online")
