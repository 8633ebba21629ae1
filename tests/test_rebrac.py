"""ReBRAC's losses and penalties against hand-computed values; the update step (critics every step, the actor and the
targets on steps 1, 3, 5, ...) against a plain sequential step written after the authors' JAX update_td3; the
fine-tuning rules (beta2 = 0, beta1 decaying); the init; the per-domain and per-dataset tables as a copied script
applies them; compiled and bf16 variants; the refusal of out-of-range values."""

import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
from conftest import (
    assert_bf16_close,
    assert_compiled_equals_eager,
    assert_invalid,
    assert_same_networks,
    assert_steps_equal_reference,
    compiled_and_eager_updates,
    fixed_batch,
    metrics_and_moved_networks,
)

import rebrac

OBS, ACT, B = 3, 2, 64


# ---- losses and penalties -------------------------------------------------------------------------------
def test_smoothed_target_action_clips_the_noise_to_noise_clip_and_the_action_to_one():
    target_action = torch.tensor([0.9, -0.2, 0.0, -0.9])
    noise = torch.tensor([0.7, -0.3, -2.0, -0.05])
    expected = torch.tensor([1.0, -0.5, -0.5, -0.95])  # noise clipped to +-0.5, then the action to +-1
    torch.testing.assert_close(rebrac.smoothed_target_action(target_action, noise, 0.5), expected)


def test_next_action_penalty_is_the_squared_distance_to_the_datasets_next_action_summed_over_dimensions():
    next_actions = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    dataset_next = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(rebrac.next_action_penalty(next_actions, dataset_next), torch.tensor([4.25, 0.0]))


def test_td_target_subtracts_beta2_times_the_penalty_from_the_bootstrapped_value_only():
    rewards, dones = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    next_q, penalty = torch.tensor([2.0, 100.0]), torch.tensor([4.0, 7.0])
    target = rebrac.td_target(rewards, dones, next_q, penalty, torch.tensor(0.25), 0.9)
    # 1 + 0.9 * (2 - 0.25 * 4) = 1.9; terminal: 0.5, neither bootstrap nor penalty
    torch.testing.assert_close(target, torch.tensor([1.9, 0.5]))


def test_td_loss_sums_the_two_critics_mse():
    q, target = torch.tensor([[1.0, 0.0], [2.0, 0.5]]), torch.tensor([2.8, 0.5])
    expected = ((1.0 - 2.8) ** 2 + 0.5**2) / 2 + ((2.0 - 2.8) ** 2 + 0.0) / 2
    assert rebrac.td_loss(q, target).item() == pytest.approx(expected)


def test_actor_loss_is_beta1_summed_bc_minus_q_over_its_detached_mean_absolute_value():
    pi = torch.tensor([[0.5, 0.0], [-1.0, 1.0]], requires_grad=True)
    actions = torch.tensor([[0.0, 0.0], [-1.0, 0.0]])
    q_pi = torch.tensor([1.0, -3.0], requires_grad=True)
    loss = rebrac.rebrac_actor_loss(pi, actions, q_pi, torch.tensor(0.1))
    # BC per state summed over actions: 0.25, 1.0; mean|Q| = 2: (0.1 * 0.25 - 0.5 + 0.1 * 1.0 + 1.5) / 2
    assert loss.item() == pytest.approx((0.025 - 0.5 + 0.1 + 1.5) / 2)
    loss.backward()
    torch.testing.assert_close(q_pi.grad, torch.full((2,), -1.0 / (2 * 2.0)))  # the normalizer is a constant


def test_online_decay_of_beta1_is_linear_from_one_and_floored():
    """CORL's finetune: max(min_decay_coef, (online updates left) / online updates), 1 at the first online step."""
    decays = [rebrac.online_decay(k, 10, 0.5) for k in range(1, 11)]
    assert decays == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert rebrac.online_decay(10, 10, 0.0) == pytest.approx(0.1)


# ---- the update step against a plain sequential ReBRAC --------------------------------------------------
def build(**overrides):
    """A small ReBRAC learner as the script builds it, fixed initial weights, and a fixed batch."""
    args = rebrac.Args(**{"hidden_dim": 16, "beta1": 0.3, "beta2": 0.2, **overrides})
    torch.manual_seed(0)
    nets = rebrac.make_networks(args, OBS, ACT)
    update = rebrac.make_update(nets, rebrac.make_optimizers(nets, args), args)
    return args, nets, update, fixed_batch(B, OBS, ACT, next_actions=True)


