"""IQL's losses and data transforms against hand-computed values, and a learning test."""

import math
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

import iql


# ---- losses ---------------------------------------------------------------------------------------------
def test_expectile_loss_weights_positive_errors_by_tau():
    diff = torch.tensor([2.0, -1.0])  # u = Q - V
    # (0.7 * 2^2 + 0.3 * 1^2) / 2
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx(1.55)


def test_expectile_loss_at_one_half_is_half_the_mse():
    diff = torch.randn(100)
    assert iql.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * (diff**2).mean().item(), rel=1e-6)


def test_expectile_regression_converges_to_the_expectile():
    """Minimizing the loss over a constant v gives the tau-expectile: above the mean for tau > 0.5."""
    q = torch.tensor([0.0, 1.0, 2.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        iql.expectile_loss(q - v, 0.9).backward()
        opt.step()
    # first-order condition: 0.9 * sum_{q>v}(q - v) = 0.1 * sum_{q<v}(v - q); solved by hand for v in (2, 10)
    # 0.9 (10 - v) = 0.1 (3v - 3)  ->  9 - 0.9v = 0.3v - 0.3  ->  v = 9.3 / 1.2
    assert v.item() == pytest.approx(9.3 / 1.2, abs=1e-3)


def test_awr_weights_are_exp_beta_advantage_clamped_at_max_weight():
    adv = torch.tensor([0.0, 1.0, -1.0, 10.0])
    w = iql.awr_weights(adv, beta=3.0, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(3.0), math.exp(-3.0), 100.0]))


def test_awr_actor_loss_is_weighted_negative_log_likelihood():
    loss = iql.awr_actor_loss(torch.tensor([-1.0, -3.0]), torch.tensor([1.0, 2.0]))
    assert loss.item() == pytest.approx((1.0 * 1.0 + 2.0 * 3.0) / 2)


def test_td_loss_sums_the_two_critics_mse_against_r_plus_gamma_v_next():
    q = torch.tensor([[1.0, 0.0], [2.0, 0.5]])  # (critics, batch)
    rewards, dones, next_v = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 100.0])
    # targets: 1 + 0.9 * 2 = 2.8 ; 0.5 (terminal: no bootstrap)
    q1 = ((1.0 - 2.8) ** 2 + (0.0 - 0.5) ** 2) / 2
    q2 = ((2.0 - 2.8) ** 2 + (0.5 - 0.5) ** 2) / 2
    assert iql.td_loss(q, rewards, dones, next_v, 0.9).item() == pytest.approx(q1 + q2)


def test_gaussian_actor_log_prob_matches_torch_normal():
    actor = iql.Actor(3, 2, 16, 2, dropout=0.0, deterministic=False)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-0.5, 0.3]))
    obs, actions = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    ref = torch.distributions.Normal(actor(obs), actor.log_std.exp()).log_prob(actions).sum(-1)
    torch.testing.assert_close(actor.log_prob(obs, actions), ref)


def test_gaussian_actor_log_std_is_clamped_at_minus_five():
    actor = iql.Actor(3, 1, 8, 1, dropout=0.0, deterministic=False)
    with torch.no_grad():
        actor.log_std.fill_(-20.0)
    obs = torch.randn(1, 3)
    mean = actor(obs)
    ref = torch.distributions.Normal(mean, math.exp(-5.0)).log_prob(mean).sum(-1)
    torch.testing.assert_close(actor.log_prob(obs, mean), ref)


def test_deterministic_actor_log_prob_is_negative_squared_error():
    actor = iql.Actor(3, 2, 16, 2, dropout=0.0, deterministic=True)
    assert actor.log_std is None
    obs, actions = torch.randn(4, 3), torch.zeros(4, 2)
    torch.testing.assert_close(actor.log_prob(obs, actions), -(actor(obs) ** 2).sum(-1))


