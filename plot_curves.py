"""Figure 6, Figure 7 and Table 6 of He et al. 2015, "Deep Residual Learning for Image
Recognition" (Section 4.2, CIFAR-10), drawn from the run folders of `run.py`.

    python plot_curves.py                  # logs/ -> out/figure6, figure7 (.png, .pdf), table6.md
    python plot_curves.py --markdown-only  # only Table 6, without rendering

Figure 6: training curves of plain nets, ResNets, and ResNet-110 vs ResNet-1202 (event files),
a row of panels per schedule; the paper's schedule in the paper's layout, with its final errors.
Figure 7: std of the 3x3 layers' responses, in network order and sorted (test.json of the run's
final weights only), a column of panels per schedule.
Table 6: our test errors next to the paper's (result.json). Runs are grouped by configuration
(config.json: everything but the seed), never by folder name; unfinished runs are reported apart.
"""
import argparse
import json
import math
import os
import statistics
import sys
import textwrap
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2

from experiment import (ADDED_KEYS, CONFIG_KEYS, NUM_CLASSES, PAPER_ERROR, PAPER_SCHEDULE, RECIPE,
                        TEST_ERROR, TRAIN_ERROR, depth_of, parameter_count, with_added_defaults)
from plumbing import JSON_MAX_BYTES, why_unreadable

DEPTH_COLOURS = {20: "tab:blue", 32: "tab:orange", 44: "tab:green", 56: "tab:red",
                 110: "tab:purple", 1202: "tab:brown"}
SPARE_COLOURS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray", "black", "gold")
CURVES = {TRAIN_ERROR, TEST_ERROR}
# Figure 6's panels, left to right, and the nets the paper draws in each, as (plain, depth).
PANELS = {"plain nets": [(True, 20), (True, 32), (True, 44), (True, 56)],
          "ResNets": [(False, 20), (False, 32), (False, 44), (False, 56), (False, 110)],
          "ResNet-110 vs ResNet-1202": [(False, 110), (False, 1202)]}
PAPER_ERROR_AXIS_TOP = 20  # Figure 6's error axis in the paper: 0-20%
FIGURE7_NETS = {(True, 20), (True, 56), (False, 20), (False, 56), (False, 110)}  # (plain, depth)
# The largest files read from a run folder: run.py's JSON files are a few KiB; its event files
# 0.15 MB at its defaults, 15 MB logging every iteration of the paper's schedule.
EVENT_FILE_MAX_BYTES = 256 * 2 ** 20


