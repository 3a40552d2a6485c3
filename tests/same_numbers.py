"""Proof that a change leaves every number as it was: the same seeded tiny trainings (and
`run.py N test` of their weights) with two checkouts, compared bit for bit: checkpoint.pt,
model.pt, result.json and test.json (but timings, times and commits) and the curves (but speed).

    git worktree add /tmp/before COMMIT
    python tests/same_numbers.py /tmp/before . /tmp/same-numbers   # prints one line per run
    python tests/same_numbers.py /tmp/before . /tmp/same-numbers --bn-batch 128  # flags of the
                                                                # new checkout's trainings only

A flag given after the three folders goes to every training of the new checkout, e.g. a new
setting at the value that reproduces the old default.
"""
import glob
import json
import os
import subprocess
import sys

import torch

old, new, work = map(os.path.abspath, sys.argv[1:4])
NEW_FLAGS = sys.argv[4:]
py = sys.executable
data = os.path.join(work, "cifar-10-batches-bin")
if not os.path.isdir(data):
    sys.path.insert(0, os.path.join(new, "tests"))
    sys.path.insert(0, new)
    from synthetic import write_dataset
    write_dataset(data, seed=5)
CONFIGS = [
    ["1", "train", "--iters", "40", "--log-every", "4", "--eval-every", "8", "--ckpt-every", "8",
     "--val-size", "1000", "--warmup", "on", "--seed", "3"],
    ["2", "train", "--plain", "--amp", "bf16", "--iters", "24", "--log-every", "5",
     "--eval-every", "10", "--ckpt-every", "6"],
    ["1", "train", "--shortcut", "B", "--iters", "30", "--milestones", "10", "20", "--lr", "0.05",
     "--log-every", "3", "--eval-every", "9", "--ckpt-every", "7", "--weight-decay", "0.001"],
]



def run_all(checkout, label, flags=()):
    logdir = os.path.join(work, label)
    subprocess.run(["rm", "-rf", logdir], check=True)
    common = ["--data-dir", data, "--threads", "1"]
    for i, argv in enumerate(CONFIGS):
        name = ["--name", f"config{i}"]  # the same folder, whatever the flags do to the name
        subprocess.run([py, "run.py", *argv, *flags, *name, *common, "--logdir", logdir],
                       cwd=checkout, check=True, capture_output=True)
    for folder in glob.glob(os.path.join(logdir, "*")):
        cfg = json.load(open(os.path.join(folder, "config.json")))
        net = [str(cfg["n"]), "test", "--shortcut", cfg["shortcut"]] + (["--plain"] if cfg["plain"] else [])
        subprocess.run([py, "run.py", *net, "--checkpoint", os.path.join(folder, "model.pt"), *common],
                       cwd=checkout, check=True, capture_output=True)
    return logdir


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0}); acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
            if not t.startswith("speed")}


def same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        for k in a:
            if k in ("train_seconds", "images_per_second", "window_seconds", "time", "git_commit",
                     "checkpoint"):
                continue
            assert k in b, f"{where}.{k} missing"
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


a, b = run_all(old, "before"), run_all(new, "after", NEW_FLAGS)
names = sorted(os.listdir(a))
assert names == sorted(os.listdir(b)), (names, os.listdir(b))
for name in names:
    fa, fb = os.path.join(a, name), os.path.join(b, name)
    for f in ("checkpoint.pt", "model.pt"):
        sa, sb = (torch.load(os.path.join(x, f), weights_only=True) for x in (fa, fb))
        same({k: v for k, v in sa.items() if k != "digest"}, sb, f"{name}/{f}")
    for f in ("result.json", "test.json"):
        same(json.load(open(os.path.join(fa, f))), json.load(open(os.path.join(fb, f))), f"{name}/{f}")
    same(scalars(fa), scalars(fb), f"{name}/events")
    print(f"{name}: checkpoint, model.pt, result.json, test.json and curves bit-identical")
