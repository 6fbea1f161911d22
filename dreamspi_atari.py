# DreamSPI (https://arxiv.org/abs/2510.12312, ICLR 2026; docs/dreamspi_atari.md): DeepSPI's real-data step trains only the
# encoder and the latent world model (with a done head); the actor and critic learn only from the world model's imagination.
import difflib
import functools
import importlib.util
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

gym.register_envs(ale_py)  # DeepSPI: gymnasium 1.x registers the Atari ids only on request
# DeepSPI: no validation of each Categorical's logits, which reads them on the host (a GPU synchronisation) per minibatch
torch.distributions.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    """DreamSPI on Atari (arXiv 2510.12312): DeepSPI whose actor and critic learn only from its world model's imagination.

    DreamSPI's own flags: --imagination-horizon, --imagination-epochs, --soft-done, --dyna-style, --wm-clip-coef, the four
    --*-learning-rate; DeepSPI's: --reward-loss-coef, --transition-loss-coef, --deep-mdp, --sn-faithful"""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, cudnn.deterministic and, on CPU, use_deterministic_algorithms: repeatable CPU runs and resumes"""
    cuda: bool = True
    """use CUDA when it is available (--no-cuda: the CPU)"""
    bf16: bool = False  # DeepSPI: bfloat16 autocast
    """bfloat16 convolutions and matmuls (autocast), float32 spectral norms and losses; slow on AVX2-only CPUs"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "deepspi"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    progress: bool = True  # RUN MACHINERY: progress, saved model, checkpoints and resume
    """show a progress bar (only when the output is a terminal)"""
    save_model: bool = False
    """save the trained agent to `runs/{run_name}/{exp_name}.cleanrl_model` (evaluate it with evaluate.py)"""
    checkpoint_every: int = 200
    """write `runs/{run_name}/checkpoint.pt` every this many iterations, at the end and on SIGINT/SIGTERM (0: signals)"""
    resume: Optional[str] = None
    """go on with the run of this checkpoint.pt, with its arguments and new games, in its `runs/{run_name}`; a larger
    --total-timesteps extends it (--anneal-lr: the rate goes on as if the run had been started with the larger total)"""

    # Algorithm specific arguments
    env_id: str = "BreakoutNoFrameskip-v4"
    """the id of the environment (`XNoFrameskip-v4`, `X-v5` or `ALE/X-v5`)"""
    env_backend: Literal["envpool", "gymnasium"] = "envpool"  # DeepSPI: the simulator and the official stochastic ALE
    """the Atari simulator: envpool (fast) or gymnasium + ale-py (equivalent preprocessing)"""
    stochastic_env: bool = False
    """the paper's stochastic ALE-57: sticky actions 0.3 and up to 60 no-ops at reset (else the id's, 30 no-ops)"""
    total_timesteps: int = 10000000
    """total agent steps, over all envs (an agent step is 4 emulator frames)"""
    encoder_learning_rate: float = 2e-4  # DreamSPI: four parameter groups
    """the learning rate of the encoder group (the conv layers; trained on real data only)"""
    world_model_learning_rate: float = 2e-4
    """the learning rate of the world-model group (reward, transition and done heads; trained on real data only)"""
    actor_learning_rate: float = 2.75e-5
    """the learning rate of the actor group (the FC-512 torso and the actor head; trained on imagined data)"""
    critic_learning_rate: float = 2.75e-5
    """the learning rate of the critic group (the critic head; trained on imagined data)"""
    num_envs: int = 128  # DeepSPI: the official defaults, 128 envs x 8 steps
    """the number of parallel game environments"""
    num_steps: int = 8
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing (each of the four groups from its own rate to 0)"""
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
    """the surrogate clipping coefficient of the imagination (actor-critic) step"""
    wm_clip_coef: float = 0.1
    """the surrogate clipping coefficient of the real-data (encoder + world model) step"""
    clip_vloss: bool = False  # DeepSPI: off by default, as officially
    """Toggles CleanRL's clipped value loss in both steps, with each step's clipping coefficient (off: the official one)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    reward_loss_coef: float = 0.01  # DeepSPI: arguments
    """alpha_R: weight of the per-sample reward and done losses in the utility"""
    transition_loss_coef: float = 5e-4
    """alpha_P: weight of the per-sample latent transition (Wasserstein) loss in the utility"""
    deep_mdp: bool = False
    """DeepMDP ablation: add the world-model losses to the loss instead of subtracting them from the advantage"""
    sn_faithful: bool = True
    """the official spectral norm (sigma = ||W^T u||^2, not 1-Lipschitz); False: exact sigma_1, 1-Lipschitz layers"""
    imagination_horizon: int = 8  # DreamSPI: arguments
    """H: the number of world-model steps imagined from every encoded real state"""
    imagination_epochs: int = 1
    """the epochs of the imagination (actor-critic) step"""
    soft_done: bool = False
    """imagined dones are the predicted probabilities (the latent is not frozen) instead of Bernoulli draws"""
    dyna_style: bool = False
    """the real-data step also updates the actor and critic (with the full DeepSPI loss)"""

    # to be filled in runtime
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    imagination_batch_size: tyro.conf.Suppress[int] = 0
    """the imagined batch size, horizon x batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""
    gamma_C: tyro.conf.Suppress[str] = ""  # DeepSPI: gamma * C, the factor in the paper's bound, for the hyperparameters table


def fail(message):  # DeepSPI: bad input gets one clear line and exit code 2, no traceback
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """Every flag against its domain before anything is built (NaN fails every test): the first bad one fails."""
    games = sorted(k[4:-3] for k in gym.registry if re.fullmatch(r"ALE/[A-Za-z0-9]+-v5", k))
    ids = []
    for game in games:  # ALE/X-v5 has sticky actions 0.25
        ids += [f"{game}NoFrameskip-v4", f"{game}-v5", f"ALE/{game}-v5"]
    if args.env_id not in ids:
        close = difflib.get_close_matches(args.env_id, ids, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown env id {args.env_id!r}{hint}")
    domains = [  # (flags, test, what they must be)
        ("num_envs num_steps num_minibatches update_epochs total_timesteps", lambda x: x > 0, "positive"),
        ("imagination_horizon imagination_epochs", lambda x: x > 0, "positive"),
        ("encoder_learning_rate world_model_learning_rate", lambda x: 0 < x < math.inf, "positive and finite"),
        ("actor_learning_rate critic_learning_rate", lambda x: 0 < x < math.inf, "positive and finite"),
        ("max_grad_norm target_kl", lambda x: x is None or 0 < x < math.inf, "positive and finite"),
        ("ent_coef vf_coef reward_loss_coef transition_loss_coef", lambda x: 0 <= x < math.inf, "non-negative and finite"),
        ("checkpoint_every", lambda x: x >= 0, "non-negative"),
        ("gamma", lambda x: 0.5 < x < 1, "in (0.5, 1), as the theory assumes"),
        ("gae_lambda", lambda x: 0 <= x <= 1, "in [0, 1]"),
        ("clip_coef wm_clip_coef", lambda x: 0 < x < 1, "in (0, 1)"),
    ]
    for names, ok, what in domains:
        for name in names.split():
            if not ok(getattr(args, name)):
                fail(f"--{name.replace('_', '-')} {getattr(args, name)} must be {what}")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches != 0:
        split = f"the batch ({args.num_envs} x {args.num_steps} = {batch})"
        fail(f"{split} is not divisible by --num-minibatches {args.num_minibatches}")
    if batch > args.total_timesteps:
        fail(f"--total-timesteps {args.total_timesteps} < one batch")


# DeepSPI: the environments of envpool, and the same preprocessing with gymnasium + ale-py
class EpisodicLifeEnv(gym.Wrapper):
    """envpool's episodic life with fire reset: a lost life ends the episode, and its reset goes on with the same game
    (a no-op to leave the lost-life frame, then FIRE); only a game over or the time limit resets the game."""

    def __init__(self, env):
        super().__init__(env)
        self.lives, self.game_over = 0, True
        self.fire = env.unwrapped.get_action_meanings()[1] == "FIRE"

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        terminated = terminated or lives < self.lives  # a lost life ends the episode
        self.lives = lives
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
    """envpool's preprocessing with gymnasium + ale-py, on ALE/X-v5 without its frame skip (no sticky actions: v4's)."""

    def thunk():
        render_mode = "rgb_array" if video_dir else None
        env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=sticky, render_mode=render_mode)
        if video_dir:  # the first game in colour, every emulator frame (60 per second)
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda episode: episode == 0, fps=60)
        env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # under the life wrapper: the raw full-game score
        env = gym.wrappers.FrameStackObservation(env, 4)
        env = EpisodicLifeEnv(env)  # outside the frame stack, which keeps rolling across a lost life
        env = gym.wrappers.TransformReward(env, np.sign)
        env.reset(seed=seed)  # seeds the emulator and the no-op draws; the vector env's reset goes on from there
        return env

    return thunk


def finished_games(infos, truncations, scores):
    """{env: raw full-game score} of the games that ended in this step (envpool's are summed in scores)."""
    if "reward" not in infos:
        final = infos.get("final_info", {})
        return {i: final["episode"]["r"][i] for i in np.nonzero(final.get("_episode", []))[0]}
    scores += infos["reward"]
    ended = np.nonzero(np.logical_or(infos["terminated"], truncations))[0]
    games = {i: scores[i] for i in ended}
    scores[ended] = 0  # the ended games start again at 0
    return games


def make_envs(env_id, backend, num_envs, seed, video_dir=None, stochastic=False):
    """num_envs envs, env i seeded seed + i; video_dir: env 0's first game (gymnasium); stochastic: the official ALE."""
    game = re.sub(r"^ALE/|NoFrameskip-v4$|-v5$", "", env_id)
    sticky = 0.25 if env_id.startswith("ALE/") else 0.0  # ALE/X-v5's sticky actions
    noop_max = 30
    if stochastic:  # the official stochastic ALE
        sticky = 0.3
        noop_max = 60
    if backend == "envpool":
        import envpool

        if f"{game}-v5" not in envpool.list_all_envs():
            fail(f"envpool has no {game}-v5; use --env-backend gymnasium")
        kwargs = dict(episodic_life=True, reward_clip=True, repeat_action_probability=sticky, noop_max=noop_max)
        return envpool.make(f"{game}-v5", env_type="gymnasium", num_envs=num_envs, seed=seed, **kwargs)
    thunks = [make_env(game, sticky, noop_max, seed + i, video_dir if i == 0 else None) for i in range(num_envs)]
    return gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


# DeepSPI: the Lipschitz world model (spectrally normalised layers, GroupSort)
def group_sort(x):
    """GroupSort(2) over dim 1: each adjacent pair of channels becomes (min, max); 1-Lipschitz and gradient-norm preserving."""
    return x.unflatten(1, (-1, 2)).sort(dim=2).values.flatten(1, 2)


def spectral_sigma(matrix, v0, n_iters=2, faithful=True):
    """Spectral norm of matrix (batched), differentiable. faithful: the official power iteration from v0, whose last
    v = M^T u stays unnormalised, so it returns ~sigma_1^2 (W/sigma is not 1-Lipschitz); else sigma_1 itself."""
    with torch.autocast(matrix.device.type, enabled=False):  # float32 also under --bf16: sigma scales every layer
        if not faithful:  # nan_to_num: a non-finite step stops the run at the end of its iteration, not in the SVD
            return torch.linalg.matrix_norm(matrix.nan_to_num(), ord=2)
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


class SNLinear(nn.Module):
    """Dense layer with spectral normalisation recomputed in every forward pass (paper: Lipschitz world model)."""

    def __init__(self, in_features, out_features, faithful=True, n_iters=2):
        super().__init__()
        self.weight = nn.Parameter(lecun_normal_(torch.empty(out_features, in_features), in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        # one fixed N(0, I) start vector per size, shared by the layers of that size (as the official PRNGKey(0) draw)
        self.register_buffer("v0", torch.randn(out_features, generator=torch.Generator().manual_seed(0)))
        self.faithful, self.n_iters = faithful, n_iters

    def sigma(self):
        return spectral_sigma(self.weight.t(), self.v0, self.n_iters, self.faithful)  # the official (in, out) kernel

    def normalized_weight(self):
        return self.weight / self.sigma()

    def forward(self, x):
        return F.linear(x, self.normalized_weight(), self.bias)


class SNConv2d(nn.Module):
    """2x2 stride-1 conv, XLA "SAME" padding (bottom/right), spectral norm per group matrix (one shared v0, official)."""

    def __init__(self, in_channels, out_channels, k=2, groups=1, faithful=True, n_iters=2):
        super().__init__()
        fan_in = in_channels // groups * k**2
        self.weight = nn.Parameter(lecun_normal_(torch.empty(out_channels, in_channels // groups, k, k), fan_in))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("v0", torch.randn(fan_in, generator=torch.Generator().manual_seed(0)))
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
        self.fc1, self.fc2 = SNLinear(latent_dim, 256, faithful), SNLinear(256, 256, faithful)
        self.fc3 = SNLinear(256, n_actions, faithful)

    def forward(self, z, action):
        x = group_sort(self.fc1(z.flatten(1)))
        x = group_sort(self.fc2(x))
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
        # conv2 for the taken action only (the full conv does |A| times the work): each sample's weights per group, rows
        # reordered from (c, k, n) to (n, k, c) so that loc and scale come out contiguous (B, K, C, H, W), on 2x2 patches
        G, K, C = self.groups, self.n_components, self.channels
        w = self.conv2.normalized_weight().view(G, C // G, K, 2, self.n_actions, -1).permute(4, 0, 3, 2, 1, 5)
        bias = self.conv2.bias.view(G, C // G, K, 2, self.n_actions).permute(4, 3, 2, 0, 1)
        hp, (height, width) = F.pad(h, (0, 1, 0, 1)), z.shape[2:]
        patches = torch.stack([hp[:, :, i : i + height, j : j + width] for i in (0, 1) for j in (0, 1)], 2)  # F.unfold's order
        o = torch.einsum("bgnkcf,bgfp->bnkgcp", w[a], patches.reshape(b, G, -1, height * width)).contiguous()
        loc, raw_scale = (o.view(b, 2, K, C, height, width) + bias[a].view(b, 2, K, C, 1, 1)).unbind(1)
        loc, scale = 0.5 * loc, 0.5 * (F.softplus(raw_scale) + 1e-6)  # (B, K, C, H, W); 0.5: the official K/2 scaling
        logits = self.mixture(h.flatten(1)).float().view(b, self.n_components, self.n_actions)
        logits = logits.gather(2, a.view(-1, 1, 1).expand(-1, self.n_components, 1)).squeeze(2)
        eps = torch.randn_like(loc).clamp(-1.0, 1.0) if eps is None else eps
        # the official "soft" reparameterised sample: a weighted average of the components' samples (clipped noise)
        sample = (logits.softmax(1).view(b, -1, 1, 1, 1) * (loc + scale * eps)).sum(1)
        return sample, logits, loc, scale


# DreamSPI: the done head and the imagined termination
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
    if soft:
        return p
    return torch.bernoulli(p.nan_to_num())  # a non-finite step stops the run at the end of its iteration


class Agent(nn.Module):
    def __init__(self, n_actions, sn_faithful=True):
        super().__init__()
        # DeepSPI: the latent state is the 64x7x7 conv map (post-ReLU); the FC-512 torso feeds only actor and critic
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
        self.done_predictor = DonePredictor()  # DreamSPI

    def param_groups(self):
        """DreamSPI's four groups, each with its own optimizer, learning rate and grad-norm clip. The critic head reads
        the shared torso output: the torso belongs to the actor group (the value loss of imagination still shapes it)."""
        world_model = [*self.reward_model.parameters(), *self.transition_model.parameters()]
        return {
            "encoder": list(self.encoder.parameters()),
            "world_model": world_model + list(self.done_predictor.parameters()),
            "actor": [*self.network.parameters(), *self.actor.parameters()],
            "critic": list(self.critic.parameters()),
        }

    def encode(self, x):  # DeepSPI: the encoder apart, so that the update encodes s and s' once
        # channels_last: the same numbers, and about 20% faster convolutions (forward and backward) on CPU (oneDNN)
        return self.encoder(x.contiguous(memory_format=torch.channels_last) / 255.0)

    def get_value(self, x):
        return self.critic(self.network(self.encode(x)))

    def get_action_and_value(self, x, action=None, z=None):
        if z is None:  # DeepSPI: z, the latent of x, when the caller has it
            z = self.encode(x)
        hidden = self.network(z)
        logits = self.actor(hidden).float()  # float32 log-probabilities also under --bf16: they make the ratio
        probs = Categorical(logits=logits)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden)

    def world_model_losses(self, z, next_z, action, reward, reset, next_done, eps=None):
        """Per-sample reward, transition (one-sample Wasserstein estimate) and done losses; a reset targets phi(s)."""
        next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), z, next_z)
        reward_pred = self.reward_model(z, action)
        sample = self.transition_model(z, action, eps)[0]
        reward_loss = F.smooth_l1_loss(reward_pred, reward, reduction="none")
        transition_loss = F.smooth_l1_loss(sample, next_z, reduction="none").sum((1, 2, 3))
        done_loss = F.smooth_l1_loss(torch.sigmoid(self.done_predictor(next_z)) + 1e-8, next_done, reduction="none")
        return reward_loss, transition_loss, done_loss


# DreamSPI: imagination, its GAE and its actor-critic loss, and the steps of the parameter groups
@torch.no_grad()
def imagine(agent, z0, d0, horizon, soft_done=False):
    """Roll the world model out for `horizon` steps from the latents z0 (done flags d0) under the current policy, all
    without gradients. Returns (H, N) tensors obs, next_obs (views of one (H+1, N, ...) latent buffer), actions,
    logprobs, values, rewards, dones, next_dones, and next_value = V(z_H). A hard done keeps z' = z."""
    n = z0.shape[0]
    device = z0.device
    latents = torch.zeros((horizon + 1,) + z0.shape, device=device)
    dones = torch.zeros((horizon + 1, n), device=device)
    actions = torch.zeros((horizon, n), dtype=torch.long, device=device)
    logprobs = torch.zeros((horizon, n), device=device)
    values = torch.zeros((horizon, n), device=device)
    rewards = torch.zeros((horizon, n), device=device)
    latents[0] = z0
    dones[0] = d0
    for h in range(horizon):
        z = latents[h]
        hidden = agent.network(z)
        probs = Categorical(logits=agent.actor(hidden).float().nan_to_num())  # nan_to_num: as in sample_done
        actions[h] = probs.sample()
        logprobs[h] = probs.log_prob(actions[h])
        values[h] = agent.critic(hidden).view(-1)
        rewards[h] = agent.reward_model(z, actions[h])  # the deterministic reward head, unclipped
        next_z = agent.transition_model(z, actions[h])[0]  # the soft mixture sample
        dones[h + 1] = sample_done(agent.done_predictor(next_z), soft_done)
        if not soft_done:  # after a predicted termination the rollout stays where it is
            next_z = torch.where(dones[h + 1].view(-1, 1, 1, 1).bool(), z, next_z)
        latents[h + 1] = next_z
    next_value = agent.critic(agent.network(latents[horizon])).float().view(-1)
    out = dict(obs=latents[:-1], next_obs=latents[1:], actions=actions, logprobs=logprobs, values=values, rewards=rewards)
    out.update(dones=dones[:-1], next_dones=dones[1:], next_value=next_value)
    return out


def compute_gae(imagined, gamma, gae_lambda):
    """GAE over an imagined (H, N) block; next_dones[t] (0/1, or a probability) cuts the bootstrap after step t and
    next_value is V of the state after the last step. Returns (advantages, returns)."""
    rewards = imagined["rewards"]
    values = imagined["values"]
    next_dones = imagined["next_dones"]
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(rewards.shape[0])):
        nextnonterminal = 1.0 - next_dones[t]
        nextvalues = imagined["next_value"] if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages, advantages + values


def imagination_loss(agent, args, z, action, logprob, advantage, ret, value):
    """The actor-critic loss on imagined latents: CleanRL's clipped PPO loss with --clip-coef and no world-model term.
    Returns the loss, its terms (policy, value, entropy) and CleanRL's statistics (old_approx_kl, approx_kl, clipfrac)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(None, action, z)
    logratio = newlogprob - logprob
    ratio = logratio.exp()
    if args.norm_adv:  # the population std, as the official (JAX) code
        advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + 1e-8)
    pg_loss1 = -advantage * ratio
    pg_loss2 = -advantage * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    v_loss = (newvalue.view(-1) - ret) ** 2
    if args.clip_vloss:  # CleanRL's clipped value loss, as in the real-data step
        v_clipped = value + torch.clamp(newvalue.view(-1) - value, -args.clip_coef, args.clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - ret) ** 2)
    v_loss = 0.5 * v_loss.mean()
    entropy_loss = entropy.mean()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return loss, torch.stack([pg_loss, v_loss, entropy_loss]), [old_approx_kl, approx_kl, clipfrac]


def step_groups(loss, agent, optimizers, names, max_grad_norm):
    """Backpropagate loss, then step only the named parameter groups, each clipped on its own (the others' gradients drop)."""
    for optimizer in optimizers.values():
        optimizer.zero_grad()
    loss.backward()
    groups = agent.param_groups()
    for name in names:
        nn.utils.clip_grad_norm_(groups[name], max_grad_norm)
        optimizers[name].step()


# RUN MACHINERY: the run folder and atomic saves
def make_run_dir(run_name, reuse=False, k=1):
    """Create runs/{run_name} and return its name; unless reuse, never an existing directory: the name gets _2, _3..."""
    name = run_name if k == 1 else f"{run_name}_{k}"
    try:
        os.makedirs(f"runs/{name}", exist_ok=reuse)
        return name
    except FileExistsError:
        return make_run_dir(run_name, reuse, k + 1)


def save_atomic(obj, path):
    """torch.save to a temporary file in the same directory, then rename it: a crash never leaves a truncated file."""
    torch.save(obj, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # RUN MACHINERY: a Ctrl-C during the start-up ends it at once
    args = tyro.cli(Args)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # DeepSPI: one process
        fail("this script runs one process (torchrun: deepspi_atari_multigpu.py, on Atari)")

    # RUN MACHINERY: --resume takes the saved run's arguments, and only these flags besides
    saved = None
    script = os.path.basename(__file__)  # each checkpoint records the script that wrote it
    if args.resume:
        keep = ["resume", "cuda", "progress", "track", "checkpoint_every", "save_model", "total_timesteps"]
        given = []
        for arg in sys.argv[1:]:
            given.append(arg[2:].split("=")[0].replace("-", "_").removeprefix("no_"))
            if arg.startswith("--") and given[-1] not in keep:
                fail(f"--resume takes the saved run's arguments, not {arg.split('=')[0]}")
        try:  # a pickle: load only files you trust
            saved = torch.load(args.resume, map_location="cpu", weights_only=False)
        except Exception as e:
            fail(f"--resume: cannot read {args.resume} ({type(e).__name__})")
        other = isinstance(saved, dict) and saved.get("script")
        if other != script or "iteration" not in saved:
            by = f" (it was written by {other})" if other and other != script else ""
            fail(f"--resume: {args.resume} is not a checkpoint.pt of {script}{by}")
        saved_args = {k: v for k, v in saved["args"].items() if k in Args.__dataclass_fields__}
        for name in keep:
            if name not in ("total_timesteps", "checkpoint_every", "save_model") or name in given:  # these: saved unless given
                saved_args[name] = getattr(args, name)
        args = Args(**saved_args)
    check_args(args)  # DeepSPI: bad input fails here
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    args.imagination_batch_size = args.batch_size * args.imagination_horizon  # DreamSPI: H imagined steps per real state
    gamma_c = args.gamma * (1 + max(args.clip_coef, args.wm_clip_coef))  # DreamSPI: the larger clip of the two steps
    args.gamma_C = f"{gamma_c:.3f} (the paper's bound assumes < 1)"  # DeepSPI
    if args.resume and saved["iteration"] >= args.num_iterations:  # RUN MACHINERY: a finished run, nothing to do
        done = f"finished ({saved['iteration']}/{args.num_iterations} iterations, {saved['global_step']} agent steps)"
        print(f"runs/{saved['run_name']}: {done}; --total-timesteps larger than {saved['global_step']} extends it")
        sys.exit(0)
    if args.env_backend == "envpool" and importlib.util.find_spec("envpool") is None:  # DeepSPI: envpool is Linux only
        print("envpool is not installed here: falling back to --env-backend gymnasium", file=sys.stderr)
        args.env_backend = "gymnasium"
    # RUN MACHINERY: the envs (the slow start-up) before the run folder, so that an interrupted start-up leaves none
    env_seed = args.seed + saved["iteration"] * args.num_envs if args.resume else args.seed  # a resumed run: new games
    envs = make_envs(args.env_id, args.env_backend, args.num_envs, env_seed, stochastic=args.stochastic_env)
    if args.resume:  # the run folder, a new one or the resumed run's
        run_name = make_run_dir(saved["run_name"], reuse=True)
        print(f"resuming runs/{run_name} after iteration {saved['iteration']}/{args.num_iterations}, with new games")
    else:
        run_name = make_run_dir(f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}")
        steps = args.num_iterations * args.batch_size
        plan = f"{args.num_iterations} iterations of {args.num_envs} envs x {args.num_steps} steps = {steps} agent steps"
        rest = f" (--total-timesteps {args.total_timesteps} is not a multiple of the batch {args.batch_size})"
        print(f"runs/{run_name}: {plan}" + (rest if steps < args.total_timesteps else ""))
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    stop_signals = []  # SIGINT/SIGTERM: a checkpoint at the end of the iteration, then exit 128 + signal number

    def stop(signum, frame):
        if stop_signals:  # a second signal: exit now, the last checkpoint kept (saves are atomic)
            kept = f": resume from {checkpoint_path}" if os.path.exists(checkpoint_path) else "; no checkpoint yet"
            print(f"stopped now{kept}", file=sys.stderr)
            os._exit(128 + signum)
        stop_signals.append(signum)
        print(f"{signal.Signals(signum).name}: stopping after this iteration; Ctrl-C again to stop now", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
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
    # RUN MACHINERY: a resumed run hides what the crashed run logged after its checkpoint
    purge_step = saved["global_step"] + 1 if args.resume else None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # DeepSPI: autocast() is --bf16's context, a no-op without it
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.bf16)
    # DeepSPI: on CPU, the backward of TransitionModel's w[a] (index_put, accumulate) is repeatable with >1 thread only so
    torch.use_deterministic_algorithms(args.torch_deterministic and device.type == "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that NaN-fills every torch.empty

    # env setup
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"

    agent = Agent(envs.single_action_space.n, args.sn_faithful).to(device)
    # DreamSPI: one Adam per parameter group, each with its own learning rate and grad-norm clip
    learning_rates = {}
    optimizers = {}
    for name, params in agent.param_groups().items():
        learning_rates[name] = getattr(args, f"{name}_learning_rate")
        optimizers[name] = optim.Adam(params, lr=learning_rates[name], eps=1e-5)
    # DreamSPI: the real-data step trains the encoder and the world model (and, dyna-style, the actor and critic as well)
    real_groups = ["encoder", "world_model"]
    if args.dyna_style:
        real_groups += ["actor", "critic"]

    # ALGO Logic: Storage setup
    # DeepSPI: obs[t + 1] is the next observation of step t, so s' costs no extra storage; dones[t] came with obs[t]
    obs = torch.zeros((args.num_steps + 1, args.num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps + 1, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    scores = np.zeros(args.num_envs)  # DeepSPI: envpool's raw score of each env's game so far
    episode_lengths = np.zeros(args.num_envs, dtype=np.int64)  # in agent steps
    last_returns = np.full(args.num_envs, np.nan)  # each env's last finished full-game raw score

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    next_obs = torch.as_tensor(envs.reset()[0], device=device)
    next_done = torch.zeros(args.num_envs).to(device)

    # RUN MACHINERY: resume, progress, signals
    if args.resume:  # the weights and optimizer at the end of the checkpoint's iteration
        agent.load_state_dict(saved["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        global_step = saved["global_step"]
        last_returns = saved["last_returns"]
        np.random.seed(env_seed)  # new random streams too, like the new games
        torch.manual_seed(env_seed)
    start_step, last_print = global_step, start_time
    done_iterations = global_step // args.batch_size
    progress = tqdm(total=args.num_iterations, initial=done_iterations, disable=None if args.progress else True)

    for iteration in range(done_iterations + 1, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            for name, optimizer in optimizers.items():  # DreamSPI: each group from its own rate
                optimizer.param_groups[0]["lr"] = frac * learning_rates[name]

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.inference_mode(), autocast():  # DeepSPI: inference mode and --bf16
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.tensor(reward).to(device).view(-1)
            next_obs, next_done = torch.as_tensor(next_obs, device=device), torch.as_tensor(next_done, device=device).float()

            # DeepSPI: the raw full-game score, ended by a game over or a time limit, not by a lost life
            episode_lengths += 1
            for idx, episodic_return in finished_games(infos, truncations, scores).items():
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", episode_lengths[idx], global_step)
                last_returns[idx] = episodic_return
                episode_lengths[idx] = 0
        obs[args.num_steps] = next_obs  # DeepSPI: the observation and done flag after the last step
        dones[args.num_steps] = next_done

        # bootstrap value if not done
        with torch.inference_mode(), autocast():  # DeepSPI: inference mode and --bf16
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values

        # flatten the batch
        b_obs = obs[:-1].reshape((-1,) + envs.single_observation_space.shape)
        b_next_obs = obs[1:].reshape((-1,) + envs.single_observation_space.shape)  # DeepSPI: s'
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        # DeepSPI: the reset transitions (target phi(s)): dones[t] with envpool, which resets one step late, else dones[t+1]
        b_rewards = rewards.reshape(-1)
        b_next_dones = dones[1:].reshape(-1)  # DreamSPI: the done head's labels
        if args.env_backend == "envpool":
            b_resets = dones[:-1].reshape(-1)
        else:
            b_resets = dones[1:].reshape(-1)

        # DreamSPI, real-data step: the DeepSPI loss, done loss included, trains the encoder and world model (not the heads)
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        bad = torch.full((6,), math.inf, device=device)  # RUN MACHINERY: per loss term, its first non-finite minibatch
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                # DeepSPI: s and s' in one pass of the live encoder (the target phi(s') is not detached, as officially)
                mb_obs = torch.cat([b_obs[mb_inds], b_next_obs[mb_inds]])
                with autocast():
                    z, next_z = agent.encode(mb_obs).tensor_split([len(mb_inds)])
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(None, b_actions.long()[mb_inds], z)
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.wm_clip_coef).float().mean()]  # DeepSPI: no host read

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:  # DeepSPI: the population std, as the official (JAX) code
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std(unbiased=False) + 1e-8)

                # DeepSPI: the utility U = A - (alpha_R (l_R + l_D) + alpha_P l_P), per sample, not detached, is the advantage
                with autocast():
                    mb = (b_actions[mb_inds], b_rewards[mb_inds], b_resets[mb_inds], b_next_dones[mb_inds])
                    reward_loss, transition_loss, done_loss = agent.world_model_losses(z, next_z, *mb)
                wm_loss = args.reward_loss_coef * (reward_loss + done_loss) + args.transition_loss_coef * transition_loss
                if not args.deep_mdp:
                    mb_advantages = mb_advantages - wm_loss

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.wm_clip_coef, 1 + args.wm_clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds],
                        -args.wm_clip_coef,
                        args.wm_clip_coef,
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                    v_loss = 0.5 * v_loss_max.mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if args.deep_mdp:  # DeepSPI: the DeepMDP ablation, the world-model losses outside the clip
                    loss = loss + wm_loss.mean()
                # RUN MACHINERY: the first non-finite minibatch of each term, with no host read
                terms = torch.stack([reward_loss.mean(), transition_loss.mean(), pg_loss, v_loss, entropy_loss])
                terms = torch.cat([terms, done_loss.mean().view(1)])
                bad = torch.where(bad.isinf() & ~terms.isfinite(), epoch * args.batch_size + start, bad)

                step_groups(loss, agent, optimizers, real_groups, args.max_grad_norm)

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        # DreamSPI: the statistics of each step, logged under its own prefix
        stats = {"repr_wm": [*terms[2:5].detach(), old_approx_kl, approx_kl, torch.stack(clipfracs).mean(), explained_var]}

        # DreamSPI, imagination: H world-model steps from every real state (and its done flag), with the updated encoder
        with torch.no_grad(), autocast():
            z0 = agent.encode(b_obs)
            im = imagine(agent, z0, dones[:-1].reshape(-1), args.imagination_horizon, args.soft_done)
            i_advantages, i_returns = compute_gae(im, args.gamma, args.gae_lambda)
        i_obs = im["obs"].flatten(0, 1)
        i_actions = im["actions"].flatten(0, 1)
        i_logprobs = im["logprobs"].flatten(0, 1)
        i_values = im["values"].flatten(0, 1)
        i_advantages = i_advantages.flatten(0, 1)
        i_returns = i_returns.flatten(0, 1)

        i_inds = np.arange(args.imagination_batch_size)  # DreamSPI: the actor-critic step, on imagined latents only
        clipfracs = []
        i_bad = torch.full((3,), math.inf, device=device)  # as bad, counted after the real-data step
        for epoch in range(args.imagination_epochs):
            np.random.shuffle(i_inds)
            for start in range(0, args.imagination_batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = i_inds[start:end]
                mb = (i_obs[mb_inds], i_actions[mb_inds], i_logprobs[mb_inds], i_advantages[mb_inds], i_returns[mb_inds])
                with autocast():
                    loss, terms, (old_approx_kl, approx_kl, clipfrac) = imagination_loss(agent, args, *mb, i_values[mb_inds])
                clipfracs += [clipfrac]
                position = (args.update_epochs + epoch) * args.imagination_batch_size + start
                i_bad = torch.where(i_bad.isinf() & ~terms.isfinite(), position, i_bad)
                step_groups(loss, agent, optimizers, ["actor", "critic"], args.max_grad_norm)

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = i_values.cpu().numpy(), i_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        stats["imagination"] = [*terms.detach(), old_approx_kl, approx_kl, torch.stack(clipfracs).mean(), explained_var]

        with torch.inference_mode(), autocast():  # DeepSPI: SIR(pi', pi); z0 is the final encoder's
            sir = (agent.get_action_and_value(None, b_actions, z0)[1] - b_logprobs).exp().max().item()

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        for name, optimizer in optimizers.items():  # DreamSPI: the groups' rates, each step's statistics
            writer.add_scalar(f"charts/{name}_learning_rate", optimizer.param_groups[0]["lr"], global_step)
        names = ["policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac", "explained_variance"]
        for prefix, logged in stats.items():  # the last minibatch's values (clipfrac: the mean over the step)
            for name, x in zip(names, logged, strict=True):
                writer.add_scalar(f"{prefix}/{name}", float(x), global_step)
        writer.add_scalar("repr_wm/reward_loss", reward_loss.mean().item(), global_step)
        writer.add_scalar("repr_wm/transition_loss", transition_loss.mean().item(), global_step)
        writer.add_scalar("repr_wm/done_loss", done_loss.mean().item(), global_step)
        writer.add_scalar("imagination/reward_mean", im["rewards"].mean().item(), global_step)
        writer.add_scalar("imagination/done_rate", im["next_dones"].mean().item(), global_step)
        writer.add_scalar("imagination/return_mean", i_returns.mean().item(), global_step)  # DreamSPI: imagined and real
        writer.add_scalar("imagination/real_return_mean", b_returns.mean().item(), global_step)
        writer.add_scalar("imagination/real_reward_mean", b_rewards.mean().item(), global_step)
        writer.add_scalar("imagination/real_done_rate", b_next_dones.mean().item(), global_step)
        writer.add_scalar("charts/sir", sir, global_step)  # DeepSPI: the SIR and the average of the last full-game scores
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/SPS", sps, global_step)
        finished = last_returns[~np.isnan(last_returns)]
        avg_text = f"{finished.mean():.1f}" if len(finished) else "n/a"
        if len(finished):
            writer.add_scalar("charts/avg_episodic_return", finished.mean(), global_step)
        writer.flush()

        # RUN MACHINERY: progress, non-finite stop, checkpoint, signals
        progress.set_postfix(SPS=sps, avg_return=avg_text, refresh=False)
        progress.update()
        if progress.disable and time.time() - last_print > 60:  # no bar: one quiet line a minute
            steps = args.num_iterations * args.batch_size
            eta = (steps - global_step) // max(sps, 1)
            at = f"global_step={global_step}/{steps} ({100 * global_step // steps}%), SPS={sps}"
            print(f"{at}, ETA {eta // 3600}h{eta // 60 % 60:02d}m, avg_episodic_return={avg_text}", flush=True)
            last_print = time.time()
        # a non-finite loss stops the run; the last checkpoint (the end of an earlier iteration) is the resume point
        first_bad = dict(zip(["reward", "transition", "policy", "value", "entropy", "done"], bad.tolist(), strict=True))
        first_bad.update(zip(["imagined policy", "imagined value", "imagined entropy"], i_bad.tolist(), strict=True))
        earliest = min(first_bad.values())
        if earliest < math.inf:
            bad_terms = " and ".join(name for name, b in first_bad.items() if b == earliest)
            kept = f"resume from {checkpoint_path}" if os.path.exists(checkpoint_path) else "no checkpoint yet"
            sys.exit(f"{sys.argv[0]}: error: non-finite {bad_terms} loss at iteration {iteration}; {kept}")
        # what it takes to go on from here: every --checkpoint-every iterations, at the end and on a signal
        signum = max(stop_signals, default=0)
        last = iteration == args.num_iterations
        if signum or (args.checkpoint_every > 0 and (iteration % args.checkpoint_every == 0 or last)):
            optimizer_states = {name: optimizer.state_dict() for name, optimizer in optimizers.items()}
            checkpoint = dict(model=agent.state_dict(), optimizers=optimizer_states, args=vars(args), script=script)
            checkpoint.update(run_name=run_name, iteration=iteration, global_step=global_step, last_returns=last_returns)
            save_atomic(checkpoint, checkpoint_path)
        if signum:
            progress.close()
            writer.close()
            print(f"{signal.Signals(signum).name} after iteration {iteration}: resume from {checkpoint_path}", file=sys.stderr)
            sys.exit(128 + signum)

    progress.close()  # RUN MACHINERY
    envs.close()
    done = f"done: {global_step} steps in {time.time() - start_time:.0f}s, runs/{run_name}"
    model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
    if args.save_model:  # DeepSPI: the trained agent, for evaluate.py
        save_atomic({"model": agent.state_dict(), "args": vars(args), "script": script}, model_path)
        done += f", model {model_path}"
    writer.close()
    print(done)
