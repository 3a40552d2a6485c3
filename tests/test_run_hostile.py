"""run.py against hostile input: damaged, foreign and booby-trapped checkpoints, checkpoint writes
cut short, repeated kill -9, bad flag values, unusable run folders, two runs on one folder.

Every outcome is either a correct run or a one-line error (exit 2 for usage errors, 1 at run
time) that names the culprit: never a traceback, never a lost or overwritten good checkpoint."""
import copy
import io
import json
import os
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import types

import pytest
import torch

import cli
import plot_curves
import plumbing
import run
from conftest import ROOT
from resnet import ResNet
from test_run import assert_same_state, checkpoint_of, sigterm_after

ITERS = 24  # the lr drops at 12 and 18, so resumed runs cross both
FLAGS = ["--iters", str(ITERS), "--log-every", "4", "--ckpt-every", "4", "--eval-every", "1000",
         "--threads", "2"]
NAME = f"resnet8-iters{ITERS}"
STOP_AT = 10  # where the stopped run's checkpoint is: between two --ckpt-every checkpoints
FILE_SIZE_LIMIT = 200_000  # bytes: above config.json and the event file, below a checkpoint


@pytest.fixture(scope="module", autouse=True)
def no_git_index_lock():
    """run.py records `git status`; a git killed with it must not leave the repo's index locked."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GIT_OPTIONAL_LOCKS", "0")
        yield


def train(data, logdir, *extra):
    return run.main(["1", "train", "--data-dir", data, "--logdir", str(logdir), *FLAGS, *extra])


def command(*argv, setup=None):
    """run.py's command line; with `setup` (limits, signal dispositions), code the fresh
    interpreter runs first, before it runs run.py as its main script."""
    script = os.path.join(ROOT, "run.py")
    if setup is None:
        return [sys.executable, script, *map(str, argv)]
    code = (f"import resource, runpy, signal, sys\n{setup}\nsys.path.insert(0, {ROOT!r})\n"
            "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", code, script, *map(str, argv)]


def start(data, logdir, *extra, setup=None):
    return subprocess.Popen(command("1", "train", "--data-dir", data, "--logdir", logdir, *FLAGS,
                                    *extra, setup=setup),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def one_line_error(err):
    """The error, after checking it is all there is on stderr."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def usage_error(err):
    """argparse's complaint: its usage block, then one line `<prog>: error: ...`."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("usage: "), err
    assert ": error: " in lines[-1], err
    return lines[-1]


def iteration_in(folder):
    path = os.path.join(folder, "checkpoint.pt")
    return torch.load(path, weights_only=True)["iteration"] if os.path.exists(path) else 0


def no_leftovers(folder):
    return not any(".tmp-" in name for name in os.listdir(folder))


@pytest.fixture(scope="module")
def reference(synthetic_cifar, tmp_path_factory):
    """The final checkpoint of an uninterrupted run: every interrupted one must end bit-equal."""
    logdir = tmp_path_factory.mktemp("reference")
    assert train(synthetic_cifar, logdir) == 0
    return checkpoint_of(logdir / NAME)


@pytest.fixture(scope="module")
def stopped(synthetic_cifar, tmp_path_factory):
    """A run folder whose checkpoint is at iteration STOP_AT, as SIGTERM leaves it: copy it."""
    logdir = tmp_path_factory.mktemp("stopped")
    with sigterm_after(STOP_AT):
        assert train(synthetic_cifar, logdir) == 128 + signal.SIGTERM
    assert iteration_in(logdir / NAME) == STOP_AT
    return logdir / NAME


@pytest.fixture(scope="module")
def good(stopped):
    """The stopped run's checkpoint, as a state and as bytes: material for damaged copies."""
    raw = (stopped / "checkpoint.pt").read_bytes()
    return torch.load(io.BytesIO(raw), weights_only=True), raw


# ---------------------------------------------------------------- damaged and foreign checkpoints

def saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_model(edit):
    return lambda state, raw: saved({**state, "model": edit(dict(state["model"]))})


def with_momentum_of_another_shape(state, raw):
    optimizer = copy.deepcopy(state["optimizer"])
    optimizer["state"][0]["momentum_buffer"] = torch.zeros(7)
    return saved({**state, "optimizer": optimizer})


def optimizer_of(model, state):
    return run.build_optimizer(model, state["config"]).state_dict()


