# DeepSPI (https://arxiv.org/abs/2510.12312, ICLR 2026) on the confounding maze of its Fig. 3 (docs/deepspi_maze.md): the
# learner of deepspi_atari.py on a maze whose two "star" cells look almost alike but need opposite actions. The exact
# V^pi(s_I) of the network's tabular policy and the distance between the stars' latents are logged every iteration.
import functools
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

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

# DeepSPI: no validation of each Categorical's logits, which reads them on the host (a GPU synchronisation) per minibatch
torch.distributions.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    """DeepSPI (arXiv 2510.12312) on the confounding maze of its Fig. 3: PPO whose encoder also feeds a Lipschitz world model.

    The maze's flags: --n, --epsilon, --max-steps; DeepSPI's own: --reward-loss-coef, --transition-loss-coef, --deep-mdp,
    --enforce-neighbourhood, --sn-faithful, --dedup-obs, --mask-next-done (the rest are CleanRL's ppo_atari.py flags)."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, cudnn.deterministic and, on CPU, use_deterministic_algorithms: CPU runs and resumes are repeatable"""
    cuda: bool = True
    """use CUDA when it is available (--no-cuda: the CPU)"""
    bf16: bool = False
    """bfloat16 convolutions and matmuls (autocast), float32 spectral norms and losses; slow on AVX2-only CPUs (emulated)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "deepspi"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    progress: bool = True
    """show a progress bar (only when the output is a terminal)"""
    save_model: bool = False
    """save the trained agent to `runs/{run_name}/{exp_name}.cleanrl_model`"""
    checkpoint_every: int = 10
    """write `runs/{run_name}/checkpoint.pt` every this many iterations, at the end and on SIGINT/SIGTERM (0: signals only)"""
    resume: Optional[str] = None
    """go on with the run of this checkpoint.pt, with its arguments and new episodes, in its `runs/{run_name}`; with a larger
    --total-timesteps, extend it (the annealed learning rate of the iterations left as if it had been started so)"""

    # Algorithm specific arguments
    n: int = 5
    """corridor length n >= 2 (official n_path); the grid is 5 x (n+3) and the maze has 2n+6 states"""
    epsilon: float = 0.2
    """probability of branching into the bottom (hazardous) corridor, in (0, 1) (official toy_confounding_env_epsilon)"""
    max_steps: int = 200
    """episode time limit; reaching it counts as done (no bootstrap), as in the official maze"""
    total_timesteps: int = 40960
    """agent steps over all envs (official: 10M; 40960 = 40 iterations of 128 envs x 8 steps, minutes on a CPU)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 128
    """the number of parallel game environments"""
    num_steps: int = 8
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """Toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.99
    """the discount factor gamma, in (0.5, 1); it also scales the two star-UP rewards"""
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
    dedup_obs: bool = True
    """compute each distinct image's latent once, and the world model's heads once per distinct image of a minibatch, for
    every action (a maze observation is a function of the state: at most 2n+6 distinct images); the same values up to float
    rounding, only faster; --no-dedup-obs computes every row as deepspi_atari.py does"""
    mask_next_done: bool = False
    """latent target phi(s) for transitions that END an episode (principled); default: for those that START one (official)"""

    # to be filled in runtime
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (computed in runtime)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of iterations (computed in runtime)"""


