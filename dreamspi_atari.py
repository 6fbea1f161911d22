# DreamSPI on Atari, single file: README.md; paper: https://arxiv.org/abs/2510.12312 (Delgrange, Avalos, Roepke, ICLR 2026)
# Real data trains only the encoder and the Lipschitz latent world model, through the DeepSPI utility inside the clipped
# surrogate; the actor and critic learn only from imagined latent rollouts of that world model (clipped PPO on latents).
import copy
import dataclasses
import difflib
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

gym.register_envs(ale_py)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, cudnn.deterministic and, on CPU, use_deterministic_algorithms: CPU runs and resumes are repeatable"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    bf16: bool = False
    """bfloat16 convolutions and matmuls (autocast), float32 spectral norms and losses; slow on AVX2-only CPUs (emulated)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "deepspi"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    progress: bool = True
    """show a progress bar (only when the output is a terminal)"""
    save_model: bool = False
    """save the trained agent to `runs/{run_name}/{exp_name}.cleanrl_model`"""
    checkpoint_every: int = 200
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on a signal or a NaN)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint.pt, with its arguments and new games, in `runs/{run_name}`"""
    eval_episodes: int = 0
    """after training, play this many full games with the greedy and with the sampled policy (0: no evaluation)"""
    eval_only: Optional[str] = None
    """evaluate this .cleanrl_model or checkpoint.pt instead of training (--eval-episodes games, 10 if it is 0)"""
    capture_video: bool = False
    """record env 0's evaluation game to `videos/{run_name}/{greedy,sampled}` (needs --eval-episodes or --eval-only)"""

    # Algorithm specific arguments
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the environment (`XNoFrameskip-v4`, `X-v5` or `ALE/X-v5`)"""
    env_backend: Literal["envpool", "gymnasium"] = "envpool"
    """the Atari simulator: envpool (fast) or gymnasium + ale-py (equivalent preprocessing)"""
    stochastic_env: bool = False
    """the official stochastic ALE (paper's ALE-57): sticky actions 0.3 and up to 60 no-ops at reset (else the id's, 30)"""
    total_timesteps: int = 10000000
    """total timesteps of the experiments"""
    encoder_learning_rate: float = 2e-4
    """the learning rate of the encoder group (the conv layers; trained on real data only)"""
    world_model_learning_rate: float = 2e-4
    """the learning rate of the world-model group (reward, transition and done heads; trained on real data only)"""
    actor_learning_rate: float = 2.75e-5
    """the learning rate of the actor group (the FC-512 torso and the actor head; trained on imagined data)"""
    critic_learning_rate: float = 2.75e-5
    """the learning rate of the critic group (the critic head; trained on imagined data)"""
    num_envs: int = 128
    """the number of parallel game environments (official DeepSPI: 128 x 8, CleanRL PPO: 8 x 128)"""
    num_steps: int = 8
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle linear learning rate annealing (each of the four groups from its own rate to 0)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches of the real-data step (the imagined batch is split into this x horizon)"""
    update_epochs: int = 4
    """the K epochs of the real-data (encoder + world model) step"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient epsilon of the imagination (actor-critic) step; C = 1 + epsilon"""
    wm_clip_coef: float = 0.1
    """the surrogate clipping coefficient of the real-data (encoder + world model) step"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function (the value loss is not clipped, as in the official code)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping, applied to each parameter group on its own"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold (checked after each epoch of both steps)"""
    reward_loss_coef: float = 0.01
    """alpha_R: weight of the per-sample reward and done losses in the utility"""
    transition_loss_coef: float = 5e-4
    """alpha_P: weight of the per-sample latent transition (Wasserstein) loss in the utility"""
    deep_mdp: bool = False
    """DeepMDP ablation: add the world-model losses to the loss instead of subtracting them from the advantage"""
    sn_faithful: bool = True
    """reproduce the official spectral norm (sigma = ||W^T u||^2, not 1-Lipschitz); False: exact sigma_1, 1-Lipschitz layers"""
    imagination_horizon: int = 8
    """H: the number of world-model steps imagined from every encoded real state"""
    imagination_epochs: int = 1
    """the epochs of the imagination (actor-critic) step"""
    soft_done: bool = False
    """imagined dones are the predicted probabilities (the latent is not frozen) instead of Bernoulli draws"""
    dyna_style: bool = False
    """the real-data step also updates the actor and critic (with the full DeepSPI loss)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    imagination_batch_size: int = 0
    """the imagined batch size, horizon x batch size (computed in runtime)"""
    imagination_num_minibatches: int = 0
    """the number of imagined mini-batches, num_minibatches x horizon (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# the flags that --resume and --eval-only take from the command line; all others come from the saved run
RUN_FLAGS = {
    "cuda", "bf16", "progress", "track", "wandb_project_name", "wandb_entity", "save_model", "checkpoint_every", "resume",
    "eval_episodes", "eval_only", "capture_video",
}  # fmt: skip
# the loss terms checked for non-finite values in every minibatch, as the error message names them; policy last: a
# non-finite world-model loss makes the policy loss non-finite too (through the utility)
LOSS_TERMS = {"v_loss": "value", "entropy_loss": "entropy", "reward_loss": "reward", "transition_loss": "transition"}
LOSS_TERMS.update(done_loss="done", pg_loss="policy")


# (random, human) scores for the human-normalised score, as in the official utils/scores.py
ATARI_SCORES = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "Asteroids": (719.1, 47388.7), "Atlantis": (12850.0, 29028.1), "BankHeist": (14.2, 753.1),
    "BattleZone": (2360.0, 37187.5), "BeamRider": (363.9, 16926.5), "Berzerk": (123.7, 2630.4), "Bowling": (23.1, 160.7),
    "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5), "Centipede": (2090.9, 12017.0), "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4), "Defender": (2874.5, 18688.9), "DemonAttack": (152.1, 1971.0),
    "DoubleDunk": (-18.6, -16.4), "Enduro": (0.0, 860.5), "FishingDerby": (-91.7, -38.7), "Freeway": (0.0, 29.6),
    "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5), "Gravitar": (173.0, 3351.4), "Hero": (1027.0, 30826.4),
    "IceHockey": (-11.2, 0.9), "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MontezumaRevenge": (0.0, 4753.3), "MsPacman": (307.3, 6951.6),
    "NameThisGame": (2292.3, 8049.0), "Phoenix": (761.4, 7242.6), "Pitfall": (-229.4, 6463.7), "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0), "Riverraid": (1338.5, 17118.0), "RoadRunner": (11.5, 7845.0),
    "Robotank": (2.2, 11.9), "Seaquest": (68.4, 42054.7), "Skiing": (-17098.1, -4336.9), "Solaris": (1236.3, 12326.7),
    "SpaceInvaders": (148.0, 1668.7), "StarGunner": (664.0, 10250.0), "Surround": (-10.0, 6.5), "Tennis": (-23.8, -8.3),
    "TimePilot": (3568.0, 5229.2), "Tutankham": (11.4, 167.6), "UpNDown": (533.4, 11693.2), "Venture": (0.0, 1187.5),
    "VideoPinball": (16256.9, 17667.9), "WizardOfWor": (563.5, 4756.5), "YarsRevenge": (3092.9, 54576.9),
    "Zaxxon": (32.5, 9173.3),
}  # fmt: skip