NOISE = random.Random(0).randbytes(1 << 20)
UNREADABLE = {  # torch.load(weights_only=True) fails
    "zero-bytes": lambda state, raw: b"",
    "first-100-bytes": lambda state, raw: raw[:100],
    "truncated-to-half": lambda state, raw: raw[:len(raw) // 2],
    "last-byte-missing": lambda state, raw: raw[:-1],
    "random-bytes": lambda state, raw: NOISE[:len(raw)],
    "zip-signature-then-random-bytes": lambda state, raw: b"PK\x03\x04" + NOISE[:len(raw)],
    "torch-save-of-the-whole-model": lambda state, raw: saved(ResNet(1)),
}
FOREIGN = {  # loads, but is not a checkpoint of this project
    "a-plain-tensor": lambda state, raw: saved(torch.zeros(3, 32, 32)),
    "a-list-holding-a-checkpoint": lambda state, raw: saved([state]),
    "another-format-number": lambda state, raw: saved({**state, "format": 2}),
    "no-weights": lambda state, raw: saved({k: v for k, v in state.items() if k != "model"}),
    "config-not-a-dict": lambda state, raw: saved({**state, "config": "n=1"}),
    "config-without-seed": lambda state, raw: saved(
        {**state, "config": {k: v for k, v in state["config"].items() if k != "seed"}}),
    "iteration-not-a-whole-number": lambda state, raw: saved({**state, "iteration": "10"}),
    "negative-iteration": lambda state, raw: saved({**state, "iteration": -4}),
    "per-pixel-mean-of-another-shape": lambda state, raw: saved(
        {**state, "per_pixel_mean": state["per_pixel_mean"][0]}),
}
MISFITS = {  # this project's format, configuration N=1, contents of another network
    "weights-of-resnet14": with_model(lambda model: ResNet(2).state_dict()),
    "weights-of-option-B": with_model(lambda model: ResNet(1, shortcut="B").state_dict()),
    "a-weight-missing": with_model(lambda model: dict(list(model.items())[1:])),
    "an-extra-weight": with_model(lambda model: {**model, "extra.weight": torch.zeros(3)}),
    "a-weight-of-another-shape": with_model(
        lambda model: {**model, "fc.weight": model["fc.weight"].t()}),
    "weights-not-a-dict": lambda state, raw: saved({**state, "model": torch.zeros(3)}),
}
MISFITS_IN_TRAINING = {  # parts that only training reads
    "optimizer-of-resnet14": lambda state, raw: saved(
        {**state, "optimizer": optimizer_of(ResNet(2), state)}),
    "a-momentum-buffer-of-another-shape": with_momentum_of_another_shape,
    "window-of-another-shape": lambda state, raw: saved({**state, "window": torch.zeros(5)}),
    "rng-state-not-bytes": lambda state, raw: saved({**state, "rng": {"torch": torch.zeros(3)}}),
}
COMPLAINTS = {"not a readable checkpoint": UNREADABLE, "not a checkpoint of this project": FOREIGN,
              "does not fit": {**MISFITS, **MISFITS_IN_TRAINING}}
DAMAGED = [pytest.param(make, complaint, id=kind)
           for complaint, cases in COMPLAINTS.items() for kind, make in cases.items()]
DAMAGED_FOR_TEST_MODE = [case for case in DAMAGED if case.id not in MISFITS_IN_TRAINING]


@pytest.mark.parametrize("make, complaint", DAMAGED)
def test_train_refuses_a_damaged_checkpoint_and_leaves_it_as_it_is(
        make, complaint, good, synthetic_cifar, tmp_path, capsys):
    folder = tmp_path / NAME
    folder.mkdir()
    path = folder / "checkpoint.pt"
    damaged = make(*good)
    path.write_bytes(damaged)
    assert train(synthetic_cifar, tmp_path) == 1
    error = one_line_error(capsys.readouterr().err)
    assert str(path) in error and complaint in error and "--fresh" in error
    assert path.read_bytes() == damaged
    assert set(os.listdir(folder)) == {"checkpoint.pt", ".lock"}  # nothing trained, nothing written


@pytest.mark.parametrize("make, complaint", DAMAGED_FOR_TEST_MODE)
def test_test_mode_refuses_a_damaged_checkpoint(make, complaint, good, synthetic_cifar, tmp_path,
                                                capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(make(*good))
    assert run.main(["1", "test", "--checkpoint", str(path), "--data-dir", synthetic_cifar]) == 1
    error = one_line_error(capsys.readouterr().err)
    assert str(path) in error and complaint in error
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no test.json


@pytest.mark.slow
def test_fresh_sets_a_damaged_checkpoint_aside_and_starts_over(synthetic_cifar, tmp_path, capsys):
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(NOISE[:1000])
    assert train(synthetic_cifar, tmp_path) == 1
    assert "--fresh" in one_line_error(capsys.readouterr().err)
    with sigterm_after(1):
        assert train(synthetic_cifar, tmp_path, "--fresh") == 128 + signal.SIGTERM
    [replaced] = os.listdir(tmp_path / ".replaced")
    assert (tmp_path / ".replaced" / replaced / "checkpoint.pt").read_bytes() == NOISE[:1000]
    assert iteration_in(folder) == 1


class Payload:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint carries."""

    def __init__(self, shell_command):
        self.shell_command = shell_command

    def __reduce__(self):
        return os.system, (self.shell_command,)


@pytest.mark.parametrize("where", ["whole-file", "among-the-weights"])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(
        where, good, synthetic_cifar, tmp_path, capsys):
    marker = tmp_path / "the-code-ran"
    payload = Payload(f"touch {shlex.quote(str(marker))}")
    state, _ = good
    folder = tmp_path / NAME
    folder.mkdir()
    path = folder / "checkpoint.pt"
    torch.save(payload if where == "whole-file" else
               {**state, "model": {**state["model"], "fc.bias": payload}}, path)
    assert train(synthetic_cifar, tmp_path) == 1
    assert run.main(["1", "test", "--checkpoint", str(path), "--data-dir", synthetic_cifar]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2  # train, then test
    assert all(f"error: {path}: not a readable checkpoint" in e for e in errors)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what weights_only prevents: the payload works
    assert marker.exists()


# ---------------------------------------------------------------- crashes and kills

@pytest.mark.slow
def test_a_checkpoint_write_cut_short_keeps_the_previous_one_and_the_resume_is_exact(
        stopped, reference, synthetic_cifar, tmp_path):
    folder = tmp_path / NAME
    shutil.copytree(stopped, folder)
    path = folder / "checkpoint.pt"
    before = path.read_bytes()
    assert len(before) > FILE_SIZE_LIMIT
    limit = f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT}))"

    # Python ignores SIGXFSZ, so the write past the limit fails with EFBIG, as on a full disk...
    code, out, err = finish(start(synthetic_cifar, tmp_path, setup=limit))
    assert code == 1 and f"resuming from iteration {STOP_AT}" in out
    error = one_line_error(err)
    assert f"{path}: cannot write checkpoint (File too large)" in error and "intact" in error
    assert path.read_bytes() == before and no_leftovers(folder)

    # ...and with the signal's default action the kernel kills the process in the middle.
    process = start(synthetic_cifar, tmp_path,
                    setup=f"{limit}\nsignal.signal(signal.SIGXFSZ, signal.SIG_DFL)")
    code, out, err = finish(process)
    assert code == -signal.SIGXFSZ, err
    assert (folder / f"checkpoint.pt.tmp-{process.pid}").stat().st_size == FILE_SIZE_LIMIT
    assert path.read_bytes() == before and iteration_in(folder) == STOP_AT

    assert train(synthetic_cifar, tmp_path) == 0
    assert no_leftovers(folder)  # the half-written file is cleared when the folder is opened
    assert_same_state(reference, checkpoint_of(folder))


@pytest.mark.slow
def test_five_kill_9_at_random_moments_then_the_resumed_run_is_bit_identical(
        reference, synthetic_cifar, tmp_path):
    rng = random.Random(2015)
    folder = tmp_path / NAME
    every_step = ["--ckpt-every", "1"]  # the same experiment, with more writes to be killed in
    reached = 0
    for target in sorted(rng.sample(range(2, ITERS - 6), 5)):
        target = max(target, reached + 1)  # a checkpoint of this process: it is training
        process = start(synthetic_cifar, tmp_path, *every_step)
        try:
            deadline = time.time() + 120
            while (iteration_in(folder) < target and process.poll() is None
                   and time.time() < deadline):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.1))  # somewhere in a step or a checkpoint write
        finally:
            process.kill()
        code, _, err = finish(process)
        assert code == -signal.SIGKILL, f"the run ended before it was killed: {err}"
        assert reached < iteration_in(folder) < ITERS
        reached = iteration_in(folder)
    assert train(synthetic_cifar, tmp_path) == 0
    assert no_leftovers(folder)
    assert_same_state(reference, checkpoint_of(folder))


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_folder_one_trains_the_other_refuses(
        synthetic_cifar, tmp_path):
    folder = tmp_path / NAME
    processes = [start(synthetic_cifar, tmp_path) for _ in range(2)]
    try:
        deadline = time.time() + 120
        while all(p.poll() is None for p in processes) and time.time() < deadline:
            time.sleep(0.05)
        [loser] = [p for p in processes if p.poll() is not None]
        [winner] = [p for p in processes if p is not loser]
        code, _, err = finish(loser)
        assert code == 1, err
        error = one_line_error(err)
        assert f"{folder}: in use by another process" in error
        assert f"(pid {winner.pid})" in error or "(pid ?)" in error  # ? if read before written
        while iteration_in(folder) == 0 and winner.poll() is None:  # training: stop it there
            time.sleep(0.05)
        winner.send_signal(signal.SIGTERM)
        code, _, err = finish(winner)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert code == 128 + signal.SIGTERM, err
    assert f"stopped by a signal at iteration {iteration_in(folder)};" in err  # its checkpoint
    assert (folder / ".lock").read_text() == str(winner.pid)
    with open(folder / "config.json") as f:
        assert json.load(f)["resumes"] == []  # the refused process wrote nothing
    assert len(list(folder.glob("events.out.tfevents*"))) == 1


# ---------------------------------------------------------------- command line

BAD_FLAGS = [
    (["-1", "train"], "argument N"),
    (["abc", "train"], "argument N"),
    (["1.5", "train"], "argument N"),
    (["", "train"], "argument N"),
    (["1", "train", "--iters", "0"], "--iters"),
    (["1", "train", "--iters", "-5"], "--iters"),
    (["1", "train", "--iters", "abc"], "--iters"),
    (["1", "train", "--iters", "1e3"], "--iters"),
    (["1", "train", "--lr", "0"], "--lr"),
    (["1", "train", "--lr", "-0.1"], "--lr"),
    (["1", "train", "--lr", "inf"], "--lr"),
    (["1", "train", "--lr", "abc"], "--lr"),
    (["1", "train", "--lr", "1e-400"], "--lr"),  # 0 once parsed
    (["1", "train", "--batch-size", "-128"], "--batch-size"),
    (["1", "train", "--batch-size", "12.8"], "--batch-size"),
    (["1", "train", "--weight-decay", "-1"], "--weight-decay"),
    (["1", "train", "--weight-decay", "inf"], "--weight-decay"),
    (["1", "train", "--momentum", "abc"], "--momentum"),
    (["1", "train", "--momentum", "-0.9"], "--momentum"),
    (["1", "train", "--momentum", "1"], "--momentum"),
    (["1", "train", "--momentum", "1.5"], "--momentum"),
    (["1", "train", "--eval-every", "0"], "--eval-every"),
    (["1", "train", "--ckpt-every", "-1"], "--ckpt-every"),
    (["1", "train", "--log-every", "0"], "--log-every"),
    (["1", "train", "--threads", "0"], "--threads"),
    (["1", "train", "--dist-timeout", "0"], "--dist-timeout"),
    (["1", "train", "--threads", str(2 ** 31)], "--threads"),  # torch.set_num_threads raised
    (["1", "train", "--dist-timeout", str(10 ** 14)], "--dist-timeout"),  # timedelta overflowed
    (["1", "train", "--seed", "-1"], "--seed"),
    (["1", "train", "--seed", "1.5"], "--seed"),
    (["1", "train", "--seed", str(2 ** 64)], "--seed"),  # beyond what torch.manual_seed takes
    (["1", "train", "--val-size", "-1"], "--val-size"),
    (["1", "train", "--val-size", "60000"], "--val-size"),
    (["1", "train", "--milestones", "5", "3"], "--milestones"),
    (["1", "train", "--milestones", "5", "5"], "--milestones"),
    (["1", "train", "--milestones", "0"], "--milestones"),
    (["1", "train", "--milestones", "-3"], "--milestones"),
    (["1", "train", "--milestones"], "--milestones"),
    (["1", "train", "--iters", "10", "--milestones", "10"], "--milestones"),
    (["1", "train", "--iters", "10", "--milestones", "4", "20"], "--milestones"),
    (["1", "train", "--shortcut", "a"], "--shortcut"),
    (["1", "train", "--warmup", "maybe"], "--warmup"),
    (["1", "train", "--amp", "fp8"], "--amp"),
    (["1", "train", "--amp", "fp16"], "--amp"),
    (["1", "train", "--device", "cuda"], "--device"),  # no CUDA on the test machine
    (["1", "train", "--device", "cuda:1"], "--device"),
    (["1", "train", "--device", "cuda:x"], "--device"),
    (["1", "train", "--device", ""], "--device"),
    (["1", "train", "--device", "mps"], "--device"),
    (["1", "train", "--device", "meta"], "--device"),
    (["1", "train", "--name", ""], "--name"),
    (["1", "train", "--name", ".hidden"], "--name"),
    (["3", "fly"], "argument mode"),
    (["3", "train", "--lr", "nan"], "--lr"),
    (["3", "train", "--shortcut", "C"], "--shortcut"),
    (["3", "train", "--plain", "--shortcut", "B"], "--shortcut"),
    (["3", "train", "--milestones", "64000"], "--milestones"),
    (["3", "train", "--val-size", "50000"], "--val-size"),
    (["3", "train", "--name", "../elsewhere"], "--name"),
    (["3", "train", "--device", "tpu"], "--device"),
    (["3", "train", "--dataset", "imagenet"], "--dataset"),
    (["1", "train", "--bn-batch", "0"], "--bn-batch"),
    (["1", "train", "--bn-batch", "abc"], "--bn-batch"),
    (["1", "train", "--bn-batch", "48"], "--bn-batch"),  # does not divide 128
    (["1", "train", "--bn-batch", "256"], "--bn-batch"),
    (["1", "train", "--batch-size", "96", "--bn-batch", "64"], "--bn-batch"),
    (["1", "train", "--bn-batch", "64", "--sync-bn"], "--bn-batch"),
]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("argv, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_bad_flag_value_is_a_usage_error_naming_the_flag(argv, flag, no_cuda, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in usage_error(capsys.readouterr().err)


@pytest.mark.parametrize("argv, flag", [
    (["0", "train"], "argument N"),
    (["1", "train", "--iters", "abc"], "--iters"),
    (["1", "train", "--seed", str(2 ** 64)], "--seed"),
])
def test_usage_errors_exit_2_before_torch_is_imported(argv, flag, tmp_path):
    (tmp_path / "torch").mkdir()  # a torch that cannot be imported: the error comes before it
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(command(*argv), capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert flag in usage_error(result.stderr)


@pytest.mark.parametrize("n, says", [
    (56, ["depth 338", "N=9 builds depth 56"]),
    (1, ["depth 8"]),
    (200, None),  # ResNet-1202: one of the paper's
])
def test_an_n_of_none_of_the_papers_depths_is_noted_in_one_line(n, says):
    note = cli.depth_note(n)
    assert (note is None) if says is None else all(s in note for s in says)
    assert note is None or "\n" not in note


def test_more_threads_than_cores_is_noted(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert any("--threads 1000" in note for note in run.notes(run.parse_args(
        ["3", "train", "--threads", "1000"])))
    assert not run.notes(run.parse_args(["3", "train", "--threads", "2"]))


def test_the_default_threads_are_the_cores_this_process_may_use(monkeypatch):
    # Under taskset, a cpuset or Slurm, one thread per core of the machine would crowd a few.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    before = torch.get_num_threads()
    try:
        run.setup_machine(run.parse_args(["3", "train", "--device", "cpu"]))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_name_that_is_not_utf8_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["1", "train", "--name", b"run\xff".decode("utf-8", "surrogateescape")])
    assert exit_info.value.code == 2
    assert "--name" in usage_error(capsys.readouterr().err)


@pytest.mark.slow
def test_a_missing_data_folder_is_a_one_line_error_suggesting_download(tmp_path):
    result = subprocess.run(command("1", "train", "--data-dir", tmp_path / "nowhere",
                                    "--logdir", tmp_path / "logs", *FLAGS),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    error = one_line_error(result.stderr)
    assert str(tmp_path / "nowhere") in error and "--download" in error
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("layout, culprit", [
    ("logdir is a file", "--logdir"),
    ("logdir inside a file", "--logdir"),
    ("logdir under /dev/null", "--logdir"),
    ("run folder is a file", "--logdir"),
    ("config.json is a folder", "config.json"),
])
def test_an_unusable_logdir_is_a_one_line_error(layout, culprit, synthetic_cifar, tmp_path, capsys):
    logdir = {"logdir is a file": tmp_path / "file",
              "logdir inside a file": tmp_path / "file" / "logs",
              "logdir under /dev/null": "/dev/null/logs"}.get(layout, tmp_path / "logs")
    (tmp_path / "file").write_text("")
    if layout == "run folder is a file":
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / NAME).write_text("")
    if layout == "config.json is a folder":
        (tmp_path / "logs" / NAME / "config.json").mkdir(parents=True)
    assert train(synthetic_cifar, logdir) == 1
    error = one_line_error(capsys.readouterr().err)
    assert culprit in error
    if os.path.isdir(tmp_path / "logs" / NAME):
        assert no_leftovers(tmp_path / "logs" / NAME)
        assert not os.path.exists(tmp_path / "logs" / NAME / "checkpoint.pt")


@pytest.mark.slow
def test_a_resume_during_warmup_with_another_log_every_ends_exactly_as_one_run(
        synthetic_cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "WARMUP_WINDOW", 3)  # random labels: the warm-up runs to the cap
    monkeypatch.setattr(run, "WARMUP_MAX_ITERS", 15)
    assert train(synthetic_cifar, tmp_path / "whole", "--warmup", "on") == 0
    with sigterm_after(STOP_AT - 2):  # mid warm-up window: windows end at 3, 6, 9
        assert train(synthetic_cifar, tmp_path / "resumed", "--warmup", "on") == \
            128 + signal.SIGTERM
    assert train(synthetic_cifar, tmp_path / "resumed", "--warmup", "on",
                 "--log-every", "7") == 0
    whole, resumed = (checkpoint_of(tmp_path / d / f"{NAME}-warmup-on")
                      for d in ("whole", "resumed"))
    assert whole["warmup_end"] == resumed["warmup_end"] == 15
    assert_same_state(whole, resumed)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"n": 1}', '{"resumes": []}',
                                     '{"start": {}, "resumes": [42]}',
                                     "[" * 100_000 + "]" * 100_000])  # too deep for json
def test_a_damaged_config_json_refuses_the_resume_until_moved_away(content, stopped,
                                                                    synthetic_cifar, tmp_path,
                                                                    capsys):
    folder = tmp_path / NAME
    shutil.copytree(stopped, folder)
    (folder / "config.json").write_text(content)
    assert train(synthetic_cifar, tmp_path) == 1
    error = one_line_error(capsys.readouterr().err)
    assert f"{folder / 'config.json'}:" in error and "move it away" in error
    assert (folder / "checkpoint.pt").read_bytes() == (stopped / "checkpoint.pt").read_bytes()
    assert (folder / "config.json").read_text() == content
    (folder / "config.json").rename(tmp_path / "damaged-config.json")
    assert train(synthetic_cifar, tmp_path) == 0
    with open(folder / "config.json") as f:
        assert json.load(f)["start"]["iteration"] == STOP_AT  # a new one, from the resume


@pytest.mark.parametrize("fifo, mode", [("checkpoint.pt", "train"), ("config.json", "train"),
                                        ("config.json", "test"), ("result.json", "test")])
def test_a_fifo_in_a_run_folder_never_blocks_a_command(fifo, mode, stopped, synthetic_cifar,
                                                       tmp_path):
    folder = tmp_path / NAME
    shutil.copytree(stopped, folder)
    (folder / fifo).unlink(missing_ok=True)
    os.mkfifo(folder / fifo)
    argv = ["1", mode, "--data-dir", synthetic_cifar, "--logdir", tmp_path, *FLAGS]
    result = subprocess.run(command(*argv), capture_output=True, text=True, timeout=120)
    if result.returncode:  # refused, naming the FIFO; or it did its job without reading it
        assert f"{folder / fifo}" in one_line_error(result.stderr) and "FIFO" in result.stderr
    assert stat.S_ISFIFO(os.stat(folder / fifo).st_mode)  # left as it was


def test_a_resume_on_other_training_data_is_refused_in_one_line(stopped, synthetic_cifar,
                                                                tmp_path, capsys):
    folder = tmp_path / NAME
    shutil.copytree(stopped, folder)
    swapped = tmp_path / "swapped"  # the same files, two of them under each other's names
    swapped.mkdir()
    for name in os.listdir(synthetic_cifar):
        other = {"data_batch_1.bin": "data_batch_2.bin",
                 "data_batch_2.bin": "data_batch_1.bin"}.get(name, name)
        os.symlink(os.path.join(synthetic_cifar, other), swapped / name)
    before = (folder / "checkpoint.pt").read_bytes()
    assert train(str(swapped), tmp_path) == 1
    error = one_line_error(capsys.readouterr().err)
    assert str(folder / "checkpoint.pt") in error and "other data" in error
    assert (folder / "checkpoint.pt").read_bytes() == before
    assert train(synthetic_cifar, tmp_path) == 0  # on its own data it resumes


@pytest.mark.slow
@pytest.mark.parametrize("limit, culprit", [(500, "config.json"), (3000, "event file")])
def test_a_full_disk_is_one_line_naming_what_could_not_be_written(limit, culprit,
                                                                  synthetic_cifar, tmp_path):
    setup = (f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)")  # writes fail as on a full disk
    argv = ["1", "train", "--data-dir", synthetic_cifar, "--logdir", tmp_path, "--iters", "300",
            "--log-every", "1", "--eval-every", "1000", "--ckpt-every", "1000",
            "--batch-size", "32", "--threads", "1"]
    result = subprocess.run(command(*argv, setup=setup), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert culprit in one_line_error(result.stderr)  # no traceback, from any thread


def without_root_powers(argv):
    """argv run so that file modes bind, even for root (which ignores them otherwise)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop the capabilities that override file modes")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]


@pytest.mark.parametrize("case", ["new run", "resumed run"])
def test_an_unwritable_logdir_is_a_one_line_error(case, stopped, synthetic_cifar, tmp_path):
    logdir = tmp_path / "logs"
    if case == "new run":
        logdir.mkdir()
        read_only, culprit = logdir, "--logdir"
    else:
        shutil.copytree(stopped, logdir / NAME)
        read_only, culprit = logdir / NAME, "config.json"
    read_only.chmod(0o555)
    try:
        if subprocess.run(without_root_powers(["touch", read_only / "probe"])).returncode == 0:
            pytest.skip("cannot make a folder unwritable here")
        result = subprocess.run(
            without_root_powers(command("1", "train", "--data-dir", synthetic_cifar,
                                        "--logdir", logdir, *FLAGS)),
            capture_output=True, text=True, timeout=120)
    finally:
        read_only.chmod(0o755)
    assert result.returncode == 1
    error = one_line_error(result.stderr)
    assert culprit in error and "Permission denied" in error
    if case == "resumed run":
        assert (logdir / NAME / "checkpoint.pt").read_bytes() == (
            stopped / "checkpoint.pt").read_bytes()


@pytest.mark.slow
def test_n_too_large_for_memory_is_a_clear_error_not_an_out_of_memory_crash(
        synthetic_cifar, tmp_path):
    # Should the check be missing, the address-space limit makes the crash quick and harmless.
    result = subprocess.run(
        command("100000", "train", "--data-dir", synthetic_cifar, "--logdir", tmp_path,
                setup="resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))"),
        capture_output=True, text=True, timeout=60)
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr, result.stderr
    error = (one_line_error if result.returncode == 1 else usage_error)(result.stderr)
    assert "100000" in error and error.count("GiB") >= 2  # needed, and available
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- damage the digest catches

def flip_a_byte_of(tensor, raw):
    """The checkpoint's bytes with one bit flipped inside the stored data of `tensor`."""
    at = raw.find(tensor.numpy().tobytes()[:64])
    assert at > 0 and raw.find(tensor.numpy().tobytes()[:64], at + 1) < 0
    return raw[:at + 5] + bytes([raw[at + 5] ^ 0x10]) + raw[at + 6:]


def test_a_flipped_bit_inside_a_tensor_is_refused_in_one_line(good, synthetic_cifar, tmp_path,
                                                              capsys):
    state, raw = good
    damaged = flip_a_byte_of(state["model"]["fc.weight"], raw)
    folder = tmp_path / NAME
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(damaged)
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["iteration"] == STOP_AT
    assert train(synthetic_cifar, tmp_path) == 1
    error = one_line_error(capsys.readouterr().err)
    assert str(folder / "checkpoint.pt") in error and "damaged" in error and "--fresh" in error
    assert (folder / "checkpoint.pt").read_bytes() == damaged
    assert run.main(["1", "test", "--checkpoint", str(folder / "checkpoint.pt"),
                     "--data-dir", synthetic_cifar]) == 1
    assert "damaged" in one_line_error(capsys.readouterr().err)


@pytest.mark.slow
def test_a_checkpoint_without_a_digest_from_before_digests_still_resumes_exactly(
        good, reference, synthetic_cifar, tmp_path):
    state, _ = good
    folder = tmp_path / NAME
    shutil.copytree(good_folder_of(state, tmp_path), folder)
    torch.save({k: v for k, v in state.items() if k != "digest"}, folder / "checkpoint.pt")
    assert train(synthetic_cifar, tmp_path) == 0
    assert_same_state(reference, checkpoint_of(folder))


def good_folder_of(state, tmp_path):
    """A run folder holding nothing but a config.json, as a resume needs."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"resumes": [], "start": {"device": "cpu"}}))
    return folder


# ---------------------------------------------------------------- signals before training starts

# Run first: the first import of torch sends this process the signal (run.py is then past its
# flags and on to loading torch, which takes seconds).
SIGNAL_AT_TORCH_IMPORT = """
import importlib.abc, os
class SignalAtTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.{signal})
sys.meta_path.insert(0, SignalAtTorch())
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_loads_ends_in_one_line(signum, synthetic_cifar, tmp_path):
    code, out, err = finish(start(synthetic_cifar, tmp_path, setup=SIGNAL_AT_TORCH_IMPORT.format(
        signal=signal.Signals(signum).name)))
    assert code == 128 + signum, err  # not the signal's silent death
    [line] = err.strip().splitlines()  # not KeyboardInterrupt's traceback
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}") and out == ""
    assert not (tmp_path / NAME).exists()