def test_actor_dropout_is_active_in_training_and_off_in_evaluation():
    obs = torch.randn(64, 3)
    actor = iql.Actor(3, 2, 64, 2, dropout=0.5, deterministic=False)
    actor.train()
    assert not torch.equal(actor(obs), actor(obs))
    actor.eval()
    assert torch.equal(actor(obs), actor(obs))
    no_dropout = iql.Actor(3, 2, 64, 2, dropout=0.0, deterministic=False)
    assert not any(isinstance(m, torch.nn.Dropout) for m in no_dropout.modules())


def test_twin_q_is_two_independent_critics_of_the_same_depth():
    critic = iql.TwinQ(3, 2, 16, 3, layer_norm=False)
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    q = critic(obs, act)
    assert q.shape == (2, 5) and not torch.allclose(q[0], q[1])
    x = torch.cat([obs, act], -1)
    for i in range(2):  # member i alone, written out as a plain MLP
        h = x
        linears = [m for m in critic.net if isinstance(m, iql.BatchedLinear)]
        for j, layer in enumerate(linears):
            h = h @ layer.weight[i] + layer.bias[i]
            h = torch.relu(h) if j < len(linears) - 1 else h
        torch.testing.assert_close(q[i], h.squeeze(-1))
    assert len([m for m in iql.TwinQ(3, 2, 16, 3, layer_norm=True).net if isinstance(m, iql.BatchedLayerNorm)]) == 3


# ---- data -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, minari_id",
    [
        ("door-human-v2", "D4RL/door/human-v2"),
        ("pen-cloned-v1", "D4RL/pen/cloned-v2"),
        ("relocate-expert-v0", "D4RL/relocate/expert-v2"),
        ("antmaze-umaze-diverse-v0", "D4RL/antmaze/umaze-diverse-v1"),
        ("antmaze-large-play-v2", "D4RL/antmaze/large-play-v1"),
        ("maze2d-medium-v1", "D4RL/pointmaze/medium-v2"),
        ("pointmaze-open-dense-v2", "D4RL/pointmaze/open-dense-v2"),
        ("kitchen-mixed-v0", "D4RL/kitchen/mixed-v2"),
        ("hopper-medium-v0", "mujoco/hopper/medium-v0"),
        ("halfcheetah-simple-v0", "mujoco/halfcheetah/simple-v0"),
        ("mujoco/walker2d/expert-v0", "mujoco/walker2d/expert-v0"),
        ("local/pendulum/random-v0", "local/pendulum/random-v0"),
    ],
)
def test_resolve_dataset_id_maps_d4rl_names_to_minari_ids(name, minari_id):
    assert iql.resolve_dataset_id(name) == minari_id


def test_d4rl_locomotion_names_are_refused_with_the_minari_alternative():
    with pytest.raises(iql.UserError, match="mujoco/halfcheetah/medium-v0"):
        iql.resolve_dataset_id("halfcheetah-medium-replay-v2")


def test_unknown_dataset_name_suggests_close_matches():
    with pytest.raises(iql.UserError, match="Did you mean door-human-v2"):
        iql.resolve_dataset_id("door-humen-v2")


def test_config_name_of_minari_ids():
    assert iql.config_name("D4RL/door/human-v2") == "door-human-v2"
    assert iql.config_name("mujoco/hopper/medium-v0") == "hopper-medium-v0"
    assert iql.config_name("local/pendulum/random-v0") == ""


def test_locomotion_rewards_are_scaled_to_a_return_spread_of_1000():
    rewards, returns = np.array([1.0, 2.0]), np.array([10.0, 30.0])
    np.testing.assert_allclose(iql.transform_rewards(rewards, returns, "locomotion"), [50.0, 100.0])


def test_antmaze_rewards_are_shifted_by_minus_one_and_others_untouched():
    rewards = np.array([0.0, 1.0])
    np.testing.assert_allclose(iql.transform_rewards(rewards, np.zeros(1), "antmaze"), [-1.0, 0.0])
    np.testing.assert_allclose(iql.transform_rewards(rewards, np.zeros(1), "none"), rewards)


