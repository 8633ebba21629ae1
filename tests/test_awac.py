"""AWAC's losses against hand-computed values; the update step (critics, then the actor weighted by the updated
critics, then Polyak) against CORL's AdvantageWeightedActorCritic.update written out with torch.distributions and
plain Adam; the networks, exploration, compiled and bf16 variants, the offline and fine-tuning tables against CORL's
configs, and the refusal of out-of-range values."""

import copy
import math
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

OBS, ACT, B = 3, 2, 64


# ---- losses ---------------------------------------------------------------------------------------------
# (its TD target and loss are TD3+BC's: tested in test_td3_bc.py)
def test_weights_are_exp_advantage_over_lambda_clipped_at_max_weight_without_gradient():
    q_data = torch.tensor([1.0, 0.0, 10.0], requires_grad=True)
    q_pi = torch.tensor([0.5, 0.3, 0.0])
    weights = awac.awac_weights(q_data, q_pi, awac_lambda=0.5, max_weight=100.0)
    # exp(0.5 / 0.5) = e, exp(-0.3 / 0.5), exp(10 / 0.5) = e^20 -> 100
    torch.testing.assert_close(weights, torch.tensor([math.e, math.exp(-0.6), 100.0]))
    assert not weights.requires_grad


def test_gaussian_log_prob_is_the_normal_density_summed_over_action_dimensions():
    actions, mean, log_std = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, -1.0]]), torch.tensor([0.0, math.log(2)])
    # N(0.5; 0, 1): -0.125 - 0.5 log 2 pi; N(-1; -1, 2^2): -log 2 - 0.5 log 2 pi
    expected = -0.125 - math.log(2) - math.log(2 * math.pi)
    assert awac.gaussian_log_prob(actions, mean, log_std).item() == pytest.approx(expected)
    reference = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(awac.gaussian_log_prob(actions, mean, log_std), reference)


def test_actor_loss_is_minus_the_weighted_mean_log_likelihood():
    loss = awac.awac_actor_loss(torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx((2.0 * 1.0 + 0.5 * 3.0) / 2)


# ---- the update step against CORL's AWAC ----------------------------------------------------------------
def build(**overrides):
    """A small AWAC learner as the script builds it, fixed initial weights, and a fixed batch."""
    args = awac.Args(**{"hidden_dim": 16, **overrides})
    torch.manual_seed(0)
    nets = awac.make_networks(args, OBS, ACT)
    update = awac.make_update(nets, awac.make_optimizers(nets, args), args)
    return args, nets, update, fixed_batch(B, OBS, ACT, next_actions=False)  # AWAC never reads next actions


def reference_steps(nets: dict, args, batch: dict, steps: int) -> tuple:
    """CORL's AdvantageWeightedActorCritic.update (offline/awac.py) written out on copies of the networks: the
    critics (a' = policy.rsample() clamped to [-1, 1], the min of the target critics, both MSEs summed, one Adam step),
    the actor (v = min Q(s, a~pi), q = min Q(s, a) from the updated critics, weights min(exp((q - v) / lambda), 100),
    -mean(Normal.log_prob(a).sum * weights), one Adam step), then Polyak on the target critics."""
    ref = copy.deepcopy(nets)
    actor, critic, target_critic = ref["actor"], ref["critic"], ref["target_critic"]
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    s, a, r, s2, d = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))

    def policy(states):
        return torch.distributions.Normal(actor.net(states), actor.log_std.clamp(-20.0, 2.0).exp())

    for _ in range(steps):
        with torch.no_grad():
            next_actions = policy(s2).rsample().clamp(-1.0, 1.0)
            q_next = torch.min(*target_critic(s2, next_actions))
            q_target = r + args.discount * (1.0 - d) * q_next
        q1, q2 = critic(s, a)
        critic_loss = F.mse_loss(q1, q_target) + F.mse_loss(q2, q_target)
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        with torch.no_grad():
            v = torch.min(*critic(s, policy(s).rsample().clamp(-1.0, 1.0)))
            q = torch.min(*critic(s, a))
            weights = torch.clamp_max(torch.exp((q - v) / args.awac_lambda), 100.0)
        actor_loss = (-policy(s).log_prob(a).sum(-1) * weights).mean()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        for p_t, p in zip(target_critic.parameters(), critic.parameters(), strict=True):
            p_t.data.copy_((1 - args.tau) * p_t.data + args.tau * p.data)
    return ref, {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "weight": weights.mean()}