def fail(message):
    """Bad input: one clear line and exit code 2, no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def given_flags(argv):
    """The Args fields set on this command line (`--x-y v`, `--x_y=v`, `--no-x-y`)."""
    fields = {f.name for f in dataclasses.fields(Args)}
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {n[3:] if n not in fields and n.startswith("no_") else n for n in names} & fields


def parse_env_id(env_id):
    """Split an Atari id into (game, sticky-action probability). `XNoFrameskip-v4` and envpool's `X-v5` have no
    sticky actions; gymnasium's `ALE/X-v5` keeps its 0.25. Returns None for anything else."""
    m = re.fullmatch(r"(ALE/)?([A-Za-z0-9]+?)(NoFrameskip-v4|-v5)", env_id)
    if m is None or (m.group(1) and m.group(3) != "-v5"):
        return None
    return m.group(2), 0.25 if m.group(1) else 0.0


def valid_env_ids():
    games = sorted(k[4:-3] for k in gym.registry if re.fullmatch(r"ALE/[A-Za-z0-9]+-v5", k))
    return [i for g in games for i in (f"{g}NoFrameskip-v4", f"{g}-v5", f"ALE/{g}-v5") if i in gym.registry or "/" not in i]


def check_args(args):
    """Every flag against its domain, before anything is built: one line and exit code 2 otherwise. The theory's
    condition on gamma * C stays a notice (printed later)."""
    if parse_env_id(args.env_id) is None or args.env_id not in valid_env_ids():
        close = difflib.get_close_matches(args.env_id, valid_env_ids(), n=3, cutoff=0.5)
        fail(f"unknown env id {args.env_id!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    flag = lambda name: f"--{name.replace('_', '-')} {getattr(args, name)}"  # noqa: E731
    rates = ["encoder_learning_rate", "world_model_learning_rate", "actor_learning_rate", "critic_learning_rate"]
    floats = [*rates, "gamma", "gae_lambda", "clip_coef", "wm_clip_coef", "ent_coef", "vf_coef", "max_grad_norm"]
    floats += ["reward_loss_coef", "transition_loss_coef"] + ["target_kl"] * (args.target_kl is not None)
    positive = ["num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps", *rates]
    positive += ["imagination_horizon", "imagination_epochs"]
    checks = [(math.isfinite(getattr(args, n)), f"{flag(n)} must be finite") for n in floats]
    checks += [(getattr(args, n) > 0, f"{flag(n)} must be positive") for n in positive + ["max_grad_norm"]]
    checks += [
        (0.5 < args.gamma < 1, f"{flag('gamma')} must lie in (0.5, 1), as the theory assumes"),
        (0 <= args.gae_lambda <= 1, f"{flag('gae_lambda')} must lie in [0, 1]"),
        (0 < args.clip_coef < 1, f"{flag('clip_coef')} must lie in (0, 1)"),
        (0 < args.wm_clip_coef < 1, f"{flag('wm_clip_coef')} must lie in (0, 1)"),
        (args.target_kl is None or args.target_kl > 0, f"{flag('target_kl')} must be positive"),
        (args.eval_episodes or not args.capture_video, "--capture-video needs --eval-episodes N or --eval-only"),
    ]
    nonnegative = ["ent_coef", "vf_coef", "reward_loss_coef", "transition_loss_coef", "checkpoint_every", "eval_episodes"]
    checks += [(getattr(args, n) >= 0, f"{flag(n)} must be non-negative") for n in nonnegative]
    for ok, message in checks:
        if not ok:
            fail(message)


class EpisodicLifeEnv(gym.Wrapper):
    """Episodic life with fire reset, which gymnasium lacks (envpool's episodic_life): a lost life ends the episode for
    learning, and the reset that follows goes on with the same game (one no-op to leave the lost-life frame, then FIRE);
    only a game over or the time limit resets the game."""

    def __init__(self, env):
        super().__init__(env)
        self.lives, self.game_over = 0, True
        self.fire = env.unwrapped.get_action_meanings()[1] == "FIRE"

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over, lives = terminated or truncated, self.env.unwrapped.ale.lives()
        terminated, self.lives = terminated or lives < self.lives, lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, _, _, info = self.env.step(0)
        if self.fire:
            obs, _, _, _, info = self.env.step(1)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


def make_env(game, sticky, noop_max, seed, video_dir=None):
    """The gymnasium + ale-py equivalent of envpool's preprocessing: no-op reset, frame skip 4 with max-pool, 84x84
    grey, 4-frame stack, episodic life with fire reset, sign-clipped rewards."""

    def thunk():
        # ALE/X-v5 with frameskip 1 and no sticky actions is XNoFrameskip-v4; AtariPreprocessing skips the frames
        mode = "rgb_array" if video_dir else None
        env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=sticky, render_mode=mode)
        if video_dir:  # the first game in colour, every emulator frame (60 per second)
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda e: e == 0, fps=60)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # under the life wrapper: the raw full-game score
        env = gym.wrappers.FrameStackObservation(env, 4)
        env = EpisodicLifeEnv(env)  # outside the frame stack, which keeps rolling across a lost life
        env = gym.wrappers.TransformReward(env, np.sign)
        env.reset(seed=seed)  # seeds the emulator and the no-op draws; the vector env's reset goes on from there
        return env

    return thunk


def finished_games(infos, truncations, scores):
    """{env index: raw full-game score} of the games that ended in this step. gymnasium: RecordEpisodeStatistics under
    the life wrapper (SAME_STEP autoreset moves the finishing step's info to final_info); envpool: summed in scores
    (its info["reward"] is the raw reward and info["terminated"] the game over)."""
    if "reward" not in infos:
        final = infos.get("final_info", {})
        return {i: final["episode"]["r"][i] for i in np.nonzero(final.get("_episode", []))[0]}
    scores += infos["reward"]
    ended = np.nonzero(np.logical_or(infos["terminated"], truncations))[0]
    games = {i: scores[i] for i in ended}
    scores[ended] = 0
    return games