@pytest.mark.slow
def test_sigterm_while_a_run_is_set_up_leaves_its_folder_to_resume(
        stopped, reference, synthetic_cifar, tmp_path, monkeypatch, capsys):
    folder = tmp_path / NAME
    shutil.copytree(stopped, folder)
    real_build = run.build_model

    def build_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the folder is open and locked, the model half built
        return real_build(*args, **kwargs)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, lambda *_: pytest.fail("SIGTERM was not handled"))
        plumbing.exit_on_signals()  # as run.py installs them when run as a command
        monkeypatch.setattr(run, "build_model", build_then_sigterm)
        with pytest.raises(SystemExit) as stopped_by:
            train(synthetic_cifar, tmp_path)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert stopped_by.value.code == 128 + signal.SIGTERM
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("interrupted by SIGTERM")
    assert iteration_in(folder) == STOP_AT and no_leftovers(folder)
    monkeypatch.setattr(run, "build_model", real_build)
    assert train(synthetic_cifar, tmp_path) == 0  # the folder's lock was let go
    assert_same_state(reference, checkpoint_of(folder))


# ---------------------------------------------------------------- signals at the end of a run

@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_cleanly_and_the_rerun_completes(
        reference, synthetic_cifar, tmp_path, monkeypatch, capsys):
    real_evaluate = run.evaluate

    def evaluate_then_sigterm(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # run.py handles it: the evaluation completes
        return result

    monkeypatch.setattr(run, "evaluate", evaluate_then_sigterm)  # --eval-every 1000: the final
    assert train(synthetic_cifar, tmp_path) == 128 + signal.SIGTERM
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("stopped by a signal at iteration 24") and "resume" in line
    folder = tmp_path / NAME
    assert iteration_in(folder) == ITERS and not (folder / "result.json").exists()
    monkeypatch.setattr(run, "evaluate", real_evaluate)
    assert train(synthetic_cifar, tmp_path) == 0
    assert (folder / "result.json").exists() and (folder / "model.pt").exists()
    assert_same_state(reference, checkpoint_of(folder))
    curves = plot_curves.load_scalars(str(folder))
    assert curves["train/error"][0] == list(range(4, ITERS + 1, 4))
    assert curves["test/error"][0] == [ITERS]
    # Once in the event files themselves, not only after plot_curves' merge: TensorBoard
    # would show the stopped process's point as well.
    logged = [step for path in folder.glob("*tfevents*")
              for tag, step, _ in plot_curves.read_event_file(str(path))[3] if tag == "test/error"]
    assert logged == [ITERS]


@pytest.mark.slow
def test_a_resume_in_the_same_second_keeps_the_stopped_runs_event_file(synthetic_cifar, tmp_path,
                                                                        monkeypatch):
    # Event files are named by the whole second their writer opened in, and opened with "wb":
    # pin that second, as for a run stopped and resumed within one second.
    from tensorboard.summary.writer import event_file_writer
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.8e9))
    with sigterm_after(6):
        assert train(synthetic_cifar, tmp_path) == 128 + signal.SIGTERM
    assert train(synthetic_cifar, tmp_path) == 0
    folder = tmp_path / NAME
    assert len(list(folder.glob("events.out.tfevents.1800000000.*"))) == 2
    assert plot_curves.load_scalars(str(folder))["train/loss"][0] == list(range(4, ITERS + 1, 4))


