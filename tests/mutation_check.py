"""Mutation check of the test suite (run by hand, not in CI): do the tests notice a broken training loop?

    python tests/mutation_check.py                    # every mutation below
    python tests/mutation_check.py --only maze-sir-min atari-gae-mask
    python tests/mutation_check.py --list

For each mutation it copies the repository (the files git tracks, and the untracked ones it does not ignore) into a
temporary folder, replaces one exact piece of text in one file (the piece must occur exactly once), and runs the tests
named for that mutation. It prints `killed: NAME` when a test fails, `survived: NAME` when they all pass, and `error:
NAME (...)` when the patch no longer applies or pytest cannot run the tests. The exit code is 1 if any mutation survived
or errored. The unmutated copy must pass the same tests first (the baseline).

Every change to a training loop adds the mutations it makes possible, and a rewrite that moves the code keeps the
patches current (a patch that no longer applies is an error, not a pass).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in file
    new: str
    tests: tuple  # pytest node ids or files, relative to the repository root


# the spectral norm's last line, and the same with the final v normalised (the official code leaves it unnormalised)
SN_RETURN = "        return (u * (matrix @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)"
SN_FINAL_V_NORMALISED = "        v = v / torch.sqrt((v * v).sum(-1, keepdim=True) + 1e-8)\n" + SN_RETURN

MUTATIONS = [
    # ----------------------------------------------------------------------------------------------- deepspi_atari.py
    Mutation(
        "atari-reset-mask-swapped",
        "deepspi_atari.py",
        "            b_resets = dones[:-1].reshape(-1)\n        else:\n            b_resets = dones[1:].reshape(-1)",
        "            b_resets = dones[1:].reshape(-1)\n        else:\n            b_resets = dones[:-1].reshape(-1)",
        ("tests/test_atari_loop.py::test_reset_transitions_are_the_ones_the_emulator_reset",),
    ),
    Mutation(
        "atari-next-obs-is-obs",
        "deepspi_atari.py",
        "b_next_obs = obs[1:].reshape(",
        "b_next_obs = obs[:-1].reshape(",
        ("tests/test_atari_loop.py::test_reset_transitions_are_the_ones_the_emulator_reset",),
    ),
    Mutation(
        "atari-sir-min",
        "deepspi_atari.py",
        "sir = (newlogprobs - b_logprobs).exp().max().item()",
        "sir = (newlogprobs - b_logprobs).exp().min().item()",
        ("tests/test_atari_loop.py::test_logged_sir_is_the_max_ratio_of_the_saved_policy_over_the_last_batch",),
    ),
    Mutation(
        "atari-gae-mask-current-done",
        "deepspi_atari.py",
        "nextnonterminal = 1.0 - dones[t + 1]",
        "nextnonterminal = 1.0 - dones[t]",
        ("tests/test_atari_loop.py::test_gae_against_the_discounted_sum_of_td_errors_cut_by_the_next_observations_flag",),
    ),
    Mutation(
        "atari-gae-bootstraps-own-value",
        "deepspi_atari.py",
        "nextvalues = values[t + 1]",
        "nextvalues = values[t]",
        ("tests/test_atari_loop.py::test_gae_against_the_discounted_sum_of_td_errors_cut_by_the_next_observations_flag",),
    ),
    Mutation(
        "atari-minibatch-gets-returns-as-advantages",
        "deepspi_atari.py",
        "b_advantages = advantages.reshape(-1)",
        "b_advantages = returns.reshape(-1)",
        ("tests/test_atari_loop.py::test_gae_against_the_discounted_sum_of_td_errors_cut_by_the_next_observations_flag",),
    ),
    Mutation(
        "atari-sn-faithful-flag-ignored",
        "deepspi_atari.py",
        "agent = Agent(envs.single_action_space.n, args.sn_faithful).to(device)",
        "agent = Agent(envs.single_action_space.n).to(device)",
        ("tests/test_atari_loop.py::test_spectral_norm_mode_reaches_the_model",),
    ),
    Mutation(
        "atari-noise-unclipped",
        "deepspi_atari.py",
        "eps = torch.randn_like(loc).clamp(-1.0, 1.0) if eps is None else eps",
        "eps = torch.randn_like(loc) if eps is None else eps",
        ("tests/test_atari.py::test_transition_noise_is_clipped_to_one",),
    ),
    Mutation(
        "atari-torchrun-sums-gradients",
        "deepspi_atari_multigpu.py",
        "                    flat /= world_size\n",
        "",
        ("tests/test_atari_loop.py::test_torchrun_averages_the_gradients_of_the_two_ranks",),
    ),
    Mutation(
        "atari-greedy-eval-samples",
        "evaluate.py",
        "action = logits.argmax(1) if greedy else Categorical(logits=logits).sample()",
        "action = Categorical(logits=logits).sample()",
        ("tests/test_runs.py::test_greedy_evaluation_takes_the_argmax",),
    ),
    Mutation(
        "atari-negative-coefficients-accepted",
        "deepspi_atari.py",
        '("ent_coef vf_coef reward_loss_coef transition_loss_coef", lambda x: 0 <= x < math.inf,',
        '("ent_coef vf_coef", lambda x: 0 <= x < math.inf,',
        ("tests/test_atari.py::test_bad_input_exits_2_with_one_line[flags8-must be non-negative]",),
    ),
    Mutation(
        "atari-gamma-range-unchecked",
        "deepspi_atari.py",
        '("gamma", lambda x: 0.5 < x < 1,',
        '("gamma", lambda x: True,',
        ("tests/test_atari.py::test_bad_input_exits_2_with_one_line[flags10---gamma 1.0 must be in (0.5, 1)]",),
    ),
    Mutation(
        "atari-clip-vloss-ignored",
        "deepspi_atari.py",
        "                if args.clip_vloss:\n",
        "                if False:\n",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[clip-vloss]",),
    ),
    Mutation(  # a mistake between the rollout storage and the flattened arrays the world model trains on
        "atari-rewards-misaligned",
        "deepspi_atari.py",
        "        b_rewards = rewards.reshape(-1)\n",
        "        b_rewards = rewards.roll(1, 0).reshape(-1)\n",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "atari-utility-not-subtracted",
        "deepspi_atari.py",
        "                if not args.deep_mdp:\n                    mb_advantages = mb_advantages - wm_loss",
        "                if not args.deep_mdp:\n                    mb_advantages = mb_advantages",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "atari-utility-detached",
        "deepspi_atari.py",
        "                    mb_advantages = mb_advantages - wm_loss\n",
        "                    mb_advantages = mb_advantages - wm_loss.detach()\n",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "atari-deep-mdp-ignored",
        "deepspi_atari.py",
        "                if args.deep_mdp:  # DeepSPI: the DeepMDP ablation",
        "                if False:  # DeepSPI: the DeepMDP ablation",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[deep-mdp]",),
    ),
    Mutation(
        "atari-coefficients-swapped",
        "deepspi_atari.py",
        "wm_loss = args.reward_loss_coef * reward_loss + args.transition_loss_coef * transition_loss",
        "wm_loss = args.transition_loss_coef * reward_loss + args.reward_loss_coef * transition_loss",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "atari-adv-unbiased-std",
        "deepspi_atari.py",
        "(mb_advantages.std(unbiased=False) + 1e-8)",
        "(mb_advantages.std() + 1e-8)",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[ppo]",),
    ),
    Mutation(
        "atari-target-detached",
        "deepspi_atari.py",
        "next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), z, next_z)",
        "next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), z, next_z.detach())",
        ("tests/test_atari_loop.py::test_the_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "atari-reset-target-ignored",
        "deepspi_atari.py",
        "next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), z, next_z)",
        "next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), next_z, next_z)",
        ("tests/test_parity_official.py::test_world_model_method_per_sample_losses",),
    ),
    Mutation(
        "atari-bf16-ignored",
        "deepspi_atari.py",
        "dtype=torch.bfloat16, enabled=args.bf16)",
        "dtype=torch.bfloat16, enabled=False)",
        ("tests/test_atari_loop.py::test_bf16_reaches_the_rollout_and_the_update",),
    ),
    Mutation(
        "atari-sigma-in-bf16",
        "deepspi_atari.py",
        "    with torch.autocast(matrix.device.type, enabled=False):",
        "    with torch.autocast(matrix.device.type, enabled=torch.is_autocast_enabled(matrix.device.type)):",
        ("tests/test_atari.py::test_bf16_autocast_keeps_sigma_ratio_and_losses_in_float32",),
    ),
    Mutation(
        "atari-bf16-logits",
        "deepspi_atari.py",
        "logits = self.actor(hidden).float()",
        "logits = self.actor(hidden)",
        ("tests/test_atari_loop.py::test_bf16_reaches_the_rollout_and_the_update",),
    ),
    Mutation(
        "atari-host-read-per-minibatch",
        "deepspi_atari.py",
        "nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)",
        "nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, error_if_nonfinite=True)",
        ("tests/test_runs.py::test_no_host_reads_in_the_minibatch_loop",),
    ),
    Mutation(
        "atari-nonfinite-not-stopped",
        "deepspi_atari.py",
        "        if earliest < math.inf:",
        "        if False:",
        ("tests/test_runs.py::test_nonfinite_loss_stops_with_one_line_and_the_last_checkpoint_untouched",),
    ),
    Mutation(
        "atari-nonfinite-named-by-the-last-minibatch",
        "deepspi_atari.py",
        "bad = torch.where(bad.isinf() & ~terms.isfinite(),",
        "bad = torch.where(~terms.isfinite(),",
        ("tests/test_runs.py::test_nonfinite_loss_stops_with_one_line_and_the_last_checkpoint_untouched",),
    ),
    Mutation(
        "atari-nonfinite-svd-raises",
        "deepspi_atari.py",
        "torch.linalg.matrix_norm(matrix.nan_to_num(), ord=2)",
        "torch.linalg.matrix_norm(matrix, ord=2)",
        ("tests/test_runs.py::test_nonfinite_loss_stops_with_one_line_and_the_last_checkpoint_untouched",),
    ),
    Mutation(
        "atari-resume-takes-any-flag",
        "deepspi_atari.py",
        '            if arg.startswith("--") and name not in keep:',
        "            if False:",
        ("tests/test_runs.py::test_bad_run_flags_exit_2_with_one_line",),
    ),
    Mutation(
        "atari-stochastic-env-ignored",
        "deepspi_atari.py",
        "        sticky = 0.3\n        noop_max = 60",
        "        sticky = 0.3\n        noop_max = 30",
        ("tests/test_atari.py::test_stochastic_env_has_sticky_actions_and_60_noops",),
    ),
    Mutation(
        "atari-life-loss-not-terminal",
        "deepspi_atari.py",
        "terminated = terminated or lives < self.lives",
        "terminated = terminated",
        (
            "tests/test_atari.py::test_episode_bookkeeping_life_loss_ends_the_episode_the_score_runs_to_the_game_over[gymnasium-deepspi_atari]",
        ),
    ),
    Mutation(
        "atari-gymnasium-scores-read-envpool-style",
        "deepspi_atari.py",
        'final = infos.get("final_info", {})',
        "final = infos",
        (
            "tests/test_atari.py::test_episode_bookkeeping_life_loss_ends_the_episode_the_score_runs_to_the_game_over[gymnasium-deepspi_atari]",
        ),
    ),
    # ------------------------------------------------------------------------------------------------ deepspi_maze.py
    Mutation(
        "maze-sn-final-v-normalised",
        "deepspi_maze.py",
        SN_RETURN,
        SN_FINAL_V_NORMALISED,
        ("tests/test_parity_official.py::test_spectral_dense[deepspi_maze-cpu-dense_256x4]",),
    ),
    Mutation(
        "maze-noise-unclipped",
        "deepspi_maze.py",
        "eps = torch.randn_like(loc).clamp(-1.0, 1.0)",
        "eps = torch.randn_like(loc)",
        ("tests/test_atari.py::test_transition_noise_is_clipped_to_one[deepspi_maze]",),
    ),
    Mutation(
        "maze-transition-loc-unscaled",
        "deepspi_maze.py",
        "loc, scale = 0.5 * loc,",
        "loc, scale = 1.0 * loc,",
        ("tests/test_parity_official.py::test_transition_head[deepspi_maze-cpu-4]",),
    ),
    Mutation(
        "maze-reset-mask-dropped",
        "deepspi_maze.py",
        "b_rewards[mb_inds], b_resets[mb_inds])",
        "b_rewards[mb_inds], torch.zeros_like(b_resets[mb_inds]))",
        ("tests/test_maze_runs.py::test_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "maze-mask-next-done-inverted",
        "deepspi_maze.py",
        "dones[1:] if args.mask_next_done else dones[:-1]",
        "dones[:-1] if args.mask_next_done else dones[1:]",
        ("tests/test_maze_runs.py::test_world_model_reset_mask_flags_the_episode_boundaries",),
    ),
    Mutation(
        "maze-sir-min",
        "deepspi_maze.py",
        "b_logprobs).exp().max().item()",
        "b_logprobs).exp().min().item()",
        ("tests/test_maze_runs.py::test_sir_is_the_largest_importance_ratio_of_the_last_batch",),
    ),
    Mutation(
        "maze-gamma-range-unchecked",
        "deepspi_maze.py",
        '("gamma", lambda x: 0.5 < x < 1,',
        '("gamma", lambda x: True,',
        ("tests/test_maze.py::test_bad_input[flags11---gamma 1.0 must be in (0.5, 1), as the theory assumes]",),
    ),
    Mutation(
        "maze-utility-adds-the-world-model-loss",
        "deepspi_maze.py",
        "mb_advantages if args.deep_mdp else mb_advantages - wm_loss",
        "mb_advantages if args.deep_mdp else mb_advantages + wm_loss",
        ("tests/test_maze_runs.py::test_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "maze-deep-mdp-loss-dropped",
        "deepspi_maze.py",
        "loss = loss + wm_loss.mean()",
        "loss = loss + 0 * wm_loss.mean()",
        ("tests/test_maze_runs.py::test_loop_trains_on_the_reference_loss[deep_mdp]",),
    ),
    Mutation(
        "maze-world-model-on-detached-latents",
        "deepspi_maze.py",
        "reward_loss, transition_loss = agent.world_model_losses(z, next_z, *mb, distinct=distinct)",
        "reward_loss, transition_loss = agent.world_model_losses(z.detach(), next_z.detach(), *mb, "
        "distinct=(distinct[0].detach(), distinct[1]))",
        ("tests/test_maze_runs.py::test_loop_trains_on_the_reference_loss[deepspi]",),
    ),
    Mutation(
        "maze-resume-loses-adam",
        "deepspi_maze.py",
        'optimizer.load_state_dict(saved["optimizer"])',
        "optimizer.load_state_dict(optimizer.state_dict())",
        ("tests/test_maze_runs.py::test_sigterm_checkpoints_then_resume_goes_on_from_the_checkpoint",),
    ),
    Mutation(
        "maze-nonfinite-ignored",
        "deepspi_maze.py",
        "bad = torch.where(bad.isinf() & ~terms.isfinite(), epoch * args.batch_size + start, bad)",
        "bad = bad",
        ("tests/test_maze_runs.py::test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_checkpoint",),
    ),
    # ---------------------------------------------------------------------------------------------- dreamspi_atari.py
    Mutation(
        "dreamspi-sn-final-v-normalised",
        "dreamspi_atari.py",
        SN_RETURN,
        SN_FINAL_V_NORMALISED,
        ("tests/test_parity_official.py::test_spectral_dense[dreamspi_atari-cpu-dense_256x4]",),
    ),
    Mutation(
        "dreamspi-noise-unclipped",
        "dreamspi_atari.py",
        "eps = torch.randn_like(loc).clamp(-1.0, 1.0)",
        "eps = torch.randn_like(loc)",
        ("tests/test_atari.py::test_transition_noise_is_clipped_to_one[dreamspi_atari]",),
    ),
    Mutation(
        "dreamspi-transition-loc-unscaled",
        "dreamspi_atari.py",
        "loc, scale = 0.5 * loc,",
        "loc, scale = 1.0 * loc,",
        ("tests/test_parity_official.py::test_transition_head[dreamspi_atari-cpu-4]",),
    ),
    Mutation(
        "dreamspi-gae-bootstraps-own-value",
        "dreamspi_atari.py",
        'nextvalues = imagined["next_value"] if t == rewards.shape[0] - 1 else values[t + 1]',
        'nextvalues = imagined["next_value"] if t == rewards.shape[0] - 1 else values[t]',
        ("tests/test_atari.py::test_compute_gae_against_the_discounted_sum_of_td_errors[dreamspi_atari]",),
    ),
    Mutation(
        "dreamspi-real-step-moves-actor-critic",
        "dreamspi_atari.py",
        "step_groups(loss, agent, optimizers, real_groups, args.max_grad_norm)",
        "step_groups(loss, agent, optimizers, list(optimizers), args.max_grad_norm)",
        (
            "tests/test_dreamspi.py::test_loop_real_step_moves_only_encoder_and_world_model_imagination_only_actor_and_critic",
            "tests/test_dreamspi.py::test_loop_adam_step_counts_of_the_four_groups",
        ),
    ),
    Mutation(
        "dreamspi-imagine-from-next-dones",
        "dreamspi_atari.py",
        "imagine(agent, z0, dones[:-1].reshape(-1), args.imagination_horizon",
        "imagine(agent, z0, dones[1:].reshape(-1), args.imagination_horizon",
        ("tests/test_dreamspi.py::test_loop_imagines_from_every_encoded_real_state_with_its_own_done_flag",),
    ),
    Mutation(
        "dreamspi-done-target-current",
        "dreamspi_atari.py",
        "b_next_dones = dones[1:].reshape(-1)",
        "b_next_dones = dones[:-1].reshape(-1)",
        ("tests/test_dreamspi.py::test_loop_done_label_is_the_next_observations_flag_and_the_reset_mask_follows_the_backend",),
    ),
    Mutation(
        "dreamspi-done-loss-outside-the-utility",
        "dreamspi_atari.py",
        "args.reward_loss_coef * (reward_loss + done_loss) + args.transition_loss_coef",
        "args.reward_loss_coef * reward_loss + args.transition_loss_coef",
        ("tests/test_dreamspi.py::test_the_loop_trains_on_the_reference_losses[default]",),
    ),
    Mutation(
        "dreamspi-done-loss-on-the-current-latent",
        "dreamspi_atari.py",
        "F.smooth_l1_loss(torch.sigmoid(self.done_predictor(next_z))",
        "F.smooth_l1_loss(torch.sigmoid(self.done_predictor(z))",
        ("tests/test_dreamspi.py::test_the_loop_trains_on_the_reference_losses[default]",),
    ),
    Mutation(
        "dreamspi-real-step-clips-with-the-imagination-clip",
        "dreamspi_atari.py",
        "torch.clamp(ratio, 1 - args.wm_clip_coef, 1 + args.wm_clip_coef)",
        "torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)",
        ("tests/test_dreamspi.py::test_the_loop_trains_on_the_reference_losses[default]",),
    ),
    Mutation(
        "dreamspi-imagination-clips-with-the-real-step-clip",
        "dreamspi_atari.py",
        "-advantage * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)",
        "-advantage * torch.clamp(ratio, 1 - args.wm_clip_coef, 1 + args.wm_clip_coef)",
        ("tests/test_dreamspi.py::test_the_loop_trains_on_the_reference_losses[default]",),
    ),
    Mutation(
        "dreamspi-imagination-ignores-clip-vloss",
        "dreamspi_atari.py",
        "    if args.clip_vloss:  # CleanRL's clipped value loss, as in the real-data step",
        "    if False:",
        ("tests/test_dreamspi.py::test_the_loop_trains_on_the_reference_losses[clip-vloss-dyna]",),
    ),
    Mutation(
        "dreamspi-imagination-nonfinite-ignored",
        "dreamspi_atari.py",
        "i_bad = torch.where(i_bad.isinf() & ~terms.isfinite(), position, i_bad)",
        "i_bad = i_bad",
        (
            "tests/test_dreamspi_runs.py::test_nonfinite_loss_stops_with_one_line_and_the_last_checkpoint_untouched[imagination]",
        ),
    ),
    Mutation(
        "dreamspi-learning-rates-may-be-infinite",  # a nan rate still fails, as not positive: the test sees the message
        "dreamspi_atari.py",
        '("actor_learning_rate critic_learning_rate", lambda x: 0 < x < math.inf, "positive and finite")',
        '("actor_learning_rate critic_learning_rate", lambda x: 0 < x, "positive and finite")',
        (
            "tests/test_dreamspi.py::test_bad_input_exits_2_with_one_line"
            "[flags14---critic-learning-rate inf must be positive and finite]",
        ),
    ),
    Mutation(
        "dreamspi-stochastic-env-ignored",
        "dreamspi_atari.py",
        "    if stochastic:  # the official stochastic ALE",
        "    if False:  # the official stochastic ALE",
        ("tests/test_dreamspi.py::test_stochastic_env_has_sticky_actions_and_60_noops",),
    ),
    Mutation(
        "dreamspi-stochastic-env-not-passed-to-training",
        "dreamspi_atari.py",
        "env_seed, stochastic=args.stochastic_env)",
        "env_seed)",
        ("tests/test_dreamspi.py::test_cli_stochastic_env_reaches_the_training_envs",),
    ),
    Mutation(
        "dreamspi-life-loss-not-terminal",
        "dreamspi_atari.py",
        "terminated = terminated or lives < self.lives",
        "terminated = terminated",
        (
            "tests/test_atari.py::test_episode_bookkeeping_life_loss_ends_the_episode_the_score_runs_to_the_game_over[gymnasium-dreamspi_atari]",
        ),
    ),
    Mutation(
        "dreamspi-gymnasium-scores-read-envpool-style",
        "dreamspi_atari.py",
        'final = infos.get("final_info", {})',
        "final = infos",
        (
            "tests/test_atari.py::test_episode_bookkeeping_life_loss_ends_the_episode_the_score_runs_to_the_game_over[gymnasium-dreamspi_atari]",
        ),
    ),
    Mutation(
        "dreamspi-resume-skips-the-weights",
        "dreamspi_atari.py",
        '        agent.load_state_dict(saved["model"])\n        for name, optimizer in optimizers.items():\n',
        "        for name, optimizer in optimizers.items():\n",
        ("tests/test_dreamspi_runs.py::test_sigterm_checkpoints_then_resume_goes_on_from_the_checkpoint",),
    ),
    Mutation(
        "dreamspi-resume-skips-the-optimizers",
        "dreamspi_atari.py",
        'optimizer.load_state_dict(saved["optimizers"][name])',
        "optimizer.load_state_dict(optimizer.state_dict())",
        ("tests/test_dreamspi_runs.py::test_sigterm_checkpoints_then_resume_goes_on_from_the_checkpoint",),
    ),
    # ------------------------------- the PPO update's schedule and the rollout's storage (tests/test_update_rollout.py)
    Mutation(
        "atari-shuffled-once-not-per-epoch",
        "deepspi_atari.py",
        "            np.random.shuffle(b_inds)\n",
        "            if epoch == 0:\n                np.random.shuffle(b_inds)\n",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[atari-envpool-b_inds]",),
    ),
    Mutation(
        "atari-minibatch-slice-off-by-one",
        "deepspi_atari.py",
        "mb_inds = b_inds[start:end]",
        "mb_inds = b_inds[start : end + 1]",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[atari-envpool-b_inds]",),
    ),
    Mutation(
        "atari-last-minibatch-skipped",
        "deepspi_atari.py",
        "for start in range(0, args.batch_size, args.minibatch_size):",
        "for start in range(0, args.batch_size - args.minibatch_size, args.minibatch_size):",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[atari-envpool-b_inds]",),
    ),
    Mutation(
        "atari-extra-optimizer-step",
        "deepspi_atari.py",
        "                optimizer.step()\n",
        "                optimizer.step()\n                optimizer.step()\n",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[atari-envpool-b_inds]",),
    ),
    Mutation(
        "atari-target-kl-ignored",
        "deepspi_atari.py",
        "if args.target_kl is not None and approx_kl > args.target_kl:",
        "if False:",
        ("tests/test_update_rollout.py::test_target_kl_stops_the_update_at_the_end_of_an_epoch[atari-gymnasium-kl]",),
    ),
    Mutation(
        "atari-target-kl-stops-mid-epoch",
        "deepspi_atari.py",
        "                mb_inds = b_inds[start:end]\n",
        "                if start and args.target_kl is not None and approx_kl > args.target_kl:\n"
        "                    break\n"
        "                mb_inds = b_inds[start:end]\n",
        ("tests/test_update_rollout.py::test_target_kl_stops_the_update_at_the_end_of_an_epoch[atari-gymnasium-kl]",),
    ),
    Mutation(
        "atari-gradient-not-clipped",
        "deepspi_atari.py",
        "nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)",
        'nn.utils.clip_grad_norm_(agent.parameters(), float("inf"))',
        ("tests/test_update_rollout.py::test_every_step_is_clipped_to_max_grad_norm[atari-envpool]",),
    ),
    Mutation(
        "atari-gradient-clipped-to-twice-the-max",
        "deepspi_atari.py",
        "nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)",
        "nn.utils.clip_grad_norm_(agent.parameters(), 2 * args.max_grad_norm)",
        ("tests/test_update_rollout.py::test_every_step_is_clipped_to_max_grad_norm[atari-envpool]",),
    ),
    Mutation(
        "atari-lr-not-annealed",
        "deepspi_atari.py",
        'optimizer.param_groups[0]["lr"] = lrnow',
        'optimizer.param_groups[0]["lr"] = args.learning_rate',
        ("tests/test_update_rollout.py::test_learning_rate_is_annealed_per_iteration[atari-envpool]",),
    ),
    Mutation(
        "atari-lr-frac-off-by-one",
        "deepspi_atari.py",
        "frac = 1.0 - (iteration - 1.0) / args.num_iterations",
        "frac = 1.0 - iteration / args.num_iterations",
        ("tests/test_update_rollout.py::test_learning_rate_is_annealed_per_iteration[atari-envpool]",),
    ),
    Mutation(
        "atari-lr-annealed-despite-no-anneal-lr",
        "deepspi_atari.py",
        "        if args.anneal_lr:\n",
        "        if True:\n",
        ("tests/test_update_rollout.py::test_learning_rate_is_annealed_per_iteration[atari-gymnasium-kl]",),
    ),
    Mutation(
        "atari-rewards-unclipped",
        "deepspi_atari.py",
        "reward_clip=True,",
        "reward_clip=False,",
        ("tests/test_update_rollout.py::test_rollout_stores_what_the_env_returned[atari-envpool]",),
    ),
    Mutation(
        "atari-rewards-shifted-by-one-step",
        "deepspi_atari.py",
        "rewards[step] = torch.tensor(reward)",
        "rewards[step - 1] = torch.tensor(reward)",
        ("tests/test_update_rollout.py::test_rollout_stores_what_the_env_returned[atari-envpool]",),
    ),
    Mutation(
        "atari-actions-from-another-sample",
        "deepspi_atari.py",
        "actions[step] = action\n",
        "actions[step] = agent.get_action_and_value(next_obs)[0]\n",
        ("tests/test_update_rollout.py::test_rollout_stores_what_the_env_returned[atari-envpool]",),
    ),
    Mutation(
        "atari-logprobs-shifted-by-one-step",
        "deepspi_atari.py",
        "logprobs[step] = logprob",
        "logprobs[step - 1] = logprob",
        ("tests/test_update_rollout.py::test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys[atari-envpool]",),
    ),
    Mutation(
        "atari-values-shifted-by-one-step",
        "deepspi_atari.py",
        "values[step] = value.flatten()",
        "values[step - 1] = value.flatten()",
        ("tests/test_update_rollout.py::test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys[atari-envpool]",),
    ),
    Mutation(
        "atari-next-value-of-the-last-acted-obs",
        "deepspi_atari.py",
        "next_value = agent.get_value(next_obs).reshape(1, -1)",
        "next_value = agent.get_value(obs[args.num_steps - 1]).reshape(1, -1)",
        ("tests/test_update_rollout.py::test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys[atari-envpool]",),
    ),
    Mutation(
        "maze-shuffled-once-not-per-epoch",
        "deepspi_maze.py",
        "            np.random.shuffle(b_inds)\n",
        "            if epoch == 0:\n                np.random.shuffle(b_inds)\n",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[maze-b_inds]",),
    ),
    Mutation(
        "maze-last-minibatch-skipped",
        "deepspi_maze.py",
        "for start in range(0, args.batch_size, args.minibatch_size):",
        "for start in range(0, args.batch_size - args.minibatch_size, args.minibatch_size):",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[maze-b_inds]",),
    ),
    Mutation(
        "maze-extra-optimizer-step",
        "deepspi_maze.py",
        "                optimizer.step()\n",
        "                optimizer.step()\n                optimizer.step()\n",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[maze-b_inds]",),
    ),
    Mutation(
        "maze-target-kl-ignored",
        "deepspi_maze.py",
        "if args.target_kl is not None and approx_kl > args.target_kl:",
        "if False:",
        ("tests/test_update_rollout.py::test_target_kl_stops_the_update_at_the_end_of_an_epoch[maze-kl]",),
    ),
    Mutation(
        "maze-gradient-not-clipped",
        "deepspi_maze.py",
        "nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)",
        'nn.utils.clip_grad_norm_(agent.parameters(), float("inf"))',
        ("tests/test_update_rollout.py::test_every_step_is_clipped_to_max_grad_norm[maze]",),
    ),
    Mutation(
        "maze-lr-not-annealed",
        "deepspi_maze.py",
        'optimizer.param_groups[0]["lr"] = lrnow',
        'optimizer.param_groups[0]["lr"] = args.learning_rate',
        ("tests/test_update_rollout.py::test_learning_rate_is_annealed_per_iteration[maze]",),
    ),
    Mutation(
        "maze-rewards-shifted-by-one-step",
        "deepspi_maze.py",
        "rewards[step] = torch.tensor(reward",
        "rewards[step - 1] = torch.tensor(reward",
        ("tests/test_update_rollout.py::test_rollout_stores_what_the_env_returned[maze]",),
    ),
    Mutation(
        "maze-values-shifted-by-one-step",
        "deepspi_maze.py",
        "values[step] = value.flatten()",
        "values[step - 1] = value.flatten()",
        ("tests/test_update_rollout.py::test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys[maze]",),
    ),
    Mutation(
        "maze-next-value-of-the-last-acted-obs",
        "deepspi_maze.py",
        "next_value = agent.get_value(next_obs).reshape(1, -1)",
        "next_value = agent.get_value(obs[args.num_steps - 1]).reshape(1, -1)",
        ("tests/test_update_rollout.py::test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys[maze]",),
    ),
    Mutation(
        "dreamspi-shuffled-once-not-per-epoch",
        "dreamspi_atari.py",
        "            np.random.shuffle(b_inds)\n",
        "            if epoch == 0:\n                np.random.shuffle(b_inds)\n",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[dreamspi-b_inds]",),
    ),
    Mutation(
        "dreamspi-imagination-shuffled-once",
        "dreamspi_atari.py",
        "            np.random.shuffle(i_inds)\n",
        "            if epoch == 0:\n                np.random.shuffle(i_inds)\n",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[dreamspi-i_inds]",),
    ),
    Mutation(
        "dreamspi-groups-annealed-from-the-encoder-rate",
        "dreamspi_atari.py",
        'optimizer.param_groups[0]["lr"] = frac * learning_rates[name]',
        'optimizer.param_groups[0]["lr"] = frac * learning_rates["encoder"]',
        ("tests/test_update_rollout.py::test_learning_rate_is_annealed_per_iteration[dreamspi]",),
    ),
    Mutation(
        "dreamspi-world-model-gradient-not-clipped",
        "dreamspi_atari.py",
        "nn.utils.clip_grad_norm_(groups[name], max_grad_norm)",
        'nn.utils.clip_grad_norm_(groups[name], float("inf") if name == "world_model" else max_grad_norm)',
        ("tests/test_update_rollout.py::test_every_step_is_clipped_to_max_grad_norm[dreamspi]",),
    ),
    Mutation(
        "dreamspi-imagination-last-minibatch-skipped",
        "dreamspi_atari.py",
        "for start in range(0, args.imagination_batch_size, args.minibatch_size):",
        "for start in range(0, args.imagination_batch_size - args.minibatch_size, args.minibatch_size):",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[dreamspi-i_inds]",),
    ),
    Mutation(
        "dreamspi-imagination-minibatch-slice-off-by-one",
        "dreamspi_atari.py",
        "mb_inds = i_inds[start:end]",
        "mb_inds = i_inds[start : end + 1]",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[dreamspi-i_inds]",),
    ),
    Mutation(
        "dreamspi-imagination-epochs-ignored",
        "dreamspi_atari.py",
        "for epoch in range(args.imagination_epochs):",
        "for epoch in range(1):",
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[dreamspi-i_inds]",),
    ),
    Mutation(
        "dreamspi-imagination-steps-the-actor-twice",
        "dreamspi_atari.py",
        'step_groups(loss, agent, optimizers, ["actor", "critic"], args.max_grad_norm)',
        'step_groups(loss, agent, optimizers, ["actor", "critic", "actor"], args.max_grad_norm)',
        ("tests/test_update_rollout.py::test_each_epoch_partitions_the_batch_in_a_fresh_order[dreamspi-i_inds]",),
    ),
    Mutation(
        "dreamspi-actor-gradient-not-clipped",
        "dreamspi_atari.py",
        "nn.utils.clip_grad_norm_(groups[name], max_grad_norm)",
        'nn.utils.clip_grad_norm_(groups[name], float("inf") if name == "actor" else max_grad_norm)',
        ("tests/test_update_rollout.py::test_every_step_is_clipped_to_max_grad_norm[dreamspi]",),
    ),
    Mutation(
        "dreamspi-lr-frac-off-by-one",
        "dreamspi_atari.py",
        "frac = 1.0 - (iteration - 1.0) / args.num_iterations",
        "frac = 1.0 - iteration / args.num_iterations",
        ("tests/test_update_rollout.py::test_learning_rate_is_annealed_per_iteration[dreamspi]",),
    ),
    Mutation(
        "dreamspi-values-shifted-by-one-step",
        "dreamspi_atari.py",
        "values[step] = value.flatten()",
        "values[step - 1] = value.flatten()",
        ("tests/test_update_rollout.py::test_rollout_logprobs_values_and_bootstrap_are_the_acting_policys[dreamspi]",),
    ),
]


def copy_repo(dest):
    """The working tree as git sees it (tracked + untracked, not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    repo = os.path.join(dest, "repo")
    for f in filter(None, files):
        src = os.path.join(REPO, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(repo, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(repo, f))
    return repo


def run_tests(repo, tests, timeout):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, then stop")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = parser.parse_args()
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        sys.exit("mutation_check.py: duplicate mutation names")
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"mutation_check.py: error: unknown mutations {unknown}", file=sys.stderr)
            sys.exit(2)
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.file} -> {' '.join(m.tests)}")
        return 0

    bad = 0
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        repo = copy_repo(tmp)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            start = time.time()
            rc, tail = run_tests(repo, tests, args.timeout * 3)
            if rc != 0:
                print(f"baseline: the unmutated tests do not pass (pytest rc {rc}): {tail}")
                return 1
            print(f"baseline: {len(tests)} test selections pass unmutated ({time.time() - start:.0f} s)", flush=True)
        for m in chosen:
            path = os.path.join(repo, m.file)
            with open(path) as f:
                original = f.read()
            count = original.count(m.old)
            if count != 1:
                print(f"error: {m.name} (the patch text occurs {count} times in {m.file}, not once)", flush=True)
                bad += 1
                continue
            with open(path, "w") as f:
                f.write(original.replace(m.old, m.new))
            start = time.time()
            try:
                rc, tail = run_tests(repo, list(m.tests), args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            took = f"{time.time() - start:.0f} s"
            if rc == 1:
                print(f"killed: {m.name} ({took})", flush=True)
            elif rc == 0:
                print(f"survived: {m.name} ({took})", flush=True)
                bad += 1
            else:  # 2-5: interrupted, internal or usage error, no tests collected; None: time-out
                print(f"error: {m.name} (pytest rc {rc}, {took}: {' '.join(tail)})", flush=True)
                bad += 1
    print(f"{len(chosen) - bad} of {len(chosen)} mutations killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
