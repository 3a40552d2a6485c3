"""How well each run fitted its training data, phase by phase: the mean of the logged training
loss and training error (each a mean over a window of --log-every iterations) in each learning-
rate phase of its schedule, with its test error at the end. Runs of one recipe that end apart
in test error can be told apart here from the first phase on, long before they end. Prints a
markdown table.

    python results/training_fit.py results/runs/resnet56-*
    python results/training_fit.py --until 8400 results/runs/resnet56-bf16 logs/<another run>

--until N keeps only the windows ending at iteration N or before, so that an unfinished run can
be compared with finished ones over the same iterations. A phase a run has not logged to its
end (or to N) is marked with the iteration its windows reach. A window logged at another lr than
its phase's (the warm-up of ResNet-110 and deeper, at lr 0.01) is left out of that phase.
"""
import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plot_curves  # noqa: E402
from experiment import LR, TRAIN_ERROR, TRAIN_LOSS  # noqa: E402


def phases(config):
    """[(first lr, last iteration)] of each learning-rate phase of the run's schedule."""
    ends = list(config["milestones"]) + [config["iters"]]
    return [(config["lr"] / 10 ** k, end) for k, end in enumerate(ends)]


def phase_means(scalars, tag, lr, start, end, until, logged_lr):
    """Mean of `tag` over the windows ending in (start, min(end, until)] that were trained at
    the phase's `lr` (where `logged_lr`, step -> lr, has it), and the last of them."""
    steps, values = scalars.get(tag, ([], []))
    kept = [(s, v) for s, v in zip(steps, values) if start < s <= min(end, until)
            and math.isclose(logged_lr.get(s, lr), lr, rel_tol=1e-6)]
    if not kept:
        return None, None
    return statistics.mean(v for _, v in kept), kept[-1][0]


def window_length(run):
    """The run's --log-every: its config.json's, else the smallest gap between logged windows."""
    every = run.config.get("log_every")
    if plot_curves.is_int(every, 1):
        return every
    steps = run.scalars.get(TRAIN_LOSS, ([], []))[0]
    return min((b - a for a, b in zip(steps, steps[1:])), default=1)


def final_test_error(run):
    """The test error at the end of training, or the last evaluation's for an unfinished run."""
    error, step = run.test_error()
    if error is None:
        return "-"
    return f"{error:.2f}" if run.finished else f"{error:.2f} (iter {step:,}, unfinished)"


def row(run, until, differ):
    config, cells, start, every = run.config, [], 0, window_length(run)
    logged_lr = dict(zip(*run.scalars.get(LR, ([], []))))
    for lr, end in phases(config):
        loss, last = phase_means(run.scalars, TRAIN_LOSS, lr, start, end, until, logged_lr)
        error, _ = phase_means(run.scalars, TRAIN_ERROR, lr, start, end, until, logged_lr)
        if loss is None or error is None:
            cells.append("-")
        else:
            reached = "" if last >= min(end, until) // every * every else f" (to {last:,})"
            cells.append(f"{loss:.3f} / {error:.2f}{reached}")
        start = end
    name = os.path.basename(os.path.normpath(run.folder))
    return [name, plot_curves.label(config, differ=differ), config["seed"], *cells,
            final_test_error(run)]


def table(runs, until):
    lrs = [lr for lr, _ in phases(runs[0].config)]
    header = ["run", "method", "seed", *[f"lr {lr:g}: loss / error (%)" for lr in lrs],
              "test error (%)"]
    differ = plot_curves.differing(runs) | {"bn_batch"}  # the BN batch always: it matters here
    rows = [row(run, until, differ) for run in runs]
    return "\n".join("| " + " | ".join(map(str, r)) + " |"
                     for r in [header, ["---"] * len(header)] + rows)


def load(folder):
    """The folder as plot_curves reads a run folder, or None (said why)."""
    config = plot_curves.read_config(folder) if os.path.isdir(folder) else None
    if config is None:
        print(f"error: {folder}: expected a run folder (with its config.json)", file=sys.stderr)
        return None
    return plot_curves.read_run(folder, config)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", metavar="FOLDER", help="run folders")
    p.add_argument("--until", type=int, default=None, metavar="N",
                   help="only the windows ending at iteration N or before (default: all)")
    args = p.parse_args(argv)
    if args.until is not None and args.until < 1:
        p.error(f"--until: expected a positive iteration, got {args.until}")
    runs = [load(folder) for folder in args.folders]
    if None in runs:
        return 1
    for run in runs[1:]:
        if phases(run.config) != phases(runs[0].config):
            print(f"error: {run.folder}: another schedule than {runs[0].folder}'s "
                  f"({plot_curves.schedule(run.config)}, lr {run.config['lr']:g}, against "
                  f"{plot_curves.schedule(runs[0].config)}, lr {runs[0].config['lr']:g}); "
                  "expected runs of one schedule", file=sys.stderr)
            return 1
    until = args.until or max(r.config["iters"] for r in runs)
    print(table(runs, until))
    return 0


if __name__ == "__main__":
    sys.exit(main())
