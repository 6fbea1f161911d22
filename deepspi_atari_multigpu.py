# deepspi_atari.py with torchrun (torchrun --standalone --nproc_per_node 2 deepspi_atari_multigpu.py): README.md; paper:
# https://arxiv.org/abs/2510.12312 (Delgrange, Avalos, Roepke, ICLR 2026); the diff to deepspi_atari.py is the distribution
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
import torch.distributed as dist
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
    """DeepSPI on Atari (arXiv 2510.12312): PPO whose encoder also feeds a Lipschitz latent world model.

    DeepSPI's own flags: --reward-loss-coef, --transition-loss-coef, --enforce-neighbourhood, --deep-mdp, --sn-faithful"""

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
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 128  # DeepSPI: the official defaults, 128 envs x 8 steps
    """the number of parallel game environments"""
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
    """the surrogate clipping coefficient"""
    clip_vloss: bool = False  # DeepSPI: off by default, as officially
    """Toggles CleanRL's clipped value loss (off: the official unclipped one)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold"""
    enforce_neighbourhood: bool = False  # DeepSPI: arguments
    """stop the update epochs once the batch's ratio leaves [2-C, C], C = 1 + clip_coef (checked per epoch)"""
    reward_loss_coef: float = 0.01
    """alpha_R: weight of the per-sample reward loss in the utility (0 together with the next one: plain PPO)"""
    transition_loss_coef: float = 5e-4
    """alpha_P: weight of the per-sample latent transition (Wasserstein) loss in the utility"""
    deep_mdp: bool = False
    """DeepMDP ablation: add the world-model losses to the loss instead of subtracting them from the advantage"""
    sn_faithful: bool = True
    """the official spectral norm (sigma = ||W^T u||^2, not 1-Lipschitz); False: exact sigma_1, 1-Lipschitz layers"""

    # to be filled in runtime
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""
    gamma_C: tyro.conf.Suppress[str] = ""  # DeepSPI: gamma * (1 + clip_coef), for the hyperparameters table


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
        ("learning_rate max_grad_norm target_kl", lambda x: x is None or 0 < x < math.inf, "positive and finite"),
        ("ent_coef vf_coef reward_loss_coef transition_loss_coef", lambda x: 0 <= x < math.inf, "non-negative and finite"),
        ("checkpoint_every", lambda x: x >= 0, "non-negative"),
        ("gamma", lambda x: 0.5 < x < 1, "in (0.5, 1), as the theory assumes"),
        ("gae_lambda", lambda x: 0 <= x <= 1, "in [0, 1]"),
        ("clip_coef", lambda x: 0 < x < 1, "in (0, 1)"),
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

    def world_model_losses(self, z, next_z, action, reward, reset, eps=None):
        """Per-sample reward loss and transition loss (one-sample Wasserstein estimate); a reset targets phi(s) (official)."""
        next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), z, next_z)
        reward_pred = self.reward_model(z, action)
        sample = self.transition_model(z, action, eps)[0]
        reward_loss = F.smooth_l1_loss(reward_pred, reward, reduction="none")
        transition_loss = F.smooth_l1_loss(sample, next_z, reduction="none").sum((1, 2, 3))
        return reward_loss, transition_loss


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


# DeepSPI multi-GPU: the ranks' checks
def out_of_sync_ranks(checksums):
    """The ranks whose parameter checksums (one row per rank) differ from rank 0's."""
    return [r for r in range(1, len(checksums)) if not torch.equal(checksums[r], checksums[0])]