def is_int(value, least=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


COUNT, POSITIVE = ("an integer >= 0", is_int), ("an integer >= 1", lambda v: is_int(v, 1))
MAX_N = 100_000  # blocks per stage: far beyond any net trained (ResNet-1202 has 200)
NUMBER, STRING = ("a finite number", is_number), ("a string", lambda v: isinstance(v, str))
# What the values this script uses must be, in config.json, result.json and test.json alike.
FIELD_TYPES = {
    "n": (f"an integer from 1 to {MAX_N:,}", lambda v: is_int(v, 1) and v <= MAX_N),
    "plain": ("true or false", lambda v: isinstance(v, bool)),
    "shortcut": ('"A" or "B"', lambda v: v in ("A", "B")), "iters": POSITIVE,
    "milestones": ("a list of integers >= 0",
                   lambda v: isinstance(v, list) and all(map(is_int, v))),
    "lr": NUMBER, "batch_size": POSITIVE, "weight_decay": NUMBER, "momentum": NUMBER,
    "seed": COUNT, "val_size": COUNT, "warmup": STRING, "amp": STRING,
    "dataset": (" or ".join(NUM_CLASSES), lambda v: isinstance(v, str) and v in NUM_CLASSES),
    "bn_batch": POSITIVE, "depth": POSITIVE, "params": POSITIVE,
    "test_error": NUMBER, "iterations": COUNT, "iteration": COUNT,
    "layer_responses": ("a list of finite numbers",
                        lambda v: isinstance(v, list) and all(map(is_number, v))),
}


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- reading run folders

@dataclass
class RunRecord:
    folder: str
    config: dict
    result: dict = None  # result.json: only once training finished
    test: dict = None    # test.json: after `run.py N test`
    scalars: dict = field(default_factory=dict)  # tag -> (steps, values), steps ascending

    @property
    def depth(self):
        return depth_of(self.config["n"])

    @property
    def finished(self):
        return self.result is not None and self.result["iterations"] >= self.config["iters"]

    @property
    def iterations(self):
        if self.result is not None:
            return self.result["iterations"]
        return max((steps[-1] for steps, _ in self.scalars.values()), default=0)

    @property
    def tested_final_weights(self):
        return of_final_weights(self.test, self.config["iters"])

    def test_error(self):
        """(error %, iteration): the final one, or for an unfinished run its last evaluation."""
        if self.finished:
            return self.result["test_error"], self.result["iterations"]
        steps, values = self.scalars.get(TEST_ERROR, ([], []))
        return (values[-1], steps[-1]) if steps else (None, None)


def of_final_weights(test, iters):
    """Whether a test.json is of its run's final weights. run.py says so in it since it tests
    runs in training; the test.json files written before were all of final weights, and are
    recognised by their iteration, the run's last."""
    if "final_weights" in test:
        return test["final_weights"] is True
    return test.get("iteration") == iters


def read_json(path, required, ignored="ignored"):
    """The dict in `path`, or None when absent; a file that is not a small regular file, is
    damaged, foreign, or has a value of the wrong type (FIELD_TYPES) is reported as `ignored`."""
    if not os.path.lexists(path) or not safe_to_read(path, JSON_MAX_BYTES, ignored):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        warn(f"{path}: unreadable ({e}); {ignored}")
        return None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        warn(f"{path}: not written by run.py (missing {', '.join(missing)}); {ignored}")
        return None
    problem = wrong_type(data)
    if problem:
        warn(f"{path}: {problem}; {ignored}")
        return None
    return data


def safe_to_read(path, max_bytes, ignored="ignored"):
    """Whether `path` is a regular file of at most `max_bytes`; if not, a warning says why."""
    problem = why_unreadable(path, max_bytes)
    if problem:
        warn(f"{problem}; {ignored}")
    return problem is None


def wrong_type(data):
    """'<key> is <value>, expected <type>' for the first value of `data` that FIELD_TYPES
    refuses, else None."""
    for key, (expected, valid) in FIELD_TYPES.items():
        if key in data and not valid(data[key]):
            shown = json.dumps(data[key])
            shown = shown if len(shown) <= 40 else shown[:36] + " ..."
            return f"{key} is {shown}, expected {expected}"
    return None


def contradiction(config):
    """Why a config.json's n, plain, shortcut and dataset make another net than its own depth
    and params say (n edited by hand), else None."""
    n, depth = config["n"], depth_of(config["n"])
    params = parameter_count(n, config["plain"], config["shortcut"], NUM_CLASSES[config["dataset"]])
    if (config["depth"], config["params"]) == (depth, params):
        return None
    return (f"n {n} makes a net of depth {depth} with {params:,} parameters, but it says depth "
            f"{config['depth']} with {config['params']:,}")


def read_event_file(path):
    """(wall time, path, start step, [(tag, step, value)]) of one event file. The start step is
    the purge step of a resumed writer (its SessionLog START), else its first scalar's step."""
    wall_time, start, records, consumed = None, None, [], 0
    size = os.path.getsize(path)  # before reading: a live run may append meanwhile
    try:
        for raw in RawEventFileLoader(path).Load():  # stops quietly at a damaged record
            event = event_pb2.Event.FromString(raw)
            consumed += len(raw) + 16  # TFRecord framing: length, its CRC, data, data CRC
            wall_time = event.wall_time if wall_time is None else wall_time
            if event.WhichOneof("what") == "session_log" and \
                    event.session_log.status == event_pb2.SessionLog.START:
                start = event.step
            records += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                        if v.WhichOneof("value") == "simple_value"]
    except DecodeError:
        pass  # reported below, like any other damage
    if consumed < size:  # so a damaged file is named instead of silently cut short
        warn(f"{path}: corrupted or truncated event file (readable up to byte {consumed:,} of "
             f"{size:,}); using the {len(records)} scalars before that")
    if start is None and records:
        start = min(step for _, step, _ in records)
    return wall_time, path, start, finite(path, records)


