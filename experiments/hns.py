# Human-normalised score of finished runs, from the charts/episodic_return their TensorBoard files hold:
# HNS = (score - random) / (human - random), with the (random, human) scores of the official utils/scores.py (57 games),
# where score is the mean raw full-game return of the run's last --last games. Run from the repository root:
#   python experiments/hns.py runs/BreakoutNoFrameskip-v4__deepspi_atari__1__* --last 100
# A run with no finished game yet (such as the empty folder of an interrupted start) is left out, with a note on stderr.
import argparse
import os
import re
import sys

# (random, human) scores per game, as in the official utils/scores.py
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
    """Bad input: one line on stderr and exit code 2, no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def game_of(run_dir):
    """The game of runs/{env_id}__{exp_name}__{seed}__{stamp} (env_id: XNoFrameskip-v4, X-v5 or ALE_X-v5)."""
    m = re.fullmatch(r"(ALE_)?([A-Za-z0-9]+?)(NoFrameskip-v4|-v5)", os.path.basename(os.path.normpath(run_dir)).split("__")[0])
    return m and m.group(2)


def human_normalized(game, score):
    low, high = ATARI_SCORES[game]
    return (score - low) / (high - low)


def episodic_returns(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return (
        [e.value for e in acc.Scalars("charts/episodic_return")] if "charts/episodic_return" in acc.Tags()["scalars"] else []
    )


def main():
    parser = argparse.ArgumentParser(description="human-normalised score of runs, from their charts/episodic_return")
    parser.add_argument("runs", nargs="+", help="run directories, runs/{env_id}__{exp_name}__{seed}__{stamp}")
    parser.add_argument("--last", type=int, default=100, help="the score is the mean return of the last this many games")
    args = parser.parse_args()
    if args.last <= 0:
        fail(f"--last {args.last} must be positive")
    rows, skipped = [], []
    for run_dir in args.runs:
        if not os.path.isdir(run_dir):
            fail(f"no run directory {run_dir}")
        if (game := game_of(run_dir)) not in ATARI_SCORES:
            fail(f"{run_dir}: not an Atari run of the 57 games with a (random, human) score")
        returns = episodic_returns(run_dir)[-args.last :]
        if not returns:  # e.g. the empty folder of a start that was interrupted: left out of the table
            skipped.append(run_dir)
            print(f"note: {run_dir} has no finished game (no charts/episodic_return): left out", file=sys.stderr)
            continue
        score = sum(returns) / len(returns)
        name = os.path.basename(os.path.normpath(run_dir))
        rows.append(f"| {name} | {game} | {len(returns)} | {score:.1f} | {human_normalized(game, score):.3f} |")
    if not rows:
        fail(f"{skipped[0]} has no charts/episodic_return" if len(skipped) == 1 else "no run has a finished game")
    print("| run | game | games | score | HNS |\n|-|-|-|-|-|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
