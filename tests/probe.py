"""Run a script through its real CLI and record what its training loop passes to, and gets back from, chosen functions,
and what its inline code holds at chosen lines.

    python tests/probe.py RECORD.pt NAME[:MAX][,NAME[:MAX]...] SCRIPT [FLAGS...]
    PROBE_LINES='[["LINE", ["EXPR", ...], MAX], ...]' python tests/probe.py RECORD.pt "" SCRIPT [FLAGS...]

It runs SCRIPT as `python SCRIPT FLAGS...` would (also under torchrun), with a profile hook that, for every call of a
function or method named NAME defined in SCRIPT (at most MAX calls of it), copies its arguments and its return value;
and with a trace hook that, each time SCRIPT is about to run a line whose text (stripped) is LINE (at most MAX times,
null: always), evaluates each EXPR in that frame and copies its value. Copies: tensors (detached, on the CPU), numpy
arrays and plain values, also inside tuples, lists and dicts, and with PROBE_MODULES=1 in the environment the
state_dict of each torch module; other objects are left out. At exit the list of records, each {"name", "args", "ret"}
(a line's record: name LINE, args {EXPR: value}), is torch.save'd to RECORD.pt (RECORD_rank{R}.pt under torchrun).
The tests use it to check the loop's wiring against independent oracles without changing the script.

A NAME that SCRIPT does not define, or a LINE that is not one of its lines, stops the run before it starts, with one
line that names it, the script, and the test that asked for it (pytest's PYTEST_CURRENT_TEST).
"""

import ast
import atexit
import json
import os
import runpy
import sys

import numpy as np
import torch


def snapshot(value):
    if isinstance(value, torch.nn.Module) and os.environ.get("PROBE_MODULES"):  # its weights at that moment
        return {k: v.detach().cpu().clone() for k, v in value.state_dict().items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    return "<object>"


def not_found(what, script):
    """Stop the run with one line that names what the probe observes, the script, and the test that observes it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0] or "the calling test"
    sys.exit(
        f"tests/probe.py: {what} is not in {os.path.basename(script)}, and {test} observes it; if the script was edited on "
        "purpose, update the test to the new text (docs/tests.md, 'Observed lines and names')"
    )


def check_observed(script, source, names, lines):
    """Every function name and every line the probe is asked to observe exists in the script, or it fails loudly."""
    with open(script) as f:
        tree = ast.parse(f.read())
    defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for name in names:
        if name not in defined:
            not_found(f"the function {name!r}", script)
    for text, *_ in lines:
        if text not in source:
            not_found(f"the line {text!r}", script)


def main():
    out, names, script = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
    limits = {n.split(":")[0]: int(n.split(":")[1]) if ":" in n else None for n in names.split(",") if n}
    counts, records, open_calls = dict.fromkeys(limits, 0), [], {}
    lines = [[text, exprs, limit, 0] for text, exprs, limit in json.loads(os.environ.get("PROBE_LINES", "[]"))]
    with open(script) as f:
        source = [line.strip() for line in f]
    check_observed(script, source, limits, lines)

    def trace(frame, event, arg):
        if event == "call":
            return trace if frame.f_code.co_filename == script else None
        if event == "line":
            for entry in lines:
                text, exprs, limit, count = entry
                if source[frame.f_lineno - 1] == text and (limit is None or count < limit):
                    entry[3] += 1
                    values = {e: snapshot(eval(e, frame.f_globals, frame.f_locals)) for e in exprs}
                    records.append({"name": text, "args": values, "ret": None})
        return trace

    def hook(frame, event, arg):
        code = frame.f_code
        if code.co_name not in limits or code.co_filename != script:
            return
        if event == "call" and (limits[code.co_name] is None or counts[code.co_name] < limits[code.co_name]):
            counts[code.co_name] += 1
            args = {k: snapshot(frame.f_locals[k]) for k in code.co_varnames[: code.co_argcount] if k != "self"}
            open_calls[id(frame)] = record = {"name": code.co_name, "args": args, "ret": None}
            records.append(record)
        elif event == "return" and id(frame) in open_calls:
            open_calls.pop(id(frame))["ret"] = snapshot(arg)

    rank = os.environ.get("RANK")
    path = out if rank is None else out.replace(".pt", f"_rank{rank}.pt")
    atexit.register(lambda: torch.save(records, path))
    sys.argv = [script, *sys.argv[4:]]
    sys.setprofile(hook)
    if lines:
        sys.settrace(trace)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
