"""Section 4.2 of He et al. 2015, "Deep Residual Learning for Image Recognition", at the paper's
scale: every CIFAR-10 net of Table 6 and Figure 6 trained by run.py, then Table 6 and Figures 6
and 7 made from the runs by plot_curves.py.

    python reproduce.py                            # the whole matrix, one run at a time
    python reproduce.py --jobs 2 --amp bf16        # two at a time, the CPU cores split between them
    python reproduce.py --only resnet56 plain56    # some of it
    python reproduce.py --seeds 5 --only resnet110 # seeds 0-4 (the paper's ResNet-110 row)
    python reproduce.py --print                    # the commands, for another scheduler
    python reproduce.py --iters 6400 -- --eval-every 200   # flags after -- go to every run.py

Each run is the command a user would type, `python run.py 9 train --plain`, then the matching
`run.py 9 test --plain` for Figure 7's layer responses, with their output in <logdir>/<name>.log
and the run in run.py's usual folder <logdir>/<name>/. Rerunning skips the finished runs and
resumes the interrupted ones from their checkpoints.
"""
import argparse
import collections
import contextlib
import ctypes
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import cli
import plot_curves
import run
from experiment import ADDED_KEYS, EXPERIMENT_KEYS, MATRIX, SPEED, with_added_defaults
from plumbing import usable_cores

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_PY = os.path.join(HERE, "run.py")
POLL_SECONDS = 0.2     # how often finished processes are noticed
REFRESH_SECONDS = 5.0  # how often a terminal's overview is redrawn
MAX_JOBS = 1024   # runs at a time: more than any machine runs of these trainings at once
MAX_SEEDS = 1000  # seeds of each net: 10,000 runs of the matrix; more is a typo
# run.py's settings that make a run one entry of the matrix (with its N and mode): given after
# --, they would apply to every entry alike and make entries share a folder.
ENTRY_FLAGS = {"plain": "--plain", "shortcut": "--shortcut", "seed": "--seed", "name": "--name"}
# run.py test's own files: given after --, every entry's test would write, or test, one file.
TEST_FLAGS = {"out": "--out", "checkpoint": "--checkpoint"}
# run.py's settings of where a run goes: given after --, the jobs are not placed by reproduce.py.
PLACEMENT_FLAGS = {"device": "--device", "threads": "--threads"}


@dataclass
class PlannedRun:
    """One run of the matrix: its run.py commands (argument lists) and where they are."""
    folder: str    # run.py's run folder
    log: str       # where the commands' output goes
    iters: int
    batch_size: int
    commands: list  # [train, test]
    config: dict = None  # the experiment settings of its train command (run.py's EXPERIMENT_KEYS)
    todo: list = field(default_factory=list)  # the commands still to run, in order
    state: str = "waiting"  # waiting, running, done, failed, stopped
    process: subprocess.Popen = None
    phase: str = None       # "train" or "test" while running
    env: dict = None        # the environment of its processes (the GPU it is given)
    returncode: int = None

    @property
    def name(self):
        return os.path.basename(self.folder)


# ---------------------------------------------------------------- the commands

def whole_number_up_to(limit):
    """An argparse type: a whole number from 1 to `limit`."""
    def parse(text):
        value = cli.positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {limit}, "
                                             f"got {text}")
        return value
    return parse