def fail(message):  # DeepSPI: bad input gets one clear line and exit code 2, no traceback
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    """Every flag against its domain before anything is built (NaN fails every test): the first bad one fails."""
    domains = [  # (flags, test, what they must be)
        ("n", lambda x: x >= 2, "at least 2 (n = 1 is degenerate: F overwrites @)"),
        ("epsilon", lambda x: 0 < x < 1, "in (0, 1)"),
        ("num_envs num_steps num_minibatches update_epochs total_timesteps max_steps", lambda x: x > 0, "positive"),
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


UP, DOWN, LEFT, RIGHT = range(4)
# background intensities of the official renderer; the star "!" looks like a corridor cell ">", G and F look the same
INTENSITY = {"#": 50, ">": 100, "!": 100, "@": 180, "I": 120, "G": 220, "F": 220, "W": 200}


class ConfoundingMaze:
    """The confounding maze of the official envs/confounding_gridworld.py as exact tables (float64). Grid 5 x (n+3):
         row 0: walls, G at column n           row 1 (and row 3): > at columns 1..n-1, star ! at n, W at n+1
         row 2: I, @, walls, F at column n     row 4: walls
    Going RIGHT from I reaches the hazard @, which sends the agent to the top corridor (prob. 1-epsilon) or the bottom one.
    Each corridor step RIGHT pays +1; at a star, RIGHT -> W pays +1, UP pays n/gamma^n at the top (-> G) and
    -(2-epsilon) n/(epsilon gamma^n) at the bottom (-> F). G, W, F are terminal; any other move is a 0-reward self-loop."""

    def __init__(self, n=5, epsilon=0.2, gamma=0.99, max_steps=200):
        if n < 2 or not 0 < epsilon < 1:
            raise ValueError(f"need n >= 2 and 0 < epsilon < 1, got n={n}, epsilon={epsilon}")
        self.n, self.epsilon, self.gamma, self.max_steps = n, epsilon, gamma, max_steps
        grid = np.full((5, n + 3), "#")
        grid[0, n], grid[2, 0], grid[2, 1], grid[2, n] = "G", "I", "@", "F"
        for r in (1, 3):
            grid[r, 1:n], grid[r, n], grid[r, n + 1] = ">", "!", "W"
        self.grid = grid
        self.state_coords = np.argwhere(grid != "#")  # row-major numbering of the non-wall cells
        index = {(int(r), int(c)): s for s, (r, c) in enumerate(self.state_coords)}
        S = self.num_states = len(self.state_coords)
        self.initial_state = index[(2, 0)]
        self.top_star, self.bottom_star = index[(1, n)], index[(3, n)]
        self.critical_states = (self.top_star, self.bottom_star)
        self.is_terminal = np.isin(grid[tuple(self.state_coords.T)], ["G", "W", "F"])
        self.terminal_states = tuple(int(s) for s in np.flatnonzero(self.is_terminal))
        self.P, self.R = np.zeros((S, 4, S)), np.zeros((S, 4))
        self.P[np.arange(S), :, np.arange(S)] = 1.0  # default: every move is a self-loop with reward 0
        for s, (r, c) in enumerate(self.state_coords):
            symbol = grid[r, c]
            if symbol == "I":
                self._move(s, RIGHT, index[(2, 1)], 0.0)
            elif symbol == "@":  # any action: branch into one of the two corridors
                self.P[s] = 0.0
                self.P[s, :, index[(1, 1)]], self.P[s, :, index[(3, 1)]] = 1 - epsilon, epsilon
            elif symbol in (">", "!"):
                self._move(s, RIGHT, index[(r, c + 1)], 1.0)
            if symbol == "!" and r == 1:
                self._move(s, UP, index[(0, n)], n / gamma**n)
            elif symbol == "!":
                self._move(s, UP, index[(2, n)], -(2 - epsilon) * n / (epsilon * gamma**n))
        self.intensity = np.vectorize(INTENSITY.get)(grid).astype(np.uint8)
        # nearest resize as jax.image.resize: output pixel i reads source floor((i + 0.5) * in / out), in float32
        source = [np.floor((np.arange(84, dtype=np.float32) + 0.5) * np.float32(m) / np.float32(84)) for m in grid.shape]
        self.rows, self.cols = (i.astype(np.int64).clip(max=m - 1) for i, m in zip(source, grid.shape, strict=True))
        self.observations = np.stack([self.render(s) for s in range(S)])  # (S, 1, 84, 84), the agent drawn

    def _move(self, s, a, s_next, reward):
        self.P[s, a], self.R[s, a] = np.eye(self.num_states)[s_next], reward

    def render(self, state, done=False):
        """The (1, 84, 84) uint8 observation: the grid's grey levels, the agent's cell at 255 (not drawn when done)."""
        image = self.intensity.copy()
        if not done:
            image[tuple(self.state_coords[state])] = 255
        return image[np.ix_(self.rows, self.cols)][None]


def optimal_value(n, epsilon, gamma):
    """Closed-form V*(s_I): corridor rewards at t = 2..n, then UP at the top star (n gamma) or RIGHT at the bottom one."""
    corridor = sum(gamma**t for t in range(2, n + 1))
    return corridor + (1 - epsilon) * n * gamma + epsilon * gamma ** (n + 1)


def star_blind_value(n, epsilon, gamma):
    """Best V(s_I) of a policy that acts the same at both stars: V(p) is linear in p = P(UP | star), maximised by p = 0."""
    return sum(gamma**t for t in range(2, n + 1)) + gamma ** (n + 1)


def policy_value(maze, pi, gamma=None):
    """Exact V^pi of every state: solve (I - gamma P^pi) V = r^pi, with pi an (S, A) array of action probabilities."""
    gamma = maze.gamma if gamma is None else gamma
    pi = np.asarray(pi, dtype=np.float64)
    P_pi, r_pi = np.einsum("sa,sat->st", pi, maze.P), (pi * maze.R).sum(1)
    return np.linalg.solve(np.eye(maze.num_states) - gamma * P_pi, r_pi)


class MazeVecEnv:
    """num_envs copies of the maze stepped together, with a seeded numpy generator for the @ branching. Same-step
    auto-reset as the official adapter: a finished env returns the start observation in the same step. Gymnasium-style
    interface; terminated = G, W or F reached, truncated = the time limit (the trainer treats both as done)."""

    def __init__(self, maze, num_envs, seed):
        self.maze, self.num_envs = maze, num_envs
        self.single_observation_space = gym.spaces.Box(0, 255, (1, 84, 84), np.uint8)
        self.single_action_space = gym.spaces.Discrete(4)
        self.cum_P = maze.P.cumsum(-1)
        self.rng = np.random.default_rng(seed)
        self.state = np.full(num_envs, maze.initial_state)
        self.steps = np.zeros(num_envs, dtype=np.int64)

    def reset(self):
        self.state[:], self.steps[:] = self.maze.initial_state, 0
        return self.maze.observations[self.state], {}

    def step(self, actions):
        rewards = self.maze.R[self.state, actions]
        u = self.rng.random(self.num_envs)[:, None]
        self.state = (u < self.cum_P[self.state, actions]).argmax(1)
        self.steps += 1
        terminations = self.maze.is_terminal[self.state]
        truncations = ~terminations & (self.steps >= self.maze.max_steps)
        done = terminations | truncations
        self.state[done], self.steps[done] = self.maze.initial_state, 0
        info = {"reward": rewards, "terminated": terminations}
        return self.maze.observations[self.state], rewards, terminations, truncations, info

    def close(self):
        pass


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

    def forward(self, z, action, index=None):
        """index: sample i has the latent z[index[i]] (z: the distinct latents of a minibatch, --dedup-obs)"""
        x = group_sort(self.fc1(z.flatten(1)))
        x = group_sort(self.fc2(x))
        rewards = self.fc3(x).float()
        if index is not None:
            rewards = rewards[index]
        return rewards.gather(1, action.long().view(-1, 1)).squeeze(1)


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

    def sample_distinct(self, z, action, index, eps=None):
        """forward's sample for (z[index[i]], action[i]), z holding the distinct latents of a minibatch (--dedup-obs): the
        mixture of each latent is computed once, for every action (the full conv2), and only the noise is per sample. The
        sum is written as the mixture's weighted mean plus its weighted scales times the noise: forward's, up to rounding."""
        u, height, width = z.shape[0], z.shape[2], z.shape[3]
        G, A, K, C = self.groups, self.n_actions, self.n_components, self.channels
        h = group_sort(self.conv1(z))
        # the full conv2 as one matrix product per group: (outputs of the group) x (its 2x2 patches of every latent)
        hp = F.pad(h, (0, 1, 0, 1))
        patches = torch.stack([hp[:, :, i : i + height, j : j + width] for i in (0, 1) for j in (0, 1)], 2)  # F.unfold's order
        patches = patches.reshape(u, G, -1, height * width).permute(1, 2, 0, 3).reshape(G, -1, u * height * width)
        w = self.conv2.normalized_weight().view(G, -1, patches.shape[1])
        o = (w @ patches).view(G, C // G, K, 2, A, u, height, width) + self.conv2.bias.view(G, C // G, K, 2, A, 1, 1, 1)
        o = o.permute(5, 4, 3, 2, 0, 1, 6, 7).reshape(u * A, 2, K, C, height, width)  # (latent, action), loc/scale, K, C
        loc = 0.5 * o[:, 0]
        scale = 0.5 * (F.softplus(o[:, 1]) + 1e-6)
        logits = self.mixture(h.flatten(1)).float().view(u, K, A).transpose(1, 2)  # (U, A, K)
        weights = logits.reshape(u * A, K).softmax(1).view(u * A, K, 1, 1, 1)
        pair = index * A + action.long()  # sample i's row among the U x A (latent, action) pairs
        if eps is None:
            eps = torch.randn((len(index), K, C, height, width), dtype=loc.dtype, device=z.device).clamp(-1.0, 1.0)
        return (weights * loc).sum(1)[pair] + ((weights * scale)[pair] * eps).sum(1)


class Agent(nn.Module):
    def __init__(self, n_actions, sn_faithful=True, dedup_obs=True):
        super().__init__()
        self.dedup_obs = dedup_obs
        # DeepSPI: the latent state is the 64x7x7 conv map (post-ReLU); the FC-512 torso feeds only actor and critic
        self.encoder = nn.Sequential(
            layer_init(nn.Conv2d(1, 32, 8, stride=4)),
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
        if self.dedup_obs:  # the same values and gradients as encoding every row, computed on the distinct images only
            unique, inverse = torch.unique(x.flatten(1), dim=0, return_inverse=True)
            return self.encoder(unique.view((-1,) + x.shape[1:]) / 255.0)[inverse]
        return self.encoder(x / 255.0)

    def encode_rows(self, images, rows):
        """phi(images[rows]) as (latents, image_index), the latent of row i being latents[image_index[i]]. With dedup_obs,
        images holds distinct images and latents those that rows use, once each; without, latents has a row per row."""
        if not self.dedup_obs:
            return self.encoder(images[rows] / 255.0), torch.arange(len(rows), device=rows.device)
        used, image_index = torch.unique(rows, return_inverse=True)
        return self.encoder(images[used] / 255.0), image_index

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

    def world_model_losses(self, z, next_z, action, reward, reset, eps=None, distinct=None):
        """Per-sample reward loss and transition loss (one-sample Wasserstein estimate); a reset targets phi(s) (official).
        distinct: (latents, index), z being latents[index] (--dedup-obs): the heads then run once per distinct latent."""
        next_z = torch.where(reset.view(-1, 1, 1, 1).bool(), z, next_z)
        if distinct is None:
            reward_pred = self.reward_model(z, action)
            sample = self.transition_model(z, action, eps)[0]
        else:
            z_distinct, index = distinct
            reward_pred = self.reward_model(z_distinct, action, index)
            sample = self.transition_model.sample_distinct(z_distinct, action, index, eps)
        reward_loss = F.smooth_l1_loss(reward_pred, reward, reduction="none")
        return reward_loss, F.smooth_l1_loss(sample, next_z, reduction="none").sum((1, 2, 3))


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
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # RUN MACHINERY: Ctrl-C during the start-up ends it at once, no traceback
    args = tyro.cli(Args)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # DeepSPI: one process
        fail("this script runs one process (torchrun: deepspi_atari_multigpu.py, on Atari)")

    # RUN MACHINERY: --resume takes the saved run's arguments, and only these flags besides (--total-timesteps: to extend it)
    saved = None
    script = os.path.basename(__file__)
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
        written_by = saved.get("script") if isinstance(saved, dict) else None
        if written_by != script or "iteration" not in saved:  # a checkpoint records the script that wrote it
            other = f" (it was written by {written_by})" if written_by not in (None, script) else ""
            fail(f"--resume: {args.resume} is not a checkpoint.pt of {script}{other}")
        saved_args = {k: v for k, v in saved["args"].items() if k in Args.__dataclass_fields__}
        for name in keep:
            if name not in ("total_timesteps", "checkpoint_every", "save_model") or name in given:  # these: saved unless given
                saved_args[name] = getattr(args, name)
        args = Args(**saved_args)
    check_args(args)  # DeepSPI: bad input fails here
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.resume and saved["iteration"] >= args.num_iterations:  # RUN MACHINERY: nothing to run, nothing written
        ran = f"{saved['iteration']}/{args.num_iterations} iterations, {saved['global_step']} agent steps"
        print(f"runs/{saved['run_name']}: finished ({ran}); --total-timesteps larger than {saved['global_step']} extends it")
        sys.exit(0)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # DeepSPI: autocast() is --bf16's context, a no-op without it
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=args.bf16)
    # DeepSPI: on CPU, only so is the backward of the index gathers (w[a], the deduplicated encoding) repeatable with >1 thread
    torch.use_deterministic_algorithms(args.torch_deterministic and device.type == "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that NaN-fills every torch.empty

    # env setup
    env_seed = args.seed + saved["iteration"] * args.num_envs if args.resume else args.seed  # RUN MACHINERY: new episodes
    maze = ConfoundingMaze(args.n, args.epsilon, args.gamma, args.max_steps)
    envs = MazeVecEnv(maze, args.num_envs, env_seed)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"
    # every state's observation, for the exact evaluation of the network's tabular policy
    maze_obs = torch.as_tensor(maze.observations, device=device)
    v_star = optimal_value(args.n, args.epsilon, args.gamma)
    v_blind = star_blind_value(args.n, args.epsilon, args.gamma)

    agent = Agent(envs.single_action_space.n, args.sn_faithful, args.dedup_obs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    world_model = args.reward_loss_coef > 0 or args.transition_loss_coef > 0  # DeepSPI: both 0 is PPO, no world model

    # RUN MACHINERY: the run folder (a new one or the resumed run's, once the start-up is done), its signals, its start line
    if args.resume:
        run_name = make_run_dir(saved["run_name"], reuse=True)
        start_line = f"resuming runs/{run_name} after iteration {saved['iteration']}/{args.num_iterations}, with new episodes"
    else:
        maze_name = f"ConfoundingMaze-n{args.n}-eps{args.epsilon}"
        run_name = make_run_dir(f"{maze_name}__{args.exp_name}__{args.seed}__{int(time.time())}")
        steps = f"{args.num_iterations} iterations of {args.num_envs} envs x {args.num_steps} steps"
        start_line = f"runs/{run_name}: {steps} = {args.num_iterations * args.batch_size} agent steps"
        if args.total_timesteps % args.batch_size:
            start_line += f" (--total-timesteps {args.total_timesteps} is not a multiple of the batch {args.batch_size})"
    checkpoint_path = f"runs/{run_name}/checkpoint.pt"
    stop_signals = []

    def stop(signum, frame):
        """A first SIGINT/SIGTERM stops the run after its iteration, with a checkpoint; a second one stops it now."""
        if stop_signals:
            kept = f": resume from {checkpoint_path}" if os.path.exists(checkpoint_path) else "; no checkpoint yet"
            print(f"stopped now{kept}", file=sys.stderr)  # stderr is line-buffered: each line is out at once
            os._exit(128 + signum)
        stop_signals.append(signum)
        print(f"{signal.Signals(signum).name}: stopping after this iteration; Ctrl-C again to stop now", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    print(start_line)
    print(f"V* = {v_star:.3f}, best star-blind value = {v_blind:.3f}")  # DeepSPI: the maze's two reference values
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
    gamma_c_row = f"|gamma_C|{args.gamma * (1 + args.clip_coef):.3f} (the paper's bound assumes < 1)|"  # DeepSPI: C = 1+clip
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()] + [gamma_c_row])),
    )

    # ALGO Logic: Storage setup
    # DeepSPI: obs[t + 1] is the next observation of step t, so s' costs no extra storage; dones[t] came with obs[t]
    obs = torch.zeros((args.num_steps + 1, args.num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps + 1, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    episode_returns = np.zeros(args.num_envs)
    episode_lengths = np.zeros(args.num_envs, dtype=np.int64)
    last_returns = np.full(args.num_envs, np.nan)  # each env's last finished episode return

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    next_obs = torch.as_tensor(envs.reset()[0], device=device)
    next_done = torch.zeros(args.num_envs).to(device)

    # RUN MACHINERY: resume, progress, signals
    if args.resume:  # the weights and optimizer at the end of the checkpoint's iteration
        agent.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
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
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.inference_mode(), autocast():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.tensor(reward).to(device).view(-1)
            next_obs, next_done = torch.as_tensor(next_obs, device=device), torch.as_tensor(next_done, device=device).float()

            # record rewards for plotting purposes: the return of each finished episode (terminal cell or time limit)
            episode_returns += infos["reward"]
            episode_lengths += 1
            for idx in np.nonzero(infos["terminated"] | truncations)[0]:
                writer.add_scalar("charts/episodic_return", episode_returns[idx], global_step)
                writer.add_scalar("charts/episodic_length", episode_lengths[idx], global_step)
                last_returns[idx] = episode_returns[idx]
                episode_returns[idx] = 0
                episode_lengths[idx] = 0
        obs[args.num_steps] = next_obs
        dones[args.num_steps] = next_done

        # bootstrap value if not done
        with torch.inference_mode(), autocast():
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
        # DeepSPI: the images of s and s' as rows of `images`; with --dedup-obs each distinct image once (a maze image is a
        # function of the state), found here once per batch instead of once per minibatch
        images = obs.reshape((-1,) + envs.single_observation_space.shape)
        rows = torch.arange(len(images), device=device)
        if args.dedup_obs:
            unique_images, rows = torch.unique(images.flatten(1), dim=0, return_inverse=True)
            images = unique_images.view((-1,) + envs.single_observation_space.shape)
        b_rows = rows[: -args.num_envs]
        b_next_rows = rows[args.num_envs :]
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        b_rewards = rewards.reshape(-1)
        # the transitions whose latent target is phi(s): the official code masks with the done flag of obs[t] (the first step
        # of an episode); --mask-next-done: the last step of an episode, whose obs[t+1] is already the reset, dones[t+1]
        b_resets = (dones[1:] if args.mask_next_done else dones[:-1]).reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        bad = torch.full((5,), math.inf, device=device)  # per loss term, the first minibatch where it was non-finite
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                # DeepSPI: s and s' in one pass of the live encoder (the target phi(s') is not detached, as officially)
                mb_rows = torch.cat([b_rows[mb_inds], b_next_rows[mb_inds]]) if world_model else b_rows[mb_inds]
                with autocast():
                    z_distinct, image_index = agent.encode_rows(images, mb_rows)
                    z, next_z = z_distinct[image_index].tensor_split([len(mb_inds)])
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(None, b_actions.long()[mb_inds], z)
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:  # the population std, as the official (JAX) code
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std(unbiased=False) + 1e-8)

                # DeepSPI: the utility U = A - (alpha_R l_R + alpha_P l_P), per sample and not detached, is the advantage
                reward_loss = transition_loss = torch.zeros_like(mb_advantages)
                if world_model:
                    with autocast():
                        mb = (b_actions[mb_inds], b_rewards[mb_inds], b_resets[mb_inds])
                        distinct = None
                        if args.dedup_obs:  # DeepSPI: the world model's heads once per distinct image of the minibatch
                            distinct = (z_distinct, image_index[: len(mb_inds)])
                        reward_loss, transition_loss = agent.world_model_losses(z, next_z, *mb, distinct=distinct)
                wm_loss = args.reward_loss_coef * reward_loss + args.transition_loss_coef * transition_loss
                mb_advantages = mb_advantages if args.deep_mdp else mb_advantages - wm_loss

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss (unclipped, as in the official code)
                newvalue = newvalue.view(-1)
                v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
                if args.deep_mdp:  # the DeepMDP ablation: the world-model losses outside the clip
                    loss = loss + wm_loss.mean()
                terms = torch.stack([reward_loss.mean(), transition_loss.mean(), pg_loss, v_loss, entropy_loss])
                bad = torch.where(bad.isinf() & ~terms.isfinite(), epoch * args.batch_size + start, bad)  # no host read

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

            if args.target_kl is not None and approx_kl > args.target_kl:
                break
            if args.enforce_neighbourhood and torch.stack(clipfracs[-args.num_minibatches :]).max() > 0:  # left [2-C, C]
                break

        with torch.inference_mode(), autocast():
            chunks = zip(b_obs.split(args.minibatch_size), b_actions.split(args.minibatch_size), strict=True)
            newlogprobs = torch.cat([agent.get_action_and_value(o, a)[1] for o, a in chunks])
            sir = (newlogprobs - b_logprobs).exp().max().item()  # SIR(pi', pi): the supremum importance ratio

        # the network's tabular policy on every maze state, evaluated exactly (official: charts/init_value, repr_dist)
        with torch.inference_mode(), autocast():
            z_maze = agent.encode(maze_obs).float()
            pi = agent.actor(agent.network(z_maze)).float().softmax(-1).double().cpu().numpy()
            z_top, z_bottom = z_maze[maze.top_star], z_maze[maze.bottom_star]
            repr_dist = ((z_top - z_bottom) ** 2).mean().item()
            repr_dist_normalized = repr_dist / max(0.5 * ((z_top**2).mean() + (z_bottom**2).mean()).item(), 1e-12)
        init_value = policy_value(maze, pi)[maze.initial_state]

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
        if world_model:
            writer.add_scalar("losses/reward_loss", reward_loss.mean().item(), global_step)
            writer.add_scalar("losses/transition_loss", transition_loss.mean().item(), global_step)
        writer.add_scalar("charts/sir", sir, global_step)
        sps = int((global_step - start_step) / (time.time() - start_time))
        writer.add_scalar("charts/SPS", sps, global_step)
        maze_scalars = dict(init_value=init_value, optimal_value=v_star, star_blind_value=v_blind, repr_dist=repr_dist)
        maze_scalars.update(repr_dist_normalized=repr_dist_normalized, p_up_top_star=pi[maze.top_star, UP])
        maze_scalars.update(p_up_bottom_star=pi[maze.bottom_star, UP], p_right_top_star=pi[maze.top_star, RIGHT])
        maze_scalars.update(p_right_bottom_star=pi[maze.bottom_star, RIGHT])
        for name, value in maze_scalars.items():
            writer.add_scalar(f"charts/{name}", value, global_step)
        finished = last_returns[~np.isnan(last_returns)]
        avg_text = f"{finished.mean():.1f}" if len(finished) else "n/a"
        if len(finished):
            writer.add_scalar("charts/avg_episodic_return", finished.mean(), global_step)
        writer.flush()

        # RUN MACHINERY: progress, non-finite stop, checkpoint, signals
        progress.set_postfix(SPS=sps, avg_return=avg_text, V_init=f"{init_value:.3f}", refresh=False)
        progress.update()
        if progress.disable and time.time() - last_print > 60:  # no bar: one quiet line a minute, with the total and an ETA
            total = args.num_iterations * args.batch_size
            hours, minutes = divmod(int((total - global_step) / max(sps, 1)) // 60, 60)  # the time left at this rate
            where = f"global_step={global_step}/{total} ({100 * global_step // total}%), SPS={sps}, ETA {hours}h{minutes:02d}m"
            print(f"{where}, avg_episodic_return={avg_text}, V_init={init_value:.3f}", flush=True)
            last_print = time.time()
        # a non-finite loss stops the run; the last checkpoint (the end of an earlier iteration) is the resume point
        first_bad = dict(zip(["reward", "transition", "policy", "value", "entropy"], bad.tolist(), strict=True))
        earliest = min(first_bad.values())
        if earliest < math.inf:
            bad_terms = " and ".join(name for name, b in first_bad.items() if b == earliest)
            kept = f"resume from {checkpoint_path}" if os.path.exists(checkpoint_path) else "no checkpoint yet"
            sys.exit(f"{sys.argv[0]}: error: non-finite {bad_terms} loss at iteration {iteration}; {kept}")
        # what it takes to go on from here: every --checkpoint-every iterations, at the end and on a signal
        signum = max(stop_signals, default=0)
        last = iteration == args.num_iterations
        if signum or (args.checkpoint_every > 0 and (iteration % args.checkpoint_every == 0 or last)):
            checkpoint = dict(model=agent.state_dict(), optimizer=optimizer.state_dict(), args=vars(args), script=script)
            checkpoint.update(run_name=run_name, iteration=iteration, global_step=global_step, last_returns=last_returns)
            save_atomic(checkpoint, checkpoint_path)
        if signum:
            progress.close()
            writer.close()
            print(f"{signal.Signals(signum).name} after iteration {iteration}: resume from {checkpoint_path}", file=sys.stderr)
            sys.exit(128 + signum)

    progress.close()  # RUN MACHINERY
    envs.close()
    done_text = f"done: {global_step} steps in {time.time() - start_time:.0f}s, runs/{run_name}"
    if args.save_model:  # DeepSPI: the trained agent, for evaluate.py
        model_path = f"runs/{run_name}/{args.exp_name}.cleanrl_model"
        save_atomic({"model": agent.state_dict(), "args": vars(args), "script": script}, model_path)
        done_text += f", model {model_path}"
    writer.close()
    print(f"{done_text}, final V^pi(s_I) = {init_value:.3f}")
