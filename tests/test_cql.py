"""CQL's penalty, importance weights, backups and multipliers against hand-computed and brute-force values; the
one-backward update against a plain sequential CORL-style step; every flag against the value it should produce;
initialisation, bf16 at realistic magnitudes, the per-domain table and the refusal of flags that do nothing."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_invalid
from torch.distributions import Normal, TanhTransform, TransformedDistribution

import cql

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


def tanh_normal(mean, log_std):
    return TransformedDistribution(Normal(mean.double(), log_std.double().exp()), TanhTransform())


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
            x = np.array(
                [(q_one(critic, i, obs[s], proposals[j, s]) - float(log_density[j, s])) / temp for j in range(3 * n)]
            )
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


# ---- the squashed Gaussian and the proposals' log-densities ---------------------------------------------
def test_importance_weights_are_the_log_densities_of_uniform_and_policy_proposals():
    n = 4
    mean, log_std = random_distribution()
    torch.manual_seed(0)
    actions, log_density = cql.ood_actions(mean, log_std, n)
    assert actions.shape == (3 * n, B, ACT) and log_density.shape == (3 * n, B)
    uniform, from_s, from_next = actions.split(n)[0], log_density.split(n)[1], log_density.split(n)[2]
    assert (uniform.abs() <= 1).all() and uniform.std() > 0.3  # spread over [-1, 1]^|A|
    torch.testing.assert_close(log_density[:n], torch.full((n, B), ACT * math.log(0.5)))  # log 0.5^|A|
    # pi(.|s) samples carry log pi(a|s), pi(.|s') samples log pi(a|s') (as in the reference code)
    expected_s = tanh_normal(mean[:B], log_std[:B]).log_prob(actions[n : 2 * n].double()).sum(-1)
    expected_next = tanh_normal(mean[B:], log_std[B:]).log_prob(actions[2 * n :].double()).sum(-1)
    torch.testing.assert_close(from_s.double(), expected_s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_next.double(), expected_next, rtol=1e-4, atol=1e-4)


def test_tanh_gaussian_log_prob_of_given_actions_matches_torch_distributions():
    mean, log_std = random_distribution(B)
    actions = torch.rand(B, ACT) * 1.8 - 0.9
    expected = tanh_normal(mean, log_std).log_prob(actions.double()).sum(-1)
    torch.testing.assert_close(cql.log_prob(mean, log_std, actions).double(), expected, rtol=1e-4, atol=1e-4)
    edge = torch.full((1, ACT), 1 - 1e-5)  # dataset actions are clipped to +-(1 - 1e-5): finite log-likelihood
    assert torch.isfinite(cql.log_prob(mean[:1], log_std[:1], edge)).all()


def test_sampled_actions_are_reparameterized_and_squashed():
    mean, log_std = random_distribution(B)
    mean.requires_grad_(True)
    actions, log_pi = cql.sample_actions(mean, log_std, 7)
    assert actions.shape == (7, B, ACT) and log_pi.shape == (7, B) and (actions.abs() < 1).all()
    actions.sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0


def test_actor_log_std_is_multiplier_times_raw_plus_offset_starting_near_minus_one_and_clamped():
    """CORL's parameterization: log sigma = m * raw + c, m = 1 and c = -1 learnable, clamp [-20, 2]; with the
    output layer at gain 1e-2 the initial pre-tanh std is ~exp(-1) = 0.37."""
    _, nets, _ = build(hidden_dim=64)
    actor = nets["actor"]
    assert actor.log_std_multiplier.item() == 1.0 and actor.log_std_offset.item() == -1.0
    assert {"log_std_multiplier", "log_std_offset"} <= set(actor.state_dict())  # checkpointed with the actor
    mean, log_std = actor.distribution(torch.randn(100, OBS))
    torch.testing.assert_close(log_std, torch.full_like(log_std, -1.0), atol=0.1, rtol=0)
    assert mean.abs().max() < 0.1
    with torch.no_grad():
        actor.log_std_multiplier.fill_(2.0)
        actor.log_std_offset.fill_(0.5)
        raw = actor.net(torch.ones(1, OBS))[:, ACT:]
        torch.testing.assert_close(actor.distribution(torch.ones(1, OBS))[1], (2.0 * raw + 0.5).clamp(-20, 2))
        actor.net[-1].bias[ACT:] = 100.0
    assert (actor.distribution(torch.randn(4, OBS))[1] == 2.0).all()


# ---- the Lagrange multiplier and the entropy temperature ------------------------------------------------
@pytest.mark.parametrize("gap, direction", [(2.0, +1), (0.2, -1)])
def test_lagrange_multiplier_grows_when_gap_above_target_and_shrinks_below(gap, direction):
    log_alpha_prime = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_alpha_prime], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        cql.lagrange_loss(log_alpha_prime.exp(), torch.tensor([gap, gap]), cql_alpha=5.0, target_gap=0.8).backward()
        opt.step()
    assert direction * log_alpha_prime.item() > 0.3


def test_lagrange_loss_value_and_no_gradient_to_the_critics():
    gap = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = cql.lagrange_loss(torch.tensor(2.0), gap, cql_alpha=5.0, target_gap=0.5)
    assert loss.item() == pytest.approx(-2.0 * 5.0 * ((1.0 - 0.5) + (3.0 - 0.5)) / 2)
    assert not loss.requires_grad  # the gap enters detached


@pytest.mark.parametrize("entropy, direction", [(-3.0, +1), (1.0, -1)])
def test_entropy_tuning_raises_alpha_when_entropy_below_target_and_lowers_it_above(entropy, direction):
    log_alpha = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=0.1)
    log_pi = torch.full((B,), -entropy)  # entropy = -E[log pi]; target entropy -|A| = -2
    for _ in range(5):
        opt.zero_grad()
        cql.alpha_loss(log_alpha, log_pi, target_entropy=-float(ACT)).backward()
        opt.step()
    assert direction * log_alpha.item() > 0.3


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
        mins = [
            min(q_one(critic, 0, next_obs[s], actions[j, s]), q_one(critic, 1, next_obs[s], actions[j, s]))
            for j in range(n)
        ]
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


# ---- the update step against a plain, sequential CORL-style step ----------------------------------------
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
    returns_to_go = 0.02 * torch.randn(batch, generator=g)  # near the initial Q ~ 0: some bounds hold, some do not
    return {
        "obs": obs,
        "actions": actions,
        "rewards": rewards,
        "next_obs": next_obs,
        "dones": dones,
        "returns_to_go": returns_to_go,
    }


def reference_step(nets, args, batch, bc_phase=False):
    """CORL's CQL step (algorithms/offline/cql.py, ContinuousCQL.train) written out plainly, every loss from the
    same pre-step parameters and differentiated on its own, in CORL's order: temperature, Lagrange multiplier,
    actor, critics. Returns the losses and each learner's gradients. The random numbers are drawn as the update
    draws them (make_update's docstring): policy action, next actions, proposals from pi(.|s) and pi(.|s'), uniform."""
    obs, actions, rewards, next_obs, dones = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
    b, n = len(obs), args.cql_n_actions
    actor, critic, target_critic = nets["actor"], nets["critic"], nets["target_critic"]
    log_alpha, log_alpha_prime = nets["log_alpha"].value, nets["log_alpha_prime"].value
    eps_pi = torch.randn(1, b, ACT)[0]
    eps_next = torch.randn(n if args.cql_max_target_backup else 1, b, ACT)
    eps_proposals = torch.randn(n, 2 * b, ACT)
    uniform = torch.rand(n, b, ACT) * 2 - 1

    def policy(states, eps):  # a = tanh(mu + sigma eps) and log pi(a|s) by torch.distributions' Normal and tanh
        mean, raw = actor.net(states).chunk(2, dim=-1)
        std = (actor.log_std_multiplier * raw + actor.log_std_offset).clamp(-20, 2).exp()
        u = mean + std * eps
        return torch.tanh(u), (Normal(mean, std).log_prob(u) - TanhTransform().log_abs_det_jacobian(u, None)).sum(-1)

    def q(i, net, states, a):  # critic i at (s, a_j) for every sample a_j: (K, B)
        return torch.stack([net(states, a_j)[i] for a_j in a])

    losses, grads = {}, {}
    a_pi, log_pi = policy(obs, eps_pi)
    alpha = log_alpha.exp()
    if args.autotune:
        target_entropy = -float(ACT) if args.target_entropy is None else args.target_entropy
        losses["alpha_loss"] = -(log_alpha * (log_pi + target_entropy).detach()).mean()
        grads["log_alpha"] = torch.autograd.grad(losses["alpha_loss"], [log_alpha])
    with torch.no_grad():
        next_a, next_log_pi = policy(next_obs, eps_next)
        next_q = torch.minimum(q(0, target_critic, next_obs, next_a), q(1, target_critic, next_obs, next_a))  # (K, B)
        next_v, index = next_q.max(dim=0)
        if args.backup_entropy:
            next_v = next_v - alpha * next_log_pi.gather(0, index[None])[0]
        y = rewards + args.discount * (1 - dones) * next_v
        current, current_log_pi = policy(obs, eps_proposals[:, :b])
        following, following_log_pi = policy(next_obs, eps_proposals[:, b:])
    diffs = []
    for i in range(2):
        q_data = critic(obs, actions)[i]
        losses[f"td{i}"] = ((q_data - y) ** 2).mean()
        q_following, q_current = q(i, critic, obs, following), q(i, critic, obs, current)
        if args.cal_ql:  # CORL's finetune/cal_ql.py: torch.maximum(cql_q*_current/next_actions, lower_bounds)
            q_following = torch.maximum(q_following, batch["returns_to_go"])
            q_current = torch.maximum(q_current, batch["returns_to_go"])
        cat = torch.cat(
            [
                q(i, critic, obs, uniform) - ACT * math.log(0.5),
                q_following - following_log_pi,
                q_current - current_log_pi,
            ]
        )
        ood = args.cql_temp * torch.logsumexp(cat / args.cql_temp, dim=0)
        diffs.append((ood - q_data).clamp(args.cql_clip_diff_min, args.cql_clip_diff_max).mean())
    if args.cql_lagrange:
        alpha_prime = log_alpha_prime.exp().clamp(0, 1e6)
        cql_losses = [alpha_prime * args.cql_alpha * (d - args.cql_target_action_gap) for d in diffs]
        losses["alpha_prime_loss"] = -(cql_losses[0] + cql_losses[1]) * 0.5
        grads["log_alpha_prime"] = torch.autograd.grad(losses["alpha_prime_loss"], [log_alpha_prime], retain_graph=True)
    else:
        cql_losses = [args.cql_alpha * d for d in diffs]
    if bc_phase:
        mean, raw = actor.net(obs).chunk(2, dim=-1)
        std = (actor.log_std_multiplier * raw + actor.log_std_offset).clamp(-20, 2).exp()
        q_new = TransformedDistribution(Normal(mean, std), TanhTransform()).log_prob(actions).sum(-1)
    else:
        q_new = torch.minimum(critic(obs, a_pi)[0], critic(obs, a_pi)[1])
    losses["actor_loss"] = (alpha.detach() * log_pi - q_new).mean()
    grads["actor"] = torch.autograd.grad(losses["actor_loss"], list(actor.parameters()))
    losses["critic_loss"] = losses["td0"] + losses["td1"] + cql_losses[0] + cql_losses[1]
    grads["critic"] = torch.autograd.grad(losses["critic_loss"], list(critic.parameters()))
    losses.update(q_target=y.mean(), cql_gap=(diffs[0] + diffs[1]) / 2, cql_penalty=cql_losses[0] + cql_losses[1])
    return {k: v.detach() for k, v in losses.items()}, grads


def run_both(bc_phase=False, **overrides):
    """One update and the reference step from the same initial networks, batch and random numbers."""
    args, nets, update = build(**overrides, bc_steps=1 if bc_phase else 0)  # step 1 is a BC step with bc_steps 1
    reference_nets = copy.deepcopy(nets)
    torch.manual_seed(1)
    metrics = {k[len("losses/") :]: v for k, v in update(fixed_batch(), 1).items()}
    torch.manual_seed(1)
    expected, grads = reference_step(reference_nets, args, fixed_batch(), bc_phase)
    return metrics, expected, grads, nets


@pytest.mark.parametrize("bc_phase", [False, True])
def test_one_backward_gives_the_gradients_of_separate_temperature_multiplier_actor_and_critic_steps(bc_phase):
    """All options on (Lagrange, max-target backup, soft backup): each learner's gradient from the single backward
    pass equals the gradient of its own loss alone, as CORL computes it, to float32 precision."""
    metrics, expected, grads, nets = run_both(
        bc_phase,
        cql_lagrange=True,
        cql_target_action_gap=0.5,
        cql_max_target_backup=True,
        backup_entropy=True,
        alpha=0.7,
        cql_clip_diff_min=-5.0,
    )
    for name in ("actor", "critic"):
        for (key, p), g in zip(nets[name].named_parameters(), grads[name], strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
    for name in ("log_alpha", "log_alpha_prime"):
        torch.testing.assert_close(nets[name].value.grad, grads[name][0], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in nets["target_critic"].parameters())
    for key in ("actor_loss", "alpha_loss", "alpha_prime_loss", "q_target", "cql_gap", "cql_penalty"):
        torch.testing.assert_close(metrics[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    torch.testing.assert_close(metrics["td_loss"], expected["td0"] + expected["td1"], rtol=1e-4, atol=1e-6)


def test_update_steps_each_learner_with_adam_and_polyak_averages_the_target():
    args, nets, update = build(tau=0.5, cql_lagrange=True, cql_target_action_gap=0.5)
    before = copy.deepcopy(nets)
    update(fixed_batch(), 1)
    for name in ("actor", "critic", "log_alpha", "log_alpha_prime"):  # Adam's first step: lr g / (|g| + 1e-8)
        lr = args.actor_lr if name in ("actor", "log_alpha") else args.critic_lr
        for p0, p in zip(before[name].parameters(), nets[name].parameters(), strict=True):
            torch.testing.assert_close(p, p0 - lr * p.grad / (p.grad.abs() + 1e-8), rtol=0, atol=1e-8)
    for t, c0, c1 in zip(
        nets["target_critic"].parameters(), before["critic"].parameters(), nets["critic"].parameters(), strict=True
    ):
        torch.testing.assert_close(t, 0.5 * c0 + 0.5 * c1)  # the target started equal to the critic


# ---- every flag produces the value it should ------------------------------------------------------------
def test_cql_lagrange_penalty_is_alpha_prime_cql_alpha_gap_minus_tau_and_alpha_prime_follows_the_gap():
    base, _, _, _ = run_both()
    for tau in (0.1, 1e3):  # gap above tau: alpha' grows; below: it shrinks
        m, expected, _, nets = run_both(cql_lagrange=True, cql_target_action_gap=tau)
        assert m["cql_gap"].item() == pytest.approx(base["cql_gap"].item(), rel=1e-6)  # same gap, alpha' = 1
        assert m["cql_penalty"].item() == pytest.approx(10.0 * 2 * (base["cql_gap"].item() - tau), rel=1e-5)
        assert m["alpha_prime_loss"].item() == pytest.approx(-10.0 * (base["cql_gap"].item() - tau), rel=1e-5)
        direction = 1.0 if base["cql_gap"].item() > tau else -1.0
        assert nets["log_alpha_prime"].value.item() == pytest.approx(direction * 3e-4, rel=1e-3)  # Adam: lr * sign
    assert "alpha_prime_loss" not in base and "alpha_prime" not in base  # alpha' = 1, not learned, not logged
    _, nets, update = build(cql_lagrange=True, cql_target_action_gap=0.5)
    with torch.no_grad():
        nets["log_alpha_prime"].value.fill_(20.0)  # exp(20) > 1e6: clamped
    assert update(fixed_batch(), 1)["losses/alpha_prime"].item() == 1e6


BACKUP_FLAGS = [
    dict(cql_max_target_backup=True),
    dict(backup_entropy=True, alpha=0.5),
    dict(discount=0.5),
    dict(cql_max_target_backup=True, backup_entropy=True),
]


@pytest.mark.parametrize("flags", BACKUP_FLAGS)
def test_backup_flags_give_the_expected_td_target(flags):
    base, _, _, _ = run_both()
    m, expected, _, _ = run_both(**flags)
    assert m["q_target"].item() != pytest.approx(base["q_target"].item())
    assert m["q_target"].item() == pytest.approx(expected["q_target"].item(), rel=1e-5)


@pytest.mark.parametrize("flags", [dict(cql_temp=0.3), dict(cql_n_actions=5), dict(cql_clip_diff_max=0.0)])
def test_penalty_flags_give_the_expected_gap(flags):
    m, expected, _, _ = run_both(**flags)
    assert m["cql_gap"].item() == pytest.approx(expected["cql_gap"].item(), rel=1e-5)
    assert m["cql_penalty"].item() == pytest.approx(expected["cql_penalty"].item(), rel=1e-5)


def test_cql_alpha_scales_the_penalty_and_clip_bounds_the_gap():
    base, _, _, _ = run_both()
    assert run_both(cql_alpha=1.0)[0]["cql_penalty"].item() == pytest.approx(base["cql_penalty"].item() / 10, rel=1e-5)
    clipped = run_both(cql_clip_diff_min=0.123, cql_clip_diff_max=0.123)[0]
    assert clipped["cql_gap"].item() == pytest.approx(0.123)
    assert clipped["cql_penalty"].item() == pytest.approx(10.0 * 2 * 0.123)  # cql_alpha * 2 critics * gap
    assert run_both(cql_clip_diff_min=1e3)[0]["cql_gap"].item() == pytest.approx(1e3)


def test_bc_phase_trains_the_actor_on_dataset_log_likelihood_and_leaves_the_critics_alone():
    sac, _, _, sac_nets = run_both()
    bc, expected, _, bc_nets = run_both(bc_phase=True)
    assert bc["actor_loss"].item() == pytest.approx(expected["actor_loss"].item(), rel=1e-5)  # log pi - log pi(a|s)
    assert bc["actor_loss"].item() != pytest.approx(sac["actor_loss"].item())
    assert bc["td_loss"].item() == sac["td_loss"].item()
    for a, b in zip(sac_nets["critic"].parameters(), bc_nets["critic"].parameters(), strict=True):
        assert torch.equal(a, b)  # the critics' step does not depend on the actor's objective


def test_fixed_alpha_is_used_and_never_tuned_and_target_entropy_sets_the_temperature_loss():
    fixed, expected, _, nets = run_both(autotune=False, alpha=0.2)
    assert fixed["alpha"].item() == pytest.approx(0.2) and "alpha_loss" not in fixed
    assert fixed["actor_loss"].item() == pytest.approx(expected["actor_loss"].item(), rel=1e-5)
    assert nets["log_alpha"].value.item() == pytest.approx(math.log(0.2)) and nets["log_alpha"].value.grad is None
    for target_entropy in (None, 3.0):  # -log alpha (log pi + target): log alpha = log 0.5 at the start
        m, *_ = run_both(alpha=0.5, target_entropy=target_entropy)
        target = -float(ACT) if target_entropy is None else target_entropy
        expected_loss = -math.log(0.5) * (-m["entropy"].item() + target)
        assert m["alpha_loss"].item() == pytest.approx(expected_loss, rel=1e-5)


def test_calibrate_is_the_elementwise_maximum_of_q_and_the_return_to_go():
    q = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]])  # (critics, actions, states)
    torch.testing.assert_close(cql.calibrate(q, torch.tensor([0.0, 0.0])), torch.tensor([[[1.0, 0.0], [0.5, 3.0]]]))


def test_cal_ql_bounds_the_policy_actions_q_by_the_return_to_go_where_q_is_below_it_and_nothing_else():
    """The same step with and without --cal-ql: equal to the reference (which clamps as CORL's cal_ql.py does), the
    penalty changed only because some policy-action Q were below G, the TD error and the actor untouched."""
    plain, _, _, _ = run_both()
    metrics, expected, grads, nets = run_both(cal_ql=True)
    assert 0.0 < metrics["calql_bound_rate"].item() < 1.0  # the bound holds for some policy actions, not all
    for key in ("cql_gap", "cql_penalty", "actor_loss", "q_target"):
        torch.testing.assert_close(metrics[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    assert metrics["cql_gap"].item() > plain["cql_gap"].item()  # raising Q to G can only raise the log-sum-exp
    assert metrics["td_loss"].item() == plain["td_loss"].item() and metrics["actor_loss"] == plain["actor_loss"]
    for (key, p), g in zip(nets["critic"].named_parameters(), grads["critic"], strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=key)
    far_below = {**fixed_batch(), "returns_to_go": torch.full((32,), -1e3)}  # a bound that never holds
    _, nets, update = build(cal_ql=True)
    torch.manual_seed(1)
    low = update(far_below, 1)
    assert low["losses/calql_bound_rate"].item() == 0.0
    assert low["losses/cql_gap"].item() == pytest.approx(plain["cql_gap"].item(), rel=1e-6)


# ---- networks -------------------------------------------------------------------------------------------
def singular_values(layer):
    return [torch.linalg.svdvals(w) for w in layer.weight.detach().view(-1, *layer.weight.shape[-2:])]


@pytest.mark.parametrize("orthogonal", [True, False])
def test_output_layers_are_orthogonal_with_gain_1e_2_and_hidden_layers_with_gain_sqrt2(orthogonal):
    _, nets, _ = build(orthogonal_init=orthogonal, critic_n_hidden=3)
    for name in ("actor", "critic", "target_critic"):
        layers = [m for m in nets[name].modules() if isinstance(m, torch.nn.Linear | cql.common.BatchedLinear)]
        assert len(layers) == (3 if name == "actor" else 4)
        for s in singular_values(layers[-1]):  # CORL: output layers orthogonal with gain 1e-2, zero bias
            torch.testing.assert_close(s, torch.full_like(s, 1e-2))
        assert (layers[-1].bias == 0).all()
        for layer in layers[1:-1]:  # square hidden layers: all singular values equal the gain
            for s in singular_values(layer):
                assert torch.allclose(s, torch.full_like(s, math.sqrt(2)), atol=1e-5) == orthogonal
    torch.testing.assert_close(nets["target_critic"].state_dict(), nets["critic"].state_dict())


def test_critic_depth_changes_both_critics_identically_and_layer_norm_normalizes_every_hidden_layer():
    for depth in (1, 2, 5):
        _, nets, _ = build(critic_n_hidden=depth)
        linears = [m for m in nets["critic"].net if isinstance(m, cql.common.BatchedLinear)]
        assert len(linears) == depth + 1 and all(m.weight.shape[0] == 2 for m in linears)  # 2 members per layer
    _, nets, _ = build(actor_n_hidden=4)
    assert len([m for m in nets["actor"].net if isinstance(m, torch.nn.Linear)]) == 5
    _, nets, _ = build(layer_norm=True, critic_n_hidden=3)
    assert len([m for m in nets["critic"].net if isinstance(m, cql.common.BatchedLayerNorm)]) == 3


# ---- compiled and bf16 variants -------------------------------------------------------------------------
def test_compiled_update_equals_the_eager_update_and_compiles_once_per_phase():
    from torch._dynamo.utils import counters

    runs = {}
    for compile in (False, True):
        _, nets, update = build(compile=compile, cql_lagrange=True, cql_target_action_gap=0.5, bc_steps=1)
        torch.manual_seed(1)
        graphs = [counters["stats"]["unique_graphs"]]
        with torch._inductor.config.patch(fallback_random=True):  # the same random numbers as eager
            for step in range(4):  # a BC warm-up step, then SAC steps: graphs for each phase, no recompiles after
                metrics = update(fixed_batch(), step + 1)
                graphs.append(counters["stats"]["unique_graphs"])
        if compile:  # really compiled (not a silent fallback to eager), each phase on its own, then never again
            assert graphs[0] < graphs[1] < graphs[2] == graphs[4], graphs
        runs[compile] = nets, metrics
    (eager_nets, m_eager), (compiled_nets, m_compiled) = runs[False], runs[True]
    for k in m_eager:
        torch.testing.assert_close(m_compiled[k], m_eager[k], rtol=1e-4, atol=1e-5)
    for name in eager_nets:
        for p, q in zip(eager_nets[name].parameters(), compiled_nets[name].parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


BF16_GAP_TOLERANCE, BF16_TD_TOLERANCE = 1e-3, 0.05  # |bf16 - float32| of the gap (batch mean) and TD errors


def test_bf16_keeps_the_cql_gap_and_td_error_close_to_float32_at_realistic_magnitudes():
    """Q around +100 and -100 (the critics' output biases set so, output weights at PyTorch's default scale): the
    hidden layers run in bfloat16 but the output layers in float32, so the gap and the TD error keep float32
    resolution (measured: 6e-5 and 3e-3). Rounding Q to bfloat16 after the fact (the old `.float()` on a bfloat16
    output layer), whose spacing at 100 is 0.5, misses both tolerances (measured: 7e-3 and 0.47)."""

    def gap_and_td_error(bf16, rounded_output=False):
        _, nets, _ = build(hidden_dim=64)
        for critic in (nets["critic"], nets["target_critic"]):
            out = critic.net[-1]
            with torch.no_grad():
                out.weight.mul_(100.0 / math.sqrt(2))  # gain 1e-2 -> ~ PyTorch's default scale: Q spreads over units
                out.bias.copy_(torch.tensor([100.0, -100.0]).view(2, 1, 1))
            if rounded_output:
                out.forward = lambda x, out=out: cql.common.BatchedLinear.forward(out, x).float()
        batch = fixed_batch(256)
        obs, actions, rewards, next_obs, dones = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            mean, log_std = nets["actor"].distribution(torch.cat([obs, next_obs]))
            next_actions, _ = cql.sample_actions(mean[256:], log_std[256:], 1)
            target = rewards + 0.99 * (1 - dones) * nets["target_critic"](next_obs, next_actions[0]).min(dim=0).values
            proposals, log_density = cql.ood_actions(mean, log_std, 10)
            q_all = nets["critic"](obs, torch.cat([actions[None], proposals]))
            gap = cql.cql_penalty(q_all[:, 1:], log_density, q_all[:, 0], 1.0, -math.inf, math.inf)
        return gap, q_all[:, 0] - target

    (gap32, td32), (gap16, td16) = gap_and_td_error(False), gap_and_td_error(True)
    assert gap16.dtype == td16.dtype == torch.float32 and not torch.equal(td16, td32)  # bf16 really ran
    assert (gap16 - gap32).abs().max() < BF16_GAP_TOLERANCE and (td16 - td32).abs().max() < BF16_TD_TOLERANCE
    gap_rounded, td_rounded = gap_and_td_error(True, rounded_output=True)
    assert (gap_rounded - gap32).abs().max() > BF16_GAP_TOLERANCE and (
        td_rounded - td32
    ).abs().max() > BF16_TD_TOLERANCE


def test_bf16_update_stays_close_to_float32():
    m32, m16 = run_both()[0], run_both(bf16=True)[0]
    assert m16["q_data"].item() != m32["q_data"].item()  # bf16 really ran
    for k in ("td_loss", "cql_penalty", "actor_loss", "q_random", "entropy"):
        assert m16[k].dtype == torch.float32
        assert abs(m16[k].item() - m32[k].item()) / max(abs(m32[k].item()), 1e-2) < 0.03, (k, m16[k], m32[k])


# ---- per-domain settings, rewards, refused flags --------------------------------------------------------
CORL = {  # CORL's values, configs/offline/cql/<env>/<dataset>.yaml (the same in every file of a domain)
    "antmaze-umaze-v1": dict(cql_alpha=5.0, cql_lagrange=True, cql_target_action_gap=0.8, cql_max_target_backup=True,
                             cql_clip_diff_min=-200.0, critic_n_hidden=5, actor_lr=1e-4, critic_lr=3e-4,
                             normalize_states=False, reward_scale=10.0, reward_bias=-5.0, eval_episodes=100),
    "door-human-v2": dict(cql_alpha=1.0, cql_lagrange=False, actor_lr=1e-4, critic_lr=3e-4, critic_n_hidden=3,
                          normalize_states=True, reward_scale=1.0, reward_bias=0.0, eval_episodes=10),
    "hopper-medium-v0": dict(cql_alpha=10.0, cql_lagrange=False, actor_lr=3e-5, critic_lr=3e-4, critic_n_hidden=3,
                             normalize_states=True, reward_scale=1.0, reward_bias=0.0, eval_episodes=10),
    "pointmaze-umaze-v2": dict(cql_alpha=10.0, cql_lagrange=True, cql_target_action_gap=5.0, actor_lr=3e-5,
                               eval_episodes=100),
}  # fmt: skip


@pytest.mark.parametrize("env", CORL)
def test_per_domain_settings_are_corls_and_pass_validation(env):
    args, _ = cql.parse_args(["--env", env])
    cql.validate(args)
    assert {k: getattr(args, k) for k in CORL[env]} == CORL[env]
    assert (args.cql_n_actions, args.cql_temp, args.batch_size, args.tau, args.autotune) == (10, 1.0, 256, 5e-3, True)


def test_antmaze_rewards_become_minus_five_plus_five():
    """CORL's AntMaze rule for CQL, (r - 0.5) * 10: the 0/1 goal reward becomes -5/+5."""
    args, _ = cql.parse_args(["--env", "antmaze-umaze-v1"])
    scale, bias = cql.reward_transform(np.zeros(2), args)
    np.testing.assert_allclose(np.array([0.0, 1.0]) * scale + bias, [-5.0, 5.0])


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(cql_target_action_gap=0.8), "--cql-target-action-gap, which does nothing without it"),
        (dict(cql_lagrange=True), "--cql-lagrange needs its threshold --cql-target-action-gap"),
        (dict(autotune=False, target_entropy=-1.0), "--target-entropy does nothing with --no-autotune"),
        (dict(cql_max_target_backup=True, cql_n_actions=1), "--cql-max-target-backup needs --cql-n-actions > 1"),
        (dict(cql_lagrange=True, cql_target_action_gap=0.8, cql_alpha=0.0), "--cql-alpha 0 turns the penalty off"),
        (dict(cql_alpha=0.0, cql_temp=0.5), "--cql-alpha 0 turns the penalty off"),
        (dict(cql_clip_diff_min=1.0, cql_clip_diff_max=0.0), "cql_clip_diff_min must be <= cql_clip_diff_max"),
        (dict(alpha=0.0), "alpha and cql_temp must be > 0"),
        (dict(cql_n_actions=0), "cql_n_actions must be >= 1"),
    ],
)
def test_flags_without_effect_and_out_of_range_values_are_refused(flags, message):
    assert_invalid(cql, flags, message)
    cql.validate(cql.Args(cql_lagrange=True, cql_target_action_gap=0.8, autotune=False, alpha=0.1))
    cql.validate(cql.Args(cql_alpha=0.0))  # offline SAC: fine


def test_a_refused_flag_of_the_domain_table_can_be_unset():
    """AntMaze sets the Lagrange form and its gap; turning Lagrange off needs the gap unset as well."""
    with pytest.raises(cql.UserError, match="unset: --cql-target-action-gap None"):
        cql.validate(cql.parse_args(["--env", "antmaze-umaze-v1", "--no-cql-lagrange"])[0])
    cql.validate(
        cql.parse_args(["--env", "antmaze-umaze-v1", "--no-cql-lagrange", "--cql-target-action-gap", "None"])[0]
    )