def build_parser():
    p = argparse.ArgumentParser(
        description="Train and evaluate the CIFAR-10 matrix of He et al. 2015 (Sec. 4.2) with "
                    "run.py, then make Table 6 and Figures 6 and 7. Arguments after -- are "
                    "passed to every run.py command: flags that every run shares, not N, "
                    "--plain, --shortcut, --seed or --name, which the entries set, nor "
                    "--out, --checkpoint or --help (python run.py --help lists them).")
    p.add_argument("--only", nargs="+", choices=list(MATRIX), metavar="NAME",
                   help="these nets only, from: " + " ".join(MATRIX))
    p.add_argument("--seeds", type=whole_number_up_to(MAX_SEEDS), default=1,
                   help="seeds 0..K-1 of each net (default: %(default)s)")
    p.add_argument("--jobs", type=whole_number_up_to(MAX_JOBS), default=1,
                   help="runs at a time (no more than there are runs); on CPU they split the "
                        "cores, on G GPUs job slot i uses GPU i mod G (default: %(default)s)")
    p.add_argument("--print", action="store_true",
                   help="print the commands, one run a line, and run nothing")
    p.add_argument("--out", default="out", help="folder for Table 6 and the figures "
                                                "(default: %(default)s)")
    to_run = p.add_argument_group("passed to run.py (its defaults when not given)")
    to_run.add_argument("--iters", type=cli.positive_int)
    to_run.add_argument("--amp", choices=("none", "bf16"))
    to_run.add_argument("--compile", action="store_true")
    to_run.add_argument("--logdir", help="folder of the run folders (run.py's default: logs)")
    to_run.add_argument("--data-dir", help="run.py's default: $CIFAR10_DIR, else "
                                           "data/cifar-10-batches-bin")
    to_run.add_argument("--download", action="store_true")
    return p


def usage_error(message):
    """Exit 2 with reproduce.py's usage and `message`, as argparse does."""
    build_parser().error(message)


def parse_args(argv=None):
    """reproduce.py's options, and the run.py arguments given after `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:split], argv[split + 1:]
    options = build_parser().parse_args(argv)
    check_run_arguments(extra)
    return options, extra


def check_run_arguments(extra):
    """Refuse, after --, help (it would be run.py's under this script's name) and whatever
    makes a run the entry it is (N, the mode, ENTRY_FLAGS): each would apply to every entry
    alike, so that entries would share one folder. The rest is parsed as run.py parses it,
    its errors reported as reproduce.py's usage errors."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if arg == "-h" or (len(flag) > 2 and "--help".startswith(flag)):
            usage_error(f"{arg} after --: this would be run.py's help; see python run.py --help "
                        "for the flags to pass after --")
    given, rest = run_flags_given(extra)
    for dest, flag in ENTRY_FLAGS.items():
        if dest in given:
            usage_error(f"{flag} after --: it would apply to every entry alike and make entries "
                        "share a folder; choose the nets with --only and the seeds with --seeds")
    for dest, flag in TEST_FLAGS.items():
        if dest in given:
            usage_error(f"{flag} after --: every entry's run.py test would share that file; "
                        "each test writes its run folder's test.json")
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        usage_error(f"after --: run.py has no option {unknown[0]}")
    if rest:
        usage_error(f"{' '.join(rest)} after --: each entry sets run.py's N and mode; pass "
                    "only flags after --")


def run_flags_given(extra):
    """(the run.py settings among ENTRY_FLAGS, TEST_FLAGS and PLACEMENT_FLAGS that `extra`
    gives, abbreviations too; what run.py's parser left over), parsed as run.py parses them."""
    parser = cli.build_parser()
    parser.error = lambda message: usage_error(f"after --: run.py {message}")
    watched = {**ENTRY_FLAGS, **TEST_FLAGS, **PLACEMENT_FLAGS}
    parser.set_defaults(**dict.fromkeys(watched))  # None: not given
    parsed, rest = parser.parse_known_args(["1", "train", *extra])
    return {dest for dest in watched if getattr(parsed, dest) is not None}, rest


def selected_nets(options):
    """The names of the nets to train, in the matrix's order."""
    return [name for name in MATRIX if name in (options.only or MATRIX)]