def test_reward_family_follows_the_dataset_namespace():
    assert iql.reward_family("mujoco/hopper/medium-v0") == "locomotion"
    assert iql.reward_family("D4RL/antmaze/umaze-v1") == "antmaze"
    assert iql.reward_family("D4RL/door/human-v2") == "none"
    assert iql.reward_family("D4RL/kitchen/mixed-v2") == "none"


def test_actions_are_mapped_affinely_to_minus_one_one_and_clipped():
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
    actions = np.array([[1.0, 0.25], [2.0, 0.0]])
    np.testing.assert_allclose(iql.scale_actions(actions, low, high), [[0.5, -0.5], [1 - 1e-5, -1 + 1e-5]])


def test_policy_normalizes_observations_and_maps_actions_back_to_the_env_bounds():
    actor = iql.Actor(2, 1, 8, 1, dropout=0.0, deterministic=True)
    seen = []
    actor.forward = lambda obs: (seen.append(obs), torch.full((len(obs), 1), 0.5))[1]
    policy = iql.Policy(actor, np.array([1.0, 2.0]), np.array([2.0, 4.0]), np.array([-2.0]), np.array([2.0]), "cpu")
    action = policy(np.array([[3.0, 6.0]]))
    torch.testing.assert_close(seen[0], torch.tensor([[1.0, 1.0]]))  # (obs - mean) / std
    np.testing.assert_allclose(action, [[1.0]])  # 0.5 in [-1, 1] is 1.0 in [-2, 2]


def test_dict_observations_are_flattened_in_gymnasiums_flatten_order():
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (3,)), "achieved_goal": gym.spaces.Box(-1, 1, (2,))})
    samples = [space.sample() for _ in range(4)]
    stacked = {k: np.stack([s[k] for s in samples]) for k in space.spaces}
    expected = np.stack([gym.spaces.flatten(space, s) for s in samples])
    np.testing.assert_allclose(iql.flatten_observations(space, stacked), expected)


def test_pointmaze_dataset_flattening_matches_the_eval_env_wrapper(pointmaze):
    dataset = minari.load_dataset(pointmaze)
    episode = dataset[0]
    flat = iql.flatten_observations(dataset.observation_space, episode.observations)
    env = iql.make_eval_env(dataset)
    obs, _ = env.reset(seed=0)
    assert isinstance(env, gym.wrappers.FlattenObservation) and obs.shape == flat.shape[1:]
    raw = {k: v[0] for k, v in episode.observations.items()}
    np.testing.assert_allclose(flat[0], gym.spaces.flatten(env.env.observation_space, raw), rtol=1e-6)