def make_envs(env_id, backend, num_envs, seed, video_dir=None, stochastic=False):
    """num_envs envs; env i is seeded with seed + i. video_dir: record env 0's first game (gymnasium backend only).
    stochastic: the official stochastic_env, sticky actions 0.3 and up to 60 no-ops, whatever the id says."""
    game, sticky = parse_env_id(env_id)
    sticky, noop_max = (0.3, 60) if stochastic else (sticky, 30)
    if backend == "envpool":
        import envpool

        if f"{game}-v5" not in envpool.list_all_envs():
            fail(f"envpool has no {game}-v5; use --env-backend gymnasium")
        return envpool.make(
            f"{game}-v5",
            env_type="gymnasium",
            num_envs=num_envs,
            episodic_life=True,
            reward_clip=True,
            seed=seed,
            repeat_action_probability=sticky,
            noop_max=noop_max,
        )
    thunks = [make_env(game, sticky, noop_max, seed + i, video_dir if i == 0 else None) for i in range(num_envs)]
    return gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def group_sort(x):
    """GroupSort(2) over dim 1: each adjacent pair of channels becomes (min, max); 1-Lipschitz and gradient-norm preserving."""
    if x.shape[1] % 2:
        raise ValueError(f"group_sort needs an even number of channels, got {x.shape[1]}")
    return x.unflatten(1, (-1, 2)).sort(dim=2).values.flatten(1, 2)