def finite(path, records):
    """The records [(tag, step, value)] with a finite value; the others are named in a warning,
    so that a NaN of a diverged run neither draws nor sets an axis."""
    dropped = sorted({tag for tag, _, value in records if not math.isfinite(value)})
    if not dropped:
        return records
    kept = [record for record in records if math.isfinite(record[2])]
    warn(f"{path}: {len(records) - len(kept)} non-finite values ({', '.join(dropped)}) left out "
         "of its curves")
    return kept


def load_scalars(folder):
    """Scalars of all event files in `folder`, merged as TensorBoard's purge does: files in the
    order they were opened; each drops earlier files' steps >= its start step, and wins ties."""
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if "tfevents" in name]
    files = [read_event_file(path) for path in paths if safe_to_read(path, EVENT_FILE_MAX_BYTES)]
    merged = {}  # tag -> {step: value}
    for _, _, start, records in sorted(f for f in files if f[0] is not None):
        if start is not None:
            for points in merged.values():
                for step in [s for s in points if s >= start]:
                    del points[step]
        for tag, step, value in records:
            merged.setdefault(tag, {})[step] = value
    return {tag: (sorted(points), [points[s] for s in sorted(points)])
            for tag, points in merged.items() if points}


def find_runs(logdir):
    """Every run folder <logdir>/<name>/ (with a config.json), copies of one run counted once;
    dot-folders like .replaced/ are not runs."""
    runs = []
    for name in sorted(os.listdir(logdir)):
        folder = os.path.join(logdir, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        config = read_config(folder)
        if config is None:
            continue  # read_config said why
        run = read_run(folder, config)
        if not CURVES & run.scalars.keys():
            warn(f"{folder}: no training curves in its event files; left out of Figure 6")
        runs.append(run)
    return one_per_seed(runs)


def read_run(folder, config):
    """The run in `folder` whose config.json is `config` (read_config's)."""
    return RunRecord(
        folder, config,
        read_json(os.path.join(folder, "result.json"), ("test_error", "iterations")),
        read_json(os.path.join(folder, "test.json"), ("test_error", "layer_responses")),
        load_scalars(folder))


def read_config(folder):
    """A run folder's config.json as of today (with_added_defaults), or None, said why."""
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):
        warn(f"{folder}: no config.json, not a run folder; skipped")
        return None
    required = tuple(k for k in CONFIG_KEYS if k not in ADDED_KEYS) + ("seed", "depth", "params")
    config = read_json(path, required, ignored="run folder skipped")
    if config is None:
        return None
    config = with_added_defaults(config)
    problem = contradiction(config)
    if problem:
        warn(f"{path}: {problem} (edited by hand?); run folder skipped")
        return None
    return config


def one_per_seed(runs):
    """`runs` with one run per computation: two folders of one configuration and seed, begun on
    the same processor and device the same way (`computation`), are copies of one run (a
    backup), counted once; the one trained furthest is kept, of those the one with the most of
    its files (test.json, curves), then the first by name. The same seed computed otherwise is a
    run of its own: other kernels, `--compile` or TF32 round otherwise, and a run that rounds
    otherwise takes a course of its own (ResNet-56's two such runs parted within the first hundred
    iterations)."""
    kept = {}
    for run in sorted(runs, key=lambda r: (not r.finished, -r.iterations, r.test is None,
                                           not r.scalars, r.folder)):
        key = configuration(run.config) + (run.config["seed"],) + computation(run.config)
        if key in kept:
            warn(f"{run.folder}: the same configuration and seed ({run.config['seed']}), begun "
                 f"the same way on the same processor as {kept[key].folder}: copies of one run, "
                 f"counted once, as {kept[key].folder}")
        else:
            kept[key] = run
    kept_runs = {id(run) for run in kept.values()}
    return [run for run in runs if id(run) in kept_runs]


