# deepspi_atari.py with torchrun (torchrun --standalone --nproc_per_node 2 deepspi_atari_multigpu.py): README.md; paper:
# https://arxiv.org/abs/2510.12312 (Delgrange, Avalos, Roepke, ICLR 2026); the diff to deepspi_atari.py is the distribution
# PPO whose encoder also feeds a Lipschitz latent world model; per-sample world-model losses are subtracted from the
# advantage (the utility) inside the clipped surrogate, so updates stay in the importance-ratio neighbourhood [2-C, C].
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
import torch.distributed as dist
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
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 128
    """the number of parallel game environments (official: 128 x 8, CleanRL PPO: 8 x 128)"""
    num_steps: int = 8
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient epsilon; the importance-ratio neighbourhood is [2-C, C] with C = 1 + epsilon"""
    clip_vloss: bool = False
    """Toggles CleanRL's clipped value loss (off: the official unclipped one); on, PPO mode at 8 x 128 is CleanRL's PPO"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    enforce_neighbourhood: bool = False
    """stop the update epochs once the batch's ratio leaves [2-C, C], C = 1 + clip_coef (checked per epoch, as --target-kl)"""
    reward_loss_coef: float = 0.01
    """alpha_R: weight of the per-sample reward loss in the utility (0 together with the next one: plain PPO)"""
    transition_loss_coef: float = 5e-4
    """alpha_P: weight of the per-sample latent transition (Wasserstein) loss in the utility"""
    deep_mdp: bool = False
    """DeepMDP ablation: add the world-model losses to the loss instead of subtracting them from the advantage"""
    sn_faithful: bool = True
    """reproduce the official spectral norm (sigma = ||W^T u||^2, not 1-Lipschitz); False: exact sigma_1, 1-Lipschitz layers"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# the flags that --resume and --eval-only take from the command line; all others come from the saved run
RUN_FLAGS = {
    "cuda", "bf16", "progress", "track", "wandb_project_name", "wandb_entity", "save_model", "checkpoint_every", "resume",
    "eval_episodes", "eval_only", "capture_video",
}  # fmt: skip
# the loss terms checked for non-finite values in every minibatch, as the error message names them; policy last: a
# non-finite world-model loss makes the policy loss non-finite too (through the utility)
LOSS_TERMS = {
    "v_loss": "value", "entropy_loss": "entropy", "reward_loss": "reward", "transition_loss": "transition", "pg_loss": "policy"
}  # fmt: skip


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
    floats = ["learning_rate", "gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm"]
    floats += ["reward_loss_coef", "transition_loss_coef"] + ["target_kl"] * (args.target_kl is not None)
    positive = ["num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps", "learning_rate"]
    checks = [(math.isfinite(getattr(args, n)), f"{flag(n)} must be finite") for n in floats]
    checks += [(getattr(args, n) > 0, f"{flag(n)} must be positive") for n in positive + ["max_grad_norm"]]
    checks += [
        (0.5 < args.gamma < 1, f"{flag('gamma')} must lie in (0.5, 1), as the theory assumes"),
        (0 <= args.gae_lambda <= 1, f"{flag('gae_lambda')} must lie in [0, 1]"),
        (0 < args.clip_coef < 1, f"{flag('clip_coef')} must lie in (0, 1)"),
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
    eps=None,
    mb_values=None,
):
    """The DeepSPI minibatch loss (paper Sec. 4; official deep_spi.py _ppo_loss). Returns the loss and its parts."""
    world_model = args.reward_loss_coef > 0 or args.transition_loss_coef > 0  # both 0: plain PPO, no world model at all
    b = mb_obs.shape[0]
    # s and s' go through the live encoder in one pass; the target phi(s') is not detached (official behaviour)
    z_all = agent.encode(torch.cat([mb_obs, mb_next_obs]) if world_model else mb_obs)
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
        aux = args.reward_loss_coef * reward_loss + args.transition_loss_coef * transition_loss
        out.update(z_target=z_target, reward_pred=reward_pred, transition_sample=transition_sample)
        out.update(mixture_logits=mixture_logits, reward_loss_per_sample=reward_loss)
        out.update(transition_loss_per_sample=transition_loss)
        out.update(reward_loss=reward_loss.mean(), transition_loss=transition_loss.mean())

    # Policy loss: the utility U = A - (alpha_R l_R + alpha_P l_P) per sample, not detached, inside the clipped surrogate
    utility = mb_advantages if args.deep_mdp else mb_advantages - aux
    pg_loss1 = -utility * ratio
    pg_loss2 = -utility * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # Value loss: unclipped, as in the official code; --clip-vloss: CleanRL's clipped one (mb_values: the rollout's values)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb_returns) ** 2
        v_clipped = mb_values + torch.clamp(newvalue - mb_values, -args.clip_coef, args.clip_coef)
        v_loss_clipped = (v_clipped - mb_returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    if args.deep_mdp:
        loss = loss + aux.mean()
    out.update(utility=utility, pg_loss=pg_loss, v_loss=v_loss, entropy_loss=entropy_loss)
    return loss, out


def compute_gae(rewards, values, next_dones, next_value, gamma, gae_lambda):
    """GAE over a (T, N) block; next_dones[t] cuts the bootstrap after step t and next_value is V of the state after the
    last step. Returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(rewards.shape[0])):
        nextnonterminal = 1.0 - next_dones[t]
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


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