def reference_steps(nets: dict, args, batch: dict, steps: int, betas=None) -> tuple:
    """The authors' update_td3 / update_td3_no_targets (CORL algorithms/offline/rebrac.py) written out with plain
    Adam on copies of the networks, updates counted from i = 0: the critic step on the smoothed target action with
    the next-action penalty; when i % 2 == 0 the actor step against the updated critics, the actor's target averaged
    towards the actor's parameters before its step, the critics' towards the updated critics. betas(step) gives
    (beta1, beta2) at each step (default: the Args values). Random numbers drawn as the update draws them."""
    ref = copy.deepcopy(nets)
    actor_opt = torch.optim.Adam(ref["actor"].parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(ref["critic"].parameters(), lr=args.critic_lr)
    s, a, r, s2, d, a2 = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones", "next_actions"))
    losses = {}
    for i in range(steps):
        beta1, beta2 = (args.beta1, args.beta2) if betas is None else betas(i + 1)
        with torch.no_grad():
            next_actions = ref["target_actor"](s2)
            noise = (torch.randn_like(next_actions) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip)
            next_actions = (next_actions + noise).clamp(-1, 1)
            bc_penalty = ((next_actions - a2) ** 2).sum(-1)
            next_q = ref["target_critic"](s2, next_actions).min(0).values - beta2 * bc_penalty
            target_q = r + (1 - d) * args.discount * next_q
        q = ref["critic"](s, a)
        critic_loss = ((q - target_q[None]) ** 2).mean(1).sum(0)
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        losses["critic_loss"] = critic_loss.detach()
        if i % args.policy_freq == 0:
            actor_before = [p.detach().clone() for p in ref["actor"].parameters()]
            actions = ref["actor"](s)
            q_values = ref["critic"](s, actions).min(0).values
            lmbda = 1 / q_values.abs().mean().detach()
            actor_loss = (beta1 * ((actions - a) ** 2).sum(-1) - lmbda * q_values).mean()
            actor_opt.zero_grad()
            actor_loss.backward()
            actor_opt.step()
            losses["actor_loss"] = actor_loss.detach()
            for p_t, p in zip(ref["target_actor"].parameters(), actor_before, strict=True):
                p_t.data.copy_(args.tau * p + (1 - args.tau) * p_t.data)  # optax.incremental_update
            for p_t, p in zip(ref["target_critic"].parameters(), ref["critic"].parameters(), strict=True):
                p_t.data.copy_(args.tau * p.data + (1 - args.tau) * p_t.data)
    return ref, losses


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_updates_equal_the_authors_sequential_rebrac_steps(steps):
    """Step 1 (CORL's i = 0): critics, actor, Polyak; step 2: the critics only; step 3: all again."""
    args, nets, update, batch = build(tau=0.1, discount=0.9)
    assert_steps_equal_reference(
        nets, update, batch, steps, partial(reference_steps, nets, args, batch, steps), ("critic_loss", "actor_loss")
    )


def test_actor_and_targets_move_on_odd_steps_only_and_every_step_returns_the_same_keys():
    _, nets, update, batch = build()
    metrics, moved = metrics_and_moved_networks(nets, update, batch, 5)
    both = {"critic", "actor", "target_critic", "target_actor"}
    first = both - {"target_actor"}  # averaged towards the actor before its first step: the actor it started equal to
    assert moved == [first, {"critic"}, both, {"critic"}, both]
    names = ("critic_loss", "q_min", "next_penalty", "actor_loss", "bc_mse", "beta1")
    assert set(metrics[0]) == {f"losses/{k}" for k in names}


def test_the_actors_target_follows_the_actor_before_its_step_and_the_critics_target_the_updated_critics():
    """With tau = 1 both targets become copies: of the actor as it was before the step (the authors' code passes
    the pre-update actor.params to optax.incremental_update), of the critics after theirs."""
    _, nets, update, batch = build(tau=1.0)
    actor_before = copy.deepcopy(nets["actor"])
    update(batch, 1)
    torch.testing.assert_close(nets["target_actor"].state_dict(), actor_before.state_dict())
    assert not torch.equal(nets["actor"].net[0].weight, actor_before.net[0].weight)
    torch.testing.assert_close(nets["target_critic"].state_dict(), nets["critic"].state_dict())


def test_the_critics_target_penalizes_the_distance_to_the_datasets_next_action():
    """The dataset's next action enters only through beta2 |a' - a_next|^2: moving a_next changes the critic loss
    exactly as the penalty says, and nothing with beta2 = 0."""
    results = {}
    for beta2 in (0.0, 0.5):
        for shift in (0.0, 0.7):
            args, nets, update, batch = build(beta2=beta2)
            batch["next_actions"] = (batch["next_actions"] + shift).clamp(-1, 1)
            torch.manual_seed(1)
            _, expected = reference_steps(nets, args, batch, 1)
            torch.manual_seed(1)
            results[beta2, shift] = update(batch, 1)
            torch.testing.assert_close(results[beta2, shift]["losses/critic_loss"], expected["critic_loss"])
    assert results[0.0, 0.0]["losses/critic_loss"] == results[0.0, 0.7]["losses/critic_loss"]
    assert results[0.5, 0.0]["losses/critic_loss"] != results[0.5, 0.7]["losses/critic_loss"]
    assert results[0.5, 0.7]["losses/next_penalty"] != results[0.5, 0.0]["losses/next_penalty"]


def test_fine_tuning_sets_beta2_to_zero_and_decays_beta1_linearly_to_its_floor():
    """Offline steps 1-2 with beta1, beta2; online steps 3-8 (online_steps 6): beta2 = 0, beta1 x max(0.5, (6 - k +
    1) / 6) at the k-th online step, against the sequential reference with those coefficients."""
    args, nets, update, batch = build(total_steps=2, online_steps=6, tau=0.1)

    def betas(step):
        if step <= 2:
            return args.beta1, args.beta2
        return args.beta1 * max(0.5, (6 - (step - 2) + 1) / 6), 0.0

    torch.manual_seed(1)
    ref, _ = reference_steps(nets, args, batch, 8, betas)
    torch.manual_seed(1)
    logged = [update(batch, step)["losses/beta1"].item() for step in range(1, 9)]
    assert_same_networks(nets, ref)
    # the actor's steps (1, 3, 5, 7) log their beta1: offline 0.3; online steps k = 1, 3, 5: 0.3 x 1, 4/6, 0.5
    expected = [0.3, 0.3, 0.3, 0.3, 0.2, 0.2, 0.15, 0.15]
    assert logged == pytest.approx(expected)


# ---- networks and exploration ---------------------------------------------------------------------------
def layers(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.Linear | rebrac.common.BatchedLinear)]