def computation(config):
    """What besides the configuration and seed decides a run's rounding, as config.json records
    it: `--compile`, and its start's processor, device and TF32 (None where older runs did not
    record them)."""
    start = config.get("start")
    start = start if isinstance(start, dict) else {}
    recorded = [start.get("processor"), start.get("device"), start.get("tf32")]
    return (config.get("compile") is True,) + tuple(
        value if isinstance(value, (str, bool)) else None for value in recorded)


# ---------------------------------------------------------------- configurations

def configuration(config):
    values = dict(config, milestones=tuple(config["milestones"]))
    if config["plain"]:
        values["shortcut"] = None  # a plain net has no shortcut to choose
    return tuple(values[k] for k in CONFIG_KEYS)


def group(runs):
    """Runs of one configuration together (seeds): the paper's schedule first, then longer
    schedules before shorter ones; within one, ResNets before plain nets, by depth."""
    groups = {}
    for run in runs:
        groups.setdefault(configuration(run.config), []).append(run)
    return sorted(groups.values(), key=lambda g: (
        schedule_key(g[0].config) != PAPER_SCHEDULE, -g[0].config["iters"],
        g[0].config["plain"], g[0].depth, label(g[0].config)))


def label(config, *extra, depth=True, with_schedule=True, differ=()):
    """e.g. 'ResNet-56', 'ResNet-56 (option B, bf16)': the net and how its configuration departs
    from the paper's CIFAR recipe (the schedule too, unless `with_schedule` is False), then any
    `extra` notes. Where runs differ in precision or batch norm's batch (`differ`, from
    `differing`), each label says its own: float32 too, and the BN batch."""
    notes = []
    if not config["plain"] and config["shortcut"] != "A":
        notes.append(f"option {config['shortcut']}")
    if config["amp"] != "none":
        notes.append(config["amp"])
    elif "amp" in differ:
        notes.append("float32")
    if "bn_batch" in differ:
        notes.append(f"BN {config['bn_batch']}")
    notes += [f"{k} {config[k]}" for k, v in RECIPE.items() if config[k] != v]
    if with_schedule and schedule_key(config) != PAPER_SCHEDULE:
        notes.append(schedule(config))
    notes += [e for e in extra if e]
    name = "plain" if config["plain"] else "ResNet"
    name += f"-{depth_of(config['n'])}" if depth else ""
    return f"{name} ({', '.join(notes)})" if notes else name


def differing(runs):
    """The settings among precision (amp) and batch norm's batch (run.py --bn-batch) in which
    the runs differ: only then do the labels say each one's."""
    return {key for key in ("amp", "bn_batch") if len({run.config[key] for run in runs}) > 1}


def schedule_key(config):
    return config["iters"], tuple(config["milestones"])


def schedule(config):
    return f"{config['iters']:,} iters, lr/10 at " + "/".join(map("{:,}".format,
                                                                  config["milestones"]))


