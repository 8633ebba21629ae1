"""CQL's penalty, importance weights, backups and multipliers against brute-force computations; every flag
changes what it claims to; end-to-end runs; and a learning test."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cql  # noqa: E402

OBS, ACT, B = 3, 2, 5


def tiny_critic(seed=0, n_hidden=1):
    torch.manual_seed(seed)
    return cql.TwinQ(OBS, ACT, 8, n_hidden, layer_norm=False)


def random_distribution(states=2 * B, seed=0):
    """mean and log-std of pi(.|s) for B states followed by pi(.|s') for their B next states."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(states, ACT, generator=g), 0.5 * torch.randn(states, ACT, generator=g) - 0.5


def q_one(critic, i, obs, action) -> float:
    """Critic i at a single (s, a), as a plain float64 number."""
    with torch.no_grad():
        return float(critic(obs[None], action[None])[i, 0].double())


# ---- the conservative penalty ---------------------------------------------------------------------------
@pytest.mark.parametrize("temp, clip", [(1.0, (-math.inf, math.inf)), (0.5, (-math.inf, math.inf)), (2.0, (-0.3, 0.4))])
def test_penalty_matches_bruteforce_logsumexp(temp, clip):
    """cql_penalty == mean over states of clip(T log sum_j exp((Q(s, a_j) - log mu(a_j)) / T) - Q(s, a_data)),
    computed here one state, one critic and one action at a time in float64."""
    critic, n = tiny_critic(), 3
    obs, data_actions = torch.randn(B, OBS), torch.rand(B, ACT) * 2 - 1
    torch.manual_seed(1)
    proposals, log_density = cql.ood_actions(*random_distribution(), n)
    with torch.no_grad():
        q_all = critic(obs, torch.cat([data_actions[None], proposals]))
        gap = cql.cql_penalty(q_all[:, 1:], log_density, q_all[:, 0], temp, *clip)
    for i in range(2):
        per_state = []
        for s in range(B):
            x = np.array([(q_one(critic, i, obs[s], proposals[j, s]) - float(log_density[j, s])) / temp
                          for j in range(3 * n)])  # fmt: skip
            lse = x.max() + math.log(np.exp(x - x.max()).sum())
            per_state.append(np.clip(temp * lse - q_one(critic, i, obs[s], data_actions[s]), *clip))
        assert gap[i].item() == pytest.approx(np.mean(per_state), rel=1e-5, abs=1e-6)


def test_penalty_gradient_lowers_ood_q_and_raises_data_q():
    """d penalty / d Q(s, a_data) = -1/B (pushed up); d penalty / d Q(s, a_ood) = softmax weights / B > 0."""
    q_ood, q_data = torch.randn(2, 6, B, requires_grad=True), torch.randn(2, B, requires_grad=True)
    cql.cql_penalty(q_ood, torch.zeros(6, B), q_data, 1.0, -math.inf, math.inf).sum().backward()
    torch.testing.assert_close(q_data.grad, torch.full((2, B), -1.0 / B))
    assert (q_ood.grad > 0).all()
    torch.testing.assert_close(q_ood.grad.sum(dim=1), torch.full((2, B), 1.0 / B))


# ---- importance weights: the proposals' log-densities ---------------------------------------------------
def test_importance_weights_are_the_log_densities_of_uniform_and_policy_proposals():
    n = 4
    mean, log_std = random_distribution()
    torch.manual_seed(0)
    actions, log_density = cql.ood_actions(mean, log_std, n)
    assert actions.shape == (3 * n, B, ACT) and log_density.shape == (3 * n, B)
    uniform, from_s, from_next = actions.split(n), log_density.split(n)[1], log_density.split(n)[2]
    assert (uniform[0].abs() <= 1).all() and uniform[0].std() > 0.3  # spread over [-1, 1]^|A|
    torch.testing.assert_close(log_density[:n], torch.full((n, B), ACT * math.log(0.5)))  # log 0.5^|A|

    def tanh_normal(m, ls):
        base = torch.distributions.Normal(m.double(), ls.double().exp())
        return torch.distributions.TransformedDistribution(base, torch.distributions.TanhTransform())

    # pi(.|s) samples carry log pi(a|s), pi(.|s') samples log pi(a|s') (as in the reference code)
    expected_s = tanh_normal(mean[:B], log_std[:B]).log_prob(actions[n : 2 * n].double()).sum(-1)
    expected_next = tanh_normal(mean[B:], log_std[B:]).log_prob(actions[2 * n :].double()).sum(-1)
    torch.testing.assert_close(from_s.double(), expected_s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_next.double(), expected_next, rtol=1e-4, atol=1e-4)


def test_tanh_gaussian_log_prob_of_given_actions_matches_torch_distributions():
    mean, log_std = random_distribution(B)
    actions = torch.rand(B, ACT) * 1.8 - 0.9
    base = torch.distributions.Normal(mean.double(), log_std.double().exp())
    ref = torch.distributions.TransformedDistribution(base, torch.distributions.TanhTransform())
    torch.testing.assert_close(
        cql.log_prob(mean, log_std, actions).double(), ref.log_prob(actions.double()).sum(-1), rtol=1e-4, atol=1e-4
    )
    edge = torch.full((1, ACT), 1 - 1e-5)  # dataset actions are clipped to +-(1 - 1e-5): finite log-likelihood
    assert torch.isfinite(cql.log_prob(mean[:1], log_std[:1], edge)).all()


def test_sampled_actions_are_reparameterized_and_squashed():
    mean, log_std = random_distribution(B)
    mean.requires_grad_(True)
    actions, log_pi = cql.sample_actions(mean, log_std, 7)
    assert actions.shape == (7, B, ACT) and log_pi.shape == (7, B) and (actions.abs() < 1).all()
    actions.sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0


def test_actor_log_std_is_clamped():
    actor = cql.Actor(OBS, ACT, 8, 1)
    with torch.no_grad():
        actor.net[-1].bias[ACT:] = 100.0
    assert (actor.distribution(torch.randn(4, OBS))[1] == cql.LOG_STD_MAX).all()


# ---- the Lagrange multiplier and the entropy temperature ------------------------------------------------
@pytest.mark.parametrize("gap, direction", [(2.0, +1), (0.2, -1)])
def test_lagrange_multiplier_grows_when_gap_above_target_and_shrinks_below(gap, direction):
    log_alpha_prime = cql.Scalar(0.0)
    assert log_alpha_prime().exp().item() == 1.0  # alpha' starts at 1
    opt = torch.optim.Adam(log_alpha_prime.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        cql.lagrange_loss(log_alpha_prime(), torch.tensor([gap, gap]), cql_alpha=5.0, target_gap=0.8).backward()
        opt.step()
    assert direction * log_alpha_prime().item() > 0.3


def test_lagrange_multiplier_is_clamped_and_does_not_move_the_critics():
    gap = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = cql.lagrange_loss(torch.tensor(20.0), gap, cql_alpha=1.0, target_gap=0.0)  # exp(20) > 1e6
    assert loss.item() == pytest.approx(-1e6 * 2.0)
    assert not loss.requires_grad  # the gap enters detached: no gradient reaches the critics


@pytest.mark.parametrize("entropy, direction", [(-3.0, +1), (1.0, -1)])
def test_entropy_tuning_raises_alpha_when_entropy_below_target_and_lowers_it_above(entropy, direction):
    log_alpha = cql.Scalar(0.0)
    opt = torch.optim.Adam(log_alpha.parameters(), lr=0.1)
    log_pi = torch.full((B,), -entropy)  # entropy = -E[log pi]; target entropy -|A| = -2
    for _ in range(5):
        opt.zero_grad()
        cql.alpha_loss(log_alpha(), log_pi, target_entropy=-float(ACT)).backward()
        opt.step()
    assert direction * log_alpha().item() > 0.3


def test_policy_loss_is_alpha_log_pi_minus_q():
    alpha, log_pi, q = torch.tensor(0.5), torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert cql.policy_loss(alpha, log_pi, q).item() == pytest.approx(((-0.5 - 3.0) + (1.0 - 1.0)) / 2)


# ---- the TD backup --------------------------------------------------------------------------------------
def test_max_backup_equals_bruteforce_max_over_sampled_actions_of_min_over_critics():
    critic, n = tiny_critic(seed=3), 6
    next_obs = torch.randn(B, OBS)
    mean, log_std = random_distribution(B)
    torch.manual_seed(0)
    actions, log_pi = cql.sample_actions(mean, log_std, n)
    with torch.no_grad():
        value, chosen_log_pi = cql.max_target_backup(critic(next_obs, actions), log_pi)
    for s in range(B):
        mins = [min(q_one(critic, 0, next_obs[s], actions[j, s]), q_one(critic, 1, next_obs[s], actions[j, s]))
                for j in range(n)]  # fmt: skip
        assert value[s].item() == pytest.approx(max(mins), rel=1e-5)
        assert chosen_log_pi[s].item() == log_pi[int(np.argmax(mins)), s].item()
    with torch.no_grad():  # one sampled action: SAC's min-of-two backup
        one, _ = cql.max_target_backup(critic(next_obs, actions[:1]), log_pi[:1])
        torch.testing.assert_close(one, critic(next_obs, actions[0]).min(dim=0).values)


def test_td_loss_sums_the_two_critics_mse():
    q, target = torch.tensor([[1.0, 0.0], [2.0, 0.5]]), torch.tensor([2.8, 0.5])
    expected = ((1.0 - 2.8) ** 2 + 0.5**2) / 2 + ((2.0 - 2.8) ** 2 + 0.0) / 2
    assert cql.td_loss(q, target).item() == pytest.approx(expected)


def test_twin_q_with_k_actions_per_state_equals_k_separate_calls():
    critic = tiny_critic(n_hidden=2)
    obs, actions = torch.randn(B, OBS), torch.randn(4, B, ACT)
    q = critic(obs, actions)
    assert q.shape == (2, 4, B)
    for k in range(4):
        torch.testing.assert_close(q[:, k], critic(obs, actions[k]))


# ---- every flag changes the computation -----------------------------------------------------------------
SMALL = dict(hidden_dim=16, actor_n_hidden=2, critic_n_hidden=2, cql_n_actions=3)


def build(**overrides):
    args = cql.Args(**{**SMALL, **overrides})
    torch.manual_seed(0)
    nets = cql.make_networks(args, OBS, ACT)
    return args, nets, cql.make_update(nets, cql.make_optimizers(nets, args), args)


def fixed_batch(batch=32):
    g = torch.Generator().manual_seed(42)
    obs, next_obs = torch.randn(batch, OBS, generator=g), torch.randn(batch, OBS, generator=g)
    actions = (torch.rand(batch, ACT, generator=g) * 2 - 1).clamp(-1 + 1e-5, 1 - 1e-5)
    rewards, dones = torch.randn(batch, generator=g), (torch.rand(batch, generator=g) < 0.2).float()
    return obs, actions, rewards, next_obs, dones


def losses(bc_phase=False, steps=1, **overrides):
    """The diagnostics of the last of `steps` updates on a fixed batch with fixed sampling noise."""
    _, _, update = build(**overrides)
    torch.manual_seed(1)
    for _ in range(steps):
        metrics = update(*fixed_batch(), bc_phase=bc_phase)
    return {k: v.item() for k, v in metrics.items()}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_critic_depth_changes_both_critics_identically():
    for depth in (1, 2, 5):
        _, nets, _ = build(critic_n_hidden=depth)
        linears = [m for m in nets["critic"].net if isinstance(m, cql.BatchedLinear)]
        assert len(linears) == depth + 1 and all(m.weight.shape[0] == 2 for m in linears)  # 2 members per layer
        single = cql.mlp(OBS + ACT, 1, SMALL["hidden_dim"], depth)  # one critic written as a plain MLP
        assert n_params(nets["critic"]) == 2 * n_params(single) == n_params(nets["target_critic"])
    _, nets, _ = build(actor_n_hidden=4)
    assert len([m for m in nets["actor"].net if isinstance(m, torch.nn.Linear)]) == 5


def test_orthogonal_init_changes_the_initial_weights_of_actor_and_critics():
    _, ortho, _ = build(orthogonal_init=True)
    _, plain, _ = build(orthogonal_init=False)
    for name in ("actor", "critic"):
        assert not torch.equal(ortho[name].net[0].weight, plain[name].net[0].weight)
    s = torch.linalg.svdvals(ortho["actor"].net[2].weight)  # hidden layers: orthogonal with gain sqrt 2
    torch.testing.assert_close(s, torch.full_like(s, math.sqrt(2)))
    for member in ortho["critic"].net[2].weight:
        s = torch.linalg.svdvals(member)
        torch.testing.assert_close(s, torch.full_like(s, math.sqrt(2)))
    torch.testing.assert_close(ortho["target_critic"].net[0].weight, ortho["critic"].net[0].weight)


def test_layer_norm_adds_a_norm_to_every_critic_hidden_layer():
    _, nets, _ = build(layer_norm=True, critic_n_hidden=3)
    assert len([m for m in nets["critic"].net if isinstance(m, cql.BatchedLayerNorm)]) == 3


def test_cql_lagrange_changes_the_loss_and_moves_alpha_prime():
    base = losses()
    lagrange = losses(cql_lagrange=True, cql_target_action_gap=0.5)
    assert lagrange["losses/cql_penalty"] != pytest.approx(base["losses/cql_penalty"])
    assert lagrange["losses/alpha_prime_loss"] != 0.0 and base["losses/alpha_prime_loss"] == 0.0
    _, nets, update = build(cql_lagrange=True, cql_target_action_gap=0.5)
    update(*fixed_batch())
    assert nets["log_alpha_prime"]().item() != 0.0
    _, nets, update = build()
    update(*fixed_batch())
    assert nets["log_alpha_prime"]().item() == 0.0


def test_max_target_backup_and_backup_entropy_change_the_td_target():
    base = losses()
    assert losses(cql_max_target_backup=True)["losses/q_target"] != pytest.approx(base["losses/q_target"])
    assert losses(backup_entropy=True)["losses/q_target"] != pytest.approx(base["losses/q_target"])


def test_bc_phase_trains_the_actor_on_dataset_log_likelihood():
    base, bc = losses(), losses(bc_phase=True)
    assert bc["losses/actor_loss"] != pytest.approx(base["losses/actor_loss"])
    assert bc["losses/td_loss"] == pytest.approx(base["losses/td_loss"])  # the critics' losses are unchanged
    # and the actor loss is alpha log pi - log pi(a_data|s), recomputed here
    args, nets, _ = build()
    obs, actions = fixed_batch()[:2]
    torch.manual_seed(1)
    mean, log_std = nets["actor"].distribution(torch.cat([obs, fixed_batch()[3]]))
    _, log_pi = cql.sample_actions(mean[:32], log_std[:32], 1)
    expected = (log_pi[0] - cql.log_prob(mean[:32], log_std[:32], actions)).mean()  # alpha = 1 at the start
    assert bc["losses/actor_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_fixed_alpha_is_used_and_never_tuned():
    fixed = losses(autotune=False, alpha=0.2, steps=3)
    assert fixed["losses/alpha"] == pytest.approx(0.2) and fixed["losses/alpha_loss"] == 0.0
    tuned = losses(alpha=0.2, steps=3)
    assert tuned["losses/alpha"] != pytest.approx(0.2)  # the initial value, then tuned
    assert losses(autotune=False, alpha=0.5)["losses/actor_loss"] != pytest.approx(fixed["losses/actor_loss"])
    # log alpha = 0 on the first step makes the alpha loss 0 there: compare on the second
    assert losses(target_entropy=3.0, steps=2)["losses/alpha"] != pytest.approx(losses(steps=2)["losses/alpha"])


def test_cql_temp_alpha_and_n_actions_change_the_penalty():
    base = losses()
    for flag in (dict(cql_temp=0.3), dict(cql_alpha=1.0), dict(cql_n_actions=5)):
        assert losses(**flag)["losses/cql_penalty"] != pytest.approx(base["losses/cql_penalty"]), flag


def test_clip_diff_bounds_the_per_state_gap():
    clipped = losses(cql_clip_diff_min=0.123, cql_clip_diff_max=0.123)
    assert clipped["losses/cql_gap"] == pytest.approx(0.123)
    assert clipped["losses/cql_penalty"] == pytest.approx(10.0 * 2 * 0.123)  # cql_alpha * 2 critics * gap
    assert losses(cql_clip_diff_min=1e3)["losses/cql_gap"] == pytest.approx(1e3)


def test_update_moves_actor_and_critics_and_polyak_averages_the_target():
    args, nets, update = build(tau=0.5)
    before = {k: [p.clone() for p in nets[k].parameters()] for k in ("actor", "critic", "target_critic")}
    update(*fixed_batch())
    for k in ("actor", "critic", "target_critic"):
        assert any(not torch.equal(a, b) for a, b in zip(before[k], nets[k].parameters(), strict=True)), k
    # target <- 0.5 target + 0.5 critic (the target started equal to the critic)
    pairs = zip(before["critic"], nets["critic"].parameters(), strict=True)
    for t, (c0, c1) in zip(nets["target_critic"].parameters(), pairs, strict=True):
        torch.testing.assert_close(t, 0.5 * c0 + 0.5 * c1)


def test_the_policy_loss_moves_the_actor_but_never_the_critics():
    """The critics' step comes from the TD loss and the penalty alone: swapping the actor's objective (SAC vs
    BC warm-up) on the same batch and noise leaves the critics' update bit-for-bit unchanged."""
    after = {}
    for bc_phase in (False, True):
        _, nets, update = build()
        torch.manual_seed(1)
        update(*fixed_batch(), bc_phase=bc_phase)
        after[bc_phase] = nets
    sac, bc = after[False], after[True]
    for a, b in zip(sac["critic"].parameters(), bc["critic"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(sac["actor"].parameters(), bc["actor"].parameters(), strict=True))


# ---- the update step: compiled and bf16 variants against the eager float32 one ---------------------------
def test_compiled_update_equals_the_eager_update(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # the same random numbers as eager
    runs = {}
    for compile in (False, True):
        _, nets, update = build(compile=compile)
        torch.manual_seed(1)
        for _ in range(3):
            metrics = update(*fixed_batch())
        runs[compile] = nets, metrics
    (eager_nets, m_eager), (compiled_nets, m_compiled) = runs[False], runs[True]
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-4, atol=1e-5)
    for name in ("actor", "critic", "target_critic", "log_alpha"):
        for p, q in zip(eager_nets[name].parameters(), compiled_nets[name].parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_update_stays_close_to_float32():
    m32, m16 = losses(), losses(bf16=True)
    assert m16["losses/q_data"] != m32["losses/q_data"]  # bf16 really ran
    for k in ("losses/td_loss", "losses/cql_penalty", "losses/actor_loss", "losses/q_random", "losses/entropy"):
        rel = abs(m16[k] - m32[k]) / max(abs(m32[k]), 1e-2)
        assert rel < 0.03, (k, m16[k], m32[k])


# ---- data transforms specific to CQL --------------------------------------------------------------------
def test_antmaze_rewards_become_minus_five_plus_five_and_scale_bias_apply_after():
    rewards = np.array([0.0, 1.0])
    np.testing.assert_allclose(cql.transform_rewards(rewards, np.zeros(1), "antmaze"), [-5.0, 5.0])
    np.testing.assert_allclose(cql.transform_rewards(rewards, np.zeros(1), "none", 2.0, -1.0), [-1.0, 1.0])
    np.testing.assert_allclose(cql.transform_rewards(rewards, np.array([0.0, 10.0]), "locomotion"), [0.0, 100.0])
    assert cql.reward_family("D4RL/antmaze/umaze-v1") == "antmaze"
    assert cql.reward_family("mujoco/hopper/medium-v0") == "none"  # CORL's CQL trains on raw MuJoCo rewards


def test_lagrange_without_a_threshold_is_refused():
    with pytest.raises(cql.UserError, match="cql-target-action-gap"):
        cql.validate(cql.Args(cql_lagrange=True))
    with pytest.raises(cql.UserError, match="cql_n_actions"):
        cql.validate(cql.Args(cql_n_actions=0))


# ---- configs --------------------------------------------------------------------------------------------
CONFIGS = sorted((Path(cql.__file__).parent / "configs" / "cql").glob("*.yaml"))
IQL_CONFIGS = {p.stem for p in (Path(cql.__file__).parent / "configs" / "iql").glob("*.yaml")}


def test_there_is_a_config_for_every_dataset_iql_has():
    names = {p.stem for p in CONFIGS}
    assert len([n for n in names if n.split("-")[0] in ("pen", "door", "hammer", "relocate")]) == 12
    assert len([n for n in names if n.startswith("antmaze-")]) == 6
    assert len([n for n in names if n.startswith("kitchen-")]) == 3
    assert len([n for n in names if n.startswith("pointmaze-")]) == 8
    assert IQL_CONFIGS <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_is_valid_and_names_a_resolvable_dataset(path):
    cfg = cql.load_config(path)
    cql.validate(cql.Args(**cfg))
    assert cql.config_name(cql.resolve_dataset_id(path.stem)) == path.stem
    assert path.read_text().startswith("#")  # says where its values come from


def test_config_values_follow_the_per_domain_table():
    load = lambda name: cql.load_config(Path(cql.__file__).parent / "configs" / "cql" / f"{name}.yaml")  # noqa: E731
    antmaze = load("antmaze-medium-play-v1")
    assert antmaze["cql_alpha"] == 5.0 and antmaze["cql_lagrange"] and antmaze["cql_target_action_gap"] == 0.8
    assert antmaze["cql_max_target_backup"] and antmaze["critic_n_hidden"] == 5 and antmaze["actor_lr"] == 1e-4
    assert antmaze["eval_episodes"] == 100
    assert load("door-human-v2") == {"cql_alpha": 1.0, "actor_lr": 1e-4}
    assert load("hopper-medium-v0") == {}
    args = cql.Args()
    assert (args.cql_alpha, args.actor_lr, args.critic_lr, args.critic_n_hidden) == (10.0, 3e-5, 3e-4, 3)


# ---- end to end -----------------------------------------------------------------------------------------
FAST = ["--total-steps", "40", "--eval-every", "20", "--eval-episodes", "2", "--log-every", "10"]
TINY = ["--hidden-dim", "32", "--batch-size", "64", "--cql-n-actions", "4", "--checkpoint-every", "20"]
EXTRA = {  # exercise the optional paths end to end as well
    "pendulum": [],
    "pointmaze": ["--cql-lagrange", "--cql-target-action-gap", "1.0", "--cql-max-target-backup", "--bc-steps", "10"],
    "door": ["--backup-entropy", "--no-autotune", "--layer-norm", "--no-orthogonal-init"],
}
CHECKPOINT_KEYS = {"algo", "minari_id", "step", "args", "rng", "normalization", "eval_history", "clock"}
CHECKPOINT_KEYS |= {"actor", "critic", "target_critic", "log_alpha", "log_alpha_prime"}
CHECKPOINT_KEYS |= {"actor_opt", "critic_opt", "alpha_opt", "alpha_prime_opt"}
SUMMARY_KEYS = {"algo", "env", "minari_id", "seed", "steps", "wall_seconds", "sps", "final_normalized_score"}
SUMMARY_KEYS |= {"best_normalized_score", "final_return", "best_return", "eval_history"}


@pytest.mark.parametrize("dataset", ["pendulum", "pointmaze", "door"])
def test_end_to_end_run_writes_events_checkpoints_and_summary(dataset, request, run, tmp_path):
    dataset_id = request.getfixturevalue(dataset)
    result = run("cql.py", "--env", dataset_id, *FAST, *TINY, *EXTRA[dataset], "--output", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith(f"{dataset_id.replace('/', '-')}__cql__1__")
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "args.yaml").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt) == CHECKPOINT_KEYS and ckpt["algo"] == "cql" and ckpt["step"] == 40
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["steps"] == 40 and np.isfinite(summary["final_return"])
    assert [h["step"] for h in summary["eval_history"]] == [20, 40]
    if dataset == "door":  # the D4RL id picks up configs/cql/door-human-v2.yaml
        assert "configs/cql/door-human-v2.yaml" in result.stdout
        assert ckpt["args"]["cql_alpha"] == 1.0 and ckpt["args"]["backup_entropy"]


def test_tensorboard_has_the_cql_diagnostics(pendulum, run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run("cql.py", "--env", pendulum, *FAST, *TINY, "--output", tmp_path).returncode == 0
    events = EventAccumulator(str(next(tmp_path.iterdir())))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("q_data", "q_random", "q_policy", "cql_penalty", "cql_gap", "alpha", "alpha_prime", "td_loss"):
        assert f"losses/{name}" in tags
    assert [e.step for e in events.Scalars("losses/cql_penalty")] == [10, 20, 30, 40]
