"""IQL's losses and data transforms against hand-computed values, and a learning test."""

import copy
import math
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from datasets import rollout

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
    w = iql.awr_weights(adv, beta=3.0)  # the official code's clamp: 100
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
        linears = [m for m in critic.net if isinstance(m, iql.common.BatchedLinear)]
        for j, layer in enumerate(linears):
            h = h @ layer.weight[i] + layer.bias[i]
            h = torch.relu(h) if j < len(linears) - 1 else h
        torch.testing.assert_close(q[i], h.squeeze(-1))
    layer_norms = [m for m in iql.TwinQ(3, 2, 16, 3, layer_norm=True).net if isinstance(m, iql.common.BatchedLayerNorm)]
    assert len(layer_norms) == 3


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
        ("humanoid-expert-v0", "mujoco/humanoid/expert-v0"),
        ("mujoco/walker2d/expert-v0", "mujoco/walker2d/expert-v0"),
        ("local/pendulum/random-v0", "local/pendulum/random-v0"),
    ],
)
def test_resolve_dataset_name_maps_d4rl_names_to_minari_ids(name, minari_id):
    assert iql.resolve_dataset_name(name)[0] == minari_id


def test_d4rl_locomotion_names_are_refused_with_the_minari_alternative():
    with pytest.raises(iql.UserError, match="mujoco/halfcheetah/simple-v0"):
        iql.resolve_dataset_name("halfcheetah-medium-replay-v2")


def test_unknown_dataset_name_suggests_close_matches():
    with pytest.raises(iql.UserError, match="Did you mean door-human-v2"):
        iql.resolve_dataset_name("door-humen-v2")


@pytest.mark.parametrize(
    "minari_id, domain",
    [
        ("D4RL/door/human-v2", "adroit"),
        ("D4RL/antmaze/umaze-v1", "antmaze"),
        ("D4RL/kitchen/mixed-v2", "kitchen"),
        ("D4RL/pointmaze/open-v2", "pointmaze"),
        ("mujoco/hopper/medium-v0", "locomotion"),  # the official code scales halfcheetah, hopper, walker2d only
        ("mujoco/invertedpendulum/expert-v0", "mujoco"),
        ("local/pendulum/random-v0", "other"),
    ],
)
def test_domain_of_a_dataset_picks_its_row_of_the_settings_table(minari_id, domain):
    assert iql.resolve_dataset_name(minari_id)[1] == domain


def test_locomotion_rewards_are_scaled_to_a_return_spread_of_1000():
    rewards, returns = np.array([1.0, 2.0]), np.array([10.0, 30.0])
    np.testing.assert_allclose(iql.transform_rewards(rewards, returns, "locomotion"), [50.0, 100.0])


def test_locomotion_scaling_is_skipped_with_a_warning_when_every_return_is_the_same(capsys):
    rewards = np.array([1.0, 2.0])
    for returns in (np.array([1000.0]), np.array([1000.0, 1000.0, 1000.0 + 1e-4])):  # one episode; all at the cap
        np.testing.assert_array_equal(iql.transform_rewards(rewards, returns, "locomotion"), rewards)
        assert "rewards are left unscaled" in capsys.readouterr().out


def test_antmaze_rewards_are_shifted_by_minus_one_and_others_untouched():
    rewards = np.array([0.0, 1.0])
    np.testing.assert_allclose(iql.transform_rewards(rewards, np.zeros(1), "antmaze"), [-1.0, 0.0])
    np.testing.assert_allclose(iql.transform_rewards(rewards, np.zeros(1), "none"), rewards)


def test_actions_are_mapped_affinely_to_minus_one_one_and_clipped():
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
    actions = np.array([[1.0, 0.25], [2.0, 0.0]])
    np.testing.assert_allclose(iql.scale_actions(actions, low, high), [[0.5, -0.5], [1 - 1e-5, -1 + 1e-5]])


def test_policy_normalizes_observations_and_maps_actions_back_to_the_env_bounds():
    actor = iql.Actor(2, 1, 8, 1, dropout=0.0, deterministic=True)
    seen = []
    actor.forward = lambda obs: (seen.append(obs), torch.full((len(obs), 1), 0.5))[1]
    stats = {"obs_mean": torch.tensor([1.0, 2.0]), "obs_std": torch.tensor([2.0, 4.0]),
             "action_low": torch.tensor([-2.0]), "action_high": torch.tensor([2.0])}  # fmt: skip
    action = iql.make_policy(actor, stats, torch.device("cpu"))(np.array([[3.0, 6.0]]))
    torch.testing.assert_close(seen[0], torch.tensor([[1.0, 1.0]]))  # (obs - mean) / std
    np.testing.assert_allclose(action, [[1.0]])  # 0.5 in [-1, 1] is 1.0 in [-2, 2]