def median_run(runs, error):
    """The run to draw for several seeds: the median by `error` (the lower of the middle two
    for an even count), among finished runs when there are any."""
    pool = sorted([r for r in runs if r.finished] or runs,
                  key=lambda r: (error(r) is None, error(r) or 0.0))
    return pool[(len(pool) - 1) // 2], len(pool)


# ---------------------------------------------------------------- Table 6

def format_error(best, mean_std=None):
    """'6.43', or as the paper gives several runs: 'best (mean±std)', e.g. '6.43 (6.61±0.16)'."""
    return f"{best:.2f}" + (f" ({mean_std[0]:.2f}±{mean_std[1]:.2f})" if mean_std else "")


def comparable_with_paper(config):
    """The paper's Table 6 has residual nets with option A, trained with its recipe and its
    whole schedule; other runs get no paper figure to be measured against (bf16 does)."""
    return (not config["plain"] and config["shortcut"] == "A"
            and schedule_key(config) == PAPER_SCHEDULE
            and all(config[k] == v for k, v in RECIPE.items()))


def table6(runs):
    """Table 6 as markdown: one row per configuration's finished seeds, one per unfinished run."""
    rows, differ = [], differing(runs)
    for runs_of_config in group(runs):
        config = runs_of_config[0].config
        depth, params = depth_of(config["n"]), f"{config['params'] / 1e6:.2f}M"
        paper = PAPER_ERROR.get(depth) if comparable_with_paper(config) else None
        paper_cell = format_error(*paper) if paper else "-"
        errors = [r.result["test_error"] for r in runs_of_config if r.finished]
        if errors:
            ours = (min(errors), (statistics.mean(errors), statistics.stdev(errors))
                    if len(errors) > 1 else None)
            diff = "-"
            if paper:
                diff = f"{ours[0] - paper[0]:+.2f}"
                if ours[1] and paper[1]:
                    diff += f" ({ours[1][0] - paper[1][0]:+.2f})"
            rows.append([label(config, depth=False, differ=differ), depth, params, format_error(*ours),
                         paper_cell, diff, len(errors), f"{config['iters']:,}"])
        for run in runs_of_config:
            if not run.finished:
                error, step = run.test_error()
                unfinished = f"unfinished: {run.iterations:,} / {config['iters']:,} iters"
                ours = "-" if error is None else f"{error:.2f} (last eval, iter {step:,})"
                rows.append([label(config, unfinished, depth=False, differ=differ), depth, params, ours,
                             paper_cell, "-", 1, f"{run.iterations:,}"])
    header = ["method", "depth", "# params", "test error (%)", "paper (%)", "difference",
              "runs", "iterations"]
    lines = ["| " + " | ".join(map(str, row)) + " |" for row in [header, ["---"] * 8] + rows]
    return "\n".join([
        "Table 6: CIFAR-10 test error of He et al. 2015, Section 4.2, and ours.", "", *lines, "",
        "Test error at the end of training. Several seeds: best (mean±std), std with ddof=1 "
        "(sample std). Difference: ours - paper, best vs best (mean vs mean). The paper's "
        "figure is given only for what its Table 6 reports: residual nets with option A, "
        "trained with its recipe and whole schedule (\"-\" otherwise: plain nets, option B, "
        "shorter schedules, other hyper-parameters). Unfinished runs: their last test "
        "evaluation, never averaged with finished runs.", ""])


# ---------------------------------------------------------------- figures

def colours(configs):
    """One colour per depth (plain and residual nets differ by panel or line style); a second
    configuration of the same net, e.g. option B, takes a spare colour."""
    out, seen, spare = [], set(), iter(SPARE_COLOURS * len(configs))
    for config in configs:
        net = (config["plain"], depth_of(config["n"]))
        out.append(next(spare) if net in seen or net[1] not in DEPTH_COLOURS
                   else DEPTH_COLOURS[net[1]])
        seen.add(net)
    return out


def figure6(runs, ylim=None):
    """Figure 6 (a matplotlib Figure; None when no run has curves): panels of plain nets,
    ResNets, and ResNet-110 vs 1202, as in the paper; one row of panels per schedule, so that
    runs of different lengths never share an axis. The paper's schedule comes first, with all
    three panels, its error axis (0-20%) and its final test errors marked; a panel there names
    the command that trains the nets it lacks. Rows of other schedules show their error axis
    over `ylim`, else from 0 to above their final errors."""
    rows = panels_by_schedule(runs)
    if not rows:
        return None
    from matplotlib.figure import Figure  # lazily: --markdown-only renders nothing
    columns = [title for title in PANELS if any(title in panels for panels in rows.values())]
    fig = Figure(figsize=(5.5 * len(columns), 4.6 * len(rows)), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.15)  # room for the paper's marks right of a panel
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for row_axes, ((iters, milestones), panels) in zip(axes, rows.items()):
        paper_row = (iters, milestones) == PAPER_SCHEDULE
        drawn_runs = [run for drawn in panels.values() for run, _ in drawn]
        if paper_row or ylim is None:
            row_ylim = (0, error_axis_top(drawn_runs, PAPER_ERROR_AXIS_TOP if paper_row else 10))
        else:
            row_ylim = ylim
        for ax, title in zip(row_axes, columns):  # a panel keeps its column in every row
            if title not in panels:
                ax.remove()
                continue
            heading = title
            if len(rows) > 1:
                heading += "\nthe paper's schedule" if paper_row else \
                    f"\n{schedule(dict(iters=iters, milestones=milestones))}"
            draw_curves(ax, heading, panels[title], row_ylim, iters,
                        with_schedule=len(rows) == 1, paper_marks=paper_row,
                        differ=differing(runs))
            if paper_row:
                note_missing_nets(ax, PANELS[title], panels[title],
                                  drawn_runs[0].config if drawn_runs else None)
    fig.suptitle("Figure 6: training on CIFAR-10 (He et al. 2015, Sec. 4.2)")
    caption = ("Dashed: training error (running average over the logging window); bold: test "
               "error. Several seeds: the run with the median final test error is drawn.")
    if PAPER_SCHEDULE in rows:
        caption += (" Bars right of a panel: the paper's final test error (Table 6; "
                    "ResNet-110: the best of 5 runs, whose mean is 6.61%); it gives none for "
                    "the plain nets.")
    fig.supxlabel(textwrap.fill(caption, width=int(95 * len(columns) ** 0.8)), fontsize="small")
    return fig


def panels_by_schedule(runs):
    """schedule -> panel title -> [(run, seeds)]: the median seed of each configuration with
    curves, in group()'s order (the paper's schedule first). The paper's schedule keeps all
    three panels, empty or not; other schedules only those with runs, and ResNet-110 vs
    ResNet-1202 only with a ResNet-1202 (without it, it would only repeat ResNet-110)."""
    rows = {}
    for runs_of_config in group([r for r in runs if CURVES & r.scalars.keys()]):
        run, count = median_run(runs_of_config, lambda r: r.test_error()[0])
        panels = rows.setdefault(schedule_key(run.config), {title: [] for title in PANELS})
        if run.config["plain"]:
            panels["plain nets"].append((run, count))
        else:
            if run.depth != 1202:
                panels["ResNets"].append((run, count))
            if run.depth in (110, 1202):
                panels["ResNet-110 vs ResNet-1202"].append((run, count))
    for key, panels in rows.items():
        if key != PAPER_SCHEDULE:
            if not any(run.depth == 1202 for run, _ in panels["ResNet-110 vs ResNet-1202"]):
                panels["ResNet-110 vs ResNet-1202"] = []
            rows[key] = {title: drawn for title, drawn in panels.items() if drawn}
    for title in PANELS:
        if not any(title in panels for panels in rows.values()):
            needs = "ResNet-1202 run" if "1202" in title else "run"
            print(f"figure 6: panel '{title}' left out: no {needs} with training curves")
    return rows


def error_axis_top(runs, lowest):
    """The top of a row's error axis (%): `lowest`, or the next 10 above the highest error a
    finished run's curves end at (any run's, while none has finished), so that no final error
    is off the chart."""
    def ends(pool):
        return [run.scalars[tag][1][-1] for run in pool for tag in CURVES & run.scalars.keys()]
    highest = max(ends([run for run in runs if run.finished]) or ends(runs) or [0])
    return max(lowest, 10 * math.ceil((highest + 2) / 10))


def draw_curves(ax, title, drawn, ylim, iters, with_schedule, paper_marks, differ=()):
    """One panel of Figure 6: each run's test error (bold) and training error (dashed), and
    with `paper_marks` the paper's final test error as a bar on the right edge, once per depth
    (in the colour of the first run of that depth)."""
    marked = set()  # depths whose paper bar is drawn
    for (run, count), colour in zip(drawn, colours([r.config for r, _ in drawn])):
        legend = label(run.config, f"median of {count}" if count > 1 else "",
                       "" if run.finished else f"unfinished: {run.iterations:,} iters",
                       with_schedule=with_schedule, differ=differ)
        for tag, style in ((TEST_ERROR, dict(lw=2.2)), (TRAIN_ERROR, dict(lw=1, ls="--"))):
            if tag in run.scalars:  # the legend entry goes on the bold line when there is one
                steps, values = run.scalars[tag]
                ax.plot([s / 1e4 for s in steps], values, color=colour, label=legend, **style)
                legend = None
        if paper_marks and comparable_with_paper(run.config) and run.depth in PAPER_ERROR \
                and run.depth not in marked:
            # a short bar just right of the panel: the paper's errors lie a few tenths apart
            marked.add(run.depth)
            ax.hlines(PAPER_ERROR[run.depth][0], 1.0, 1.03, transform=ax.get_yaxis_transform(),
                      colors=colour, linewidths=2.5, clip_on=False)
    ax.set(title=title, xlabel="iter. (1e4)", ylabel="error (%)", xlim=(0, iters / 1e4),
           ylim=ylim)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="upper right", fontsize="small")


