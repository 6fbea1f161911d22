# DeepSPI on the confounding maze (paper Fig. 3), single file: README.md; paper: https://arxiv.org/abs/2510.12312
# The learner of deepspi_atari.py (PPO whose encoder also feeds a Lipschitz latent world model; per-sample world-model
# losses are subtracted from the advantage inside the clipped surrogate) on a tabular maze whose two "star" cells look
# almost alike but need opposite actions. Exact policy evaluation of the network's tabular policy is logged every iteration.
import csv
import dataclasses
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
    num_threads: Optional[int] = None
    """torch CPU threads (None: torch's default)"""
    save_model: bool = False
    """save the trained agent to `runs/{run_name}/{exp_name}.cleanrl_model`"""
    checkpoint_every: int = 10
    """write `runs/{run_name}/checkpoint.pt` every this many iterations and at the end (0: only on a signal or a NaN)"""
    resume: Optional[str] = None
    """continue the run of this checkpoint.pt, with its arguments, in `runs/{run_name}` (exact on CPU)"""
    eval_episodes: int = 0
    """after training, play this many episodes with the greedy and with the sampled policy (0: no evaluation)"""
    eval_only: Optional[str] = None
    """evaluate this .cleanrl_model or checkpoint.pt instead of training (--eval-episodes episodes, 10 if it is 0)"""
    capture_video: bool = False
    """record env 0's evaluation episode to `videos/{run_name}/{greedy,sampled}` (needs --eval-episodes or --eval-only)"""

    # Maze arguments (official deep_spi.py --toy_confounding_env path)
    n: int = 5
    """corridor length n >= 2 (official n_path); the grid is 5 x (n+3) and the maze has 2n+6 states"""
    epsilon: float = 0.2
    """probability of branching into the bottom (hazardous) corridor, in (0, 1) (official toy_confounding_env_epsilon)"""
    max_steps: int = 200
    """episode time limit; reaching it counts as done (no bootstrap), as in the official maze"""

    # Algorithm specific arguments
    total_timesteps: int = 40960
    """total timesteps of the experiments (official: 10M; 40960 = 40 iterations fits the 20-minute CPU budget)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 128
    """the number of parallel maze environments (official DeepSPI: 128 x 8)"""
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
    """the surrogate clipping coefficient epsilon; the importance-ratio neighbourhood is [2-C, C] with C = 1 + epsilon"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function (the value loss is not clipped, as in the official code)"""
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
    """encode each distinct image of a batch once (a maze observation is a function of the state, so at most 2n+6 distinct
    images): exact, only faster; --no-dedup-obs encodes every row as deepspi_atari.py does"""
    mask_next_done: bool = False
    """latent target phi(s) for transitions that END an episode (principled); default: for those that START one (official)"""

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
# the loss terms checked for non-finite values before every optimizer step, as the error message names them; policy
# last: a non-finite world-model loss makes the policy loss non-finite too (through the utility)
LOSS_TERMS = {"v_loss": "value", "entropy_loss": "entropy", "reward_loss": "reward", "transition_loss": "transition"}
LOSS_TERMS["pg_loss"] = "policy"