def training_commands(options, extra, threads):
    """run.py's argument list for each run, in the order they run: seed by seed, the matrix."""
    flags = []
    for flag in ("iters", "amp", "logdir", "data_dir"):
        if getattr(options, flag) is not None:
            flags += [f"--{flag.replace('_', '-')}", str(getattr(options, flag))]
    flags += ["--compile"] * options.compile + ["--download"] * options.download
    flags += ["--threads", str(threads)] if threads else []
    commands = []
    for seed in range(options.seeds):
        for name in selected_nets(options):
            n, plain = MATRIX[name]
            commands.append([str(n), "train", *["--plain"] * plain, *flags,
                             *(["--seed", str(seed)] if seed else []), *extra])
    return commands


def plan(options, extra, threads=None):
    """The runs, each as run.py names its folder (the same parser, so the two never disagree)."""
    runs = []
    for train in training_commands(options, extra, threads):
        args = run.parse_args(train)
        folder = os.path.join(args.logdir, args.name)
        test = [train[0], "test", *train[2:]]
        runs.append(PlannedRun(folder, f"{folder}.log", args.iters, args.batch_size, [train, test],
                               run.experiment_config(args)))
    return runs


def shell_line(command, env=None):
    """A run.py command as a user types it (from the current folder), with this interpreter, so
    that it runs as printed."""
    gpu = env.get("CUDA_VISIBLE_DEVICES") if env else None
    prefix = [f"CUDA_VISIBLE_DEVICES={gpu}"] if gpu is not None else []
    return " ".join(prefix + [shlex.join([sys.executable, os.path.relpath(RUN_PY), *command])])


def check_folders(runs):
    """Usage errors for runs that would share a folder, and for a --logdir that is, or is
    inside, a file."""
    for folder, count in collections.Counter(r.folder for r in runs).items():
        if count > 1:
            usage_error(f"{count} runs would share the folder {folder}; each run needs its own")
    for logdir in dict.fromkeys(os.path.dirname(r.folder) for r in runs):
        path = logdir
        while path and not os.path.isdir(path):
            if os.path.lexists(path):
                where = "" if path == logdir else f" {path}"
                usage_error(f"--logdir {logdir}:{where} is a file, expected a folder")
            path = os.path.dirname(path)