@pytest.mark.slow
def test_curve_points_a_checkpoint_covers_survive_kill_9(synthetic_cifar, tmp_path):
    # The process kills itself right after writing its checkpoint at iteration 12. Its event
    # writer's thread writes each record slowly, so points still queued at the checkpoint would
    # be lost.
    code = (f"import os, signal, sys, time\nsys.path.insert(0, {ROOT!r})\nimport run\n"
            "from tensorboard.summary.writer.record_writer import RecordWriter\n"
            "write = RecordWriter.write\n"
            "RecordWriter.write = lambda self, data: (time.sleep(0.05), write(self, data))\n"
            "save = run.save_checkpoint\n"
            "def save_then_die(path, state, *keys):\n"
            "    save(path, state, *keys)\n"
            "    if state['iteration'] == 12: os.kill(os.getpid(), signal.SIGKILL)\n"
            "run.save_checkpoint = save_then_die\n"
            "sys.exit(run.main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", code, "1", "train", "--data-dir",
                                synthetic_cifar, "--logdir", str(tmp_path), *FLAGS],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    returncode, _, err = finish(process)
    assert returncode == -signal.SIGKILL, err
    folder = tmp_path / NAME
    assert iteration_in(folder) == 12
    assert plot_curves.load_scalars(str(folder))["train/error"][0] == [4, 8, 12]


def test_a_training_set_smaller_than_one_batch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["1", "train", "--val-size", "49999"])
    assert exit_info.value.code == 2
    error = usage_error(capsys.readouterr().err)
    assert "--val-size 49999 leaves 1 training images, fewer than one batch" in error