def test_init_is_the_authors_hidden_weights_uniform_biases_point_one_small_uniform_outputs():
    """Hidden weights U(+-1/sqrt(fan_in)) (std bound / sqrt 3), hidden biases 0.1, output layers U(+-1e-3) (actor)
    and U(+-3e-3) (critics), weights and biases; three hidden layers of 256; targets equal to their learners."""
    args, nets, _, _ = build(hidden_dim=256)
    for name, out_bound in (("actor", 1e-3), ("critic", 3e-3)):
        *hidden, output = layers(nets[name])
        assert len(hidden) == 3
        for layer in hidden:
            fan_in = layer.weight.shape[-1] if isinstance(layer, torch.nn.Linear) else layer.weight.shape[-2]
            bound = fan_in**-0.5
            assert layer.weight.abs().max() <= bound
            assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
            assert (layer.bias == 0.1).all()
        for p in (output.weight, output.bias):
            assert p.abs().max() <= out_bound and p.abs().max() > 0.5 * out_bound
        torch.testing.assert_close(nets[f"target_{name}"].state_dict(), nets[name].state_dict())
    # the two critics are initialized independently
    assert not torch.equal(layers(nets["critic"])[0].weight[0], layers(nets["critic"])[0].weight[1])
    with torch.no_grad():  # tiny output layers: Q ~ 0 and pi(s) ~ 0 at the start
        assert nets["actor"](torch.randn(50, OBS)).abs().max() < 0.05
        assert nets["critic"](torch.randn(50, OBS), torch.rand(50, ACT)).abs().max() < 0.1


