"""The Decision Transformer: the segment sampler (episodes in proportion to their length, padding and masks, never
across episodes, returns-to-go at each step), the causal mask by perturbation, the loss by hand, the update step against
CORL's training step written out, the context policy's rolling window and the lockstep evaluation, the per-dataset
settings against CORL's configs, the exported policy file, and the refusals (fine-tuning among them)."""

import copy
import subprocess
import sys

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_compiled_equals_eager,
    assert_invalid,
    assert_same_networks,
    assert_user_error,
    compiled_and_eager_updates,
    run_script,
    script_checkpoint,
)
from local_datasets import Countdown
from minari.data_collector import EpisodeBuffer

import dt

CPU = torch.device("cpu")
LENGTHS = [3, 7, 12, 1, 5]  # 28 transitions


@pytest.fixture(scope="module")
def episodes(minari_root):
    """Episodes of LENGTHS: observation 100 k + t at step t of episode k, action t / 100, reward 1 + k."""
    buffers = []
    for k, length in enumerate(LENGTHS):
        t = np.arange(length)
        obs = np.float32(100 * k + np.arange(length + 1))[:, None]
        actions, rewards = np.float32(t / 100)[:, None], np.full(length, 1.0 + k)
        done = t == length - 1
        truncated = np.zeros(length, bool)
        episode = dict(observations=obs, actions=actions, rewards=rewards, terminations=done, truncations=truncated)
        buffers.append(EpisodeBuffer(id=k, **episode, infos={}))
    env = gym.make("LocalCountdown-v0")
    minari.create_dataset_from_buffers("local/countdown/segments-v0", buffers, env, algorithm_name="test")
    return minari.load_dataset("local/countdown/segments-v0")