def note_missing_nets(ax, nets, drawn, config):
    """In a panel of the paper's schedule: which of the paper's `nets` [(plain, depth)] it
    lacks, and the reproduce.py command that trains them (like `config`'s run, if any)."""
    present = {(run.config["plain"], run.depth) for run, _ in drawn}
    missing = [net for net in nets if net not in present]
    if not missing:
        return
    command = "python reproduce.py --only " + " ".join(
        f"{'plain' if plain else 'resnet'}{depth}" for plain, depth in missing)
    if config is not None and config["amp"] != "none":
        command += f" --amp {config['amp']}"
    if drawn:  # bottom left: no training error is that low before the first lr drop
        names = ", ".join(f"{'plain' if plain else 'ResNet'}-{depth}" for plain, depth in missing)
        note = textwrap.fill(f"not run yet: {names}:", 44) + "\n" + textwrap.fill(command, 44)
        ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize="x-small", color="dimgray")
    else:
        ax.text(0.5, 0.5, "no run yet:\n" + textwrap.fill(command, 40), transform=ax.transAxes,
                ha="center", va="center", color="dimgray")


def figure7(runs):
    """Figure 7 (a matplotlib Figure; None without test.json): std of each 3x3 layer's response,
    in network order (top) and sorted by magnitude (bottom), on a log axis so that close
    values stay apart; one column per schedule, so that nets trained for different lengths
    never share a panel."""
    columns, other_nets = {}, []  # schedule -> [(run, seeds)]
    tested = [r for r in runs if r.test is not None]
    for run in tested:
        if not run.tested_final_weights:
            iteration, iters = run.test.get("iteration"), run.config["iters"]
            where = "" if iteration is None else f" of iteration {iteration:,} of {iters:,}"
            if run.test.get("in_training"):
                where += ", tested while the run was training"
            warn(f"{os.path.join(run.folder, 'test.json')}: not of the run's final weights"
                 f"{where}; left out of Figure 7 (`run.py N test` again once the run has "
                 "finished)")
    for runs_of_config in group([r for r in tested if r.tested_final_weights]):
        run, count = median_run(runs_of_config, lambda r: r.test["test_error"])
        if (run.config["plain"], run.depth) not in FIGURE7_NETS:
            other_nets.append(label(run.config))
        else:
            columns.setdefault(schedule_key(run.config), []).append((run, count))
    if other_nets:
        print("figure 7 shows the paper's plain-20/56 and ResNet-20/56/110; left out: "
              + ", ".join(other_nets))
    if not columns:
        print("figure 7 left out: no test.json with layer responses (run `run.py N test`)")
        return None
    from matplotlib.figure import Figure
    fig = Figure(figsize=(1 + 7 * len(columns), 6.5), layout="constrained")
    axes = fig.subplots(2, len(columns), squeeze=False)
    for (top, bottom), drawn in zip(axes.T, columns.values()):
        config = drawn[0][0].config
        for (run, count), colour in zip(drawn, colours([r.config for r, _ in drawn])):
            legend = label(run.config, f"median of {count}" if count > 1 else "",
                           with_schedule=len(columns) == 1, differ=differing(runs))
            responses = run.test["layer_responses"]
            style = dict(color=colour, lw=1.6, ls="--" if run.config["plain"] else "-",
                         label=legend)
            top.plot(range(1, len(responses) + 1), responses, **style)
            bottom.plot(range(1, len(responses) + 1), sorted(responses, reverse=True), **style)
        if len(columns) > 1:
            top.set_title("the paper's schedule" if schedule_key(config) == PAPER_SCHEDULE
                          else schedule(config))
        top.set(xlabel="layer index (original)", ylabel="std")
        bottom.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
        for ax in (top, bottom):
            log_axis(ax)
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right", fontsize="small")
    fig.suptitle("Figure 7: std of layer responses on CIFAR-10 (3x3 layers, after BN, before "
                 "ReLU/addition; log scale)")
    return fig


