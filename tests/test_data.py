"""The shared block's data path, evaluation and configuration, tested on iql.py's copy (tools/shared_block.py keeps
every algorithm script's copy identical, and tests/test_shared_block.py runs it): D4RL-style names, rewards, actions,
flattening, the on-device buffer, standardization, the policy wrapper, evaluation and the precedence of settings."""

from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from local_datasets import Countdown, rollout

import iql


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
    args = iql.Args(normalize_reward=True)
    assert iql.reward_transform(np.array([10.0, 30.0]), args) == (50.0, 0.0)  # 1000 / (30 - 10)


def test_normalization_is_skipped_with_a_warning_when_every_return_is_the_same(capsys):
    args = iql.Args(normalize_reward=True, reward_scale=2.0, reward_bias=-1.0)
    for returns in (np.array([1000.0]), np.array([1000.0, 1000.0, 1000.0 + 1e-4])):  # one episode; all at the cap
        assert iql.reward_transform(returns, args) == (2.0, -1.0)
        assert "rewards are not normalized" in capsys.readouterr().out


def test_reward_scale_and_bias_apply_after_the_normalization():
    args = iql.Args(normalize_reward=True, reward_scale=10.0, reward_bias=-5.0)
    assert iql.reward_transform(np.array([0.0, 100.0]), args) == (100.0, -5.0)
    assert iql.reward_transform(np.array([0.0, 100.0]), iql.Args(reward_bias=-1.0)) == (1.0, -1.0)


def test_actions_are_mapped_affinely_to_minus_one_one_and_clipped():
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
    actions = np.array([[1.0, 0.25], [2.0, 0.0]])
    np.testing.assert_allclose(iql.scale_actions(actions, low, high), [[0.5, -0.5], [1 - 1e-5, -1 + 1e-5]])


def test_policy_normalizes_observations_and_maps_actions_back_to_the_env_bounds():
    actor = iql.Actor(2, 1, 8, 1, dropout=0.0, deterministic=True)
    seen = []
    actor.forward = lambda obs: (seen.append(obs), torch.full((len(obs), 1), 0.5))[1]
    stats = {
        "obs_mean": torch.tensor([1.0, 2.0]),
        "obs_std": torch.tensor([2.0, 4.0]),
        "action_low": torch.tensor([-2.0]),
        "action_high": torch.tensor([2.0]),
    }
    action = iql.numpy_policies(iql.Policy(actor, stats), stats, torch.device("cpu"))[""](np.array([[3.0, 6.0]]))
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
    assert buffer.obs.shape[0] == buffer.n_obs == dataset.total_steps + len(episodes)  # T + 1 rows per episode
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
    # every sampled transition is one of the dataset's: s' follows s in the same episode, with s's action and reward
    transitions = {
        (*ep.observations[t], *ep.observations[t + 1]): (float(ep.actions[t, 0]), float(ep.rewards[t]))
        for ep in episodes
        for t in range(len(ep.rewards))
    }
    batch = buffer.sample(256)
    obs, actions, rewards, next_obs, dones = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
    low, high = stats["action_low"].numpy(), stats["action_high"].numpy()
    for s, a, r, s2 in zip(obs.numpy(), actions.numpy(), rewards.numpy(), next_obs.numpy(), strict=True):
        key = (*s.astype(np.float64), *s2.astype(np.float64))
        assert key in transitions, "s' is not the observation after s in an episode"
        action, reward = transitions[key]
        assert iql.scale_actions(np.float32([action]), low, high)[0] == pytest.approx(a) and reward == pytest.approx(r)
    assert actions.shape == (256, 1) and rewards.shape == (256,) and dones.shape == (256,)