class NullWriter:
    """The SummaryWriter of the ranks other than 0 under torchrun: it writes nothing."""

    def __getattr__(self, name):
        return self.ignore

    def ignore(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # RUN MACHINERY: a Ctrl-C during the start-up ends it at once
    args = tyro.cli(Args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # DeepSPI multi-GPU: set by torchrun
    rank = int(os.environ.get("RANK", 0))

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
        if len(saved["ranks"]) != world_size:
            fail(f"{args.resume} was written by {len(saved['ranks'])} processes; resume it with as many")
        saved_args = {k: v for k, v in saved["args"].items() if k in Args.__dataclass_fields__}
        for name in keep:
            if name not in ("total_timesteps", "checkpoint_every", "save_model") or name in given:  # these: saved unless given
                saved_args[name] = getattr(args, name)
        args = Args(**saved_args)
    check_args(args)  # DeepSPI: bad input fails here
    if args.num_envs % world_size or args.num_envs * args.num_steps // world_size % args.num_minibatches:
        fail(f"--num-envs {args.num_envs} does not split into {world_size} processes with whole minibatches")
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    args.gamma_C = f"{args.gamma * (1 + args.clip_coef):.3f} (the paper's bound assumes < 1)"  # DeepSPI
    if args.resume and saved["iteration"] >= args.num_iterations:  # RUN MACHINERY: a finished run, nothing to do
        done = f"finished ({saved['iteration']}/{args.num_iterations} iterations, {saved['global_step']} agent steps)"
        if rank == 0:
            print(f"runs/{saved['run_name']}: {done}; --total-timesteps larger than {saved['global_step']} extends it")
        sys.exit(0)
    if args.env_backend == "envpool" and importlib.util.find_spec("envpool") is None:  # DeepSPI: envpool is Linux only
        print("envpool is not installed here: falling back to --env-backend gymnasium", file=sys.stderr)
        args.env_backend = "gymnasium"
    # RUN MACHINERY: the envs (the slow start-up) before the run folder, so that an interrupted start-up leaves none
    env_seed = args.seed + saved["iteration"] * args.num_envs if args.resume else args.seed  # a resumed run: new games
    local_num_envs = args.num_envs // world_size  # DeepSPI multi-GPU: env i of rank r is seeded seed + r * local_num_envs + i
    env_seed += rank * local_num_envs
    envs = make_envs(args.env_id, args.env_backend, local_num_envs, env_seed, stochastic=args.stochastic_env)
    if rank > 0:  # DeepSPI multi-GPU: rank 0 logs and writes the checkpoint; the others make no run folder
        run_name = None
    elif args.resume:  # the run folder, a new one or the resumed run's
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
    signal_times = []  # DeepSPI multi-GPU: torchrun passes a terminal's Ctrl-C on to the workers, which had it already

    def stop(signum, frame):
        if stop_signals and time.time() > signal_times[0] + 1:  # a second signal: exit now, the last checkpoint kept
            kept = f": resume from {checkpoint_path}" if os.path.exists(checkpoint_path) else "; no checkpoint yet"
            if rank == 0:
                print(f"stopped now{kept}", file=sys.stderr)
            os._exit(128 + signum)
        if rank == 0 and not stop_signals:
            print(f"{signal.Signals(signum).name}: stopping after this iteration; Ctrl-C again to stop now", file=sys.stderr)
        stop_signals.append(signum)
        signal_times.append(time.time())

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
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
    # RUN MACHINERY: a resumed run hides what the crashed run logged after its checkpoint
    purge_step = saved["global_step"] + 1 if args.resume else None
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step) if rank == 0 else NullWriter()
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed + rank)  # DeepSPI multi-GPU: each rank its own streams, the same initial weights
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    use_cuda = torch.cuda.is_available() and args.cuda
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}" if use_cuda else "cpu")
    # DeepSPI: autocast() is --bf16's context, a no-op without it
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.bf16)
    # DeepSPI: on CPU, the backward of TransitionModel's w[a] (index_put, accumulate) is repeatable with >1 thread only so
    torch.use_deterministic_algorithms(args.torch_deterministic and device.type == "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that NaN-fills every torch.empty
    if world_size > 1:  # DeepSPI multi-GPU: each rank steps num_envs / world_size envs; the gradients are averaged
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_batch_size = args.batch_size // world_size
    local_minibatch_size = args.minibatch_size // world_size

    # env setup
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"

    agent = Agent(envs.single_action_space.n, args.sn_faithful).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    world_model = args.reward_loss_coef > 0 or args.transition_loss_coef > 0  # DeepSPI: both 0 is PPO, no world model
    if world_size > 1:
        torch.manual_seed(args.seed + rank)  # DeepSPI multi-GPU: each rank samples its own actions

    # ALGO Logic: Storage setup
    # DeepSPI: obs[t + 1] is the next observation of step t, so s' costs no extra storage; dones[t] came with obs[t]
    obs = torch.zeros((args.num_steps + 1, local_num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, local_num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, local_num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, local_num_envs)).to(device)
    dones = torch.zeros((args.num_steps + 1, local_num_envs)).to(device)
    values = torch.zeros((args.num_steps, local_num_envs)).to(device)
    scores = np.zeros(local_num_envs)  # DeepSPI: envpool's raw score of each env's game so far
    episode_lengths = np.zeros(local_num_envs, dtype=np.int64)  # in agent steps
    last_returns = np.full(local_num_envs, np.nan)  # each env's last finished full-game raw score

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    next_obs = torch.as_tensor(envs.reset()[0], device=device)
    next_done = torch.zeros(local_num_envs).to(device)

    # RUN MACHINERY: resume, progress, signals
    if args.resume:  # the weights and optimizer at the end of the checkpoint's iteration
        agent.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        global_step = saved["global_step"]
        last_returns = saved["ranks"][rank]["last_returns"]
        np.random.seed(env_seed)  # new random streams too, like the new games
        torch.manual_seed(env_seed)
    start_step, last_print = global_step, start_time
    done_iterations = global_step // args.batch_size
    progress = tqdm(total=args.num_iterations, initial=done_iterations, disable=None if args.progress and rank == 0 else True)

    for iteration in range(done_iterations + 1, args.num_iterations + 1):
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
        if args.env_backend == "envpool":
            b_resets = dones[:-1].reshape(-1)
        else:
            b_resets = dones[1:].reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(local_batch_size)
        clipfracs = []
        bad = torch.full((5,), math.inf, device=device)  # RUN MACHINERY: per loss term, its first non-finite minibatch
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, local_batch_size, local_minibatch_size):
                end = start + local_minibatch_size
                mb_inds = b_inds[start:end]

                # DeepSPI: s and s' in one pass of the live encoder (the target phi(s') is not detached, as officially)
                if world_model:
                    mb_obs = torch.cat([b_obs[mb_inds], b_next_obs[mb_inds]])
                else:
                    mb_obs = b_obs[mb_inds]
                with autocast():
                    z, next_z = agent.encode(mb_obs).tensor_split([len(mb_inds)])
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(None, b_actions.long()[mb_inds], z)
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]  # DeepSPI: no host read

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:  # DeepSPI: the population std, as the official (JAX) code
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std(unbiased=False) + 1e-8)

                # DeepSPI: the utility U = A - (alpha_R l_R + alpha_P l_P), per sample and not detached, is the advantage
                reward_loss = torch.zeros_like(mb_advantages)
                transition_loss = torch.zeros_like(mb_advantages)
                if world_model:
                    with autocast():
                        reward_loss, transition_loss = agent.world_model_losses(
                            z, next_z, b_actions[mb_inds], b_rewards[mb_inds], b_resets[mb_inds]
                        )
                wm_loss = args.reward_loss_coef * reward_loss + args.transition_loss_coef * transition_loss
                if not args.deep_mdp:
                    mb_advantages = mb_advantages - wm_loss

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds],
                        -args.clip_coef,
                        args.clip_coef,
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
                bad = torch.where(bad.isinf() & ~terms.isfinite(), epoch * args.batch_size + start, bad)

                optimizer.zero_grad()
                loss.backward()
                if world_size > 1:  # DeepSPI multi-GPU: ONE all_reduce averages the gradients and approx_kl
                    grads = [p.grad for p in agent.parameters() if p.grad is not None]
                    flat = torch.cat([g.view(-1) for g in grads] + [approx_kl.view(1)])
                    dist.all_reduce(flat)
                    flat /= world_size
                    for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads]), strict=True):
                        g.copy_(part.view_as(g))
                    approx_kl = flat[-1]  # so that every rank takes the same --target-kl decision
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break
            # DeepSPI: stop once a ratio of this epoch left [2-C, C]
            out_of_band = torch.stack(clipfracs[-args.num_minibatches :]).max()
            if args.enforce_neighbourhood and world_size > 1:  # DeepSPI multi-GPU: every rank takes the same decision
                dist.all_reduce(out_of_band, op=dist.ReduceOp.MAX)
            if args.enforce_neighbourhood and out_of_band > 0:
                break

        with torch.inference_mode(), autocast():
            chunks = zip(b_obs.split(local_minibatch_size), b_actions.split(local_minibatch_size), strict=True)
            newlogprobs = torch.cat([agent.get_action_and_value(o, a)[1] for o, a in chunks])
            sir = (newlogprobs - b_logprobs).exp().max().item()  # DeepSPI: SIR(pi', pi), the supremum importance ratio

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", torch.stack(clipfracs).mean().item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        if world_model:  # DeepSPI: the world-model losses, the SIR and the average of each env's last full-game score
            writer.add_scalar("losses/reward_loss", reward_loss.mean().item(), global_step)
            writer.add_scalar("losses/transition_loss", transition_loss.mean().item(), global_step)
        writer.add_scalar("charts/sir", sir, global_step)
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
        if progress.disable and rank == 0 and time.time() - last_print > 60:  # no bar: one quiet line a minute
            steps = args.num_iterations * args.batch_size
            eta = (steps - global_step) // max(sps, 1)
            at = f"global_step={global_step}/{steps} ({100 * global_step // steps}%), SPS={sps}"
            print(f"{at}, ETA {eta // 3600}h{eta // 60 % 60:02d}m, avg_episodic_return={avg_text}", flush=True)
            last_print = time.time()
        # DeepSPI multi-GPU: the ranks must take the same decisions, or the next collective call hangs: they share their
        # non-finite flags and signals, and check that their parameters are identical (each row of the table: one rank's)
        signum = max(stop_signals, default=0)
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)  # the first non-finite minibatch of any rank
            params = list(agent.parameters())
            table = torch.zeros(world_size, len(params) + 1, dtype=torch.float64, device=device)
            table[rank, :-1] = torch.stack([p.detach().double().sum() for p in params])
            table[rank, -1] = signum
            dist.all_reduce(table)
            signum = int(table[:, -1].max())
            drifted = out_of_sync_ranks(table[:, :-1])
            if bad.isinf().all() and drifted:
                raise RuntimeError(f"the parameters of ranks {drifted} differ from rank 0's after iteration {iteration}")
        # a non-finite loss stops the run; the last checkpoint (the end of an earlier iteration) is the resume point
        first_bad = dict(zip(["reward", "transition", "policy", "value", "entropy"], bad.tolist(), strict=True))
        earliest = min(first_bad.values())
        if earliest < math.inf:
            bad_terms = " and ".join(name for name, b in first_bad.items() if b == earliest)
            kept = f"resume from {checkpoint_path}" if os.path.exists(checkpoint_path) else "no checkpoint yet"
            sys.exit(f"{sys.argv[0]}: error: non-finite {bad_terms} loss at iteration {iteration}; {kept}" if rank == 0 else 1)
        # what it takes to go on from here: every --checkpoint-every iterations, at the end and on a signal
        last = iteration == args.num_iterations
        if signum or (args.checkpoint_every > 0 and (iteration % args.checkpoint_every == 0 or last)):
            checkpoint = dict(model=agent.state_dict(), optimizer=optimizer.state_dict(), args=vars(args), script=script)
            ranks = [dict(last_returns=last_returns)]
            if world_size > 1:  # DeepSPI multi-GPU: every rank's own state goes to rank 0
                ranks = [None] * world_size
                dist.all_gather_object(ranks, dict(last_returns=last_returns))
            checkpoint.update(run_name=run_name, iteration=iteration, global_step=global_step, ranks=ranks)
            if rank == 0:
                save_atomic(checkpoint, checkpoint_path)
        if signum:
            progress.close()
            writer.close()
            if rank == 0:
                print(
                    f"{signal.Signals(signum).name} after iteration {iteration}: resume from {checkpoint_path}",
                    file=sys.stderr,
                )
            sys.exit(128 + signum)

    progress.close()  # RUN MACHINERY
    envs.close()
    done = f"done: {global_step} steps in {time.time() - start_time:.0f}s, runs/{run_name}"
    model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
    if args.save_model and rank == 0:  # DeepSPI: the trained agent, for evaluate.py
        save_atomic({"model": agent.state_dict(), "args": vars(args), "script": script}, model_path)
        done += f", model {model_path}"
    writer.close()
    if world_size > 1:
        dist.destroy_process_group()
    if rank == 0:
        print(done)