def test_layer_norm_follows_each_hidden_relu_in_the_critics_by_default_and_in_the_actor_on_request():
    _, nets, _, _ = build()
    kinds = [type(m).__name__ for m in nets["critic"].net]
    assert kinds == ["BatchedLinear", "ReLU", "BatchedLayerNorm"] * 3 + ["BatchedOutputLinear"]
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in nets["actor"].modules())
    _, nets, _, _ = build(actor_layer_norm=True, critic_layer_norm=False, actor_n_hidden=2, critic_n_hidden=4)
    assert [type(m).__name__ for m in nets["actor"].net] == ["Linear", "ReLU", "LayerNorm"] * 2 + ["OutputLinear"]
    assert [type(m).__name__ for m in nets["critic"].net] == ["BatchedLinear", "ReLU"] * 4 + ["BatchedOutputLinear"]


def test_explore_is_the_deterministic_action_by_default_and_adds_clipped_noise_on_request():
    args, nets, _, _ = build()
    obs = torch.randn(2000, OBS)
    with torch.no_grad():
        mean = nets["actor"](obs)
        torch.testing.assert_close(rebrac.explore(nets, obs, args), mean)  # CORL's fine-tuning: expl_noise 0
        noisy = rebrac.explore(nets, obs, rebrac.Args(exploration_noise=0.2))
        assert noisy.abs().max() <= 1.0 and (noisy - mean).std().item() == pytest.approx(0.2, rel=0.05)


# ---- compiled and bf16 variants -------------------------------------------------------------------------
def test_compiled_update_equals_the_eager_one_and_never_recompiles_not_even_when_fine_tuning_starts():
    def small(compile):  # one hidden layer: every kind of layer (Linear, ReLU, LayerNorm, output); 3 + 3 steps
        return build(compile=compile, total_steps=3, online_steps=3, actor_n_hidden=1, critic_n_hidden=1)

    runs = compiled_and_eager_updates(small)  # offline steps 1-3, online 4-6: beta1, beta2 change in place
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] == graphs[6], graphs  # both steps compiled at step 1, nothing new afterwards
    assert_compiled_equals_eager(runs)


def test_bf16_update_stays_close_to_float32():
    _, _, fp32, batch = build()
    _, _, bf16, _ = build(bf16=True)
    names = ("critic_loss", "q_min", "next_penalty", "actor_loss", "bc_mse")
    assert_bf16_close(fp32, bf16, batch, 1, "bc_mse", names)


# ---- the settings tables, as a script applies them ------------------------------------------------------
# (actor_bc_coef, critic_bc_coef) of CORL's configs/offline/rebrac/<task>/<kind>_v1.yaml, antmaze/<kind>_v2.yaml
BETAS = {
    "pen-human-v2": (0.1, 0.5), "pen-cloned-v2": (0.05, 0.5), "pen-expert-v2": (0.01, 0.01),
    "door-human-v2": (0.1, 0.1), "door-cloned-v2": (0.01, 0.1), "door-expert-v2": (0.05, 0.01),
    "hammer-human-v2": (0.01, 0.5), "hammer-cloned-v2": (0.1, 0.5), "hammer-expert-v2": (0.01, 0.01),
    "relocate-human-v2": (0.1, 0.01), "relocate-cloned-v2": (0.1, 0.01), "relocate-expert-v2": (0.05, 0.01),
    "antmaze-umaze-v1": (0.003, 0.002), "antmaze-umaze-diverse-v1": (0.003, 0.001),
    "antmaze-medium-play-v1": (0.001, 0.0005), "antmaze-medium-diverse-v1": (0.001, 0.0),
    "antmaze-large-play-v1": (0.002, 0.001), "antmaze-large-diverse-v1": (0.002, 0.002),
    "maze2d-umaze-v1": (0.003, 0.001), "pointmaze-large-v2": (0.003, 0.001),
}  # fmt: skip
DOMAIN = {  # the rest of CORL's configs, the same in every file of a domain
    "adroit": dict(batch_size=256, actor_lr=3e-4, critic_lr=3e-4, discount=0.99, reward_scale=1.0, eval_episodes=10),
    "antmaze": dict(batch_size=256, actor_lr=3e-4, critic_lr=5e-5, discount=0.999, reward_scale=100.0,
                    reward_bias=0.0, eval_episodes=100),
    "pointmaze": dict(batch_size=256, actor_lr=3e-4, critic_lr=3e-4, discount=0.99, eval_episodes=100),
    "locomotion": dict(batch_size=1024, actor_lr=1e-3, critic_lr=1e-3, discount=0.99, eval_episodes=10),
}  # fmt: skip
EVERY_DATASET = dict(
    hidden_dim=256, actor_n_hidden=3, critic_n_hidden=3, actor_layer_norm=False, critic_layer_norm=True, tau=0.005,
    policy_noise=0.2, noise_clip=0.5, policy_freq=2, normalize_states=False, normalize_reward=False,
)  # fmt: skip