def fail(message):
    """Bad input: one clear line and exit code 2, no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def given_flags(argv):
    """The Args fields set on this command line (`--x-y v`, `--x_y=v`, `--no-x-y`)."""
    fields = {f.name for f in dataclasses.fields(Args)}
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return {n[3:] if n not in fields and n.startswith("no_") else n for n in names} & fields


def check_args(args):
    """Every flag against its domain, before anything is built: one line and exit code 2 otherwise. The theory's
    condition on gamma * C stays a notice (printed later)."""
    flag = lambda name: f"--{name.replace('_', '-')} {getattr(args, name)}"  # noqa: E731
    floats = ["learning_rate", "gamma", "gae_lambda", "clip_coef", "ent_coef", "vf_coef", "max_grad_norm"]
    floats += ["reward_loss_coef", "transition_loss_coef"] + ["target_kl"] * (args.target_kl is not None) + ["epsilon"]
    positive = ["num_envs", "num_steps", "num_minibatches", "update_epochs", "total_timesteps", "learning_rate"]
    positive += ["max_steps"] + ["num_threads"] * (args.num_threads is not None)
    checks = [(math.isfinite(getattr(args, n)), f"{flag(n)} must be finite") for n in floats]
    checks += [(getattr(args, n) > 0, f"{flag(n)} must be positive") for n in positive + ["max_grad_norm"]]
    checks += [
        (args.n >= 2, f"{flag('n')} must be at least 2 (n = 1 is degenerate: F overwrites @)"),
        (0 < args.epsilon < 1, f"{flag('epsilon')} must lie in (0, 1)"),
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
        self.rows, self.cols = (
            np.floor((np.arange(84, dtype=np.float32) + 0.5) * np.float32(m) / np.float32(84)) for m in grid.shape
        )
        self.rows, self.cols = self.rows.astype(np.int64).clip(max=4), self.cols.astype(np.int64).clip(max=n + 2)
        self.observations = np.stack([self.render(s) for s in range(S)])  # (S, 1, 84, 84), the agent drawn

    def _move(self, s, a, s_next, reward):
        self.P[s, a] = 0.0
        self.P[s, a, s_next], self.R[s, a] = 1.0, reward

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


def policy_value_iterative(maze, pi, gamma=None, num_iters=1000):
    """V^pi by num_iters sweeps of V <- r^pi + gamma P^pi V from V = 0 (what the official code logs)."""
    gamma = maze.gamma if gamma is None else gamma
    pi = np.asarray(pi, dtype=np.float64)
    P_pi, r_pi = np.einsum("sa,sat->st", pi, maze.P), (pi * maze.R).sum(1)
    V = np.zeros(maze.num_states)
    for _ in range(num_iters):
        V = r_pi + gamma * P_pi @ V
    return V


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

    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.state[:], self.steps[:] = self.maze.initial_state, 0
        return self.maze.observations[self.state], {}

    def step(self, actions):
        actions = np.asarray(actions)
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

    def get_state(self):
        """Everything the next steps depend on, for an exact resume: the cells, the step counters, the generator."""
        return {"state": self.state.copy(), "steps": self.steps.copy(), "rng": self.rng.bit_generator.state}

    def set_state(self, state):
        self.state, self.steps = state["state"].copy(), state["steps"].copy()
        self.rng.bit_generator.state = state["rng"]

    def close(self):
        pass


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
    def __init__(self, n_actions, sn_faithful=True, dedup_obs=True):
        super().__init__()
        self.dedup_obs = dedup_obs
        # the latent state of DeepSPI is the 64x7x7 conv map (post-ReLU); the FC-512 torso feeds only actor and critic
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
    agent, args, mb_obs, mb_next_obs, mb_actions, mb_logprobs, mb_advantages, mb_returns, mb_rewards, mb_wm_dones, eps=None
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
        # per-sample losses: Huber on the (unclipped) reward; one-sample Wasserstein estimate, Huber summed over the latent
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

    # Value loss (unclipped, as in the official code)
    v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    if args.deep_mdp:
        loss = loss + aux.mean()
    out.update(utility=utility, pg_loss=pg_loss, v_loss=v_loss, entropy_loss=entropy_loss)
    return loss, out


def autocast(args, device):
    """--bf16: convolutions and matmuls in bfloat16 (AVX-512 BF16 or AMX, GPU tensor cores); the rest keeps its dtype."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def evaluate(agent, args, maze, run_name, writer, device):
    """Play --eval-episodes episodes with the greedy and with the sampled policy, on an env seeded after the training one.
    One episode per env, each env's first, so that short episodes are not over-represented. The returns go to
    TensorBoard (x = episode index) and their mean and std to stdout, with the exact V^pi(s_I) of the policy (the
    network's tabular policy: an observation is a function of the state); --capture-video records env 0's episode."""
    n, maze_obs = args.eval_episodes, torch.as_tensor(maze.observations, device=device)
    with torch.inference_mode(), autocast(args, device):
        pi = agent.actor(agent.network(agent.encode(maze_obs))).float().softmax(-1).double().cpu().numpy()
    v_star = optimal_value(args.n, args.epsilon, args.gamma)
    for mode, tag in (("greedy", "eval/greedy_episodic_return"), ("sampled", "eval/episodic_return")):
        envs = MazeVecEnv(maze, n, args.seed + args.num_envs)
        next_obs, returns, playing = envs.reset()[0], np.zeros(n), np.ones(n, dtype=bool)
        frames = [next_obs[0, 0]]
        while playing.any():
            with torch.inference_mode(), autocast(args, device):
                logits = agent.actor(agent.network(agent.encode(torch.as_tensor(next_obs, device=device)))).float()
            action = logits.argmax(1) if mode == "greedy" else Categorical(logits=logits).sample()
            next_obs, reward, terminations, truncations, _ = envs.step(action.cpu().numpy())
            returns += reward * playing
            done = terminations | truncations
            if args.capture_video and playing[0]:  # the same-step reset hides the last cell: end on the empty maze
                frames.append(maze.render(0, done=True)[0] if done[0] else next_obs[0, 0])
            playing &= ~done
        if args.capture_video:
            write_video(frames, f"videos/{run_name}/{mode}/rl-video-episode-0.mp4")
        tabular = np.eye(pi.shape[1])[pi.argmax(1)] if mode == "greedy" else pi
        value = policy_value(maze, tabular)[maze.initial_state]
        for i, episode_return in enumerate(returns):
            writer.add_scalar(tag, episode_return, i)
        writer.add_scalar(tag.replace("episodic_return", "init_value"), value, 0)
        print(
            f"eval, {mode} policy: {returns.mean():.3f} ± {returns.std():.3f} over {n} episodes of "
            f"ConfoundingMaze-n{args.n}-eps{args.epsilon}; exact V^pi(s_I) = {value:.4f} (V* = {v_star:.4f})"
        )