def test_dict_observations_are_flattened_in_gymnasiums_flatten_order():
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-1, 1, (3,)), "achieved_goal": gym.spaces.Box(-1, 1, (2,))})
    samples = [space.sample() for _ in range(4)]
    stacked = {k: np.stack([s[k] for s in samples]) for k in space.spaces}
    np.testing.assert_allclose(iql.flatten(space, stacked), np.stack([gym.spaces.flatten(space, s) for s in samples]))


def test_pointmaze_dataset_flattening_matches_the_eval_env_wrapper(pointmaze):
    dataset = minari.load_dataset(pointmaze)
    episode = dataset[0]
    flat = iql.flatten(dataset.observation_space, episode.observations)
    assert flat.shape == (len(episode.rewards) + 1, gym.spaces.flatdim(dataset.observation_space))
    env = iql.make_eval_env(dataset)
    obs, _ = env.reset(seed=0)
    assert isinstance(env, gym.wrappers.FlattenObservation) and obs.shape == flat.shape[1:]
    raw = {k: v[0] for k, v in episode.observations.items()}
    np.testing.assert_allclose(flat[0], gym.spaces.flatten(env.env.observation_space, raw), rtol=1e-6)


def test_buffer_stores_each_observation_once_and_pairs_it_with_the_next_within_its_episode(pendulum):
    dataset = minari.load_dataset(pendulum)
    args = iql.Args(normalize_states=False)
    buffer, stats = iql.load_buffer(dataset, args, torch.device("cpu"))
    episodes = list(dataset.iterate_episodes())
    assert buffer.obs.shape[0] == dataset.total_steps + len(episodes)  # T + 1 rows per episode, no next_obs copy
    assert buffer.obs.dtype == torch.float32 and torch.equal(stats["obs_mean"], torch.zeros(3))
    first, second = episodes[0], episodes[1]
    n = len(first.rewards)
    torch.testing.assert_close(buffer.obs[: n + 1], torch.tensor(first.observations, dtype=torch.float32))
    torch.testing.assert_close(buffer.obs[n + 1 : n + 2], torch.tensor(second.observations[:1], dtype=torch.float32))
    np.testing.assert_array_equal(buffer.rows[:, n].numpy(), [n + 1, n + 2])  # episode 2 starts one row later
    scaled = iql.scale_actions(
        first.actions.astype(np.float32), stats["action_low"].numpy(), stats["action_high"].numpy()
    )
    torch.testing.assert_close(buffer.steps[:n, 0], torch.tensor(scaled[:, 0]))
    torch.testing.assert_close(buffer.steps[:n, 1], torch.tensor(first.rewards, dtype=torch.float32))
    assert not buffer.steps[:, 2].any() and first.truncations[-1]  # Pendulum only truncates: never done
    obs, actions, rewards, next_obs, dones = buffer.sample(64)
    rows = buffer.rows[:, torch.randint(len(buffer.steps), (64,), generator=torch.Generator().manual_seed(args.seed))]
    torch.testing.assert_close(obs, buffer.obs[rows[0]])
    torch.testing.assert_close(next_obs, buffer.obs[rows[0] + 1])
    assert actions.shape == (64, 1) and rewards.shape == (64,) and dones.shape == (64,)


