# torch.profiler over one training iteration of the real CLI (the second one; the first is the warm-up), top ops by self
# CPU time. The profiler steps at the script's once-an-iteration `writer.flush()`.
#   python benchmarks/profile_iteration.py [--top 20] -- --reward-loss-coef 0 --transition-loss-coef 0
import argparse
import os
import runpy
import sys
import tempfile

import torch
from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="profile one iteration of deepspi_atari.py (flags after --)")
    parser.add_argument("--script", default=os.path.join(ROOT, "deepspi_atari.py"))
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--sort", default="self_cpu_time_total")
    args, rest = parser.parse_known_args()
    args.script = os.path.abspath(args.script)  # the run goes on in a temporary directory
    if not os.path.isfile(args.script):
        print(f"{sys.argv[0]}: error: --script {args.script}: no such file", file=sys.stderr)
        sys.exit(2)
    rest = [a for a in rest if a != "--"]
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=1, repeat=1)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule)
    with profiler as prof, tempfile.TemporaryDirectory() as tmp:
        flush = SummaryWriter.flush
        SummaryWriter.flush = lambda self: (flush(self), prof.step())
        sys.argv = [args.script, "--no-progress", "--num-envs", "128", "--num-steps", "8", "--total-timesteps", "2048"]
        sys.argv += rest
        os.chdir(tmp)
        runpy.run_path(args.script, run_name="__main__")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.top, max_name_column_width=40))