def test_transitions_pair_each_observation_with_the_next_and_use_terminations_as_done(pendulum):
    dataset = minari.load_dataset(pendulum)
    data = iql.load_transitions(dataset)
    first = dataset[0]
    n = len(first.rewards)
    assert data["obs"].dtype == np.float32 and len(data["obs"]) == dataset.total_steps
    np.testing.assert_allclose(data["obs"][:n], first.observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(data["next_obs"][:n], first.observations[1:], rtol=1e-6)
    np.testing.assert_array_equal(data["dones"][:n], first.terminations.astype(np.float32))
    assert not first.terminations.any() and first.truncations[-1]  # Pendulum only truncates: never done
    assert data["returns"][0] == pytest.approx(first.rewards.sum())


def test_buffer_samples_whole_transitions_on_the_device():
    obs = np.arange(10, dtype=np.float32)[:, None]
    buffer = iql.Buffer(obs, obs * 2, obs[:, 0] * 3, obs + 1, obs[:, 0] % 2, "cpu", seed=0)
    o, a, r, o2, d = buffer.sample(32)
    torch.testing.assert_close(a, 2 * o)
    torch.testing.assert_close(r, 3 * o[:, 0])
    torch.testing.assert_close(o2, o + 1)
    torch.testing.assert_close(d, o[:, 0] % 2)
    assert r.shape == (32,) and d.shape == (32,)


# ---- configs --------------------------------------------------------------------------------------------
CONFIGS = sorted((Path(iql.__file__).parent / "configs" / "iql").glob("*.yaml"))


def test_there_is_a_config_for_every_dataset_of_the_design_table():
    names = {p.stem for p in CONFIGS}
    assert len([n for n in names if n.split("-")[0] in ("pen", "door", "hammer", "relocate")]) == 12
    assert len([n for n in names if n.startswith("antmaze-")]) == 6
    assert len([n for n in names if n.startswith("kitchen-")]) == 3
    assert len([n for n in names if n.startswith("pointmaze-")]) == 8
    assert {"halfcheetah-medium-v0", "hopper-medium-v0", "walker2d-expert-v0"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_is_valid_and_names_a_resolvable_dataset(path):
    cfg = iql.load_config(path)
    iql.validate(iql.Args(**cfg))
    assert iql.config_name(iql.resolve_dataset_id(path.stem)) == path.stem


def test_config_values_follow_the_official_per_domain_hyperparameters():
    load = lambda name: iql.load_config(Path(iql.__file__).parent / "configs" / "iql" / f"{name}.yaml")  # noqa: E731
    assert (load("antmaze-large-play-v1")["expectile"], load("antmaze-large-play-v1")["beta"]) == (0.9, 10.0)
    assert load("door-human-v2") == {"beta": 0.5, "actor_dropout": 0.1}
    assert load("hopper-medium-v0") == {}  # the defaults are the locomotion values
    assert (iql.Args().expectile, iql.Args().beta) == (0.7, 3.0)


def test_config_with_an_unknown_key_or_a_wrong_type_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("expectle: 0.8\n")
    with pytest.raises(iql.UserError, match="unknown key 'expectle'.*Did you mean expectile"):
        iql.load_config(bad)
    bad.write_text("batch_size: many\n")
    with pytest.raises(iql.UserError, match="'batch_size' should be"):
        iql.load_config(bad)
    bad.write_text("actor_lr: 3e-4\n")  # YAML 1.1 reads this as a string: still accepted as a float
    assert iql.load_config(bad) == {"actor_lr": 3e-4}


# ---- the update step: compiled and bf16 variants against the eager float32 one ---------------------------
def build_update(**overrides):
    """A small IQL learner (hidden 16) with fixed initial weights, and a fixed batch."""
    torch.manual_seed(0)
    args = iql.Args(hidden_dim=16, **overrides)
    actor, critic, value = iql.Actor(3, 2, 16, 2, 0.0, False), iql.TwinQ(3, 2, 16, 2, False), iql.mlp(3, 1, 16, 2)
    target = iql.TwinQ(3, 2, 16, 2, False)
    target.load_state_dict(critic.state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=3e-4) for m in (actor, critic, value)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opts[0], lambda s: 1.0)
    update = iql.make_update(actor, critic, target, value, *opts, scheduler, args)
    batch = (torch.randn(64, 3), torch.rand(64, 2) * 2 - 1, torch.randn(64), torch.randn(64, 3), torch.zeros(64))
    return update, [actor, critic, value, target], batch


def test_compiled_update_equals_the_eager_update():
    eager, eager_nets, batch = build_update()
    compiled, compiled_nets, _ = build_update()
    compiled = torch.compile(compiled)
    for _ in range(3):
        m_eager, m_compiled = eager(*batch), compiled(*batch)
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_nets, compiled_nets, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_update_stays_close_to_float32():
    fp32, _, batch = build_update()
    bf16, _, _ = build_update(bf16=True)
    m32, m16 = fp32(*batch), bf16(*batch)
    assert m16["losses/critic_loss"].item() != m32["losses/critic_loss"].item()  # bf16 really ran
    for k in ("losses/value_loss", "losses/critic_loss", "losses/actor_loss", "losses/q_mean"):
        rel = abs(m16[k].float().item() - m32[k].item()) / max(abs(m32[k].item()), 1e-3)
        assert rel < 0.02, (k, m16[k].item(), m32[k].item())