def out_of_sync_ranks(checksums):
    """The ranks whose parameter checksums (one row per rank) differ from rank 0's."""
    return [r for r in range(1, len(checksums)) if not torch.equal(checksums[r], checksums[0])]


class NullWriter:
    """The SummaryWriter of the ranks other than 0 under torchrun: it writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


if __name__ == "__main__":
    args = tyro.cli(Args)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))  # set by torchrun
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
        except Exception as e:
            fail(f"{mode}: cannot read {path} ({type(e).__name__})")
        if args.resume and "iteration" not in saved:
            fail(f"--resume needs a checkpoint.pt; {path} is a saved model")
        if args.resume and "ranks" not in saved:
            fail(f"{path} was written by deepspi_atari.py; resume it with that script")
        if args.resume and len(saved["ranks"]) != world_size:
            fail(f"{path} was written by {len(saved['ranks'])} processes; resume it with as many")
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
    if args.num_envs % world_size or args.batch_size // world_size % args.num_minibatches:
        fail(f"--num-envs {args.num_envs} does not split into {world_size} processes with whole minibatches")
    if args.total_timesteps < args.batch_size:
        fail(f"--total-timesteps {args.total_timesteps} is smaller than one batch ({args.batch_size})")
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.env_backend == "envpool":
        try:
            import envpool  # noqa: F401
        except ImportError:
            print("envpool cannot be imported here: falling back to --env-backend gymnasium", file=sys.stderr)
            args.env_backend = "gymnasium"
    if args.gamma * (1 + args.clip_coef) >= 1 and rank == 0 and not args.eval_only:
        print(
            f"note: gamma * C = {args.gamma * (1 + args.clip_coef):.3f} >= 1, so the paper's condition C < 1/gamma does not "
            "hold (the official defaults break it too); the safety bound is not guaranteed",
            file=sys.stderr,
        )
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = saved["run_name"] if args.resume else run_name + ("__eval" if args.eval_only else "")
    if rank == 0:  # a new run never reuses a directory: runs started in the same second get the suffixes _2, _3, ...
        run_name = make_run_dir(run_name, reuse=bool(args.resume))
        if args.resume:
            print(f"resuming runs/{run_name} after iteration {saved['iteration']}/{args.num_iterations}, with new games")
    if args.track and rank == 0:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    # rank 0 logs; a resumed run hides what its crashed predecessor logged after the checkpoint (purge_step)
    purge_step = saved["global_step"] + 1 if args.resume else None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step) if rank == 0 else NullWriter()
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # no validation of each Categorical's logits: it reads them on the host (a GPU synchronisation) in every minibatch
    torch.distributions.Distribution.set_default_validate_args(False)

    # seeding: each rank its own streams, the same initial weights
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # the same on every rank, so that every rank builds the same initial weights
    torch.backends.cudnn.deterministic = args.torch_deterministic

    use_cuda = torch.cuda.is_available() and args.cuda
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}" if use_cuda else "cpu")
    # on CPU the backward of TransitionModel's w[a] (index_put with accumulate) is not repeatable with >1 thread otherwise
    torch.use_deterministic_algorithms(args.torch_deterministic and not use_cuda)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that NaN-fills every torch.empty
    if world_size > 1:  # torchrun: each rank steps num_envs / world_size envs; the gradients are averaged over the ranks
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_num_envs, local_batch_size, local_minibatch_size = (
        n // world_size for n in (args.num_envs, args.batch_size, args.minibatch_size)
    )

    if args.eval_only:  # no training: evaluate the saved agent, then stop
        agent = Agent(saved["model"]["actor.bias"].numel(), args.sn_faithful).to(device)
        agent.load_state_dict(saved["model"])
        if rank == 0:
            evaluate(agent, args, run_name, writer, device)
        writer.close()
        sys.exit(0)

    # env setup: env i of rank r is seeded seed + r * local_num_envs + i (a resumed run: new games, seeded after those)
    env_seed = args.seed + rank * local_num_envs + (saved["iteration"] * args.num_envs if args.resume else 0)
    envs = make_envs(args.env_id, args.env_backend, local_num_envs, env_seed, stochastic=args.stochastic_env)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"
    game = parse_env_id(args.env_id)[0]

    agent = Agent(envs.single_action_space.n, args.sn_faithful).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # each rank samples its own actions

    # ALGO Logic: Storage setup
    # obs[t + 1] is the next observation of step t, so s' costs no extra storage; dones[t] came with obs[t]
    obs = torch.zeros((args.num_steps + 1, local_num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, local_num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, local_num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, local_num_envs)).to(device)
    dones = torch.zeros((args.num_steps + 1, local_num_envs)).to(device)
    values = torch.zeros((args.num_steps, local_num_envs)).to(device)
    scores = np.zeros(local_num_envs)  # envpool: the raw score of each env's game so far
    episode_lengths = np.zeros(local_num_envs, dtype=np.int64)  # in agent steps
    last_returns = np.full(local_num_envs, np.nan)  # each env's last finished full-game raw score

    # start the game (CleanRL's, and --resume)
    global_step, start_iteration = 0, 1
    start_time = time.time()
    next_obs = torch.as_tensor(envs.reset()[0], device=device)
    next_done = torch.zeros(local_num_envs).to(device)
    if args.resume:  # the state at the end of the checkpoint's iteration
        agent.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        global_step, start_iteration, state = saved["global_step"], saved["iteration"] + 1, saved["ranks"][rank]
        last_returns, rng = state["last_returns"], state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if use_cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
    start_step = global_step
    hide_bar = None if args.progress and rank == 0 else True  # tqdm's disable: None hides the bar only off a terminal
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
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

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

        # bootstrap value if not done; dones[t + 1] (the flag that came with obs[t + 1]) cuts the bootstrap after step t
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
        # which transitions are resets, whose latent target is phi(s): envpool resets one step late, so (obs[t], obs[t+1])
        # is a reset when dones[t] is set (official); gymnasium resets in the same step, so when dones[t+1] is set
        b_wm_dones = (dones[:-1] if args.env_backend == "envpool" else dones[1:]).reshape(-1)

        # Optimizing the policy, value and world-model networks
        # no host synchronisation per minibatch (it stalls a GPU): the statistics and finiteness checks stay on the device
        # until the end of the update, and a non-finite loss undoes the whole update (back to the weights of `before`)
        before = copy.deepcopy((agent.state_dict(), optimizer.state_dict()))
        b_inds = np.arange(local_batch_size)
        clipfracs, ratio_max, ratio_min, finite = [], [], [], []
        for epoch in range(args.update_epochs):
            drift = torch.zeros((), device=device)  # max |ratio - 1| of the epoch's minibatches, on the device
            np.random.shuffle(b_inds)
            for start in range(0, local_batch_size, local_minibatch_size):
                end = start + local_minibatch_size
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
                        mb_values=b_values[mb_inds],
                    )
                with torch.no_grad():
                    ratio = out["ratio"]
                    drift = torch.maximum(drift, (ratio - 1.0).abs().max())
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]
                    ratio_max, ratio_min = ratio_max + [ratio.max()], ratio_min + [ratio.min()]

                optimizer.zero_grad()
                loss.backward()
                # the loss terms and approx_kl travel with the gradients, so every rank takes the same stop decisions below
                terms = [k for k in LOSS_TERMS if k in out]
                shared = torch.stack([out[k] for k in terms] + [out["approx_kl"]]).detach()
                if world_size > 1:  # ONE all_reduce averages all of them (entity-neural-network/incubator#220)
                    grads = [p.grad for p in agent.parameters() if p.grad is not None]
                    flat = torch.cat([g.view(-1) for g in grads] + [shared])
                    dist.all_reduce(flat)
                    flat /= world_size
                    for g, part in zip(grads, flat[: -len(shared)].split([g.numel() for g in grads]), strict=True):
                        g.copy_(part.view_as(g))
                    shared = flat[-len(shared) :]
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                finite += [torch.cat([shared[:-1], grad_norm.view(1)]).isfinite()]
                for p in agent.parameters():  # after a non-finite step the weights stay finite until the update is undone
                    if p.grad is not None:
                        p.grad.nan_to_num_(0.0, 0.0, 0.0)
                optimizer.step()

            if args.target_kl is not None and shared[-1] > args.target_kl:
                break
            if args.enforce_neighbourhood and world_size > 1:  # every rank takes the same decision
                dist.all_reduce(drift, op=dist.ReduceOp.MAX)
            if args.enforce_neighbourhood and drift > args.clip_coef:  # the ratio left [2 - C, C]: one host read
                break
        nonfinite = None
        if not (finite := torch.stack(finite)).all():  # the first bad minibatch, named; the update undone
            first = int((~finite.all(1)).nonzero()[0])
            bad = [LOSS_TERMS[k] for k, ok in zip(terms, finite[first].tolist(), strict=False) if not ok]
            epoch, minibatch = divmod(first, args.num_minibatches)
            where = f"iteration {iteration} (epoch {epoch + 1}, minibatch {minibatch + 1})"
            nonfinite = f"non-finite {' and '.join(bad) + ' loss' if bad else 'gradient norm'} at {where}"
            agent.load_state_dict(before[0])
            optimizer.load_state_dict(before[1])

        # the supremum importance ratio SIR(pi', pi) on this batch, recomputed with the final parameters
        # (in minibatch-sized chunks: the same numbers, and faster on CPU than one pass over the whole batch)
        with torch.inference_mode(), autocast(args, device):
            chunks = zip(b_obs.split(local_minibatch_size), b_actions.split(local_minibatch_size), strict=True)
            newlogprobs = torch.cat([agent.get_action_and_value(o, a)[1] for o, a in chunks])
            sir = (newlogprobs - b_logprobs).exp().max().item()

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # record rewards for plotting purposes: CleanRL's metrics, then DeepSPI's
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", out["v_loss"].item(), global_step)
        writer.add_scalar("losses/policy_loss", out["pg_loss"].item(), global_step)
        writer.add_scalar("losses/entropy", out["entropy_loss"].item(), global_step)
        writer.add_scalar("losses/old_approx_kl", out["old_approx_kl"].item(), global_step)
        writer.add_scalar("losses/approx_kl", out["approx_kl"].item(), global_step)
        writer.add_scalar("losses/clipfrac", torch.stack(clipfracs).mean().item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("losses/ratio_max", torch.stack(ratio_max).max().item(), global_step)
        writer.add_scalar("losses/ratio_min", torch.stack(ratio_min).min().item(), global_step)
        if "reward_loss" in out:
            writer.add_scalar("losses/reward_loss", out["reward_loss"].item(), global_step)
            writer.add_scalar("losses/transition_loss", out["transition_loss"].item(), global_step)
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
        if progress.disable and rank == 0 and time.time() - last_print > 60:  # no bar: one quiet line a minute
            print(f"global_step={global_step}, SPS={sps}, avg_episodic_return={avg_text}", flush=True)
            last_print = time.time()
        writer.flush()

        # the ranks must take the same decisions, or the next collective call hangs: they check that their parameters
        # are identical and agree on stopping (each row of the table: one rank's parameter checksums, then its signal)
        signum = max(stop_signals, default=0)
        if world_size > 1:
            params = list(agent.parameters())
            table = torch.zeros(world_size, len(params) + 1, dtype=torch.float64, device=device)
            table[rank, :-1] = torch.stack([p.detach().double().sum() for p in params])
            table[rank, -1] = signum
            dist.all_reduce(table)
            if drifted := out_of_sync_ranks(table[:, :-1]):
                raise RuntimeError(f"the parameters of ranks {drifted} differ from rank 0's after iteration {iteration}")
            signum = int(table[:, -1].max())

        # checkpoint: what it takes to go on from here (after a non-finite loss: the iteration before, which resume redoes)
        checkpoint_path = f"runs/{run_name}/checkpoint.pt"
        due = args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations)
        if nonfinite or signum or due:
            rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
            rng["cuda"] = torch.cuda.get_rng_state_all() if use_cuda else None
            local = dict(rng=rng, last_returns=last_returns)
            ranks = [local]
            if world_size > 1:  # every rank's own state goes to rank 0
                ranks = [None] * world_size
                dist.all_gather_object(ranks, local)
            if rank == 0:
                checkpoint = dict(model=agent.state_dict(), optimizer=optimizer.state_dict(), args=vars(args))
                done_iteration = iteration - 1 if nonfinite else iteration
                checkpoint.update(run_name=run_name, iteration=done_iteration, global_step=done_iteration * args.batch_size)
                checkpoint.update(ranks=ranks)
                save_atomic(checkpoint, checkpoint_path)
        if nonfinite or signum:
            progress.close()
            writer.close()
            if rank == 0:
                stop = f"error: {nonfinite}" if nonfinite else f"{signal.Signals(signum).name} after iteration {iteration}"
                print(f"{os.path.basename(sys.argv[0])}: {stop}; resume from {checkpoint_path}", file=sys.stderr)
            sys.exit(1 if nonfinite else 128 + signum)

    progress.close()
    envs.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # training is over: signals stop the rest at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.save_model and rank == 0:
        save_atomic({"model": agent.state_dict(), "args": vars(args)}, f"runs/{run_name}/{args.exp_name}.cleanrl_model")
    if args.eval_episodes and rank == 0:
        evaluate(agent, args, run_name, writer, device)
    writer.close()
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(f"done: {global_step} steps in {time.time() - start_time:.0f}s, runs/{run_name}")
