"""Run a training script through its real CLI and record its rollout and its PPO update at CleanRL's boundaries.

    python tests/recorder.py RECORD.pt SCRIPT [FLAGS...]

It runs SCRIPT as `python SCRIPT FLAGS...` would, and names nothing of the script but CleanRL's variables of the training
loop (read in SCRIPT's top-level frame, where the loop runs): `iteration`, `epoch`, `mb_inds`, `b_inds` (`i_inds`, the
imagined batch of DreamSPI), `agent` and the rollout storage. At exit it torch.save's a dict to RECORD.pt:
  env:        every `step` or `reset` method called from the top-level frame (the vector env, any backend), in order:
              {"call": "step" or "reset", "actions": the first argument, "ret": the returned tuple, info reduced to its
              numpy arrays}
  steps:      every optimizer step (torch's global step pre-hook), in order: the loop's iteration and epoch, a copy of
              mb_inds and the name of the index array it is a slice of, which optimizer (by order of first step), the
              names in `agent` of its parameters, each param group's lr, the float64 norm of the gradients it is about
              to apply, and `clip`: (float64 norm before, max_norm) of the last clip_grad_norm_ over exactly its
              parameters, or None
  iterations: {iteration: the acting weights (agent.state_dict() at the iteration's first optimizer step, before any
              update) and the rollout storage at that moment (obs, actions, logprobs, rewards, dones, values,
              next_value)}
A name of these that SCRIPT does not assign stops the run with one line that names it, the script, and the test that
asked for it (pytest's PYTEST_CURRENT_TEST).
"""

import ast
import atexit
import os
import runpy
import sys

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

STORAGE = ["obs", "actions", "logprobs", "rewards", "dones", "values", "next_value"]
LOOP_NAMES = ["iteration", "epoch", "mb_inds", "b_inds", "agent"]  # the loop's CleanRL names besides the storage


def copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (tuple, list)):
        return type(value)(copy(v) for v in value)
    if isinstance(value, dict):  # an info dict: its per-env arrays
        return {k: v.copy() for k, v in value.items() if isinstance(v, np.ndarray)}
    return value


def grad_norm(params):
    """The float64 2-norm of the gradients of params (0 if none has one)."""
    grads = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def not_found(what, script):
    """Stop the run with one line that names what the recorder observes, the script, and the test that observes it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0] or "the calling test"
    sys.exit(
        f"tests/recorder.py: {what} is not in {os.path.basename(script)}, and {test} observes it; if the script was "
        "edited on purpose, update tests/recorder.py to the new name (docs/tests.md, 'Observed lines and names')"
    )


def check_observed(script):
    """The script's top level assigns every CleanRL name the recorder reads, or it fails loudly before the run."""
    with open(script) as f:
        tree = ast.parse(f.read())
    assigned = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned.add(node.id)
    for name in LOOP_NAMES + STORAGE:
        if name not in assigned:
            not_found(f"the variable {name!r}", script)


def main():
    out, script = sys.argv[1], os.path.abspath(sys.argv[2])
    check_observed(script)
    record = {"env": [], "steps": [], "iterations": {}}
    optimizers, clips, env_calls = {}, {}, {}

    def is_top(frame):
        return frame is not None and frame.f_code.co_filename == script and frame.f_code.co_name == "<module>"

    def env_hook(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name in ("step", "reset") and is_top(frame.f_back):
            if not isinstance(frame.f_locals.get("self"), torch.optim.Optimizer):
                first = frame.f_locals[code.co_varnames[1]] if code.co_argcount > 1 else None
                env_calls[id(frame)] = entry = {"call": code.co_name, "actions": copy(first), "ret": None}
                record["env"].append(entry)
        elif event == "return" and id(frame) in env_calls:
            env_calls.pop(id(frame))["ret"] = copy(arg)

    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        clips[frozenset(map(id, parameters))] = (grad_norm(parameters), float(max_norm))
        return clip_grad_norm(parameters, max_norm, *args, **kwargs)

    def on_step(optimizer, args, kwargs):
        frame = sys._getframe()
        while not is_top(frame):
            frame = frame.f_back
        loop = frame.f_locals
        for name in LOOP_NAMES[:3] + ["agent"]:
            if name not in loop:  # assigned somewhere, but not in the training loop's frame at an optimizer step
                not_found(f"the variable {name!r} (at the optimizer step)", script)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        names = {id(p): name for name, p in loop["agent"].named_parameters()}
        mb_inds = np.array(loop["mb_inds"])
        source = [k for k in ("b_inds", "i_inds") if k in loop and np.shares_memory(loop["mb_inds"], loop[k])]
        iteration = loop["iteration"]
        if iteration not in record["iterations"]:
            acting = {k: v.detach().cpu().clone() for k, v in loop["agent"].state_dict().items()}
            record["iterations"][iteration] = {"agent": acting, **{k: copy(loop[k]) for k in STORAGE}}
        record["steps"].append(
            {
                "iteration": iteration,
                "epoch": loop["epoch"],
                "mb_inds": mb_inds,
                "source": source[0] if source else None,
                "optimizer": optimizers.setdefault(id(optimizer), len(optimizers)),
                "params": [names.get(id(p)) for p in params],
                "lr": [float(group["lr"]) for group in optimizer.param_groups],
                "grad_norm": grad_norm(params),
                "clip": clips.pop(frozenset(map(id, params)), None),
            }
        )

    torch.nn.utils.clip_grad_norm_ = recording_clip
    register_optimizer_step_pre_hook(on_step)
    atexit.register(lambda: torch.save(record, out))
    sys.argv = [script, *sys.argv[3:]]
    sys.setprofile(env_hook)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