def test_states_are_standardized_with_the_dataset_mean_and_std(pendulum):
    dataset = minari.load_dataset(pendulum)
    buffer, stats = iql.load_buffer(dataset, iql.Args(), torch.device("cpu"))
    raw = np.concatenate([ep.observations for ep in dataset.iterate_episodes()])
    torch.testing.assert_close(stats["obs_mean"], torch.tensor(raw.mean(0), dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["obs_std"], torch.tensor(raw.std(0) + 1e-3, dtype=torch.float32))
    expected = (raw - stats["obs_mean"].numpy()) / stats["obs_std"].numpy()
    torch.testing.assert_close(buffer.obs, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_an_infinite_action_is_refused_not_clipped_into_range(minari_root):
    """Actions are scaled and clipped to +-(1 - 1e-5) as they are read: the finiteness check must come first."""
    env = gym.make("Pendulum-v1")
    episodes, _ = rollout(env, lambda obs, rng: env.action_space.sample(), 2, seed=0)
    episodes[1].actions[4, 0] = np.inf
    minari.create_dataset_from_buffers("local/pendulum/infaction-v0", episodes, env=env, algorithm_name="random")
    with pytest.raises(iql.UserError, match="episode 1 has non-finite .* actions or rewards"):
        iql.load_buffer(minari.load_dataset("local/pendulum/infaction-v0"), iql.Args(), torch.device("cpu"))


# ---- the update step ------------------------------------------------------------------------------------
def build(**overrides):
    """A small IQL learner (hidden 16) as the script builds it, with fixed initial weights, and a fixed batch."""
    torch.manual_seed(0)
    args = iql.Args(hidden_dim=16, total_steps=4, **overrides)
    nets = iql.make_networks(args, 3, 2)
    opts = iql.make_optimizers(nets, args)
    batch = (
        torch.randn(64, 3),
        torch.rand(64, 2) * 2 - 1,
        torch.randn(64),
        torch.randn(64, 3),
        (torch.rand(64) < 0.2).float(),
    )
    return nets, opts, iql.make_update(nets, opts, args), batch


def test_one_update_equals_a_hand_written_iql_step_in_the_official_order():
    """V step; actor step with A = min target Q - V_new(s); Q step with target r + gamma (1 - d) V_new(s');
    Polyak. Written out with plain Adam on copies of the same networks."""
    nets, _, update, (s, a, r, s2, d) = build(expectile=0.8, beta=2.0, tau=0.1)
    ref = copy.deepcopy(nets)
    adam = {k: torch.optim.Adam(ref[k].parameters(), lr=3e-4) for k in ("value", "actor", "critic")}
    q_target = torch.minimum(*ref["target_critic"](s, a)).detach()
    u = q_target - ref["value"](s).squeeze(-1)
    v_loss = (torch.where(u > 0, 0.8, 0.2) * u**2).mean()
    adam["value"].zero_grad(), v_loss.backward(), adam["value"].step()
    with torch.no_grad():
        v, v_next = ref["value"](s).squeeze(-1), ref["value"](s2).squeeze(-1)
    std = ref["actor"].log_std.clamp(-5, 2).exp()
    log_prob = torch.distributions.Normal(ref["actor"](s), std).log_prob(a).sum(-1)
    actor_loss = -(torch.clamp(torch.exp(2.0 * (q_target - v)), max=100.0) * log_prob).mean()
    adam["actor"].zero_grad(), actor_loss.backward(), adam["actor"].step()
    q1, q2 = ref["critic"](s, a)
    y = r + 0.99 * (1 - d) * v_next
    critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    adam["critic"].zero_grad(), critic_loss.backward(), adam["critic"].step()
    for p_t, p in zip(ref["target_critic"].parameters(), ref["critic"].parameters(), strict=True):
        p_t.data = 0.9 * p_t.data + 0.1 * p.data

    metrics = update(s, a, r, s2, d)
    torch.testing.assert_close(metrics["losses/value_loss"], v_loss.detach())
    torch.testing.assert_close(metrics["losses/actor_loss"], actor_loss.detach())
    torch.testing.assert_close(metrics["losses/critic_loss"], critic_loss.detach())
    for name in nets:
        for (key, p), p_ref in zip(nets[name].state_dict().items(), ref[name].state_dict().values(), strict=True):
            torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_compiled_update_equals_eager_follows_the_cosine_schedule_and_never_recompiles():
    from torch._dynamo.utils import counters

    nets, opts, eager, batch = build()
    compiled_nets, compiled_opts, compiled, _ = build(compile=True)
    lrs = [float(compiled_opts["actor_opt"].param_groups[0]["lr"])]
    for step in range(4):  # T = 4 steps: lr 3e-4 * (1 + cos(pi t / T)) / 2
        m_eager, m_compiled = eager(*batch), compiled(*batch)
        lrs.append(float(compiled_opts["actor_opt"].param_groups[0]["lr"]))
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # a changing learning rate must not recompile
    assert lrs[0] == pytest.approx(3e-4) and lrs[2] == pytest.approx(1.5e-4) and lrs[4] == pytest.approx(0.0, abs=1e-12)
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-5, atol=1e-6)
    for name in nets:
        for p, q in zip(nets[name].parameters(), compiled_nets[name].parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_default_init_is_pytorchs_and_orthogonal_init_has_gain_sqrt2_on_every_layer(orthogonal):
    """Default: PyTorch's nn.Linear init, weights and biases uniform in +-1/sqrt(fan_in) (CORL); --orthogonal-init:
    the official code's orthogonal weights with gain sqrt 2 on every layer, output layers included, zero biases."""
    nets, *_ = build(orthogonal_init=orthogonal)
    for name in ("actor", "critic", "value"):
        layers = [m for m in nets[name].modules() if hasattr(m, "weight") and m.weight.dim() >= 2]
        assert len(layers) == 3, name  # 2 hidden + output
        for layer in layers:
            bias, fan_in = layer.bias.detach(), layer.weight.shape[-1 if isinstance(layer, torch.nn.Linear) else -2]
            for w in layer.weight.detach().view(-1, *layer.weight.shape[-2:]):
                if orthogonal:
                    w = w if w.shape[0] >= w.shape[1] else w.T  # columns orthonormal up to the gain
                    torch.testing.assert_close(w.T @ w, 2.0 * torch.eye(w.shape[1]), atol=1e-5, rtol=0)
                else:  # uniform in +-1/sqrt(fan_in): its std is 1/sqrt(3 fan_in)
                    assert w.abs().max() <= fan_in**-0.5 and w.std() == pytest.approx((3 * fan_in) ** -0.5, rel=0.3)
            assert (bias == 0).all() if orthogonal else (bias.abs().max() <= fan_in**-0.5 and (bias != 0).any())


BF16_ADVANTAGE_TOLERANCE = 0.05  # |A_bf16 - A_fp32| at Q, V ~ 100; bf16's spacing at 100 is 0.5


def test_bf16_keeps_advantages_and_awr_weights_close_to_float32_at_realistic_magnitudes():
    """Q and V around 100 (IQL after the locomotion scaling): with float32 output layers the advantage keeps
    float32 resolution; rounding Q and V to bfloat16 (the defect this guards against) would not."""
    nets, _, _, (s, a, *_) = build()
    with torch.no_grad():
        for net in (nets["target_critic"], nets["value"]):
            list(net.modules())[-1].bias.fill_(100.0)

    def advantage(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return nets["target_critic"](s, a).min(dim=0).values - nets["value"](s).squeeze(-1)

    exact, fast = advantage(False), advantage(True)
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # bf16 hidden layers really ran
    assert (fast - exact).abs().max() < BF16_ADVANTAGE_TOLERANCE
    ratio = iql.awr_weights(fast, beta=10.0) / iql.awr_weights(exact, beta=10.0)
    assert ratio.min() > 0.6 and ratio.max() < 1.65  # exp(10 * 0.05)
    with torch.no_grad():  # the same outputs rounded to bfloat16 after the fact miss the tolerance
        q, v = nets["target_critic"](s, a).min(dim=0).values, nets["value"](s).squeeze(-1)
    rounded = q.bfloat16().float() - v.bfloat16().float()
    assert (rounded - exact).abs().max() > BF16_ADVANTAGE_TOLERANCE


def test_bf16_update_stays_close_to_float32():
    *_, fp32, batch = build()
    *_, bf16, _ = build(bf16=True)
    m32, m16 = fp32(*batch), bf16(*batch)
    assert m16["losses/critic_loss"].item() != m32["losses/critic_loss"].item()  # bf16 really ran
    for k in ("losses/value_loss", "losses/critic_loss", "losses/actor_loss", "losses/q_mean"):
        assert m16[k].dtype == torch.float32
        rel = abs(m16[k].item() - m32[k].item()) / max(abs(m32[k].item()), 1e-3)
        assert rel < 0.02, (k, m16[k].item(), m32[k].item())


# ---- configuration ----------------------------------------------------------------------------------------
def test_precedence_is_defaults_then_domain_table_then_config_file_then_flags(tmp_path):
    config = tmp_path / "override.yaml"
    config.write_text("beta: 7.0\nlayer_norm: true\nexpectile: 0.8\n")
    args, ckpt = iql.parse_args(["--env", "door-human-v2", "--config", str(config), "--expectile", "0.6"])
    assert ckpt is None
    assert args.actor_dropout == 0.1  # Adroit's row of the table (the default is 0.0)
    assert args.beta == 7.0 and args.layer_norm  # the file overrides the table's 0.5
    assert args.expectile == 0.6  # the flag overrides the file
    assert args.critic_lr == iql.Args.critic_lr  # untouched fields keep the defaults


def test_the_example_override_file_is_valid():
    args, _ = iql.parse_args(
        ["--env", "local/x/y-v0", "--config", str(Path(iql.__file__).parent / "configs" / "example.yaml")]
    )
    assert args.layer_norm and args.total_steps == 500_000
