"""SAC-N's losses against hand-computed values; the update step (temperature, actor, critics, Polyak) against CORL's
SACN.update written out with N separate critic modules, a plain Python loop over critics; the ensemble as one batched
module with CORL's init; the settings tables against CORL's configs; compiled and bf16 variants; the refusal of
out-of-range values and of fine-tuning (on the command line for edac.py too). test_edac.py reuses the reference step,
the builder and the settings check."""

import copy
import math
from collections import Counter
from functools import partial

import pytest
import torch
import torch.nn as nn
from conftest import (
    assert_bf16_close,
    assert_compiled_equals_eager,
    assert_invalid,
    assert_steps_equal_reference,
    assert_user_error,
    compiled_and_eager_updates,
    fixed_batch,
    run_script,
)
from torch.distributions import Normal
from torch.utils._python_dispatch import TorchDispatchMode

import common
import sac_n

OBS, ACT, B = 3, 2, 64


# ---- losses ---------------------------------------------------------------------------------------------
def test_sample_action_is_tanh_of_a_reparameterized_gaussian_with_the_change_of_variables_log_prob():
    mean, log_std = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, math.log(2.0)]])
    torch.manual_seed(3)
    action, log_pi = sac_n.sample_action(mean, log_std)
    torch.manual_seed(3)
    eps = torch.randn(1, 2)
    u = torch.tensor([[0.5 + eps[0, 0], -1.0 + 2.0 * eps[0, 1]]])
    gaussian = sum(-0.5 * eps[0, j] ** 2 - 0.5 * math.log(2 * math.pi) for j in range(2)) - math.log(2.0)
    squash = sum(math.log(1 - math.tanh(u[0, j]) ** 2 + 1e-6) for j in range(2))
    torch.testing.assert_close(action, torch.tanh(u))
    assert log_pi.item() == pytest.approx(gaussian - squash, rel=1e-5)


def test_alpha_loss_is_minus_log_alpha_times_log_pi_plus_the_target_entropy_with_no_gradient_to_the_policy():
    log_alpha, log_pi = torch.tensor(0.5, requires_grad=True), torch.tensor([-1.0, 3.0], requires_grad=True)
    loss = sac_n.alpha_loss(log_alpha, log_pi, target_entropy=-2.0)
    assert loss.item() == pytest.approx(-0.5 * ((-1.0 - 2.0) + (3.0 - 2.0)) / 2)  # 0.5
    loss.backward()
    assert log_pi.grad is None and log_alpha.grad.item() == pytest.approx(1.0)  # the entropy is below the target


def test_actor_loss_takes_the_minimum_over_all_critics():
    q_pi = torch.tensor([[1.0, 5.0], [2.0, 4.0], [0.0, 6.0]])  # 3 critics, 2 states: minima 0 and 4
    loss = sac_n.actor_loss(torch.tensor(0.5), torch.tensor([1.0, -2.0]), q_pi)
    assert loss.item() == pytest.approx(((0.5 * 1.0 - 0.0) + (0.5 * -2.0 - 4.0)) / 2)  # -2.25


def test_td_target_bootstraps_the_minimum_of_the_target_critics_minus_the_entropy_term_except_after_a_termination():
    rewards, dones = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    next_q = torch.tensor([[2.0, 100.0], [3.0, 50.0], [5.0, 70.0]])
    target = sac_n.td_target(rewards, dones, next_q, torch.tensor([1.0, 1.0]), torch.tensor(0.5), discount=0.9)
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.9 * (2.0 - 0.5), 0.5]))  # 2.35; terminal: r


def test_td_loss_sums_every_critics_mse():
    q, target = torch.tensor([[1.0, 0.0], [2.0, 0.5], [3.0, 1.5]]), torch.tensor([2.0, 0.5])
    expected = (1.0 + 0.25) / 2 + (0.0 + 0.0) / 2 + (1.0 + 1.0) / 2
    assert sac_n.td_loss(q, target).item() == pytest.approx(expected)


# ---- the update step against CORL's, with a loop over separate critics ----------------------------------
def build(module, **overrides):
    """A small learner of sac_n.py or edac.py as the script builds it, fixed initial weights, and a fixed batch."""
    args = module.Args(**{"hidden_dim": 16, "num_critics": 5, **overrides})
    torch.manual_seed(0)
    nets = module.make_networks(args, OBS, ACT)
    update = module.make_update(nets, module.make_optimizers(nets, args), args)
    return args, nets, update, fixed_batch(B, OBS, ACT, next_actions=False)  # the next actions are never read


