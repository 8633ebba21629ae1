"""TD3+BC's losses against hand-computed values; the update step (critics every step, the actor and the targets every
second step) against a plain sequential step written after the authors' TD3_BC.train; exploration, the per-domain
table, compiled and bf16 variants, and the refusal of out-of-range values."""

import copy
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_bf16_close,
    assert_compiled_equals_eager,
    assert_invalid,
    assert_steps_equal_reference,
    compiled_and_eager_updates,
    fixed_batch,
    metrics_and_moved_networks,
)

import awac
import td3_bc

OBS, ACT, B = 3, 2, 64


# ---- losses ---------------------------------------------------------------------------------------------
def test_smoothed_target_action_clips_the_noise_to_noise_clip_and_the_action_to_one():
    target_action = torch.tensor([0.9, -0.2, 0.0, -0.9])
    noise = torch.tensor([0.7, -0.3, -2.0, -0.05])
    # noise clipped to [-0.5, 0.5]: 0.5, -0.3, -0.5, -0.05; then the sum clipped to [-1, 1]
    expected = torch.tensor([1.0, -0.5, -0.5, -0.95])
    torch.testing.assert_close(td3_bc.smoothed_target_action(target_action, noise, 0.5), expected)


TWIN_CRITICS = pytest.mark.parametrize("script", [td3_bc, awac], ids=["td3_bc", "awac"])  # the same TD step


@TWIN_CRITICS
def test_td_target_bootstraps_the_min_of_the_target_critics_except_after_a_termination(script):
    rewards, dones, next_q = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 100.0])
    # 1 + 0.9 * 2 = 2.8; 0.5 (terminal: no bootstrap)
    torch.testing.assert_close(script.td_target(rewards, dones, next_q, 0.9), torch.tensor([2.8, 0.5]))


@TWIN_CRITICS
def test_td_loss_sums_the_two_critics_mse(script):
    q, target = torch.tensor([[1.0, 0.0], [2.0, 0.5]]), torch.tensor([2.8, 0.5])
    expected = ((1.0 - 2.8) ** 2 + 0.5**2) / 2 + ((2.0 - 2.8) ** 2 + 0.0) / 2
    assert script.td_loss(q, target).item() == pytest.approx(expected)


def test_lambda_is_alpha_over_the_mean_absolute_q_and_carries_no_gradient():
    q_pi = torch.tensor([2.0, -6.0], requires_grad=True)
    lmbda = td3_bc.q_weight(q_pi, alpha=2.5)
    assert lmbda.item() == pytest.approx(2.5 / 4.0) and not lmbda.requires_grad


def test_actor_loss_is_minus_lambda_mean_q_plus_the_mse_to_the_dataset_action():
    q_pi = torch.tensor([1.0, -3.0])
    pi, actions = torch.tensor([[0.5, 0.0], [-1.0, 1.0]]), torch.tensor([[0.0, 0.0], [-1.0, 0.0]])
    loss = td3_bc.td3_bc_actor_loss(q_pi, pi, actions, torch.tensor(0.5))
    # -0.5 * (1 - 3) / 2 + (0.25 + 0 + 0 + 1) / 4: the BC term averaged over batch and action dimensions
    assert loss.item() == pytest.approx(0.5 + 0.3125)


# ---- the update step against a plain sequential TD3+BC ---------------------------------------------------
def build(**overrides):
    """A small TD3+BC learner as the script builds it, fixed initial weights, and a fixed batch."""
    args = td3_bc.Args(**{"hidden_dim": 16, **overrides})
    torch.manual_seed(0)
    nets = td3_bc.make_networks(args, OBS, ACT)
    update = td3_bc.make_update(nets, td3_bc.make_optimizers(nets, args), args)
    return args, nets, update, fixed_batch(B, OBS, ACT, next_actions=False)  # TD3+BC never reads next actions