# ---- the segment sampler --------------------------------------------------------------------------------
def test_segments_follow_one_episode_from_a_uniform_start_with_padding_masked(episodes):
    args = dt.Args(seq_len=4, normalize_states=False, reward_scale=0.5)
    buffer, _ = dt.load_buffer(episodes, args, CPU)
    batch = buffer.sample(5600)
    assert batch["obs"].shape == (5600, 4, 1) and batch["actions"].shape == (5600, 4, 1)
    assert batch["returns_to_go"].shape == batch["timesteps"].shape == batch["mask"].shape == (5600, 4)
    k, start = (batch["obs"][:, 0, 0] // 100).long(), (batch["obs"][:, 0, 0] % 100).long()
    length = torch.tensor(LENGTHS)[k, None]
    t = start[:, None] + torch.arange(4)
    real = t < length  # steps after the episode's end are padding: zeros, masked
    assert torch.equal(batch["mask"], real.float()) and torch.equal(batch["timesteps"], t)  # timesteps go on
    torch.testing.assert_close(batch["obs"][..., 0], torch.where(real, 100.0 * k[:, None] + t, 0.0))
    torch.testing.assert_close(batch["actions"][..., 0], torch.where(real, t / 100, 0.0))
    # the undiscounted return still to come from step t, times reward_scale
    torch.testing.assert_close(batch["returns_to_go"], torch.where(real, (length - t) * (1.0 + k[:, None]) * 0.5, 0.0))
    # every (episode, start) pair alike: episodes drawn in proportion to their length, the start uniform within one
    counts = np.bincount((100 * k + start).numpy(), minlength=500)
    cells = [100 * k + s for k, length in enumerate(LENGTHS) for s in range(length)]
    assert counts.sum() == counts[cells].sum()
    chi2 = ((counts[cells] - 200) ** 2 / 200).sum()  # 27 degrees of freedom: 60 is exceeded with p < 0.0003
    assert chi2 < 60, counts[cells]


def test_segments_come_from_the_kept_episodes_only(episodes):
    args = dt.Args(seq_len=3, normalize_states=False, top_fraction=0.2)  # the best of 5 by return: episode 2 (12 x 3)
    buffer, _ = dt.load_buffer(episodes, args, CPU)
    obs = buffer.sample(500)["obs"]
    assert set((obs[:, 0, 0] // 100).long().tolist()) == {2}


# ---- the transformer ------------------------------------------------------------------------------------
def window(batch: int, steps: int, obs_dim: int = 3, act_dim: int = 2, seed: int = 0) -> list:
    """Random states, actions in [-1, 1], returns-to-go and timesteps of `steps` consecutive steps."""
    g = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(100, (batch, 1), generator=g) + torch.arange(steps)
    return [
        torch.randn(batch, steps, obs_dim, generator=g),
        torch.rand(batch, steps, act_dim, generator=g) * 2 - 1,
        torch.randn(batch, steps, generator=g),
        timesteps,
    ]


def model(**overrides) -> dt.DecisionTransformer:
    torch.manual_seed(0)
    return dt.make_networks(dt.Args(**{"embedding_dim": 16, "num_heads": 2, "seq_len": 6, **overrides}), 3, 2)["actor"]


@pytest.mark.parametrize("token", ["return_to_go", "state", "action"])
def test_a_prediction_never_sees_a_later_token(token):
    """Perturb R_j, s_j or a_j: the actions predicted before it (a_j's own prediction, at s_j, for a_j) stay the same
    to the last bit, the later ones change. So padding after an episode's end never reaches a real step."""
    net = model().eval()
    inputs = window(4, 6)
    which = {"return_to_go": 2, "state": 0, "action": 1}[token]
    with torch.no_grad():
        base = net.predict(*inputs)
        for j in range(6):
            perturbed = [x.clone() for x in inputs]
            perturbed[which][:, j] += 1.0
            out = net.predict(*perturbed)
            first_seen = j + 1 if token == "action" else j
            assert torch.equal(out[:, :first_seen], base[:, :first_seen]), (token, j)
            if first_seen < 6:
                assert not torch.allclose(out[:, first_seen], base[:, first_seen]), (token, j)


def test_the_network_is_corls_gpt_with_its_initialization():
    net = model(embedding_dim=128, num_heads=1, seq_len=20)
    assert len(net.blocks) == 3 and net.timestep_emb.num_embeddings == 1000 + 20
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert abs(net.state_emb.weight.std().item() - 0.02) < 0.002  # GPT-2's N(0, 0.02)
    qkv = net.blocks[0].attention.qkv.weight  # nn.MultiheadAttention's xavier_uniform in_proj, CORL's init skips it
    assert qkv.shape == (384, 128) and qkv.abs().max() <= (6 / (128 + 384)) ** 0.5
    assert qkv.abs().max() > 0.09
    assert net.predict(*window(2, 20, seed=1)).abs().max() <= 1.0


def test_timesteps_beyond_the_embeddings_share_the_last_one():
    net = model(episode_len=10).eval()  # 16 embeddings
    inputs = window(2, 3)
    late, last = [*inputs[:3], inputs[3] * 0 + 500], [*inputs[:3], inputs[3] * 0 + 15]
    with torch.no_grad():
        assert torch.equal(net.predict(*late), net.predict(*last))


# ---- the loss and the update step -----------------------------------------------------------------------
def test_loss_is_the_masked_squared_error_averaged_over_every_step_and_dimension():
    predicted = torch.tensor([[[0.5, 0.0], [1.0, -1.0]], [[0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # the second step of the first segment is padding
    assert dt.dt_loss(predicted, torch.zeros(2, 2, 2), mask).item() == pytest.approx((0.25 + 1.0) / 8)


def segment_batch(batch: int = 8, steps: int = 6) -> dict:
    states, actions, returns_to_go, timesteps = window(batch, steps)
    mask = (torch.arange(steps) < torch.randint(1, steps + 1, (batch, 1), generator=torch.Generator())).float()
    return {"obs": states, "actions": actions, "returns_to_go": returns_to_go, "timesteps": timesteps, "mask": mask}


def test_updates_equal_corls_training_steps():
    """CORL's loop: predicted actions, the masked F.mse_loss, zero_grad, backward, clip_grad_norm_ 0.25, AdamW step,
    LambdaLR warm-up step; compared over the first steps of a 3-step warm-up (dropout off: the same numbers)."""
    no_dropout = dict(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0)
    args = dt.Args(embedding_dim=16, num_heads=2, seq_len=6, learning_rate=1e-3, warmup_steps=3, **no_dropout)
    torch.manual_seed(0)
    nets = dt.make_networks(args, 3, 2)
    ref = copy.deepcopy(nets)
    opts = dt.make_optimizers(nets, args)
    update = dt.make_update(nets, opts, args)
    opt = torch.optim.AdamW(ref["actor"].parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda steps: min((steps + 1) / 3, 1))
    batch = segment_batch()
    for step in range(1, 6):
        predicted = ref["actor"].predict(batch["obs"], batch["actions"], batch["returns_to_go"], batch["timesteps"])
        loss = (F.mse_loss(predicted, batch["actions"], reduction="none") * batch["mask"][..., None]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref["actor"].parameters(), 0.25)
        opt.step()
        scheduler.step()
        metrics = update(batch, step)
        torch.testing.assert_close(metrics["losses/actor_loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert float(opts["actor_opt"].param_groups[0]["lr"]) == pytest.approx(scheduler.get_last_lr()[0])
    # the attention's key bias has no effect (softmax ignores a constant per query): its gradient, 1e-11 of float noise,
    # becomes AdamW steps of random sign that the fused and the reference AdamW round differently (1.5e-6 in 5 steps)
    assert_same_networks(nets, ref, rtol=1e-4, atol=1e-5)


def test_bf16_update_stays_close_to_float32():
    batch = segment_batch()
    losses = {}
    for bf16 in (False, True):
        args = dt.Args(embedding_dim=16, seq_len=6, bf16=bf16, embedding_dropout=0.0)
        torch.manual_seed(0)
        nets = dt.make_networks(args, 3, 2)
        losses[bf16] = dt.make_update(nets, dt.make_optimizers(nets, args), args)(batch, 1)["losses/actor_loss"]
    assert losses[True].dtype == torch.float32 and losses[True].item() != losses[False].item()
    assert abs(losses[True].item() - losses[False].item()) < 0.03 * losses[False].item()


# ---- acting: the context policy and the lockstep evaluation ---------------------------------------------
class Recorder(torch.nn.Module):
    """An actor that records the windows it is given and returns 0.1 x the last timestep (clamped to [-1, 1])."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, states, actions, returns_to_go, timesteps):
        self.seen.append([x.clone() for x in (states, actions, returns_to_go, timesteps)])
        return (0.1 * timesteps[:, -1:]).float().clamp(max=1.0)


STATS = {"obs_mean": torch.zeros(1), "obs_std": torch.ones(1), "action_low": torch.full((1,), -2.0)}
STATS["action_high"] = torch.full((1,), 2.0)


def test_the_context_policy_rolls_each_episodes_last_seq_len_steps_and_restarts_with_a_new_episode():
    actor = Recorder()
    policy = dt.Policy(actor, STATS)
    act = dt.context_policy(policy, 10.0, 3, 1, CPU)
    rewards = np.array([1.0, 2.0])
    returned = [act(np.array([[0.0], [100.0]]))]
    for t in range(1, 8):
        returned.append(act(np.array([[t], [100.0 + t]]), rewards))
    for t, (states, actions, returns_to_go, timesteps) in enumerate(actor.seen):
        steps = torch.arange(max(0, t - 2), t + 1)  # at most the last 3
        assert torch.equal(timesteps, steps.repeat(2, 1))
        assert torch.equal(states[..., 0], torch.stack([steps, 100 + steps]).float())
        torch.testing.assert_close(
            returns_to_go, 10.0 - torch.tensor([[1.0], [2.0]]) * steps
        )  # target - rewards so far
        taken = (
            torch.tensor(np.stack(returned)[steps[:-1].numpy(), :, 0].T) / 2
        )  # the actions returned, in the actor's [-1, 1]
        torch.testing.assert_close(actions[:, :-1, 0], taken)
        assert torch.equal(actions[:, -1], torch.zeros(2, 1))  # a placeholder for the action being chosen
    np.testing.assert_allclose(returned[-1], [[1.4], [1.4]])  # 0.1 x timestep 7, in [-2, 2]
    act(np.array([[5.0], [6.0]]))  # no rewards: new episodes, a new window
    assert actor.seen[-1][0].shape == (2, 1, 1) and torch.equal(actor.seen[-1][3], torch.zeros(2, 1, dtype=torch.long))


def test_evaluation_steps_every_episode_together_with_one_batched_forward_per_step():
    net = dt.make_networks(dt.Args(embedding_dim=16, seq_len=6, target_returns=(4.0, 2.0)), 1, 1)["actor"].eval()
    calls = []
    net.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    acts = dt.numpy_policies(dt.Policy(net, STATS), STATS, CPU)
    assert list(acts) == ["target_4", "target_2"]  # the first is the run's score
    envs = gym.vector.SyncVectorEnv([lambda n=n: Countdown(n) for n in (3, 5, 2)])
    returns, lengths, _ = dt.evaluate(envs, acts["target_4"], [0, 1, 2])
    assert calls == [3] * 5  # one forward of all 3 episodes per step, until the longest ends
    np.testing.assert_array_equal(lengths, [3, 5, 2])
    np.testing.assert_array_equal(returns, [6, 15, 3])


def test_without_target_returns_the_evaluation_conditions_on_the_best_episode_and_half_of_it():
    net = model()
    stats = {**STATS, "best_return": 300.0}
    assert list(net.numpy_policies(dt.Policy(net, stats), stats, CPU)) == ["target_300", "target_150"]


# ---- settings and refusals ------------------------------------------------------------------------------
# CORL's configs/offline/dt/<env>/<dataset>.yaml (batch_size, learning_rate, reward_scale, eval_every, eval_episodes,
# target_returns; every other key the same in every file)
CORL = {
    "hopper-medium-v0": dict(batch_size=4096, learning_rate=8e-4, reward_scale=0.001, target_returns=(3600.0, 1800.0)),
    "halfcheetah-expert-v0": dict(batch_size=4096, reward_scale=0.001, target_returns=(12000.0, 6000.0)),
    "walker2d-simple-v0": dict(eval_every=5000, eval_episodes=100, target_returns=(5000.0, 2500.0)),
    "door-human-v2": dict(batch_size=4096, learning_rate=8e-4, reward_scale=1.0, target_returns=(2900.0, 1450.0)),
    "relocate-cloned-v2": dict(target_returns=(4300.0, 2150.0)),
    "antmaze-umaze-v1": dict(batch_size=64, learning_rate=1e-4, reward_scale=1.0, eval_every=10_000,
                             target_returns=(1.0, 0.5)),
    "antmaze-medium-diverse-v1": dict(target_returns=(1.0, 0.5, 0.25, 0.125, 0.06, 0.03)),
    "maze2d-large-v1": dict(batch_size=4096, reward_scale=1.0, target_returns=(280.0, 140.0)),
}  # fmt: skip
EVERY_DATASET = dict(
    embedding_dim=128, num_layers=3, num_heads=1, seq_len=20, episode_len=1000, attention_dropout=0.1,
    residual_dropout=0.1, embedding_dropout=0.1, weight_decay=1e-4, warmup_steps=10_000, clip_grad=0.25, discount=1.0,
    eval_episodes=100, total_steps=100_000,
)  # fmt: skip


@pytest.mark.parametrize("env", CORL)
def test_per_dataset_settings_are_corls(env):
    args, _ = dt.parse_args(["--env", env])
    assert {k: getattr(args, k) for k in CORL[env]} == CORL[env]
    assert {k: getattr(args, k) for k in EVERY_DATASET} == EVERY_DATASET


def test_a_config_file_and_flags_set_the_target_returns(tmp_path):
    config = tmp_path / "targets.yaml"
    config.write_text("target_returns: [500, 250.5]\n")
    assert dt.parse_args(["--env", "local/x/y-v0", "--config", str(config)])[0].target_returns == (500.0, 250.5)
    assert dt.parse_args(["--env", "hopper-medium-v0", "--target-returns", "900"])[0].target_returns == (900.0,)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(embedding_dim=10, num_heads=3), "embedding_dim must be a multiple of num_heads"),
        (dict(seq_len=0), "seq_len and episode_len must be >= 1"),
        (dict(residual_dropout=1.0), "dropouts must be in [0, 1)"),
        (dict(warmup_steps=0), "warmup_steps must be > 0"),
        (dict(normalize_reward=True), "scaled by reward_scale > 0 alone"),
        (dict(reward_bias=-1.0), "scaled by reward_scale > 0 alone"),
        (dict(online_steps=10), "dt.py does not fine-tune online"),
        (dict(mixing_ratio=0.5), "dt.py does not fine-tune online"),
    ],
)
def test_out_of_range_values_and_fine_tuning_are_refused(flags, message):
    assert_invalid(dt, flags, message)


def test_online_steps_are_refused_on_the_command_line_before_any_data_is_read(pendulum):
    assert_user_error(run_script("dt.py", "--env", pendulum, "--online-steps", "10"), "does not fine-tune online")


# ---- the exported policy --------------------------------------------------------------------------------
DRIVE = """
import json, sys, gymnasium as gym, numpy, torch
extra = {"policy.json": ""}
policy = torch.export.load(sys.argv[1], extra_files=extra).module()
info = json.loads(extra["policy.json"])  # seq_len and the target returns, the first the run's score
env = gym.make("Pendulum-v1")
obs, _ = env.reset(seed=0)
states, actions, returns_to_go, timesteps, taken = [obs], [], [info["target_returns"][0]], [0], []
window = lambda x: torch.tensor(numpy.array(x[-info["seq_len"]:]), dtype=torch.float32)[None]
for t in range(30):
    action = policy(window(states), window(actions + [[0.0]]), window(returns_to_go),
                    torch.tensor(timesteps[-info["seq_len"]:])[None]).detach().numpy()[0]
    obs, reward, *_ = env.step(action)
    taken.append(action)
    states.append(obs); actions.append(action); returns_to_go.append(returns_to_go[-1] - reward)
    timesteps.append(t + 1)
numpy.save(sys.argv[2], numpy.array(taken))
"""


def assert_recorded_by(dataset: minari.MinariDataset, act) -> None:
    """Each recorded action is act's on the episode's observations and rewards so far."""
    for episode in dataset.iterate_episodes():
        rewards = [None, *(np.array([r]) for r in episode.rewards[:-1])]
        expected = [act(obs[None], r)[0] for obs, r in zip(episode.observations[:-1], rewards, strict=True)]
        np.testing.assert_allclose(episode.actions, expected, rtol=1e-5, atol=1e-5)


def test_the_exported_policy_takes_the_window_and_drives_the_env_from_an_empty_folder(tmp_path):
    """policy.py export, then a process in an empty folder without the repository (python -I) rolls the window of
    the last 5 steps itself, at the target the file names: its actions are those of the script's own context policy
    on the same episode. collect.py records with the file, its actions the checkpoint's."""
    policy = script_checkpoint("dt", tmp_path / "c.pt", 3, low=[-2.0], high=[2.0], target_returns=(-300.0, -100.0))
    result = run_script("policy.py", "export", tmp_path / "c.pt", tmp_path / "policy.pt2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "actions match" in result.stdout and "Warning" not in result.stdout + result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "drive.py").write_text(DRIVE)
    cmd = [sys.executable, "-I", "drive.py", str(tmp_path / "policy.pt2"), "actions.npy"]
    run = subprocess.run(cmd, cwd=empty, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    act = dt.numpy_policies(policy.eval(), {}, CPU)["target_-300"]
    env = gym.make("Pendulum-v1")
    obs, rewards, expected = env.reset(seed=0)[0], None, []
    for _ in range(30):
        expected.append(act(obs[None], rewards)[0])
        obs, reward, *_ = env.step(expected[-1])
        rewards = np.array([reward])
    np.testing.assert_allclose(np.load(empty / "actions.npy"), np.array(expected), rtol=1e-5, atol=1e-5)
    import collect

    argv = ["--policy", "checkpoint", "--checkpoint", tmp_path / "policy.pt2", "--env", "Pendulum-v1"]
    argv += ["--episodes", 2, "--ref-episodes", 1, "--dataset-id", "local/pendulum/dt-file-v0"]
    assert_recorded_by(collect.main([str(a) for a in argv]), act)


def test_collect_records_with_a_checkpoint_that_keeps_each_episodes_context(pendulum, tmp_path):
    """collect.py --policy checkpoint: each recorded action is the context policy's on the episode's steps so far."""
    import collect

    policy = script_checkpoint("dt", tmp_path / "c.pt", 3, low=[-2.0], high=[2.0], target_returns=(-300.0,))
    argv = ["--policy", "checkpoint", "--checkpoint", tmp_path / "c.pt", "--episodes", 2, "--ref-episodes", 1]
    dataset = collect.main([str(a) for a in [*argv, "--dataset-id", "local/pendulum/dt-v0"]])
    assert_recorded_by(dataset, dt.numpy_policies(policy.eval(), {}, CPU)["target_-300"])


def test_compiled_update_equals_the_eager_one_and_compiles_once():
    """--compile: the same steps (dropout off), one graph for every step (the warm-up's learning rate is a tensor)."""

    def build(compile: bool):
        no_dropout = dict(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0)
        args = dt.Args(embedding_dim=16, num_layers=1, seq_len=6, warmup_steps=3, compile=compile, **no_dropout)
        torch.manual_seed(0)
        nets = dt.make_networks(args, 3, 2)
        return args, nets, dt.make_update(nets, dt.make_optimizers(nets, args), args), segment_batch()

    runs = compiled_and_eager_updates(build)
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] == graphs[6], graphs
    assert_compiled_equals_eager(runs)