def test_states_are_standardized_with_the_dataset_mean_and_std(pendulum):
    dataset = minari.load_dataset(pendulum)
    buffer, stats = iql.load_buffer(dataset, iql.Args(), torch.device("cpu"))
    raw = np.concatenate([ep.observations for ep in dataset.iterate_episodes()])
    torch.testing.assert_close(stats["obs_mean"], torch.tensor(raw.mean(0), dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["obs_std"], torch.tensor(raw.std(0) + 1e-3, dtype=torch.float32))
    expected = (raw - stats["obs_mean"].numpy()) / stats["obs_std"].numpy()
    torch.testing.assert_close(buffer.obs, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_best_episodes_are_the_top_fraction_by_discounted_return_at_least_one():
    rewards = np.array([1.0, 1.0, 5.0, 0.0, 0.0, 3.0, 2.0, 2.0, 2.0])  # returns 2, 5, 3, 6 (gamma 1) in 4 episodes
    lengths = [2, 1, 3, 3]
    for fraction, best in [(1.0, [0, 1, 2, 3]), (0.75, [1, 2, 3]), (0.5, [1, 3]), (0.25, [3]), (0.01, [3])]:
        assert np.flatnonzero(iql.best_episodes(rewards, lengths, 1.0, fraction)).tolist() == best
    # discounted by 0.1: 1.1, 5, 0.03, 2.22, ranked by brute force as CORL's keep_best_trajectories does
    starts = [0, 2, 3, 6]
    returns = [sum(r * 0.1**t for t, r in enumerate(rewards[s : s + T])) for s, T in zip(starts, lengths, strict=True)]
    expected = sorted(np.argsort(returns)[::-1][:3])
    assert np.flatnonzero(iql.best_episodes(rewards, lengths, 0.1, 0.75)).tolist() == expected == [0, 1, 3]


def test_top_fraction_trains_on_the_best_episodes_with_their_own_state_statistics(pendulum):
    dataset = minari.load_dataset(pendulum)
    episodes = list(dataset.iterate_episodes())
    best = int(np.argmax([ep.rewards.sum() for ep in episodes]))  # 5 episodes, 0.2 of them: the best one
    buffer, stats = iql.load_buffer(dataset, iql.Args(top_fraction=0.2, discount=1.0), torch.device("cpu"))
    raw = episodes[best].observations
    torch.testing.assert_close(stats["obs_mean"], torch.tensor(raw.mean(0), dtype=torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["obs_std"], torch.tensor(raw.std(0) + 1e-3, dtype=torch.float32))
    first = sum(len(ep.rewards) for ep in episodes[:best])
    assert buffer.n_index == buffer.n_offline == len(episodes[best].rewards)
    np.testing.assert_array_equal(buffer.index[: buffer.n_index].numpy(), np.arange(first, first + buffer.n_index))
    assert set(buffer.draw(500).tolist()) <= set(range(first, first + buffer.n_index))


def test_an_infinite_action_is_refused_not_clipped_into_range(minari_root):
    """Actions are scaled and clipped to +-(1 - 1e-5) as they are read: the finiteness check must come first."""
    env = gym.make("Pendulum-v1")
    episodes, _ = rollout(env, lambda obs, rng: env.action_space.sample(), 2, seed=0)
    episodes[1].actions[4, 0] = np.inf
    minari.create_dataset_from_buffers("local/pendulum/infaction-v0", episodes, env=env, algorithm_name="random")
    with pytest.raises(iql.UserError, match="episode 1 has non-finite .* actions or rewards"):
        iql.load_buffer(minari.load_dataset("local/pendulum/infaction-v0"), iql.Args(), torch.device("cpu"))


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


@pytest.mark.parametrize("mode", [gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP])
def test_evaluate_counts_only_each_sub_envs_first_episode(mode):
    lengths = [3, 5, 2]
    envs = gym.vector.SyncVectorEnv(
        [lambda n=n, i=i: Countdown(n, truncate=i == 1) for i, n in enumerate(lengths)], autoreset_mode=mode
    )

    def policy(obs, rewards):
        return np.zeros((len(obs), 1), np.float32)

    returns, episode_lengths, success = iql.evaluate(envs, policy, [0, 1, 2])
    assert success is None  # these envs do not report success
    np.testing.assert_array_equal(episode_lengths, lengths)
    np.testing.assert_array_equal(returns, [n * (n + 1) / 2 for n in lengths])  # 1 + 2 + ... + n, once