def reference_steps(nets: dict, args, batch: dict, steps: int) -> dict:
    """TD3+BC as the authors' TD3_BC.train (and CORL's), written out with plain Adam on copies of the networks:
    total_it += 1; the smoothed target action, clipped double-Q target, both critics' MSE summed; every second
    iteration the actor (Q1 only, lambda = alpha / mean|Q1| detached, F.mse_loss to the data), then Polyak on the
    critics' and the actor's targets. Random numbers drawn as the update draws them (make_update's docstring)."""
    ref = copy.deepcopy(nets)
    actor_opt = torch.optim.Adam(ref["actor"].parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(ref["critic"].parameters(), lr=args.critic_lr)
    s, a, r, s2, d = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
    losses = {}
    for total_it in range(1, steps + 1):
        with torch.no_grad():
            noise = (torch.randn_like(a) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_action = (ref["target_actor"](s2) + noise).clamp(-1.0, 1.0)
            target_q1, target_q2 = ref["target_critic"](s2, next_action)
            target_q = r + (1 - d) * args.discount * torch.min(target_q1, target_q2)
        current_q1, current_q2 = ref["critic"](s, a)
        critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        losses["critic_loss"] = critic_loss.detach()
        if total_it % 2 == 0:
            pi = ref["actor"](s)
            q = ref["critic"](s, pi)[0]
            lmbda = args.alpha / q.abs().mean().detach()
            actor_loss = -lmbda * q.mean() + F.mse_loss(pi, a)
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            losses.update(actor_loss=actor_loss.detach(), **{"lambda": lmbda})
            for target, source in ((ref["target_critic"], ref["critic"]), (ref["target_actor"], ref["actor"])):
                for p_t, p in zip(target.parameters(), source.parameters(), strict=True):
                    p_t.data.copy_((1 - args.tau) * p_t.data + args.tau * p.data)
    return ref, losses


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_updates_equal_the_authors_sequential_td3_bc_steps(steps):
    """Step 1: the critics only; step 2: critics, actor, Polyak; 4 steps: twice that."""
    args, nets, update, batch = build(tau=0.1, alpha=2.0, discount=0.9)
    names = ("critic_loss", "actor_loss", "lambda") if steps > 1 else ("critic_loss",)
    assert_steps_equal_reference(nets, update, batch, steps, partial(reference_steps, nets, args, batch, steps), names)


def test_actor_and_targets_move_on_even_steps_only_and_every_step_returns_the_same_keys():
    _, nets, update, batch = build()
    metrics, moved = metrics_and_moved_networks(nets, update, batch, 5)
    assert moved == [{"critic"}, {"critic", "actor", "target_critic", "target_actor"}] * 2 + [{"critic"}]
    assert metrics[0]["losses/actor_loss"].item() == 0.0  # no actor step yet: its metrics are zeros
    names = ("critic_loss", "q_mean", "target_q_mean", "actor_loss", "lambda", "bc_mse")
    assert set(metrics[0]) == {f"losses/{k}" for k in names}


def test_the_actor_loss_moves_the_actor_and_never_the_critics():
    _, nets, update, batch = build(critic_lr=1e-30)  # the critics' own step is ~0
    update(batch, 1)
    critic = copy.deepcopy(nets["critic"])
    update(batch, 2)  # the actor's step: its gradient must not reach the critics
    for p, q in zip(critic.parameters(), nets["critic"].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-20)


def test_policy_freq_sets_the_actor_steps():
    _, nets, update, batch = build(policy_freq=3)
    actor_steps = []
    for step in range(1, 7):
        before = nets["actor"].net[0].weight.clone()
        update(batch, step)
        if not torch.equal(before, nets["actor"].net[0].weight):
            actor_steps.append(step)
    assert actor_steps == [3, 6]


# ---- networks and exploration ---------------------------------------------------------------------------
def test_networks_are_two_hidden_layers_tanh_actor_and_targets_start_equal():
    args, nets, _, _ = build(hidden_dim=256)
    linears = [m for m in nets["actor"].net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(256, OBS), (256, 256), (ACT, 256)]
    assert isinstance(linears[-1], td3_bc.common.OutputLinear)
    critic_layers = [m for m in nets["critic"].net if isinstance(m, td3_bc.common.BatchedLinear)]
    assert [tuple(m.weight.shape) for m in critic_layers] == [(2, OBS + ACT, 256), (2, 256, 256), (2, 256, 1)]
    for layer in critic_layers:  # PyTorch's default init, per critic: U(+-1/sqrt(fan_in))
        assert layer.weight.abs().max() <= layer.weight.shape[1] ** -0.5
    assert nets["actor"](torch.randn(100, OBS) * 100).abs().max() <= 1.0
    for name in ("actor", "critic"):
        torch.testing.assert_close(nets[f"target_{name}"].state_dict(), nets[name].state_dict())
        assert not any(p.requires_grad for p in nets[f"target_{name}"].parameters())


def test_explore_adds_gaussian_noise_of_exploration_noise_std_and_clips_to_the_action_bounds():
    args, nets, _, _ = build()
    obs = torch.randn(4000, OBS)
    with torch.no_grad():
        mean = nets["actor"](obs)
        actions = td3_bc.explore(nets, obs, args)
        assert actions.abs().max() <= 1.0
        inside = (mean.abs() < 0.5).all(dim=1)  # where clipping cannot matter much
        assert (actions - mean)[inside].std().item() == pytest.approx(0.1, rel=0.05)  # TD3's 0.1
        wide = td3_bc.explore(nets, obs, td3_bc.Args(exploration_noise=5.0))
        assert wide.abs().max() == 1.0
        torch.testing.assert_close(td3_bc.explore(nets, obs, td3_bc.Args(exploration_noise=0.0)), mean)


# ---- compiled and bf16 variants -------------------------------------------------------------------------
def test_compiled_update_equals_the_eager_one_compiles_each_step_kind_once_and_never_recompiles():
    runs = compiled_and_eager_updates(lambda compile: build(compile=compile, n_hidden=1))  # every kind of layer
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] < graphs[2] == graphs[6], graphs  # the critic step at 1, the actor step at 2
    assert_compiled_equals_eager(runs)


def test_bf16_update_stays_close_to_float32():
    _, _, fp32, batch = build()
    _, _, bf16, _ = build(bf16=True)
    assert_bf16_close(fp32, bf16, batch, 2, "q_mean", ("critic_loss", "q_mean", "actor_loss", "lambda", "bc_mse"))


# ---- per-domain settings and refused values -------------------------------------------------------------
CORL = {  # CORL's configs/offline/td3_bc/<env>/<dataset>.yaml
    "antmaze-umaze-v1": dict(reward_scale=1.0, reward_bias=-1.0, eval_episodes=100, normalize_reward=False),
    "pointmaze-umaze-v2": dict(reward_bias=0.0, eval_episodes=100),
    "door-human-v2": dict(reward_bias=0.0, eval_episodes=10),
    "hopper-medium-v0": dict(normalize_reward=False, reward_bias=0.0, eval_episodes=10),
}


@pytest.mark.parametrize("env", CORL)
def test_per_domain_settings_are_corls_and_the_rest_the_papers(env):
    args, _ = td3_bc.parse_args(["--env", env])
    assert {k: getattr(args, k) for k in CORL[env]} == CORL[env]
    paper = dict(alpha=2.5, policy_noise=0.2, noise_clip=0.5, policy_freq=2, tau=0.005, discount=0.99, batch_size=256)
    assert {k: getattr(args, k) for k in paper} == paper
    network = dict(actor_lr=3e-4, critic_lr=3e-4, hidden_dim=256, n_hidden=2, normalize_states=True)
    assert {k: getattr(args, k) for k in network} == network
    assert args.exploration_noise == 0.1 and args.mixing_ratio == 0.5 and td3_bc.NEEDS_NEXT_ACTION is False


def test_antmaze_rewards_become_minus_one_and_zero():
    """CORL's modify_reward for AntMaze (normalize_reward true in its configs): r - 1."""
    args, _ = td3_bc.parse_args(["--env", "antmaze-umaze-v1"])
    scale, bias = td3_bc.reward_transform(np.zeros(2), args)
    np.testing.assert_allclose(np.array([0.0, 1.0]) * scale + bias, [-1.0, 0.0])


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(alpha=-1.0), "alpha, policy_noise, noise_clip and exploration_noise must be >= 0"),
        (dict(noise_clip=-0.1), "alpha, policy_noise, noise_clip and exploration_noise must be >= 0"),
        (dict(policy_freq=0), "policy_freq must be >= 1"),
        (dict(actor_lr=0.0), "learning rates must be > 0"),
        (dict(tau=0.0), "tau in (0, 1]"),
    ],
)
def test_out_of_range_values_are_refused(flags, message):
    assert_invalid(td3_bc, flags, message)
    td3_bc.validate(td3_bc.Args(alpha=0.0))  # behaviour cloning alone: allowed
