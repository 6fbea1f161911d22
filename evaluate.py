# Evaluate a trained agent on full games with its greedy and its sampled policy, as CleanRL's cleanrl_utils/evals does:
# the agent class and the environments come from the training script that wrote the file, whose name the file records
# (older files that do not: --script dreamspi_atari.py, say). Run from the repository root:
#   python evaluate.py runs/RUN/deepspi_atari.cleanrl_model --episodes 10 --capture-video
#   python evaluate.py runs/RUN/checkpoint.pt --env-backend envpool --seed 5
# The raw full-game scores go to runs/{run_name}__eval (TensorBoard: eval/greedy_episodic_return and
# eval/episodic_return, x = game index), their mean and std to stdout; --capture-video records each policy's first game
# to videos/{run_name}. The last line names both folders.
import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch
from torch.distributions.categorical import Categorical

HERE = os.path.dirname(os.path.abspath(__file__))


def fail(message):
    """Bad input: one clear line and exit code 2, no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_script(path):
    """The training script as a module (its main block does not run): Agent, make_envs, finished_games, make_run_dir."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[: -len(".py")], path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def evaluate(agent, script, env_id, backend, episodes, seed, device, greedy, video_dir=None, stochastic=False, bf16=False):
    """The raw scores of `episodes` full games, one per env and each env's first (so that short games are not
    over-represented), env i seeded seed + i; greedy: the most likely action, else one sampled from the policy."""
    envs = script.make_envs(env_id, backend, episodes, seed, video_dir, stochastic)
    next_obs, _ = envs.reset()
    scores = np.zeros(episodes)  # each env's first full-game score
    playing = np.ones(episodes, dtype=bool)  # the envs whose first game goes on
    running = np.zeros(episodes)  # envpool: the raw score of each env's game so far
    while playing.any():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = agent.actor(agent.network(agent.encode(torch.as_tensor(next_obs, device=device)))).float()
        action = logits.argmax(1) if greedy else Categorical(logits=logits).sample()
        next_obs, _, _, truncations, infos = envs.step(action.cpu().numpy())
        for i, score in script.finished_games(infos, truncations, running).items():
            if playing[i]:
                scores[i] = score
            playing[i] = False
    envs.close()
    return scores


def main():
    parser = argparse.ArgumentParser(description="evaluate a checkpoint.pt or saved .cleanrl_model on full games")
    parser.add_argument("model", help="a checkpoint.pt or .cleanrl_model written by the training script")
    parser.add_argument("--episodes", type=int, default=10, help="full games per policy (one per env)")
    parser.add_argument("--seed", type=int, help="env i is seeded seed + i (default: after the training envs' seeds)")
    parser.add_argument("--env-backend", choices=["envpool", "gymnasium"], help="default: the training run's")
    parser.add_argument("--capture-video", action="store_true", help="record each policy's first game (gymnasium backend)")
    parser.add_argument(
        "--script",
        help="the training script whose Agent and envs to use, e.g. dreamspi_atari.py (default: the script the file "
        "records; a file that records none: {exp_name}.py if there is one, else deepspi_atari.py)",
    )
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=True, help="use a GPU if there is one")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast (default: the run's)")
    cli = parser.parse_args()
    if cli.episodes <= 0:
        fail(f"--episodes {cli.episodes} must be positive")
    try:  # a pickle: load only files you trust
        saved = torch.load(cli.model, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read {cli.model} ({type(e).__name__})")
    if not isinstance(saved, dict) or not {"model", "args"} <= saved.keys():
        fail(f"{cli.model} is neither a checkpoint.pt nor a saved model")
    args = saved["args"]
    recorded = saved.get("script")  # the training script's file name, which checkpoints and models record
    if cli.script:
        path = cli.script
        if not os.path.isfile(path) and os.path.isfile(os.path.join(HERE, path)):  # a script of this repository by name
            path = os.path.join(HERE, path)
    elif recorded:
        path = os.path.join(HERE, recorded)
    else:  # an older file, which does not record its script: {exp_name}.py, else deepspi_atari.py
        path = os.path.join(HERE, f"{args['exp_name']}.py")
        if not os.path.isfile(path):
            path = os.path.join(HERE, "deepspi_atari.py")
    name = os.path.basename(path)
    if not os.path.isfile(path):
        fail(f"no training script {path}; give it with --script")
    script = load_script(path)
    if not hasattr(script, "make_envs"):
        fail(
            f"{name} has no Atari games to play: evaluate.py plays the Atari scripts' agents "
            "(a deepspi_maze.py run logs the exact value of its policy while it trains)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() and cli.cuda else "cpu")
    agent = script.Agent(saved["model"]["actor.bias"].numel(), args.get("sn_faithful", True)).to(device)
    try:
        agent.load_state_dict(saved["model"])
    except RuntimeError:
        if cli.script or recorded:
            fail(f"{cli.model} does not fit the Agent of {name}; give the script that wrote it with --script")
        fail(
            f"{cli.model} does not fit the Agent of {name} (the file does not record its training script, and "
            f"{name} is the guess from its exp_name {args['exp_name']}); name the script that wrote it, e.g. "
            "dreamspi_atari.py, with --script"
        )
    backend = cli.env_backend or args["env_backend"]
    if cli.capture_video:  # envpool has no renderer
        backend = "gymnasium"
    seed = args["seed"] + args["num_envs"] if cli.seed is None else cli.seed
    env_name = args["env_id"].replace("/", "_")
    run_name = script.make_run_dir(f"{env_name}__{args['exp_name']}__{seed}__{int(time.time())}__eval")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}")
    torch.manual_seed(seed)  # the sampled policy's draws
    stochastic = args.get("stochastic_env", False)
    bf16 = args.get("bf16", False) if cli.bf16 is None else cli.bf16
    for mode, tag in (("greedy", "eval/greedy_episodic_return"), ("sampled", "eval/episodic_return")):
        video_dir = f"videos/{run_name}/{mode}" if cli.capture_video else None
        greedy = mode == "greedy"
        scores = evaluate(
            agent, script, args["env_id"], backend, cli.episodes, seed, device, greedy, video_dir, stochastic, bf16
        )
        for i, score in enumerate(scores):
            writer.add_scalar(tag, score, i)
        print(f"eval, {mode} policy: {scores.mean():.1f} ± {scores.std():.1f} over {cli.episodes} games of {args['env_id']}")
    writer.close()
    print(f"eval results: runs/{run_name}" + (f", videos: videos/{run_name}" if cli.capture_video else ""))


if __name__ == "__main__":
    main()