def log_axis(ax):
    """A log y axis labelled 0.5, 0.7, 1, 2, 3... rather than in powers of ten, and whole layer
    numbers on the x axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5, 7)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Figure 6, Figure 7 and Table 6 of He et al. 2015 "
                                            "(Sec. 4.2) from run.py's run folders.")
    p.add_argument("--logdir", default="logs", help="folder of run folders (default: %(default)s)")
    p.add_argument("--out", default="out", help="folder for the outputs (default: %(default)s)")
    p.add_argument("--ylim", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="figure 6's error axis in %% for schedules other than the paper's "
                        "(default: from 0 to above their final errors); the paper's schedule "
                        "keeps the paper's 0 20, raised only if a run ends above 18 (2 points below "
                        "the top keep a final error clear of the frame)")
    p.add_argument("--markdown-only", action="store_true",
                   help="write only table6.md, without matplotlib (for scripts)")
    args = p.parse_args(argv)
    if args.ylim and not (math.isfinite(args.ylim[0]) and math.isfinite(args.ylim[1])
                          and args.ylim[0] < args.ylim[1]):
        p.error("--ylim: expected two finite numbers LO < HI, got %g %g" % tuple(args.ylim))
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.logdir):
        problem = "not a folder" if os.path.exists(args.logdir) else "no such folder"
        print(f"error: --logdir {args.logdir}: {problem}", file=sys.stderr)
        return 1
    try:
        runs = find_runs(args.logdir)
    except OSError as e:
        print(f"error: cannot read {e.filename} ({e.strerror or e})", file=sys.stderr)
        return 1
    if not runs:
        hint = (" (it is a run folder itself: pass its parent)"
                if os.path.exists(os.path.join(args.logdir, "config.json")) else "")
        print(f"error: no runs found in logdir {args.logdir}{hint}", file=sys.stderr)
        return 1
    table = table6(runs)
    print(table)
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table6.md"), "w") as f:
            f.write(table)
        written = ["table6.md"]
        if not args.markdown_only:
            for name, fig in (("figure6", figure6(runs, args.ylim)), ("figure7", figure7(runs))):
                for ext in ("png", "pdf") if fig is not None else ():
                    fig.savefig(os.path.join(args.out, f"{name}.{ext}"), dpi=150)
                    written.append(f"{name}.{ext}")
    except OSError as e:
        print(f"error: --out {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