def separate_critics(ensemble: nn.Module) -> list:
    """The ensemble's N members as N plain MLPs of nn.Linear layers, each with its own copy of its weights."""
    critics = []
    for i in range(len(ensemble.net[0].weight)):
        layers = []
        for layer in ensemble.net:
            if isinstance(layer, common.BatchedLinear):
                linear = nn.utils.skip_init(nn.Linear, *layer.weight.shape[1:])  # no random draws
                linear.load_state_dict({"weight": layer.weight[i].T, "bias": layer.bias[i, 0]})
                layers.append(linear)
            else:
                layers.append(copy.deepcopy(layer))
        critics.append(nn.Sequential(*layers))
    return critics


def ensemble_of(critics: list, like: nn.Module) -> nn.Module:
    """separate_critics' inverse: the members' weights stacked into a copy of the batched module `like`."""
    ensemble = copy.deepcopy(like)
    with torch.no_grad():
        for k, layer in enumerate(ensemble.net):
            if isinstance(layer, common.BatchedLinear):
                layer.weight.copy_(torch.stack([critic[k].weight.T for critic in critics]))
                layer.bias.copy_(torch.stack([critic[k].bias[None] for critic in critics]))
    return ensemble


def q_values(critics: list, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(N, B): a Python loop over the critics."""
    return torch.stack([critic(torch.cat([obs, actions], dim=-1)).squeeze(-1) for critic in critics])


def reference_steps(nets: dict, args, batch: dict, steps: int, extra_critic_loss=None) -> tuple:
    """CORL's SACN.update (algorithms/offline/sac_n.py) written out with plain Adam on copies of the networks, the
    critics as N separate modules: the temperature (a policy sample at s), the actor (another sample, min over the
    critics), the critics (SAC's soft backup from the min over the target critics; the actor's gradients in them
    zeroed first, as CORL), Polyak by a loop over parameters. extra_critic_loss(critics, obs, actions) is added to the
    critics' loss (EDAC's term). Returns the networks in the script's layout and the last step's losses."""
    actor = copy.deepcopy(nets["actor"])
    critics, targets = separate_critics(nets["critic"]), separate_critics(nets["target_critic"])
    log_alpha = torch.zeros(1, requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam([p for critic in critics for p in critic.parameters()], lr=args.critic_lr)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.alpha_lr)

    def policy(state):  # CORL's Actor.forward(state, need_log_prob=True)
        mu, log_sigma = actor.net(state).chunk(2, dim=-1)
        dist = Normal(mu, torch.exp(torch.clip(log_sigma, -5, 2)))
        action = dist.rsample()
        tanh_action = torch.tanh(action)
        return tanh_action, dist.log_prob(action).sum(-1) - torch.log(1 - tanh_action.pow(2) + 1e-6).sum(-1)

    s, a, r, s2, d = (batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones"))
    for _ in range(steps):
        with torch.no_grad():
            _, log_prob = policy(s)
        alpha_loss = (-log_alpha * (log_prob - ACT)).mean()  # target entropy -|A|
        alpha_opt.zero_grad()
        alpha_loss.backward()
        alpha_opt.step()
        alpha = log_alpha.exp().detach()
        action, log_prob = policy(s)
        actor_loss = (alpha * log_prob - q_values(critics, s, action).min(0).values).mean()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        with torch.no_grad():
            next_action, next_log_prob = policy(s2)
            q_next = q_values(targets, s2, next_action).min(0).values - alpha * next_log_prob
            q_target = r + args.discount * (1 - d) * q_next
        critic_loss = ((q_values(critics, s, a) - q_target) ** 2).mean(dim=1).sum(dim=0)
        if extra_critic_loss is not None:
            critic_loss = critic_loss + extra_critic_loss(critics, s, a)
        critic_opt.zero_grad()
        critic_loss.backward()
        critic_opt.step()
        with torch.no_grad():
            for target, critic in zip(targets, critics, strict=True):
                for p_t, p in zip(target.parameters(), critic.parameters(), strict=True):
                    p_t.data.copy_((1 - args.tau) * p_t.data + args.tau * p.data)
    ref = {
        "actor": actor,
        "critic": ensemble_of(critics, nets["critic"]),
        "target_critic": ensemble_of(targets, nets["target_critic"]),
        "log_alpha": nn.ParameterDict({"value": log_alpha.detach()[0]}),
    }
    losses = {"alpha_loss": alpha_loss, "alpha": alpha[0], "actor_loss": actor_loss, "critic_loss": critic_loss}
    return ref, {name: x.detach() for name, x in losses.items()}


def assert_update_equals_reference(module, steps: int, extra_critic_loss=None, **overrides) -> None:
    """The script's update(batch, step) for `steps` steps against reference_steps, from the same weights and seeds."""
    args, nets, update, batch = build(module, tau=0.1, discount=0.9, alpha_lr=1e-2, **overrides)
    extra = extra_critic_loss and extra_critic_loss(args)
    assert_steps_equal_reference(nets, update, batch, steps, partial(reference_steps, nets, args, batch, steps, extra))