@pytest.mark.parametrize("env", BETAS)
def test_every_adroit_antmaze_and_maze_dataset_gets_corls_betas_and_domain_settings(env):
    args, _ = rebrac.parse_args(["--env", env])
    assert (args.beta1, args.beta2) == BETAS[env]
    domain = rebrac.resolve_dataset_name(env)[1]
    assert {k: getattr(args, k) for k in DOMAIN[domain]} == DOMAIN[domain]
    assert {k: getattr(args, k) for k in EVERY_DATASET} == EVERY_DATASET


def test_the_tables_name_only_datasets_and_domains_the_scripts_know():
    names = {minari_id for minari_id, _ in rebrac.dataset_names().values()}
    assert set(rebrac.DATASET_SETTINGS) <= names and len(rebrac.DATASET_SETTINGS) == 18
    assert set(rebrac.DOMAIN_SETTINGS) | set(rebrac.FINETUNE_SETTINGS) <= set(rebrac.DATASET_NAMES)
    for settings in [*rebrac.DOMAIN_SETTINGS.values(), *rebrac.DATASET_SETTINGS.values()]:
        rebrac.validate(rebrac.Args(**settings))


def test_locomotion_and_unknown_datasets_get_the_defaults_and_flags_win():
    args, _ = rebrac.parse_args(["--env", "hopper-medium-v0"])
    assert (args.beta1, args.beta2, args.batch_size) == (0.05, 0.01, 1024)
    args, _ = rebrac.parse_args(["--env", "local/my/own-v0"])
    assert (args.beta1, args.beta2, args.batch_size, args.actor_lr) == (0.05, 0.01, 256, 1e-3)
    args, _ = rebrac.parse_args(["--env", "door-human-v2", "--beta1", "0.5"])
    assert (args.beta1, args.beta2) == (0.5, 0.1)


def test_fine_tuning_keeps_the_offline_betas_and_evaluates_adroit_on_100_episodes():
    """CORL's configs/finetune/rebrac: the offline betas, 100 evaluation episodes, 50/50 batches, no noise."""
    for env, episodes in (("door-cloned-v2", 100), ("antmaze-umaze-v1", 100), ("hopper-medium-v0", 10)):
        args, _ = rebrac.parse_args(["--env", env, "--online-steps", "10"])
        assert args.eval_episodes == episodes and (args.mixing_ratio, args.exploration_noise) == (0.5, 0.0)
    offline, _ = rebrac.parse_args(["--env", "door-cloned-v2"])
    online, _ = rebrac.parse_args(["--env", "door-cloned-v2", "--online-steps", "10"])
    assert (online.beta1, online.beta2) == (offline.beta1, offline.beta2) == (0.01, 0.1)
    assert offline.eval_episodes == 10 and rebrac.NEEDS_NEXT_ACTION is True


def test_antmaze_rewards_are_multiplied_by_100():
    """CORL's ReplayBuffer.normalize_reward for AntMaze: r * 100, no bias (unlike TD3+BC's and IQL's r - 1)."""
    args, _ = rebrac.parse_args(["--env", "antmaze-umaze-v1"])
    scale, bias = rebrac.reward_transform(np.zeros(2), args)
    np.testing.assert_allclose(np.array([0.0, 1.0]) * scale + bias, [0.0, 100.0])


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(beta1=-0.1), "beta1, beta2, policy_noise, noise_clip and exploration_noise must be >= 0"),
        (dict(beta2=-1.0), "beta1, beta2, policy_noise, noise_clip and exploration_noise must be >= 0"),
        (dict(beta1_decay_floor=1.5), "beta1_decay_floor must be in [0, 1]"),
        (dict(critic_n_hidden=0), "critic_n_hidden and policy_freq must be >= 1"),
        (dict(critic_lr=0.0), "learning rates must be > 0"),
    ],
)
def test_out_of_range_values_are_refused(flags, message):
    assert_invalid(rebrac, flags, message)
    rebrac.validate(rebrac.Args(beta1=0.0, beta2=0.0))  # TD3 with LayerNorm: allowed
