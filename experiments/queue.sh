#!/usr/bin/env bash
# The paper's experiments as four lanes of runs, each a nice-19, one-thread background job, from a git worktree at a fixed
# commit (so that edits in this checkout never reach a running job), the runs in one shared runs/ folder. A finished run
# is skipped (its checkpoint.pt at the last iteration, or its whole curve in the committed CSV that experiments/sweep.py
# reads for its --out), a cut one resumed from its checkpoint.pt: the same command goes on after a stop or on a new machine.
#   bash experiments/queue.sh COMMIT [RUNS_DIR] [LANES...]     e.g.  bash experiments/queue.sh 900a26b /work/runs A D
# Each lane logs to $RUNS_DIR/queue_lane_<L>.log and each run to $RUNS_DIR/sweep_logs/. Then, from the repository root,
# remake the tables with the same sweep commands and --report-only (docs/results.md lists them).
# A run longer than a session travels to the next machine in the repository: before the stop,
# `python experiments/carry.py save runs/RUN` and commit experiments/carried_runs/; this script restores the carried runs
# into RUNS_DIR first, and their lanes resume them. THREADS=2 gives each run two threads (for one lane on two cores).
set -euo pipefail
commit=${1:?usage: bash experiments/queue.sh COMMIT [RUNS_DIR] [LANES...]}
root=$(cd "$(dirname "$0")/.." && pwd)
runs=$(realpath -m "${2:-$root/runs}")
shift $(( $# >= 2 ? 2 : 1 ))
lanes=${*:-A B C D}
tree="$(dirname "$root")/queue-$commit"
[ -d "$tree" ] || git -C "$root" worktree add --detach "$tree" "$commit"
mkdir -p "$runs/sweep_logs"
ln -sfn "$runs" "$tree/runs"
py=${PYTHON:-python}
threads=${THREADS:-1}
$py "$root/experiments/carry.py" restore "$runs"
ppo="--reward-loss-coef 0 --transition-loss-coef 0"
lane_A() {  # DreamSPI at 8 x 128 on Breakout to 1M steps, seed 1
  $py experiments/sweep.py --script dreamspi_atari.py --out docs/learning/dreamspi_1m --algo dreamspi-8x128= --seeds 1 \
    --threads "$threads" --base="--num-envs 8 --num-steps 128 --total-timesteps 1000000 --checkpoint-every 10"
}
lane_B() {  # PPO mode on the maze (the same numbers with and without the deduplicated update), then Breakout
  $py experiments/sweep.py --base="--n 10" --algo deepspi= --algo "ppo=$ppo" --grid clip-coef=0.01,0.1,0.2,0.5,0.8 \
    --seeds 1 2 3 4 5 --seed-major --out docs/learning/maze_sweep_clip
  $py experiments/sweep.py --base="--n 10" --algo "ppo=--enforce-neighbourhood $ppo" --seeds 1 2 3 4 5 \
    --out docs/learning/maze_sweep_neighbourhood
  $py experiments/sweep.py --base="--total-timesteps 163840" --algo "ppo=$ppo" --grid n=15,20 --seeds 1 2 3 4 5 \
    --out docs/learning/maze_sweep_n
  $py experiments/sweep.py --script deepspi_atari.py --algo deepspi= --grid clip-coef=0.1,0.2,0.5 \
    --grid enforce-neighbourhood=True --out docs/learning/breakout_sweep_clip \
    --base="--num-envs 8 --num-steps 128 --total-timesteps 300032 --checkpoint-every 10"
}
lane_C() {  # DeepSPI on the maze
  $py experiments/sweep.py --base="--n 10" --algo deepspi= --grid clip-coef=0.01,0.1,0.2,0.5,0.8 --seeds 1 2 3 4 5 \
    --seed-major --out docs/learning/maze_sweep_clip
  $py experiments/sweep.py --base="--n 10" --algo deepspi="--enforce-neighbourhood" --seeds 1 2 3 4 5 \
    --out docs/learning/maze_sweep_neighbourhood
  for n in 5 10; do  # the 10-seed defaults of experiments/maze_seeds.py (exp_name deepspi): skip a seed whose curve is
    for seed in 1 2 3 4 5 6 7 8 9 10; do  # committed, resume a cut run, start the others
      grep -q "^$n,0.2,deepspi,$seed," docs/learning/maze_10seeds_curves.csv && continue
      log="runs/sweep_logs/deepspi_n${n}_${seed}.log"
      run=$(ls -d runs/ConfoundingMaze-n$n-eps0.2__deepspi__${seed}__* 2> /dev/null | tail -1)
      if [ -n "$run" ] && [ -f "$run/checkpoint.pt" ]; then
        $py deepspi_maze.py --no-progress --resume "$run/checkpoint.pt" >> "$log" 2>&1 || true
      else
        [ -n "$run" ] && rm -r "$run"
        $py deepspi_maze.py --no-progress --exp-name deepspi --seed "$seed" --n "$n" > "$log" 2>&1 || true
      fi
    done
  done
  $py experiments/sweep.py --base="--n 10" --algo deepspi= --grid reward-loss-coef=0.001,0.1,1 \
    --grid transition-loss-coef=5e-5,5e-3,5e-2 --seeds 1 2 3 --seed-major --out docs/learning/maze_sweep_alpha
  $py experiments/sweep.py --base="--total-timesteps 163840" --algo deepspi= --grid n=15,20 --seeds 1 2 3 4 5 \
    --seed-major --out docs/learning/maze_sweep_n
}
lane_D() {  # the variance half of prediction 1 (docs/results.md): seeds 6-20 of the maze C grid, DeepSPI and PPO, so that
  # experiments/verdicts.py's spread tests see 20 seeds a cell (it takes seeds 1-5 from docs/learning/maze_sweep_clip)
  $py experiments/sweep.py --base="--n 10" --algo deepspi= --algo "ppo=$ppo" --grid clip-coef=0.01,0.1,0.2,0.5,0.8 \
    --seeds 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 --seed-major --out docs/learning/maze_sweep_clip_seeds6-20
}
cd "$tree"
for lane in $lanes; do
  nohup nice -n 19 env OMP_NUM_THREADS=1 bash -c "$(declare -f "lane_$lane"); py=$py threads=$threads ppo='$ppo' lane_$lane" \
    > "$runs/queue_lane_$lane.log" 2>&1 &
  echo "lane $lane: pid $!, log $runs/queue_lane_$lane.log"
done