def placement(jobs, runs_count, extra):
    """(threads for each run, the GPUs to spread the jobs over). On CPU the jobs split the
    cores (no flag for one job: run.py takes them all); on GPUs each job gets one through
    CUDA_VISIBLE_DEVICES, so the command stays the one a user types."""
    if run_flags_given(extra)[0] & set(PLACEMENT_FLAGS):
        return None, []
    if torch.cuda.is_available():
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = listed.split(",") if listed else range(torch.cuda.device_count())
        return None, [str(g).strip() for g in gpus][:torch.cuda.device_count()]
    jobs = min(jobs, runs_count)
    cores = usable_cores()
    return (max(1, (cores or 1) // jobs) if jobs > 1 else None), []


def another_configuration(planned):
    """Why the run folder holds a run of other experiment settings than the planned command's
    (a finished run would otherwise count as done), else None."""
    path = os.path.join(planned.folder, "config.json")
    required = [k for k in EXPERIMENT_KEYS if k not in ADDED_KEYS]  # older runs lack those
    held = plot_curves.read_json(path, required, ignored="its run cannot be checked")
    if held is None or planned.config is None:
        return None  # absent; or unreadable, and run.py refuses to resume such a folder
    planned_config = json.loads(json.dumps(planned.config))  # milestones as a list, as held
    changed = run.changed_settings(with_added_defaults(held), planned_config)
    if not changed:
        return None
    hint = ""
    if list(changed) == ["bn_batch"]:  # a run of the BN-128 default of before, most likely
        flags = ["--bn-batch", str(changed["bn_batch"][0])]
        renamed = os.path.join(os.path.dirname(planned.folder),
                               run.parse_args(planned.commands[0] + flags).name)
        hint = f"; to go on with it, rename it {renamed} and pass -- {' '.join(flags)}"
    return (f"{planned.folder} holds a run of another configuration "
            f"({run.describe_changes(changed)}){hint}; move it away or choose another --logdir")


# ---------------------------------------------------------------- running them

def settle_finished(planned):
    """What is left to do for a run: training unless result.json is there, then the test
    unless test.json is there and of the final weights (not of a checkpoint tested while the
    run trained). A run with both is done and is not started."""
    trained = os.path.exists(os.path.join(planned.folder, "result.json"))
    test = plot_curves.read_json(os.path.join(planned.folder, "test.json"), ("iteration",))
    tested = trained and test is not None and plot_curves.of_final_weights(test, planned.iters)
    planned.todo = [c for c, done in zip(planned.commands, (trained, tested)) if not done]
    planned.state = "waiting" if planned.todo else "done"


def placed(settled, commands):
    """A settled run with the commands it is to run with (its --threads); what it has done is
    still skipped (its commands left to run are always the last ones)."""
    skipped = len(settled.commands) - len(settled.todo)
    return replace(settled, commands=commands, todo=commands[skipped:])


def die_with_parent():
    """In the child: get SIGTERM if reproduce.py dies (even by SIGKILL), so that the run
    checkpoints and stops instead of training on, orphaned, with its folder locked."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_next(planned):
    """Start the run's next command, its output appended to the run's log."""
    command = planned.todo.pop(0)
    os.makedirs(os.path.dirname(planned.log) or ".", exist_ok=True)
    with open(planned.log, "a") as log:
        log.write(f"$ {shell_line(command, planned.env)}\n")
        log.flush()
        planned.process = subprocess.Popen([sys.executable, RUN_PY, *command], stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=planned.env, preexec_fn=die_with_parent)
    planned.state, planned.phase = "running", command[1]


def advance(planned, stopping):
    """Notice a run's process that ended: start its next command, or settle its state."""
    code = planned.process.poll()
    if code is None:
        return
    planned.process, planned.returncode = None, code
    if code != 0:
        planned.state = "stopped" if stopping else "failed"
    elif planned.todo and not stopping:
        start_next(planned)
    else:
        planned.state = "done" if not planned.todo else "stopped"


@contextlib.contextmanager
def forwarding_signals(runs, received):
    """SIGINT and SIGTERM go on to the running run.py processes (which checkpoint and exit);
    no run starts after one."""
    def forward(signum, frame):
        received.append(signum)
        for planned in runs:
            if planned.process is not None and planned.process.returncode is None:
                planned.process.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_all(runs, jobs, gpus, overview):
    """Run the runs' commands, `jobs` runs at a time, until all have ended or a signal came.
    Returns the signals received."""
    slots, received = [None] * min(jobs, len(runs)), []  # slot -> the run in it
    with forwarding_signals(runs, received):
        while True:
            for planned in runs:
                if planned.process is not None:
                    advance(planned, stopping=bool(received))
            slots = [r if r is not None and r.state == "running" else None for r in slots]
            waiting = [r for r in runs if r.state == "waiting"]
            for slot in [i for i, r in enumerate(slots) if r is None][:len(waiting)]:
                if received:
                    break
                planned = slots[slot] = waiting.pop(0)
                if gpus:
                    planned.env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[slot % len(gpus)])
                start_next(planned)
                if received:  # came while it started, too late to be forwarded to it
                    planned.process.send_signal(received[-1])
            overview.update(runs)
            if not any(r.state == "running" for r in runs) and (received or not waiting):
                return received
            time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------- the overview

def progress(planned):
    """(iteration, images per second) of a training run, from its event files (which run.py
    flushes every 30 s); (0, None) before the first."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a live file may end mid-record
            scalars = plot_curves.load_scalars(planned.folder)
    except OSError:
        return 0, None
    steps, speeds = scalars.get(SPEED, ([], []))
    return (steps[-1], speeds[-1]) if steps else (0, None)


def last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def state_detail(planned):
    """What the overview says of a run after its name and state."""
    if planned.state == "done":
        path = os.path.join(planned.folder, "result.json")
        error = (plot_curves.read_json(path, ("test_error",)) or {}).get("test_error")
        if isinstance(error, (int, float)) and not isinstance(error, bool):
            return f"test error {error:.2f}%"
        return "result.json unreadable" if os.path.exists(path) else ""
    if planned.state in ("failed", "stopped"):
        return f"exit {planned.returncode}: {last_line(planned.log)}"
    if planned.state == "running" and planned.phase == "test":
        return "test: layer responses (Figure 7)"
    if planned.state == "running":
        iteration, speed = progress(planned)
        line = f"{iteration:,}/{planned.iters:,} iters"
        if speed:
            left = (planned.iters - iteration) * planned.batch_size / speed
            line += f"  {speed:,.0f} img/s  {run.duration(left)} left"
        return line + (f"  (GPU {planned.env['CUDA_VISIBLE_DEVICES']})" if planned.env else "")
    return ""


def overview_lines(runs):
    counts = {s: sum(r.state == s for r in runs)
              for s in ("done", "running", "waiting", "failed", "stopped")}
    width = max(len(r.name) for r in runs)
    head = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    return [f"{time.strftime('%H:%M:%S')}  {head}"] + [
        f"  {r.name:<{width}}  {r.state:<8} {state_detail(r)}".rstrip() for r in runs]


class Overview:
    """The runs at a glance: on a terminal, redrawn in place every few seconds; elsewhere
    (a log file), printed again only when a run changes state, so that the log stays short."""

    def __init__(self, stream):
        self.stream, self.tty = stream, stream.isatty()
        self.drawn, self.states, self.drawn_at = 0, None, 0.0

    def update(self, runs):
        states = [r.state for r in runs]
        due = self.tty and time.monotonic() - self.drawn_at >= REFRESH_SECONDS
        if not (due or states != self.states):
            return
        lines = overview_lines(runs)
        if self.tty:
            columns = shutil.get_terminal_size().columns  # 80 where the terminal says 0
            lines = [line[:columns - 1] for line in lines]  # a wrapped line breaks the redraw
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the last drawing, clear
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.drawn, self.states, self.drawn_at = len(lines), states, time.monotonic()


# ---------------------------------------------------------------- main

def exit_status(runs, received):
    """The exit code, after naming each run that failed or was stopped, with its log's last
    line."""
    for planned in runs:
        if planned.state in ("failed", "stopped"):
            print(f"{planned.name} {planned.state} (exit {planned.returncode}); {planned.log} "
                  f"ends with: {last_line(planned.log)}", file=sys.stderr)
    if received:
        print(f"stopped by signal {received[0]}: rerun the same command to resume",
              file=sys.stderr)
        return 128 + received[0]
    return 1 if any(r.state != "done" for r in runs) else 0


def main(argv=None):
    options, extra = parse_args(argv)
    runs = plan(options, extra)
    check_folders(runs)
    if options.print:  # for another scheduler: every run, the cores split among all of them
        threads, _ = placement(options.jobs, len(runs), extra)
        for planned in plan(options, extra, threads):
            print(" && ".join(shell_line(command) for command in planned.commands))
        return 0
    for planned in runs:
        problem = another_configuration(planned)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    for planned in runs:
        settle_finished(planned)
    # The cores go to the runs left to do; a finished run takes none.
    threads, gpus = placement(options.jobs, sum(p.state != "done" for p in runs), extra)
    runs = [placed(settled, planned.commands)
            for settled, planned in zip(runs, plan(options, extra, threads))]
    received = run_all(runs, options.jobs, gpus, Overview(sys.stdout))
    plot_code = 0
    if not received:  # Table 6 and the figures, from whatever has finished
        logdir = os.path.dirname(runs[0].folder) or "."
        plot_code = plot_curves.main(["--logdir", logdir, "--out", options.out])
    return exit_status(runs, received) or plot_code


if __name__ == "__main__":
    sys.exit(main())