def spectral_sigma(matrix, v0, n_iters=2, faithful=True):
    """Spectral-norm estimate of matrix (batched over leading dims), differentiable: no stop-gradient anywhere.
    faithful: the official power iteration from the fixed start vector v0, whose final v = M^T u is left unnormalised, so
    it returns ||M^T u||^2 (roughly sigma_1^2): W/sigma is then not 1-Lipschitz, its gain ~1/||W|| is learnable.
    Otherwise: the exact largest singular value, so W/sigma has spectral norm 1 (a 1-Lipschitz layer)."""
    with torch.autocast(matrix.device.type, enabled=False):  # float32 also under --bf16: sigma scales every layer
        if not faithful:
            return torch.linalg.matrix_norm(matrix, ord=2)
        v = v0.expand(matrix.shape[:-2] + v0.shape)
        for _ in range(n_iters):
            v = v / torch.sqrt((v * v).sum(-1, keepdim=True) + 1e-8)
            u = (matrix @ v.unsqueeze(-1)).squeeze(-1)
            u = u / torch.sqrt((u * u).sum(-1, keepdim=True) + 1e-8)
            v = (matrix.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        return (u * (matrix @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)


def lecun_normal_(weight, fan_in):
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978  # truncated at 2 std, as Flax's lecun_normal
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def start_vector(n):
    # one fixed N(0, I) draw per size, shared by all layers of that size (like the official PRNGKey(0) draw)
    return torch.randn(n, generator=torch.Generator().manual_seed(0))


class SNLinear(nn.Module):
    """Dense layer with spectral normalisation recomputed in every forward pass (paper: Lipschitz world model)."""

    def __init__(self, in_features, out_features, faithful=True, n_iters=2):
        super().__init__()
        self.weight = nn.Parameter(lecun_normal_(torch.empty(out_features, in_features), in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("v0", start_vector(out_features))
        self.faithful, self.n_iters = faithful, n_iters

    def sigma(self):
        # the official layer iterates on its (in, out) kernel, i.e. on weight.t(), with v0 of size out
        return spectral_sigma(self.weight.t(), self.v0, self.n_iters, self.faithful)

    def normalized_weight(self):
        return self.weight / self.sigma()

    def forward(self, x):
        return F.linear(x, self.normalized_weight(), self.bias)


class SNConv2d(nn.Module):
    """2x2 stride-1 conv with XLA "SAME" padding (bottom/right only) and per-group spectral normalisation of the
    (out_g, in_g*kh*kw) kernel matrices, all groups sharing one start vector, as in the official code."""

    def __init__(self, in_channels, out_channels, kernel_size=2, groups=1, faithful=True, n_iters=2):
        super().__init__()
        fan_in = in_channels // groups * kernel_size**2
        self.weight = nn.Parameter(
            lecun_normal_(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size), fan_in)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("v0", start_vector(fan_in))
        self.groups, self.faithful, self.n_iters = groups, faithful, n_iters

    def sigma(self):
        return spectral_sigma(self.weight.reshape(self.groups, -1, self.v0.numel()), self.v0, self.n_iters, self.faithful)

    def normalized_weight(self):
        return self.weight / self.sigma().repeat_interleave(self.weight.shape[0] // self.groups).view(-1, 1, 1, 1)

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.normalized_weight(), self.bias, groups=self.groups)


class RewardModel(nn.Module):
    """R(z, a): flatten -> SN 256 -> GroupSort -> SN 256 -> GroupSort -> SN |A|, entry of the taken action."""

    def __init__(self, n_actions, faithful=True, latent_dim=64 * 7 * 7):
        super().__init__()
        self.fc1 = SNLinear(latent_dim, 256, faithful)
        self.fc2 = SNLinear(256, 256, faithful)
        self.fc3 = SNLinear(256, n_actions, faithful)

    def forward(self, z, action):
        x = group_sort(self.fc2(group_sort(self.fc1(z.flatten(1)))))
        return self.fc3(x).float().gather(1, action.long().view(-1, 1)).squeeze(1)


class TransitionModel(nn.Module):
    """P(.|z, a): a 5-component Gaussian mixture over the 64x7x7 latent. Conv 64->128 + GroupSort, then a 16-group conv
    whose output channel ((c*5 + k)*2 + n)*|A| + a holds loc (n=0) / raw scale (n=1) of latent channel c, component k."""

    def __init__(self, n_actions, faithful=True, channels=64, n_components=5, groups=16):
        super().__init__()
        self.n_actions, self.channels, self.n_components, self.groups = n_actions, channels, n_components, groups
        self.conv1 = SNConv2d(channels, 2 * channels, faithful=faithful)
        self.conv2 = SNConv2d(2 * channels, channels * n_components * 2 * n_actions, groups=groups, faithful=faithful)
        self.mixture = SNLinear(2 * channels * 7 * 7, n_components * n_actions, faithful)

    def forward(self, z, action, eps=None):
        b, a = z.shape[0], action.long()
        h = group_sort(self.conv1(z))
        # conv2 only for the taken action's channels: gather each sample's (out_g, in_g*2*2) weights per group and apply
        # them to 2x2 patches; equal to running the full conv (|A| times the work) and selecting the action afterwards.
        # The weight rows are reordered from (c, k, n) to (n, k, c) so that loc and scale come out contiguous (B, K, C, H, W)
        G, K, C = self.groups, self.n_components, self.channels
        w = self.conv2.normalized_weight().view(G, C // G, K, 2, self.n_actions, -1).permute(4, 0, 3, 2, 1, 5)
        bias = self.conv2.bias.view(G, C // G, K, 2, self.n_actions).permute(4, 3, 2, 0, 1)
        # the 2x2 patches (channel-major, in F.unfold's order) by slicing the padded map: F.unfold is slow on CPU
        hp, (height, width) = F.pad(h, (0, 1, 0, 1)), z.shape[2:]
        patches = torch.stack([hp[:, :, i : i + height, j : j + width] for i in (0, 1) for j in (0, 1)], 2)
        o = torch.einsum("bgnkcf,bgfp->bnkgcp", w[a], patches.reshape(b, G, -1, height * width)).contiguous()
        loc, raw_scale = (o.view(b, 2, K, C, height, width) + bias[a].view(b, 2, K, C, 1, 1)).unbind(1)
        loc = 0.5 * loc  # (B, K, C, H, W); 0.5 = the official K/2 output scaling
        scale = 0.5 * (F.softplus(raw_scale) + 1e-6)
        logits = self.mixture(h.flatten(1)).float().view(b, self.n_components, self.n_actions)
        logits = logits.gather(2, a.view(-1, 1, 1).expand(-1, self.n_components, 1)).squeeze(2)
        if eps is None:
            eps = torch.randn_like(loc).clamp(-1.0, 1.0)
        # the official "soft" reparameterised sample: a weighted average of the components' samples (clipped noise)
        sample = (logits.softmax(1).view(b, -1, 1, 1, 1) * (loc + scale * eps)).sum(1)
        return sample, logits, loc, scale


class DonePredictor(nn.Module):
    """D(z'): flatten -> Dense 512 -> ReLU -> Dense 1, the logit of the Bernoulli "episode ended" (Flax default init)."""

    def __init__(self, latent_dim=64 * 7 * 7, hidden=512):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(latent_dim, hidden), nn.Linear(hidden, 1)
        for layer in (self.fc1, self.fc2):
            lecun_normal_(layer.weight.data, layer.in_features)
            nn.init.zeros_(layer.bias)

    def forward(self, z):
        return self.fc2(F.relu(self.fc1(z.flatten(1)))).float().squeeze(1)


def sample_done(logits, soft=False):
    """Imagined termination d' ~ Bernoulli(sigmoid(logit)); the official straight-through round(RelaxedBernoulli(T=1))
    draw has exactly this law. soft: d' is the probability itself."""
    p = torch.sigmoid(logits)
    return p if soft else torch.bernoulli(p)


class Agent(nn.Module):
    def __init__(self, n_actions, sn_faithful=True):
        super().__init__()
        # the latent state of DeepSPI is the 64x7x7 conv map (post-ReLU); the FC-512 torso feeds only actor and critic
        self.encoder = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
        )
        self.network = nn.Sequential(nn.Flatten(), layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU())
        self.actor = layer_init(nn.Linear(512, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1)
        self.reward_model = RewardModel(n_actions, sn_faithful)
        self.transition_model = TransitionModel(n_actions, sn_faithful)
        self.done_predictor = DonePredictor()

    def param_groups(self):
        """DreamSPI's four groups, each with its own optimizer, learning rate and grad-norm clip. The critic head reads
        the shared torso output: the torso belongs to the actor group (the value loss of imagination still shapes it)."""
        return {
            "encoder": list(self.encoder.parameters()),
            "world_model": [*self.reward_model.parameters(), *self.transition_model.parameters()]
            + list(self.done_predictor.parameters()),
            "actor": [*self.network.parameters(), *self.actor.parameters()],
            "critic": list(self.critic.parameters()),
        }

    def encode(self, x):
        # channels_last: the same numbers, and about 20% faster convolutions (forward and backward) on CPU (oneDNN)
        return self.encoder(x.contiguous(memory_format=torch.channels_last) / 255.0)

    def get_value(self, x):
        return self.critic(self.network(self.encode(x)))

    def get_action_and_value(self, x, action=None):
        hidden = self.network(self.encode(x))
        logits = self.actor(hidden).float()  # float32 log-probabilities also under --bf16: they make the ratio
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)


def compute_losses(
    agent,
    args,
    mb_obs,
    mb_next_obs,
    mb_actions,
    mb_logprobs,
    mb_advantages,
    mb_returns,
    mb_rewards,
    mb_wm_dones,
    mb_next_dones,
    eps=None,
    latent=False,
):
    """The DeepSPI minibatch loss (paper Sec. 4; official deep_spi.py _ppo_loss) plus the done loss, clipped with
    wm_clip_coef: the real-data step. latent: mb_obs are imagined latents and the loss is the plain clipped PPO loss of
    the imagination step (no world model, clip_coef; the other mb_* may be None). Returns the loss and its parts."""
    world_model = not latent
    clip_coef = args.clip_coef if latent else args.wm_clip_coef
    b = mb_obs.shape[0]
    # s and s' go through the live encoder in one pass; the target phi(s') is not detached (official behaviour)
    z_all = mb_obs if latent else agent.encode(torch.cat([mb_obs, mb_next_obs]))
    z = z_all[:b]
    hidden = agent.network(z)
    probs = Categorical(logits=agent.actor(hidden).float())
    newlogprob, entropy, newvalue = probs.log_prob(mb_actions), probs.entropy(), agent.critic(hidden).view(-1)
    logratio = newlogprob - mb_logprobs
    ratio = logratio.exp()
    out = {"newlogprob": newlogprob, "entropy": entropy, "newvalue": newvalue, "ratio": ratio, "z": z}
    with torch.no_grad():
        # calculate approx_kl http://joschu.net/blog/kl-approx.html
        out["old_approx_kl"] = (-logratio).mean()
        out["approx_kl"] = ((ratio - 1) - logratio).mean()

    if args.norm_adv:  # population std, as the official (JAX) code
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std(unbiased=False) + 1e-8)
    out["adv_norm"] = mb_advantages

    aux = torch.zeros_like(mb_advantages)
    if world_model:
        # reset transitions (done flag set) target the current latent instead of phi(s') (official L719-721)
        z_target = torch.where(mb_wm_dones.view(-1, 1, 1, 1).bool(), z, z_all[b:])
        reward_pred = agent.reward_model(z, mb_actions)
        transition_sample, mixture_logits, _, _ = agent.transition_model(z, mb_actions, eps)
        # per-sample losses: Huber on the clipped reward; one-sample Wasserstein estimate, Huber summed over the latent
        reward_loss = F.smooth_l1_loss(reward_pred, mb_rewards, reduction="none")
        transition_loss = F.smooth_l1_loss(transition_sample, z_target, reduction="none").sum((1, 2, 3))
        # done loss: Huber between the predicted probability on the (masked) target latent and the next done flag
        done_prob = torch.sigmoid(agent.done_predictor(z_target)) + 1e-8
        done_loss = F.smooth_l1_loss(done_prob, mb_next_dones, reduction="none")
        aux = args.reward_loss_coef * (reward_loss + done_loss) + args.transition_loss_coef * transition_loss
        out.update(z_target=z_target, reward_pred=reward_pred, transition_sample=transition_sample)
        out.update(mixture_logits=mixture_logits, reward_loss_per_sample=reward_loss)
        out.update(transition_loss_per_sample=transition_loss, done_prob=done_prob, done_loss_per_sample=done_loss)
        out.update(reward_loss=reward_loss.mean(), transition_loss=transition_loss.mean(), done_loss=done_loss.mean())

    # Policy loss: the utility U = A - alpha_R (l_R + l_done) - alpha_P l_P per sample, not detached, inside the clip
    utility = mb_advantages if args.deep_mdp else mb_advantages - aux
    pg_loss1 = -utility * ratio
    pg_loss2 = -utility * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # Value loss (unclipped, as in the official code)
    v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    if args.deep_mdp:
        loss = loss + aux.mean()
    out.update(utility=utility, pg_loss=pg_loss, v_loss=v_loss, entropy_loss=entropy_loss)
    return loss, out


def compute_gae(rewards, values, next_dones, next_value, gamma, gae_lambda):
    """GAE over a (T, N) block; next_dones[t] (0/1, or a probability) cuts the bootstrap after step t and next_value is
    V of the state after the last step. Returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(rewards.shape[0])):
        nextnonterminal = 1.0 - next_dones[t]
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


@torch.no_grad()
def imagine(agent, z0, d0, horizon, soft_done=False):
    """Roll the world model out for `horizon` steps from the latents z0 (done flags d0) under the current policy, all
    without gradients. Returns (H, N) tensors obs, next_obs (views of one (H+1, N, ...) latent buffer), actions,
    logprobs, values, rewards, dones, next_dones, and next_value = V(z_H). A hard done keeps z' = z."""
    n, device = z0.shape[0], z0.device
    latents = torch.zeros((horizon + 1,) + z0.shape, device=device)
    dones = torch.zeros((horizon + 1, n), device=device)
    actions = torch.zeros((horizon, n), dtype=torch.long, device=device)
    logprobs, values, rewards = (torch.zeros((horizon, n), device=device) for _ in range(3))
    latents[0], dones[0] = z0, d0
    for h in range(horizon):
        z = latents[h]
        hidden = agent.network(z)
        probs = Categorical(logits=agent.actor(hidden).float())
        actions[h] = probs.sample()
        logprobs[h], values[h] = probs.log_prob(actions[h]), agent.critic(hidden).view(-1)
        rewards[h] = agent.reward_model(z, actions[h])  # the deterministic reward head, unclipped
        next_z = agent.transition_model(z, actions[h])[0]  # the soft mixture sample
        dones[h + 1] = sample_done(agent.done_predictor(next_z), soft_done)
        if not soft_done:  # after a predicted termination the rollout stays where it is
            next_z = torch.where(dones[h + 1].view(-1, 1, 1, 1).bool(), z, next_z)
        latents[h + 1] = next_z
    next_value = agent.critic(agent.network(latents[horizon])).float().view(-1)
    return {
        "obs": latents[:-1],
        "next_obs": latents[1:],
        "actions": actions,
        "logprobs": logprobs,
        "values": values,
        "rewards": rewards,
        "dones": dones[:-1],
        "next_dones": dones[1:],
        "next_value": next_value,
    }


def optimizer_step(loss, agent, optimizers, names, max_grad_norm, out):
    """Backpropagate loss and step only the named parameter groups, each clipped to max_grad_norm on its own; the
    gradients of the other groups are discarded. Returns, on the device (no host synchronisation), whether each loss term
    of out (LOSS_TERMS order) and each group's gradient norm is finite: non-finite gradients step as zeros, so the
    weights stay finite until the caller undoes the update."""
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    groups = agent.param_groups()
    grad_norms = [nn.utils.clip_grad_norm_(groups[name], max_grad_norm) for name in names]
    for name in names:
        for p in groups[name]:
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        optimizers[name].step()
    return torch.stack([out[k].detach() for k in LOSS_TERMS if k in out] + grad_norms).isfinite()


def nonfinite_message(phase, finite, out, iteration, num_minibatches):
    """None if every row of finite (optimizer_step's flags, one row per minibatch, num_minibatches per epoch) is True
    (one host read), else the error line naming the first bad minibatch and its non-finite loss terms."""
    if (finite := torch.stack(finite)).all():
        return None
    first = int((~finite.all(1)).nonzero()[0])
    terms = [k for k in LOSS_TERMS if k in out]
    bad = [LOSS_TERMS[k] for k, ok in zip(terms, finite[first].tolist(), strict=False) if not ok]
    epoch, minibatch = divmod(first, num_minibatches)
    where = f"iteration {iteration} (epoch {epoch + 1}, minibatch {minibatch + 1})"
    return f"non-finite {phase} {' and '.join(bad) + ' loss' if bad else 'gradient norm'} at {where}"


def autocast(args, device):
    """--bf16: convolutions and matmuls in bfloat16 (AVX-512 BF16 or AMX, GPU tensor cores); the rest keeps its dtype."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def evaluate(agent, args, run_name, writer, device):
    """Play --eval-episodes full games with the greedy and with the sampled policy, on envs seeded after the training
    ones. One game per env, each env's first, so that short games are not over-represented. The raw scores go to
    TensorBoard (x = game index) and their mean and std to stdout; --capture-video records env 0's game."""
    n = args.eval_episodes
    for mode, tag in (("greedy", "eval/greedy_episodic_return"), ("sampled", "eval/episodic_return")):
        video_dir = f"videos/{run_name}/{mode}" if args.capture_video else None  # envpool has no renderer
        backend = "gymnasium" if video_dir else args.env_backend
        envs = make_envs(args.env_id, backend, n, args.seed + args.num_envs, video_dir, args.stochastic_env)
        next_obs, scores, playing, running = envs.reset()[0], np.zeros(n), np.ones(n, dtype=bool), np.zeros(n)
        while playing.any():
            with torch.inference_mode(), autocast(args, device):
                logits = agent.actor(agent.network(agent.encode(torch.as_tensor(next_obs, device=device))))
            action = logits.argmax(1) if mode == "greedy" else Categorical(logits=logits).sample()
            next_obs, _, _, truncations, infos = envs.step(action.cpu().numpy())
            for i, score in finished_games(infos, truncations, running).items():
                scores[i], playing[i] = score if playing[i] else scores[i], False
        envs.close()
        for i, score in enumerate(scores):
            writer.add_scalar(tag, score, i)
        print(f"eval, {mode} policy: {scores.mean():.1f} ± {scores.std():.1f} over {n} games of {args.env_id}")


def make_run_dir(run_name, reuse=False):
    """Create runs/{run_name} and return its name; unless reuse, never an existing directory: the name gets _2, _3..."""
    name, k = run_name, 1
    while True:
        try:
            os.makedirs(f"runs/{name}", exist_ok=reuse)
            return name
        except FileExistsError:
            k += 1
            name = f"{run_name}_{k}"


def save_atomic(obj, path):
    """torch.save to a temporary file in the same directory, then rename it: a crash never leaves a truncated file."""
    torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # set by torchrun
        fail("multi-process training (torchrun) is only in deepspi_atari.py; run dreamspi_atari.py as one process")
    # --resume / --eval-only: the saved run's arguments; a flag given here must agree with them, unless it only controls
    # the run (RUN_FLAGS, and for --eval-only also --seed and --env-backend), in which case it replaces the saved value
    saved = None
    if args.resume and args.eval_only:
        fail("--resume and --eval-only exclude each other")
    if args.resume or args.eval_only:
        path, mode = (args.resume, "--resume") if args.resume else (args.eval_only, "--eval-only")
        if not os.path.isfile(path):
            fail(f"{mode}: no such file {path}")
        try:  # a pickle (ALE and RNG states): load only files you trust
            saved = torch.load(path, map_location="cpu", weights_only=False)
            agent_keys = Agent(saved["model"]["actor.bias"].numel()).state_dict().keys()
        except Exception as e:
            fail(f"{mode}: cannot read {path} ({type(e).__name__})")
        if saved["model"].keys() != agent_keys:  # e.g. a deepspi_atari.py model, which has no done head
            fail(f"{mode}: {path} does not hold a dreamspi_atari.py agent")
        if args.resume and "optimizers" not in saved:
            fail(f"--resume needs a checkpoint.pt; {path} is a saved model")
        free = RUN_FLAGS | ({"seed", "env_backend"} if args.eval_only else set())
        given = given_flags(sys.argv[1:])
        conflicts = [f for f in sorted(given - free) if getattr(args, f) != saved["args"].get(f)]
        if conflicts:
            differ = ", ".join(f"--{f.replace('_', '-')} (saved: {saved['args'].get(f)})" for f in conflicts)
            fail(f"{mode} keeps the saved run's arguments, and these differ: {differ}")
        cli, fields = args, {f.name for f in dataclasses.fields(Args)}
        args = Args(**{k: v for k, v in saved["args"].items() if k in fields})
        for f in given & free | {"resume", "eval_only"}:
            setattr(args, f, getattr(cli, f))
    if args.eval_only and not args.eval_episodes:
        args.eval_episodes = 10
    check_args(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    if args.batch_size % args.num_minibatches:
        fail(
            f"the batch ({args.num_envs} envs x {args.num_steps} steps = {args.batch_size}) "
            f"is not divisible by --num-minibatches {args.num_minibatches}"
        )
    if args.total_timesteps < args.batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch ({args.batch_size})")
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    # H imagined steps per real state, split into H times as many minibatches: both steps use the same minibatch size
    args.imagination_batch_size = args.batch_size * args.imagination_horizon
    args.imagination_num_minibatches = args.num_minibatches * args.imagination_horizon
    if args.env_backend == "envpool":
        try:
            import envpool  # noqa: F401
        except ImportError:
            print("envpool cannot be imported here: falling back to --env-backend gymnasium", file=sys.stderr)
            args.env_backend = "gymnasium"
    if args.gamma * (1 + max(args.clip_coef, args.wm_clip_coef)) >= 1 and not args.eval_only:
        print(
            f"note: gamma * C = {args.gamma * (1 + max(args.clip_coef, args.wm_clip_coef)):.3f} >= 1, so the paper's "
            "condition C < 1/gamma does not hold (the official defaults break it too); the safety bound is not guaranteed",
            file=sys.stderr,
        )
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = saved["run_name"] if args.resume else run_name + ("__eval" if args.eval_only else "")
    # a new run never reuses a directory: runs started in the same second get the suffixes _2, _3, ...
    run_name = make_run_dir(run_name, reuse=bool(args.resume))
    if args.resume:
        print(f"resuming runs/{run_name} after iteration {saved['iteration']}/{args.num_iterations}, with new games")
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    # a resumed run hides what its crashed predecessor logged after the checkpoint (purge_step)
    purge_step = saved["global_step"] + 1 if args.resume else None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # no validation of each Categorical's logits: it reads them on the host (a GPU synchronisation) in every minibatch
    torch.distributions.Distribution.set_default_validate_args(False)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    use_cuda = torch.cuda.is_available() and args.cuda
    device = torch.device("cuda" if use_cuda else "cpu")
    # on CPU the backward of TransitionModel's w[a] (index_put with accumulate) is not repeatable with >1 thread otherwise
    torch.use_deterministic_algorithms(args.torch_deterministic and not use_cuda)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that NaN-fills every torch.empty

    if args.eval_only:  # no training: evaluate the saved agent, then stop
        agent = Agent(saved["model"]["actor.bias"].numel(), args.sn_faithful).to(device)
        agent.load_state_dict(saved["model"])
        evaluate(agent, args, run_name, writer, device)
        writer.close()
        sys.exit(0)

    # env setup: env i is seeded seed + i; a resumed run starts new games, seeded after those before its checkpoint
    env_seed = args.seed + (saved["iteration"] * args.num_envs if args.resume else 0)
    envs = make_envs(args.env_id, args.env_backend, args.num_envs, env_seed, stochastic=args.stochastic_env)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"
    game = parse_env_id(args.env_id)[0]

    agent = Agent(envs.single_action_space.n, args.sn_faithful).to(device)
    # one Adam per parameter group, each with its own learning rate (and, in optimizer_step, its own grad-norm clip)
    learning_rates = {
        "encoder": args.encoder_learning_rate,
        "world_model": args.world_model_learning_rate,
        "actor": args.actor_learning_rate,
        "critic": args.critic_learning_rate,
    }
    optimizers = {name: optim.Adam(params, lr=learning_rates[name], eps=1e-5) for name, params in agent.param_groups().items()}
    # the real-data step trains the encoder and the world model (and, dyna-style, the actor and critic as well)
    real_groups = ["encoder", "world_model"] + (["actor", "critic"] if args.dyna_style else [])

    # ALGO Logic: Storage setup
    # obs[t + 1] is the next observation of step t, so s' costs no extra storage; dones[t] came with obs[t]
    obs = torch.zeros((args.num_steps + 1, args.num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps + 1, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    scores = np.zeros(args.num_envs)  # envpool: the raw score of each env's game so far
    episode_lengths = np.zeros(args.num_envs, dtype=np.int64)  # in agent steps
    last_returns = np.full(args.num_envs, np.nan)  # each env's last finished full-game raw score

    # start the game (CleanRL's, and --resume)
    global_step, start_iteration = 0, 1
    start_time = time.time()
    next_obs = torch.as_tensor(envs.reset()[0], device=device)
    next_done = torch.zeros(args.num_envs).to(device)
    if args.resume:  # the state at the end of the checkpoint's iteration
        agent.load_state_dict(saved["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        global_step, start_iteration, last_returns = saved["global_step"], saved["iteration"] + 1, saved["last_returns"]
        rng = saved["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if use_cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
    start_step = global_step
    hide_bar = None if args.progress else True  # tqdm's disable: None hides the bar only when stderr is not a terminal
    progress = tqdm(total=args.num_iterations, initial=start_iteration - 1, unit="it", disable=hide_bar, dynamic_ncols=True)
    last_print = start_time
    # SIGINT/SIGTERM stop the run at the end of the iteration, after a checkpoint (exit code 128 + signal number)
    stop_signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signals.append(signum))

    for iteration in range(start_iteration, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for name, optimizer in optimizers.items():
                optimizer.param_groups[0]["lr"] = frac * learning_rates[name]

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.inference_mode(), autocast(args, device):
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # execute the game and log data (CleanRL's, observations kept as uint8)
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.as_tensor(reward, device=device).view(-1)
            next_obs, next_done = torch.as_tensor(next_obs, device=device), torch.as_tensor(next_done, device=device).float()

            # record rewards for plotting purposes: the raw full-game score, ended by a game over or a time limit
            episode_lengths += 1
            for idx, episodic_return in finished_games(infos, truncations, scores).items():
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_lengths[idx], global_step)
                last_returns[idx], episode_lengths[idx] = episodic_return, 0
        obs[args.num_steps] = next_obs
        dones[args.num_steps] = next_done

        # bootstrap value if not done
        with torch.inference_mode(), autocast(args, device):
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages, returns = compute_gae(rewards, values, dones[1:], next_value, args.gamma, args.gae_lambda)

        # flatten the batch
        b_obs = obs[:-1].reshape((-1,) + envs.single_observation_space.shape)
        b_next_obs = obs[1:].reshape((-1,) + envs.single_observation_space.shape)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        b_rewards = rewards.reshape(-1)
        b_dones = dones[:-1].reshape(-1)
        b_next_dones = dones[1:].reshape(-1)
        # which transitions are resets, whose latent target is phi(s): envpool resets one step late, so (obs[t], obs[t+1])
        # is a reset when dones[t] is set (official); gymnasium resets in the same step, so when dones[t+1] is set
        b_wm_dones = (dones[:-1] if args.env_backend == "envpool" else dones[1:]).reshape(-1)

        # Encoder + world-model step on real data: the DeepSPI surrogate (clipped with wm_clip_coef) whose utility holds the
        # reward, done and transition losses; the actor and critic are frozen (they still pass gradients to the encoder)
        # no host synchronisation per minibatch (it stalls a GPU), in either step: the statistics and finiteness checks
        # stay on the device until the end of the step, and a non-finite loss undoes the iteration's updates (`before`)
        before = copy.deepcopy((agent.state_dict(), {k: o.state_dict() for k, o in optimizers.items()}))
        b_inds = np.arange(args.batch_size)
        clipfracs, ratio_max, ratio_min, finite = [], [], [], []
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]
                with autocast(args, device):
                    loss, out = compute_losses(
                        agent,
                        args,
                        b_obs[mb_inds],
                        b_next_obs[mb_inds],
                        b_actions[mb_inds],
                        b_logprobs[mb_inds],
                        b_advantages[mb_inds],
                        b_returns[mb_inds],
                        b_rewards[mb_inds],
                        b_wm_dones[mb_inds],
                        b_next_dones[mb_inds],
                    )
                with torch.no_grad():
                    ratio = out["ratio"]
                    clipfracs += [((ratio - 1.0).abs() > args.wm_clip_coef).float().mean()]
                    ratio_max, ratio_min = ratio_max + [ratio.max()], ratio_min + [ratio.min()]

                finite += [optimizer_step(loss, agent, optimizers, real_groups, args.max_grad_norm, out)]

            if args.target_kl is not None and out["approx_kl"] > args.target_kl:
                break
        nonfinite = nonfinite_message("real-data", finite, out, iteration, args.num_minibatches)

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        stats = {"repr_wm": (out, clipfracs, ratio_max, ratio_min, explained_var)}

        # every real state of the batch, encoded by the updated encoder, starts one imagined rollout
        with torch.no_grad(), autocast(args, device):
            z0 = agent.encode(b_obs)
            # SIR of the real-data step: the frozen heads on the new latents against the behaviour policy
            logits = agent.actor(agent.network(z0)).float()
            sir_real = (Categorical(logits=logits).log_prob(b_actions) - b_logprobs).exp().max()

        if not nonfinite:  # after a non-finite real-data loss, the iteration stops here
            # Imagination: H world-model steps under the current policy, GAE on the imagined block (bootstrap V(z_H),
            # mask 1-d')
            with autocast(args, device):
                imagined = imagine(agent, z0, b_dones, args.imagination_horizon, args.soft_done)
            with torch.no_grad():
                im_advantages, im_returns = compute_gae(
                    imagined["rewards"],
                    imagined["values"],
                    imagined["next_dones"],
                    imagined["next_value"],
                    args.gamma,
                    args.gae_lambda,
                )
            i_obs = imagined["obs"].reshape((-1,) + z0.shape[1:])
            i_actions = imagined["actions"].reshape(-1)
            i_logprobs = imagined["logprobs"].reshape(-1)
            i_advantages = im_advantages.reshape(-1)
            i_returns = im_returns.reshape(-1)
            i_values = imagined["values"].reshape(-1)

            # Optimizing the actor and critic on imagined latents only: clipped PPO, no gradient reaches encoder or world model
            i_inds = np.arange(args.imagination_batch_size)
            clipfracs, ratio_max, ratio_min, finite = [], [], [], []
            for epoch in range(args.imagination_epochs):
                np.random.shuffle(i_inds)
                # imagination_num_minibatches minibatches, of the same size as the real step's
                for start in range(0, args.imagination_batch_size, args.minibatch_size):
                    end = start + args.minibatch_size
                    mb_inds = i_inds[start:end]
                    with autocast(args, device):
                        loss, out = compute_losses(
                            agent,
                            args,
                            i_obs[mb_inds],
                            None,
                            i_actions[mb_inds],
                            i_logprobs[mb_inds],
                            i_advantages[mb_inds],
                            i_returns[mb_inds],
                            None,
                            None,
                            None,
                            latent=True,
                        )
                    with torch.no_grad():
                        ratio = out["ratio"]
                        clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]
                        ratio_max, ratio_min = ratio_max + [ratio.max()], ratio_min + [ratio.min()]

                    finite += [optimizer_step(loss, agent, optimizers, ["actor", "critic"], args.max_grad_norm, out)]

                if args.target_kl is not None and out["approx_kl"] > args.target_kl:
                    break
            nonfinite = nonfinite_message("imagination", finite, out, iteration, args.imagination_num_minibatches)

            y_pred, y_true = i_values.cpu().numpy(), i_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            stats["imagination"] = (out, clipfracs, ratio_max, ratio_min, explained_var)

        # the supremum importance ratio SIR(pi', pi) on the real batch, recomputed with the final parameters (the
        # imagination step leaves the encoder, hence z0, unchanged)
        with torch.no_grad(), autocast(args, device):
            logits = agent.actor(agent.network(z0)).float()
            sir = (Categorical(logits=logits).log_prob(b_actions) - b_logprobs).exp().max().item()
        if nonfinite:  # the iteration's updates undone, after its statistics
            agent.load_state_dict(before[0])
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(before[1][name])

        # record rewards for plotting purposes: CleanRL's metrics, then DeepSPI's
        sps = int((global_step - start_step) / (time.time() - start_time))
        for name, optimizer in optimizers.items():
            writer.add_scalar(f"charts/{name}_learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for prefix, (out, clipfracs, ratio_max, ratio_min, explained_var) in stats.items():
            writer.add_scalar(f"{prefix}/value_loss", out["v_loss"].item(), global_step)
            writer.add_scalar(f"{prefix}/policy_loss", out["pg_loss"].item(), global_step)
            writer.add_scalar(f"{prefix}/entropy", out["entropy_loss"].item(), global_step)
            writer.add_scalar(f"{prefix}/old_approx_kl", out["old_approx_kl"].item(), global_step)
            writer.add_scalar(f"{prefix}/approx_kl", out["approx_kl"].item(), global_step)
            writer.add_scalar(f"{prefix}/clipfrac", torch.stack(clipfracs).mean().item(), global_step)
            writer.add_scalar(f"{prefix}/explained_variance", explained_var, global_step)
            writer.add_scalar(f"{prefix}/ratio_max", torch.stack(ratio_max).max().item(), global_step)
            writer.add_scalar(f"{prefix}/ratio_min", torch.stack(ratio_min).min().item(), global_step)
        out = stats["repr_wm"][0]
        writer.add_scalar("repr_wm/reward_loss", out["reward_loss"].item(), global_step)
        writer.add_scalar("repr_wm/transition_loss", out["transition_loss"].item(), global_step)
        writer.add_scalar("repr_wm/done_loss", out["done_loss"].item(), global_step)
        writer.add_scalar("repr_wm/sir", sir_real.item(), global_step)
        if "imagination" in stats:
            writer.add_scalar("imagination/reward_mean", imagined["rewards"].mean().item(), global_step)
            writer.add_scalar("imagination/done_rate", imagined["next_dones"].mean().item(), global_step)
        writer.add_scalar("charts/sir", sir, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        finished = last_returns[~np.isnan(last_returns)]
        if len(finished):
            avg_return = finished.mean()
            writer.add_scalar("charts/avg_episodic_return", avg_return, global_step)
            if game in ATARI_SCORES:
                low, high = ATARI_SCORES[game]
                writer.add_scalar("charts/human_normalized_score", (avg_return - low) / (high - low), global_step)
        avg_text = f"{finished.mean():.1f}" if len(finished) else "n/a"
        progress.set_postfix(SPS=sps, avg_return=avg_text, refresh=False)
        progress.update()
        if progress.disable and time.time() - last_print > 60:  # no bar: one quiet line a minute
            print(f"global_step={global_step}, SPS={sps}, avg_episodic_return={avg_text}", flush=True)
            last_print = time.time()
        writer.flush()

        # checkpoint: what it takes to go on from here (after a non-finite loss: the iteration before, which resume redoes)
        checkpoint_path = f"runs/{run_name}/checkpoint.pt"
        signum = max(stop_signals, default=0)
        due = args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations)
        if nonfinite or signum or due:
            rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
            rng["cuda"] = torch.cuda.get_rng_state_all() if use_cuda else None
            checkpoint = dict(model=agent.state_dict(), optimizers={k: o.state_dict() for k, o in optimizers.items()})
            checkpoint.update(args=vars(args), run_name=run_name)
            done_iteration = iteration - 1 if nonfinite else iteration
            checkpoint.update(iteration=done_iteration, global_step=done_iteration * args.batch_size, rng=rng)
            checkpoint.update(last_returns=last_returns)
            save_atomic(checkpoint, checkpoint_path)
        if nonfinite or signum:
            progress.close()
            writer.close()
            stop = f"error: {nonfinite}" if nonfinite else f"{signal.Signals(signum).name} after iteration {iteration}"
            print(f"{os.path.basename(sys.argv[0])}: {stop}; resume from {checkpoint_path}", file=sys.stderr)
            sys.exit(1 if nonfinite else 128 + signum)

    progress.close()
    envs.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # training is over: signals stop the rest at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.save_model:
        save_atomic({"model": agent.state_dict(), "args": vars(args)}, f"runs/{run_name}/{args.exp_name}.cleanrl_model")
    if args.eval_episodes:
        evaluate(agent, args, run_name, writer, device)
    writer.close()
    print(f"done: {global_step} steps in {time.time() - start_time:.0f}s, runs/{run_name}")