def write_video(frames, path, fps=4):
    """An mp4 of the 84x84 grey frames, upscaled 4x to 336x336 RGB."""
    from moviepy import ImageSequenceClip

    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = [np.repeat(np.repeat(frame, 4, 0), 4, 1)[..., None].repeat(3, 2) for frame in frames]
    ImageSequenceClip(frames, fps=fps).write_videofile(path, logger=None)


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


def keep_progress_rows(path, iteration):
    """Drop the rows of progress.csv after `iteration` (a killed run logged them after its last checkpoint; the resumed
    run logs them again) and any cut-off last line. Returns the column names, None if there are none yet."""
    with open(path, newline="") as f:
        lines = f.readlines()
    kept = lines[:1] + [line for line in lines[1:] if line.endswith("\n") and int(line.split(",", 1)[0]) <= iteration]
    with open(f"{path}.tmp", "w", newline="") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)
    return next(csv.reader(kept), None)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # set by torchrun
        fail(f"WORLD_SIZE={os.environ['WORLD_SIZE']}: multi-process training (torchrun) is only in deepspi_atari.py")
    # --resume / --eval-only: the saved run's arguments; a flag given here must agree with them, unless it only controls
    # the run (RUN_FLAGS, and for --eval-only also --seed and --num-threads), in which case it replaces the saved value
    saved = None
    if args.resume and args.eval_only:
        fail("--resume and --eval-only exclude each other")
    if args.resume or args.eval_only:
        path, mode = (args.resume, "--resume") if args.resume else (args.eval_only, "--eval-only")
        if not os.path.isfile(path):
            fail(f"{mode}: no such file {path}")
        try:  # a pickle (numpy arrays and RNG states): load only files you trust
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            fail(f"{mode}: cannot read {path} ({type(e).__name__})")
        if not isinstance(saved, dict) or not {"model", "args"} <= saved.keys() or "epsilon" not in saved["args"]:
            fail(f"{mode}: {path} is not a model or checkpoint of deepspi_maze.py")
        if args.resume and "optimizer" not in saved:
            fail(f"--resume needs a checkpoint.pt; {path} is a saved model")
        free = RUN_FLAGS | ({"seed", "num_threads"} if args.eval_only else set())
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
    if args.capture_video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            fail("--capture-video needs moviepy (pip install moviepy)")
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
    if args.gamma * (1 + args.clip_coef) >= 1 and not args.eval_only:
        print(
            f"note: gamma * C = {args.gamma * (1 + args.clip_coef):.3f} >= 1, so the paper's condition C < 1/gamma does not "
            "hold (the official defaults break it too); the safety bound is not guaranteed",
            file=sys.stderr,
        )
    run_name = f"ConfoundingMaze-n{args.n}-eps{args.epsilon}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = saved["run_name"] if args.resume else run_name + ("__eval" if args.eval_only else "")
    # a new run never reuses a directory: runs started in the same second get the suffixes _2, _3, ...
    run_name = make_run_dir(run_name, reuse=bool(args.resume))
    if args.resume:
        print(f"resuming runs/{run_name} after iteration {saved['iteration']}/{args.num_iterations}, with its arguments")
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
    writer = SummaryWriter(f"runs/{run_name}", purge_step=saved["global_step"] + 1 if args.resume else None)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % ("\n".join([f"|{key}|{value}|" for key, value in vars(args).items()])),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    use_cuda = torch.cuda.is_available() and args.cuda
    device = torch.device("cuda" if use_cuda else "cpu")
    # on CPU the backward of the index gathers (TransitionModel's w[a], the deduplicated encoding) is not repeatable with
    # >1 thread otherwise; with one thread the results are the same bit for bit
    torch.use_deterministic_algorithms(args.torch_deterministic and not use_cuda)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid that NaN-fills every torch.empty

    maze = ConfoundingMaze(args.n, args.epsilon, args.gamma, args.max_steps)
    if args.eval_only:  # no training: evaluate the saved agent, then stop
        agent = Agent(saved["model"]["actor.bias"].numel(), args.sn_faithful, args.dedup_obs).to(device)
        agent.load_state_dict(saved["model"])
        evaluate(agent, args, maze, run_name, writer, device)
        writer.close()
        sys.exit(0)

    # env setup
    envs = MazeVecEnv(maze, args.num_envs, args.seed)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete action space is supported"
    # every state's observation, for the exact evaluation of the network's tabular policy
    maze_obs = torch.as_tensor(maze.observations, device=device)
    v_star = optimal_value(args.n, args.epsilon, args.gamma)
    v_blind = star_blind_value(args.n, args.epsilon, args.gamma)
    # a resumed run appends to its progress.csv, after the rows up to the checkpoint
    csv_path, columns = f"runs/{run_name}/progress.csv", None
    if args.resume and os.path.isfile(csv_path):
        columns = keep_progress_rows(csv_path, saved["iteration"])
    csv_file = open(csv_path, "a" if args.resume else "w", newline="")
    csv_writer = csv.DictWriter(csv_file, fieldnames=columns) if columns else None

    agent = Agent(envs.single_action_space.n, args.sn_faithful, args.dedup_obs).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    # ALGO Logic: Storage setup
    # obs[t + 1] is the next observation of step t, so s' costs no extra storage; dones[t] came with obs[t]
    obs = torch.zeros((args.num_steps + 1, args.num_envs) + envs.single_observation_space.shape, dtype=torch.uint8).to(device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long).to(device)
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps + 1, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)
    episode_returns = np.zeros(args.num_envs)
    episode_lengths = np.zeros(args.num_envs, dtype=np.int64)
    last_returns = np.full(args.num_envs, np.nan)  # each env's last finished episode return

    # start the game (CleanRL's, and --resume)
    global_step, start_iteration, elapsed = 0, 1, 0.0  # elapsed: the wall time of the run before this process
    start_time = time.time()
    next_obs = torch.as_tensor(envs.reset()[0], device=device)
    next_done = torch.zeros(args.num_envs).to(device)
    if args.resume:  # the state at the end of the checkpoint's iteration
        agent.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        global_step, start_iteration, elapsed = saved["global_step"], saved["iteration"] + 1, saved["wall_s"]
        envs.set_state(saved["envs"])
        next_obs, next_done = saved["next_obs"].to(device), saved["next_done"].to(device)
        episode_returns, episode_lengths = saved["episode_returns"], saved["episode_lengths"]
        last_returns = saved["last_returns"]
        random.setstate(saved["rng"]["python"])
        np.random.set_state(saved["rng"]["numpy"])
        torch.set_rng_state(saved["rng"]["torch"])
        if use_cuda and saved["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
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

            # record rewards for plotting purposes: the return of each finished episode (terminal cell or time limit)
            episode_returns += infos["reward"]
            episode_lengths += 1
            for idx in np.nonzero(infos["terminated"] | truncations)[0]:
                writer.add_scalar("charts/episodic_return", episode_returns[idx], global_step)
                writer.add_scalar("charts/episodic_length", episode_lengths[idx], global_step)
                last_returns[idx], episode_returns[idx], episode_lengths[idx] = episode_returns[idx], 0, 0
        obs[args.num_steps] = next_obs
        dones[args.num_steps] = next_done

        # bootstrap value if not done
        with torch.inference_mode(), autocast(args, device):
            next_value = agent.get_value(next_obs).float().reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                nextnonterminal = 1.0 - dones[t + 1]
                nextvalues = next_value if t == args.num_steps - 1 else values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
            returns = advantages + values

        # flatten the batch
        b_obs = obs[:-1].reshape((-1,) + envs.single_observation_space.shape)
        b_next_obs = obs[1:].reshape((-1,) + envs.single_observation_space.shape)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        b_rewards = rewards.reshape(-1)
        # transitions whose latent target is phi(s) instead of phi(s'): the official code masks with the done flag of obs[t]
        # (here the first step of an episode); the last step of an episode, whose obs[t+1] is already the reset, is dones[t+1]
        b_wm_dones = (dones[1:] if args.mask_next_done else dones[:-1]).reshape(-1)

        # Optimizing the policy, value and world-model networks
        b_inds = np.arange(args.batch_size)
        clipfracs, ratio_max, ratio_min, nonfinite = [], 0.0, float("inf"), None
        for epoch in range(args.update_epochs):
            drift = torch.zeros((), device=device)  # max |ratio - 1| of the epoch's minibatches, on the device
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
                    )
                with torch.no_grad():
                    ratio = out["ratio"]
                    drift = torch.maximum(drift, (ratio - 1.0).abs().max())
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]
                    ratio_max, ratio_min = max(ratio_max, ratio.max().item()), min(ratio_min, ratio.min().item())

                optimizer.zero_grad()
                loss.backward()
                terms = [k for k in LOSS_TERMS if k in out]
                losses = torch.stack([out[k] for k in terms]).detach()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                if not torch.isfinite(torch.cat([losses, grad_norm.view(1)])).all():  # stop before a bad step
                    bad = [LOSS_TERMS[k] for k, v in zip(terms, losses.tolist(), strict=True) if not np.isfinite(v)]
                    where = f"iteration {iteration} (epoch {epoch + 1}, minibatch {start // args.minibatch_size + 1})"
                    nonfinite = f"non-finite {' and '.join(bad) + ' loss' if bad else 'gradient norm'} at {where}"
                    break
                optimizer.step()

            if nonfinite or args.target_kl is not None and out["approx_kl"] > args.target_kl:
                break
            if args.enforce_neighbourhood and drift > args.clip_coef:  # the ratio left [2 - C, C]: one host read
                break

        # the supremum importance ratio SIR(pi', pi) on this batch, recomputed with the final parameters
        with torch.inference_mode(), autocast(args, device):
            sir = (agent.get_action_and_value(b_obs, b_actions)[1] - b_logprobs).exp().max().item()

        # the network's tabular policy on every maze state, evaluated exactly (official: charts/init_value, repr_dist)
        with torch.inference_mode(), autocast(args, device):
            z_maze = agent.encode(maze_obs).float()
            pi = agent.actor(agent.network(z_maze)).float().softmax(-1).double().cpu().numpy()
            z_top, z_bottom = z_maze[maze.top_star], z_maze[maze.bottom_star]
            repr_dist = ((z_top - z_bottom) ** 2).mean().item()
            repr_dist_normalized = repr_dist / max(0.5 * ((z_top**2).mean() + (z_bottom**2).mean()).item(), 1e-12)
        init_value = policy_value(maze, pi)[maze.initial_state]

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
        writer.add_scalar("losses/clipfrac", np.mean(clipfracs), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("losses/ratio_max", ratio_max, global_step)
        writer.add_scalar("losses/ratio_min", ratio_min, global_step)
        if "reward_loss" in out:
            writer.add_scalar("losses/reward_loss", out["reward_loss"].item(), global_step)
            writer.add_scalar("losses/transition_loss", out["transition_loss"].item(), global_step)
        writer.add_scalar("charts/sir", sir, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        finished = last_returns[~np.isnan(last_returns)]
        avg_return = finished.mean() if len(finished) else np.nan
        if len(finished):
            writer.add_scalar("charts/avg_episodic_return", avg_return, global_step)
        row = {
            "iteration": iteration,
            "global_step": global_step,
            "wall_s": round(elapsed + time.time() - start_time, 2),
            "avg_episodic_return": avg_return,
            "init_value": init_value,
            "optimal_value": v_star,
            "star_blind_value": v_blind,
            "repr_dist": repr_dist,
            "repr_dist_normalized": repr_dist_normalized,
            "p_up_top_star": pi[maze.top_star, UP],
            "p_up_bottom_star": pi[maze.bottom_star, UP],
            "p_right_top_star": pi[maze.top_star, RIGHT],
            "p_right_bottom_star": pi[maze.bottom_star, RIGHT],
        }
        for name in ("init_value", "optimal_value", "star_blind_value", "repr_dist", "repr_dist_normalized"):
            writer.add_scalar(f"charts/{name}", row[name], global_step)
        writer.add_scalar("charts/p_up_top_star", row["p_up_top_star"], global_step)
        writer.add_scalar("charts/p_up_bottom_star", row["p_up_bottom_star"], global_step)
        row.update(
            value_loss=out["v_loss"].item(),
            policy_loss=out["pg_loss"].item(),
            entropy=out["entropy_loss"].item(),
            approx_kl=out["approx_kl"].item(),
            clipfrac=np.mean(clipfracs),
            reward_loss=out["reward_loss"].item() if "reward_loss" in out else np.nan,
            transition_loss=out["transition_loss"].item() if "transition_loss" in out else np.nan,
            learning_rate=optimizer.param_groups[0]["lr"],
            SPS=sps,
        )
        if csv_writer is None:
            csv_writer = csv.DictWriter(csv_file, fieldnames=list(row))
            csv_writer.writeheader()
        csv_writer.writerow(row)
        csv_file.flush()
        avg_text = f"{finished.mean():.2f}" if len(finished) else "n/a"
        progress.set_postfix(SPS=sps, avg_return=avg_text, V_init=f"{init_value:.3f}", refresh=False)
        progress.update()
        if progress.disable and time.time() - last_print > 60:  # no bar: one quiet line a minute
            print(
                f"global_step={global_step}, SPS={sps}, avg_episodic_return={avg_text}, init_value={init_value:.3f} "
                f"(V*={v_star:.3f}, star-blind={v_blind:.3f}), P(UP|top*)={row['p_up_top_star']:.3f}, "
                f"P(UP|bottom*)={row['p_up_bottom_star']:.3f}",
                flush=True,
            )
            last_print = time.time()
        writer.flush()

        # checkpoint: what it takes to go on exactly from here (after a non-finite loss: the weights before the bad step)
        checkpoint_path, signum = f"runs/{run_name}/checkpoint.pt", max(stop_signals, default=0)
        due = args.checkpoint_every and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations)
        if nonfinite or signum or due:
            rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
            rng["cuda"] = torch.cuda.get_rng_state_all() if use_cuda else None
            checkpoint = dict(model=agent.state_dict(), optimizer=optimizer.state_dict(), args=vars(args), rng=rng)
            checkpoint.update(run_name=run_name, iteration=iteration, global_step=global_step)
            checkpoint.update(wall_s=elapsed + time.time() - start_time, envs=envs.get_state(), last_returns=last_returns)
            checkpoint.update(next_obs=next_obs.cpu(), next_done=next_done.cpu())
            checkpoint.update(episode_returns=episode_returns, episode_lengths=episode_lengths)
            save_atomic(checkpoint, checkpoint_path)
        if nonfinite or signum:
            progress.close()
            csv_file.close()
            writer.close()
            stop = f"error: {nonfinite}" if nonfinite else f"{signal.Signals(signum).name} after iteration {iteration}"
            print(f"{os.path.basename(sys.argv[0])}: {stop}; resume from {checkpoint_path}", file=sys.stderr)
            sys.exit(1 if nonfinite else 128 + signum)

    progress.close()
    csv_file.close()
    envs.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # training is over: signals stop the rest at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.save_model:
        save_atomic({"model": agent.state_dict(), "args": vars(args)}, f"runs/{run_name}/{args.exp_name}.cleanrl_model")
    if args.eval_episodes:
        evaluate(agent, args, maze, run_name, writer, device)
    writer.close()
    print(f"done: {global_step} steps in {time.time() - start_time:.0f}s, runs/{run_name}")