@pytest.mark.parametrize("steps", [1, 3])
def test_updates_equal_corls_sequential_awac_steps(steps):
    args, nets, update, batch = build(tau=0.1, awac_lambda=0.5, discount=0.9)
    assert_steps_equal_reference(nets, update, batch, steps, partial(reference_steps, nets, args, batch, steps))


def test_every_step_moves_the_critics_the_actor_and_the_target_critics():
    _, nets, update, batch = build()
    metrics, moved = metrics_and_moved_networks(nets, update, batch, 3)
    assert moved == [{"actor", "critic", "target_critic"}] * 3
    names = ("critic_loss", "q_mean", "actor_loss", "advantage", "weight", "log_prob")
    assert set(metrics[0]) == {f"losses/{k}" for k in names}


# ---- networks and exploration ---------------------------------------------------------------------------
def test_networks_are_three_hidden_layers_and_the_actor_an_unsquashed_gaussian_with_a_free_log_std():
    _, nets, _, _ = build(hidden_dim=256)
    linears = [m for m in nets["actor"].net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(256, OBS), (256, 256), (256, 256), (ACT, 256)]
    critic_layers = [m for m in nets["critic"].net if isinstance(m, awac.common.BatchedLinear)]
    shapes = [(2, OBS + ACT, 256), (2, 256, 256), (2, 256, 256), (2, 256, 1)]
    assert [tuple(m.weight.shape) for m in critic_layers] == shapes
    assert torch.equal(nets["actor"].log_std, torch.zeros(ACT)) and set(nets) == {"actor", "critic", "target_critic"}
    torch.testing.assert_close(nets["target_critic"].state_dict(), nets["critic"].state_dict())
    obs = torch.randn(100, OBS) * 100
    with torch.no_grad():  # the deterministic action: the mean, clipped to the action bounds
        mean, log_std = nets["actor"].mean_and_log_std(obs)
        torch.testing.assert_close(nets["actor"](obs), mean.clamp(-1, 1))
        nets["actor"].log_std.fill_(-30.0)
        assert nets["actor"].mean_and_log_std(obs)[1].min() == -20.0  # clamped to [-20, 2], as CORL's


def test_explore_samples_the_gaussian_and_clips_to_the_action_bounds():
    args, nets, _, _ = build()
    obs = torch.zeros(4000, OBS)
    with torch.no_grad():
        nets["actor"].log_std.fill_(math.log(0.2))
        mean = nets["actor"](obs)
        actions = awac.explore(nets, obs, args)
        assert actions.abs().max() <= 1.0
        assert (actions - mean).std().item() == pytest.approx(0.2, rel=0.05)
        nets["actor"].log_std.fill_(2.0)
        assert awac.explore(nets, obs, args).abs().max() == 1.0


# ---- compiled and bf16 variants -------------------------------------------------------------------------
def test_compiled_update_equals_the_eager_one_and_compiles_once():
    runs = compiled_and_eager_updates(lambda compile: build(compile=compile, n_hidden=1))
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] == graphs[6], graphs
    assert_compiled_equals_eager(runs)


def test_bf16_update_stays_close_to_float32():
    _, _, fp32, batch = build()
    _, _, bf16, _ = build(bf16=True)
    assert_bf16_close(fp32, bf16, batch, 2, "q_mean", ("critic_loss", "q_mean", "actor_loss", "log_prob"))


