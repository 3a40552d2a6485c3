"""reproduce.py: the Section 4.2 matrix run by run.py, on synthetic data with tiny schedules."""
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import reproduce
import run
from conftest import ROOT

# run.py flags that keep a run short: one evaluation (the final one), frequent checkpoints.
FAST = ["--", "--log-every", "2", "--eval-every", "1000", "--ckpt-every", "2"]


def argv(data, tmp_path, *options):
    return [*options, "--logdir", str(tmp_path / "logs"), "--data-dir", data,
            "--out", str(tmp_path / "out"), *FAST]


def call(argv):
    """reproduce.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = reproduce.main(argv)
    return code, out.getvalue(), err.getvalue()


def start(argv, output):
    """reproduce.py in a subprocess of its own process group, as a user starts it."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "reproduce.py"), *argv],
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def commands_in(log_text):
    """The commands a log says were run, in order."""
    return [line[2:] for line in log_text.splitlines() if line.startswith("$ ")]


def wait_for(path, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def overview_row(out, name):
    """The cells of the last overview line about run folder `name`."""
    return [line.split(maxsplit=2) for line in out.splitlines()
            if line.startswith(f"  {name} ")][-1]


def checkpoint_iteration(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)["iteration"]


@pytest.fixture(scope="module")
def matrix(synthetic_cifar, tmp_path_factory):
    """Three runs, two at a time: plain20 and resnet20 train, resnet32 fails (a damaged
    checkpoint in its folder). reproduce.py is killed (SIGKILL, with its runs) once plain20 has
    a checkpoint, then run again to the end, then once more."""
    tmp_path = tmp_path_factory.mktemp("reproduce")
    args = argv(synthetic_cifar, tmp_path, "--only", "resnet20", "plain20", "resnet32",
                "--jobs", "2", "--iters", "12")
    logs = tmp_path / "logs"
    os.makedirs(logs / "resnet32-iters12")
    (logs / "resnet32-iters12" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with open(tmp_path / "killed.out", "w") as output:
        process = start(args, output)
        wait_for(logs / "plain20-iters12" / "checkpoint.pt")
        os.killpg(process.pid, signal.SIGKILL)  # reproduce.py and its run.py processes
        process.wait()
    killed_at = checkpoint_iteration(logs / "plain20-iters12")
    first = call(args)
    snapshot = {name: (logs / name).read_text() for name in os.listdir(logs)
                if name.endswith(".log")}
    rerun = call(args)
    printed = call(args[:-len(FAST)] + ["--print"] + FAST)[1]
    return SimpleNamespace(killed_at=killed_at, first=first, snapshot=snapshot, rerun=rerun,
                           printed=printed, logs=logs, out=tmp_path / "out")


def test_runs_go_in_parallel_and_finish_with_table_and_figures(matrix):
    spans = []
    for name in ("plain20-iters12", "resnet20-iters12"):
        folder = matrix.logs / name
        assert checkpoint_iteration(folder) == 12
        # config.json is written when training starts or resumes, test.json by the test at the end
        spans.append([os.path.getmtime(folder / f) for f in ("config.json", "test.json")])
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end  # the two runs were going on at the same time
    assert sorted(os.listdir(matrix.out)) == ["figure6.pdf", "figure6.png", "figure7.pdf",
                                              "figure7.png", "table6.md"]
    code, out, _ = matrix.first
    state, message = overview_row(out, "plain20-iters12")[1:]
    assert state == "done" and message.startswith("test error ")
    assert "Table 6" in out


def test_a_killed_run_resumes_when_reproduce_is_rerun(matrix):
    assert 0 < matrix.killed_at < 12
    log = (matrix.logs / "plain20-iters12.log").read_text()
    assert f"resuming from iteration {matrix.killed_at}" in log
    assert len(run.read_run_info(str(matrix.logs / "plain20-iters12"))["resumes"]) == 1
    assert os.path.exists(matrix.logs / "plain20-iters12" / "result.json")


def test_a_failing_run_does_not_stop_the_others_and_is_reported(matrix):
    code, out, err = matrix.first
    assert code == 1
    last = "checkpoint.pt: not a readable checkpoint of this project"
    state, message = overview_row(out, "resnet32-iters12")[1:]
    assert state == "failed" and message.startswith("exit 1: error: ") and last in message
    (line,) = [line for line in err.splitlines() if " failed " in line]
    log = matrix.logs / "resnet32-iters12.log"
    assert line.startswith(f"resnet32-iters12 failed (exit 1); {log} ends with: error: ")
    assert last in line
    assert os.path.exists(matrix.logs / "resnet20-iters12" / "test.json")


def test_print_lists_exactly_the_commands_that_were_run(matrix):
    lines = matrix.printed.splitlines()
    assert len(lines) == 3  # the matrix's order: plain20, resnet32, resnet20
    for line, name in zip(lines, ("plain20-iters12", "resnet32-iters12", "resnet20-iters12")):
        printed, run_commands = line.split(" && "), commands_in(matrix.snapshot[f"{name}.log"])
        if name == "resnet32-iters12":
            assert run_commands == printed[:1] * 2  # killed, then failed: never got to its test
        else:  # killed or not, then resumed
            assert run_commands[-2:] == printed and set(run_commands) == set(printed)
    assert lines[0].startswith(f"{shlex.quote(sys.executable)} ")
    assert " 3 train --plain --iters 12 " in lines[0]


def test_a_rerun_skips_finished_runs_and_retries_the_failed_one(matrix):
    code, out, err = matrix.rerun
    assert code == 1 and "resnet32-iters12 failed" in err
    for name, text in matrix.snapshot.items():
        now = (matrix.logs / name).read_text()
        if name.startswith("resnet32"):
            assert now.startswith(text) and now.count("$ ") == text.count("$ ") + 1
        else:
            assert now == text  # not started again
    assert overview_row(out, "plain20-iters12")[1] == "done"


@pytest.mark.slow
def test_sigterm_reaches_the_runs_which_checkpoint_and_stop(synthetic_cifar, tmp_path):
    args = argv(synthetic_cifar, tmp_path, "--only", "plain20", "--iters", "400")
    folder = tmp_path / "logs" / "plain20-iters400"
    with open(tmp_path / "reproduce.out", "w") as output:
        process = start(args, output)
        wait_for(folder / "checkpoint.pt")
        process.send_signal(signal.SIGTERM)  # to reproduce.py alone
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    log = (tmp_path / "logs" / "plain20-iters400.log").read_text()
    assert "stopped by a signal at iteration" in log
    assert 0 < checkpoint_iteration(folder) < 400
    out = (tmp_path / "reproduce.out").read_text()
    assert "stopped by signal 15: rerun the same command to resume" in out
    assert not os.path.exists(tmp_path / "out")  # no figures from a stopped campaign


# ---------------------------------------------------------------- the commands

def test_print_lists_the_matrix_in_the_campaigns_order(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert reproduce.main(["--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    nets = [line.split(" && ")[0].split()[2:] for line in lines]
    assert nets == [["9", "train"], ["9", "train", "--plain"], ["3", "train", "--plain"],
                    ["18", "train"], ["5", "train"], ["7", "train"], ["5", "train", "--plain"],
                    ["7", "train", "--plain"], ["3", "train"], ["200", "train"]]
    python = shlex.quote(sys.executable)  # the interpreter running reproduce.py
    assert lines[1] == f"{python} run.py 9 train --plain && {python} run.py 9 test --plain"


def test_seeds_after_the_first_add_a_seed_flag_and_a_folder_each():
    options, extra = reproduce.parse_args(["--only", "resnet110", "--seeds", "3"])
    runs = reproduce.plan(options, extra)
    assert [r.name for r in runs] == ["resnet110", "resnet110-seed1", "resnet110-seed2"]
    assert [r.commands[0] for r in runs] == [["18", "train"], ["18", "train", "--seed", "1"],
                                             ["18", "train", "--seed", "2"]]


@pytest.mark.parametrize("files, todo", [
    ({}, ["train", "test"]),
    ({"test.json": dict(iteration=3000, final_weights=False)}, ["train", "test"]),
    ({"result.json": {}, "test.json": dict(iteration=3000, final_weights=False)}, ["test"]),
    ({"result.json": {}, "test.json": dict(iteration=64000, final_weights=True)}, []),
    ({"result.json": {}, "test.json": dict(iteration=64000)}, []),  # before final_weights
    ({"result.json": {}, "test.json": dict(iteration=3000)}, ["test"]),
])
def test_a_rerun_tests_again_unless_test_json_is_of_the_final_weights(tmp_path, files, todo):
    options, extra = reproduce.parse_args(["--only", "resnet56", "--logdir", str(tmp_path)])
    [planned] = reproduce.plan(options, extra)
    os.makedirs(planned.folder)
    for name, content in files.items():
        with open(os.path.join(planned.folder, name), "w") as f:
            json.dump(content, f)
    reproduce.settle_finished(planned)
    assert [command[1] for command in planned.todo] == todo
    assert planned.state == ("waiting" if todo else "done")


def test_bad_only_name_is_a_usage_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "resnet56", "resnet57"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: argument --only: invalid choice: 'resnet57'" in error
    assert all(name in error for name in reproduce.MATRIX)


def test_jobs_split_the_cpu_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert reproduce.placement(jobs=1, runs_count=10, extra=[]) == (None, [])  # run.py: all
    assert reproduce.placement(jobs=3, runs_count=10, extra=[]) == (2, [])
    assert reproduce.placement(jobs=16, runs_count=10, extra=[]) == (1, [])
    assert reproduce.placement(jobs=4, runs_count=2, extra=[]) == (4, [])  # two jobs at most
    assert reproduce.placement(jobs=4, runs_count=10, extra=["--threads", "3"]) == (None, [])


def test_the_cores_go_to_the_runs_left_to_do(tmp_path, monkeypatch):
    # Two jobs, two runs, one of them finished: the one left gets all eight cores (run.py's
    # default, no --threads), not four; the finished one is not started.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    options = ["--only", "resnet20", "plain20", "--iters", "100", "--jobs", "2",
               "--logdir", str(tmp_path), "--out", str(tmp_path / "out")]
    finished, left = reproduce.plan(*reproduce.parse_args(options))
    os.makedirs(finished.folder)
    for name, content in {"config.json": finished.config, "result.json": {"test_error": 9.0},
                          "test.json": dict(iteration=100, final_weights=True)}.items():
        with open(os.path.join(finished.folder, name), "w") as f:
            json.dump(content, f)
    given = {}
    monkeypatch.setattr(reproduce, "run_all", lambda runs, *_: given.update(
        {r.name: (r.state, r.todo) for r in runs}))
    monkeypatch.setattr(reproduce.plot_curves, "main", lambda argv: 0)
    call(options)
    assert given[finished.name] == ("done", [])
    state, todo = given[left.name]
    assert state == "waiting" and [command[1] for command in todo] == ["train", "test"]
    assert all("--threads" not in command for command in todo), todo
    # --print is for another scheduler, which runs them all: the cores split between two.
    printed = call(options + ["--print"])[1].splitlines()
    assert len(printed) == 2 and all("--threads 4" in line for line in printed)


def test_jobs_take_the_gpus_in_turn(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert reproduce.placement(jobs=3, runs_count=10, extra=[]) == (None, ["0", "1"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert reproduce.placement(jobs=3, runs_count=10, extra=[]) == (None, ["5", "7"])
    env = {"CUDA_VISIBLE_DEVICES": "7"}
    assert reproduce.shell_line(["9", "train"], env) == \
        f"CUDA_VISIBLE_DEVICES=7 {shlex.quote(sys.executable)} run.py 9 train"


def usage_error(err):
    """reproduce.py's argparse complaint: its own usage block (not run.py's), then one line
    `<prog>: error: ...`; returns that line."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("usage: "), err
    assert "--seeds" in err and "--eval-every" not in err, err  # reproduce.py's usage
    assert ": error: " in lines[-1], err
    return lines[-1]


@pytest.mark.parametrize("after_dashes, named", [
    (["--plain"], "--plain"),
    (["--pla"], "--plain"),  # argparse's abbreviation
    (["--shortcut", "B"], "--shortcut"),
    (["--seed", "7"], "--seed"),
    (["--seed=7"], "--seed"),
    (["--name", "X"], "--name"),
    (["5"], "5"),
    (["--iters", "12", "test"], "test"),
])
def test_run_flags_after_the_dashes_that_change_which_run_an_entry_is_are_usage_errors(
        after_dashes, named, capsys):
    # They would make entries share a folder: `--only resnet20 plain20 -- --plain` trained
    # plain-20 twice in one folder and ResNet-20 never.
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "resnet20", "plain20", "--seeds", "2", "--print", "--",
                        *after_dashes])
    assert exit_info.value.code == 2
    assert named in usage_error(capsys.readouterr().err)


def test_two_planned_runs_in_one_folder_are_a_usage_error_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "MATRIX", {"resnet20": (3, False), "resnet20-too": (3, False)})
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--print", "--logdir", "somewhere"])
    assert exit_info.value.code == 2
    assert os.path.join("somewhere", "resnet20") in usage_error(capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--help", "-h", "--he"])
def test_help_after_the_dashes_is_a_usage_error_pointing_at_run_py_help(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--print", "--", "--iters", "12", flag])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # not run.py's help under reproduce.py's name
    assert "run.py --help" in usage_error(err)


@pytest.mark.parametrize("logdir", ["a-file", os.path.join("a-file", "runs")])
@pytest.mark.parametrize("where", ["option", "after the dashes"])
def test_a_logdir_that_is_or_is_inside_a_file_is_a_usage_error_naming_it(logdir, where, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    flags = ["--logdir", logdir] if where == "option" else ["--", "--logdir", logdir]
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "resnet20", "--iters", "1", "--data-dir", "absent", *flags])
    assert exit_info.value.code == 2
    error = usage_error(capsys.readouterr().err)
    assert "--logdir" in error and "a-file" in error
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("flag, value", [("--jobs", "1000000000000"),
                                         ("--seeds", "1000000000000")])
def test_absurd_jobs_or_seeds_are_a_usage_error_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "resnet20", "--print", flag, value])
    assert exit_info.value.code == 2
    error = usage_error(capsys.readouterr().err)
    assert flag in error and value in error


def test_printed_lines_run_with_this_interpreter_as_printed(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "executable", "/opt/my envs/bin/python")
    assert reproduce.main(["--only", "plain20", "--print"]) == 0
    train, test = capsys.readouterr().out.strip().split(" && ")
    assert shlex.split(train) == ["/opt/my envs/bin/python", "run.py", "3", "train", "--plain"]
    assert shlex.split(test) == ["/opt/my envs/bin/python", "run.py", "3", "test", "--plain"]


# ---------------------------------------------------------------- the overview

def test_overview_in_a_log_is_printed_once_per_change_of_state(tmp_path):
    runs = [reproduce.PlannedRun(str(tmp_path / name), str(tmp_path / f"{name}.log"), 64_000, 128, [])
            for name in ("resnet56", "plain56")]
    stream = io.StringIO()
    overview = reproduce.Overview(stream)
    overview.update(runs)
    overview.update(runs)
    runs[0].state, runs[0].phase = "running", "test"
    overview.update(runs)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6
    assert lines[1:3] == ["  resnet56  waiting", "  plain56   waiting"]
    assert lines[3].endswith("1 running, 1 waiting")
    assert lines[4] == "  resnet56  running  test: layer responses (Figure 7)"


def test_overview_shows_iteration_speed_and_time_left_from_the_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    run_ = reproduce.PlannedRun(str(tmp_path / "resnet56"), str(tmp_path / "resnet56.log"), 64_000, 128,
                         [], state="running", phase="train")
    with SummaryWriter(run_.folder) as writer:
        writer.add_scalar("speed/images_per_second", 640.0, 100)
        writer.add_scalar("speed/images_per_second", 512.0, 16_000)
    assert reproduce.state_detail(run_) == "16,000/64,000 iters  512 img/s  3h20m left"


@pytest.mark.parametrize("test_error", ["x", None, [8.2], True])
def test_overview_shows_a_finished_run_whose_result_holds_no_number(tmp_path, test_error):
    planned = reproduce.PlannedRun(str(tmp_path / "resnet56"), str(tmp_path / "resnet56.log"),
                                   64_000, 128, [], state="done")
    os.makedirs(planned.folder)
    with open(os.path.join(planned.folder, "result.json"), "w") as f:
        json.dump({"test_error": test_error}, f)
    assert "result.json" in reproduce.state_detail(planned)
    assert "result.json" in reproduce.overview_lines([planned])[1]


@pytest.mark.parametrize("held_bn, refused", [(None, True), (128, True), (64, False)])
def test_a_finished_run_of_another_configuration_is_refused_not_counted_done(
        tmp_path, held_bn, refused):
    # A folder of the BN-128 default (its config.json written before bn_batch was a key, or
    # with 128) has the name the BN-64 default's run gets: it must not pass as that run.
    options, extra = reproduce.parse_args(["--only", "resnet20", "--iters", "100",
                                           "--logdir", str(tmp_path)])
    [planned] = reproduce.plan(options, extra)
    held = json.loads(json.dumps(planned.config))
    held.pop("bn_batch")
    if held_bn is not None:
        held["bn_batch"] = held_bn
    os.makedirs(planned.folder)
    for name, content in {"config.json": held, "result.json": {"test_error": 9.0},
                          "test.json": dict(iteration=100, final_weights=True)}.items():
        with open(os.path.join(planned.folder, name), "w") as f:
            json.dump(content, f)
    code, out, err = call(["--only", "resnet20", "--iters", "100", "--logdir", str(tmp_path),
                           "--out", str(tmp_path / "out")])
    if refused:
        assert code == 1 and out == ""
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert planned.folder in err and "bn_batch: run has 128, command has 64" in err
        renamed = str(tmp_path / "resnet20-iters100-bn128")
        assert f"rename it {renamed} and pass -- --bn-batch 128" in err
        assert not os.path.exists(planned.log)  # nothing ran
        # as the hint says: the old run is then the entry's, and done
        os.rename(planned.folder, renamed)
        code, out, err = call(["--only", "resnet20", "--iters", "100", "--logdir", str(tmp_path),
                               "--out", str(tmp_path / "out"), "--", "--bn-batch", "128"])
        assert "resnet20-iters100-bn128  done" in out, out + err
    else:
        assert "done" in out and "holds a run of another configuration" not in err


@pytest.mark.parametrize("after_dashes, named", [
    (["--out", "t.json"], "--out"), (["--ou=t.json"], "--out"),
    (["--checkpoint", "m.pt"], "--checkpoint"),
])
def test_test_files_after_the_dashes_are_usage_errors(after_dashes, named, capsys):
    # Every entry's test would write one file (none its test.json), or test one checkpoint.
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "resnet20", "--print", "--", *after_dashes])
    assert exit_info.value.code == 2
    assert named in usage_error(capsys.readouterr().err)


def test_placement_is_left_to_run_py_when_device_or_threads_follow_the_dashes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for extra in (["--device", "cpu"], ["--dev=cpu"], ["--thr", "3"], ["--threads=3"]):
        assert reproduce.placement(jobs=4, runs_count=10, extra=extra) == (None, []), extra
