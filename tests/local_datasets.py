"""Small Minari datasets built locally (no network): Box, dict-observation and Adroit-door ones, plus a
dataset with a known behaviour policy for the learning tests. Episodes are assembled directly into
EpisodeBuffers, so neither minari[create] nor jax is needed."""

import gymnasium as gym
import gymnasium_robotics
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

gym.register_envs(gymnasium_robotics)


def rollout(env: gym.Env, policy, n_episodes: int, seed: int) -> tuple[list, np.ndarray]:
    """Run `policy(obs, rng)` for n episodes; returns EpisodeBuffers (T+1 observations) and episode returns."""
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    episodes, returns = [], []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        observations, actions, rewards, terms, truncs = [obs], [], [], [], []
        done = False
        while not done:
            action = policy(obs, rng)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terms.append(terminated)
            truncs.append(truncated)
            done = terminated or truncated
        if isinstance(observations[0], dict):
            stacked = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
        else:
            stacked = np.stack(observations)
        episodes.append(
            EpisodeBuffer(
                id=i,
                observations=stacked,
                actions=np.stack(actions),
                rewards=np.asarray(rewards, dtype=np.float64),
                terminations=np.asarray(terms),
                truncations=np.asarray(truncs),
                infos={},
            )
        )
        returns.append(float(np.sum(rewards)))
    return episodes, np.asarray(returns)


def random_policy(env: gym.Env):
    return lambda obs, rng: env.action_space.sample()


def make_dataset(dataset_id: str, env_id: str, n_episodes: int, policy=None, seed: int = 0, ref=None, **env_kwargs):
    """Record a dataset with `policy` (default random) and store it under `dataset_id`."""
    env = gym.make(env_id, **env_kwargs)
    episodes, returns = rollout(env, policy or random_policy(env), n_episodes, seed)
    ref_min, ref_max = ref if ref is not None else (None, None)
    minari.create_dataset_from_buffers(
        dataset_id,
        episodes,
        env=env,
        eval_env=env.spec,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        algorithm_name="test",
    )
    return returns


def inverted_pendulum_controller(noise: float):
    """A linear balancing controller on InvertedPendulum (obs: cart x, pole angle, velocities) plus Gaussian
    noise: the known behaviour policy of the learning tests."""
    gains = np.array([1.0, 20.0, 1.5, 3.0])

    def policy(obs, rng):
        return np.clip(gains @ obs + noise * rng.standard_normal(1), -3.0, 3.0).astype(np.float32)

    return policy


class Countdown(gym.Env):
    """Episodes of a fixed length ending in a termination or, with truncate, a time limit; the observation after step
    t is t and so is its reward, so a second episode would change the return."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, length: int = 3, truncate: bool = False):
        self.length, self.truncate = length, truncate

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        return np.full(1, self.t, np.float32), float(self.t), end and not self.truncate, end and self.truncate, {}


gym.register("LocalCountdown-v0", entry_point="local_datasets:Countdown")  # for in-process tests only