# ---- the settings tables, as a script applies them ------------------------------------------------------
# CORL's configs/offline/awac/<env>/<dataset>.yaml: awac_lambda, eval_frequency, n_test_episodes, normalize_reward
# (AntMaze: r - 1); the other keys the same in every file (batch 256, learning_rate 3e-4, gamma 0.99, tau 0.005,
# hidden_dim 256)
OFFLINE = {
    "hopper-medium-v0": dict(awac_lambda=0.3333, eval_every=1000, eval_episodes=10, reward_bias=0.0),
    "halfcheetah-expert-v0": dict(awac_lambda=0.3333, eval_every=1000, eval_episodes=10, reward_bias=0.0),
    "door-human-v2": dict(awac_lambda=0.1, eval_every=1000, eval_episodes=10, reward_bias=0.0),
    "pen-cloned-v2": dict(awac_lambda=0.1, eval_every=1000, eval_episodes=10, reward_bias=0.0),
    "relocate-expert-v2": dict(awac_lambda=0.1, eval_every=1000, eval_episodes=10, reward_bias=0.0),
    "antmaze-umaze-v1": dict(awac_lambda=0.1, eval_every=1000, eval_episodes=100, reward_bias=-1.0),
    "antmaze-large-diverse-v1": dict(awac_lambda=0.1, eval_every=1000, eval_episodes=100, reward_bias=-1.0),
    "maze2d-medium-v1": dict(awac_lambda=0.1, eval_every=1000, eval_episodes=100, reward_bias=0.0),
}
# configs/finetune/awac/<env>/<dataset>.yaml: the offline lambda and rewards; eval_frequency, n_test_episodes
FINETUNE = {
    "antmaze-medium-play-v1": dict(awac_lambda=0.1, eval_every=50000, eval_episodes=100, reward_bias=-1.0),
    "door-cloned-v2": dict(awac_lambda=0.1, eval_every=5000, eval_episodes=10, reward_bias=0.0),
    "hammer-cloned-v2": dict(awac_lambda=0.1, eval_every=5000, eval_episodes=10, reward_bias=0.0),
}
EVERY_DATASET = dict(
    batch_size=256, actor_lr=3e-4, critic_lr=3e-4, discount=0.99, tau=0.005, hidden_dim=256, n_hidden=3,
    max_weight=100.0, normalize_states=True, normalize_reward=False, reward_scale=1.0,
)  # fmt: skip


@pytest.mark.parametrize("env, online", [(env, False) for env in OFFLINE] + [(env, True) for env in FINETUNE])
def test_offline_and_fine_tuning_settings_are_corls(env, online):
    expected = (FINETUNE if online else OFFLINE)[env]
    args, _ = awac.parse_args(["--env", env, *(["--online-steps", "10"] if online else [])])
    assert {k: getattr(args, k) for k in expected} == expected
    assert {k: getattr(args, k) for k in EVERY_DATASET} == EVERY_DATASET
    assert args.mixing_ratio is None  # CORL's fine-tuning samples its one buffer uniformly


def test_the_tables_name_only_domains_the_scripts_know_and_unknown_datasets_get_the_locomotion_lambda():
    assert set(awac.DOMAIN_SETTINGS) | set(awac.FINETUNE_SETTINGS) <= set(awac.DATASET_NAMES)
    assert not awac.DATASET_SETTINGS
    args, _ = awac.parse_args(["--env", "local/my/own-v0"])
    assert (args.awac_lambda, args.eval_every, args.eval_episodes) == (0.3333, 5000, 10)


def test_antmaze_rewards_become_minus_one_and_zero():
    args, _ = awac.parse_args(["--env", "antmaze-umaze-v1"])
    scale, bias = awac.reward_transform(np.zeros(2), args)
    np.testing.assert_allclose(np.array([0.0, 1.0]) * scale + bias, [-1.0, 0.0])


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(awac_lambda=0.0), "awac_lambda and max_weight must be > 0"),
        (dict(max_weight=-1.0), "awac_lambda and max_weight must be > 0"),
        (dict(n_hidden=0), "hidden_dim and n_hidden must be >= 1"),
        (dict(critic_lr=0.0), "learning rates must be > 0"),
        (dict(tau=0.0), "tau in (0, 1]"),
    ],
)
def test_out_of_range_values_are_refused(flags, message):
    assert_invalid(awac, flags, message)