@pytest.mark.parametrize("steps", [1, 3])
def test_updates_equal_corls_sequential_steps_over_separate_critics(steps):
    assert_update_equals_reference(sac_n, steps)


def test_every_step_returns_the_same_detached_metrics():
    _, _, update, batch = build(sac_n)
    first, second = update(batch, 1), update(batch, 2)
    names = ("alpha_loss", "alpha", "actor_loss", "entropy", "q_policy_std", "critic_loss", "q_data", "q_target")
    assert set(first) == set(second) == {f"losses/{name}" for name in names}
    assert not any(m.requires_grad for m in second.values())


# ---- networks -------------------------------------------------------------------------------------------
def matmuls(fn) -> Counter:
    """The matrix products fn() runs, by ATen operator."""
    counts = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "mm" in func.__name__:
                counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return counts


@pytest.mark.parametrize("n", [2, 50])
def test_the_n_critics_are_one_batched_module_one_matmul_per_layer_whatever_n(n):
    args, nets, _, batch = build(sac_n, num_critics=n, n_hidden=2)
    critic = nets["critic"]
    assert matmuls(lambda: critic(batch["obs"], batch["actions"])) == {"baddbmm": 3}  # 2 hidden layers + output
    expected = q_values(separate_critics(critic), batch["obs"], batch["actions"])
    torch.testing.assert_close(critic(batch["obs"], batch["actions"]), expected, rtol=1e-5, atol=1e-6)


def test_networks_have_corls_layout_and_init_and_the_targets_start_equal():
    """3 x 256; hidden biases 0.1; output layers U(+-1e-3) (actor) and U(+-3e-3) (critics); the actor's hidden weights
    U(+-1/sqrt(fan_in)), the critics' U(+-1/sqrt(fan_out)) = U(+-1/16) (CORL's VectorizedLinear)."""
    _, nets, _, _ = build(sac_n, hidden_dim=256, num_critics=7, n_hidden=3)
    critic_layers = [m for m in nets["critic"].net if isinstance(m, common.BatchedLinear)]
    assert [tuple(m.weight.shape) for m in critic_layers] == [
        (7, OBS + ACT, 256),
        (7, 256, 256),
        (7, 256, 256),
        (7, 256, 1),
    ]
    actor_layers = [m for m in nets["actor"].net if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in actor_layers] == [(256, OBS), (256, 256), (256, 256), (2 * ACT, 256)]
    for layer, bound in [
        *((m, 1 / 16) for m in critic_layers[:-1]),
        *((m, m.in_features**-0.5) for m in actor_layers[:-1]),
    ]:
        assert bound * 0.95 < layer.weight.abs().max() <= bound
        assert torch.all(layer.bias == 0.1)
    for layer, bound in ((critic_layers[-1], 3e-3), (actor_layers[-1], 1e-3)):
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert isinstance(critic_layers[-1], common.BatchedOutputLinear) and isinstance(
        actor_layers[-1], common.OutputLinear
    )
    torch.testing.assert_close(nets["target_critic"].state_dict(), nets["critic"].state_dict())
    assert not any(p.requires_grad for p in nets["target_critic"].parameters())
    assert nets["log_alpha"].value.item() == 0.0  # alpha starts at 1


def test_the_actor_acts_with_tanh_of_its_mean_and_clips_its_log_std_to_minus_5_and_2():
    _, nets, _, _ = build(sac_n)
    actor, obs = nets["actor"], torch.randn(100, OBS) * 100
    with torch.no_grad():
        actor.net[-1].bias.copy_(torch.tensor([0.0, 0.0, 50.0, -50.0]))
        mean, log_std = actor.distribution(obs)
        torch.testing.assert_close(actor(obs), torch.tanh(mean))
    assert log_std.max() == 2.0 and log_std.min() == -5.0
    assert actor(obs).abs().max() <= 1.0


# ---- compiled and bf16 variants -------------------------------------------------------------------------
def test_compiled_update_equals_the_eager_one_and_never_recompiles():
    runs = compiled_and_eager_updates(lambda compile: build(sac_n, compile=compile, n_hidden=1), steps=3)
    graphs = runs[True][2]
    assert graphs[0] < graphs[1] == graphs[3], graphs  # compiled at step 1, then reused
    assert_compiled_equals_eager(runs)


def test_bf16_update_stays_close_to_float32():
    _, _, fp32, batch = build(sac_n)
    _, _, bf16, _ = build(sac_n, bf16=True)
    names = ("critic_loss", "q_data", "q_target", "actor_loss", "alpha_loss", "entropy")
    assert_bf16_close(fp32, bf16, batch, 2, "q_data", names)


# ---- settings tables and refused values -----------------------------------------------------------------
# What every CORL config of SAC-N and EDAC sets alike (configs/offline/{sac_n,edac}/*/*.yaml): 3000 epochs x 1000
# updates, an evaluation every 5 epochs on 10 episodes, gamma 0.99, tau 0.005, learning rates 3e-4 (actor, critics,
# alpha), hidden 256 (3 hidden layers: the scripts' networks), batch 256, normalize_reward false, no state normalization
CORL_COMMON = dict(total_steps=3_000_000, eval_every=5000, eval_episodes=10, discount=0.99, tau=0.005)
CORL_COMMON.update(actor_lr=3e-4, critic_lr=3e-4, alpha_lr=3e-4, hidden_dim=256, n_hidden=3, batch_size=256)
CORL_COMMON.update(normalize_reward=False, normalize_states=False, reward_scale=1.0, reward_bias=0.0)

# num_critics of every configs/offline/sac_n/<env>/<dataset>.yaml, under the name --env takes for the Minari dataset
# holding it (D4RL-style names: antmaze v2 -> D4RL/antmaze/*-v1, Adroit v1 -> D4RL/*/*-v2, maze2d v1 ->
# D4RL/pointmaze/*-v2); <env>-medium-v2 under mujoco/<env>/medium-v0 by name (other data); CORL's medium-replay and
# medium-expert have no Minari dataset
ADROIT_TASKS = ("pen", "door", "hammer", "relocate")
CORL_SAC_N = {
    **{f"antmaze-{kind}-v2": 25 for kind in ("umaze", "umaze-diverse", "medium-play", "medium-diverse")},
    **{f"antmaze-{kind}-v2": 25 for kind in ("large-play", "large-diverse")},
    **{
        f"{task}-{kind}-v1": 100
        for task in ("pen", "door", "hammer", "relocate")
        for kind in ("human", "cloned", "expert")
    },
    **{f"maze2d-{kind}-v1": 25 for kind in ("umaze", "medium", "large")},
    "halfcheetah-medium-v0": 10,
    "hopper-medium-v0": 500,
    "walker2d-medium-v0": 20,
}


def assert_corl_settings(module, env: str, expected: dict) -> None:
    """The settings a run on env gets (tables, no flags): CORL's common ones and the config's own."""
    args, _ = module.parse_args(["--env", env])
    wanted = {**CORL_COMMON, **expected}
    assert {k: getattr(args, k) for k in wanted} == wanted


@pytest.mark.parametrize("env", CORL_SAC_N)
def test_settings_are_corls_for_every_dataset_of_its_configs(env):
    assert_corl_settings(sac_n, env, {"num_critics": CORL_SAC_N[env]})


def test_datasets_without_a_corl_config_get_the_defaults():
    """Locomotion's simple and expert datasets keep CORL's budget, N = 10; a dataset of no D4RL domain, all defaults."""
    assert_corl_settings(sac_n, "hopper-expert-v0", {"num_critics": 10})
    args, _ = sac_n.parse_args(["--env", "local/pendulum/random-v0"])
    assert args == sac_n.Args(env="local/pendulum/random-v0")


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_critics=0), "num_critics, hidden_dim and n_hidden must be >= 1"),
        (dict(alpha_lr=0.0), "learning rates must be > 0"),
        (dict(tau=0.0), "tau in (0, 1]"),
        (dict(online_steps=10), "trains offline only"),
        (dict(mixing_ratio=0.5), "trains offline only"),
    ],
)
def test_out_of_range_values_and_fine_tuning_are_refused(flags, message):
    assert_invalid(sac_n, flags, message)
    sac_n.validate(sac_n.Args(num_critics=1))  # SAC with one critic: allowed


@pytest.mark.parametrize("script", ["sac_n.py", "edac.py"])
def test_fine_tuning_is_refused_on_the_command_line_with_the_reason(script, pendulum):
    """CORL has no fine-tuning recipe for SAC-N or EDAC: exit 2 before any data is read."""
    result = run_script(script, "--env", pendulum, "--online-steps", "10")
    assert_user_error(result, "trains offline only", "no algorithms/finetune/", "--online-steps")
