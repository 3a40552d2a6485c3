"""run.py: the paper's schedule, the data order, and train/test runs on synthetic data."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import plot_curves
import plumbing
import run
from conftest import ROOT

TINY = ["--iters", "12", "--log-every", "4", "--eval-every", "8", "--ckpt-every", "4",
        "--threads", "2"]


def train(data, logdir, *extra):
    return run.main(["1", "train", "--data-dir", data, "--logdir", str(logdir), *TINY, *extra])


def start(data, logdir, *extra):
    """run.py in a subprocess, as a user runs it."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), "1", "train",
                             "--data-dir", data, "--logdir", str(logdir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def sigterm_after(steps):
    """In-process runs get SIGTERM in their step number `steps`: they checkpoint and stop there,
    without the final evaluation."""
    real_step, done = run.train_step, []

    def step_then_sigterm(*args, **kwargs):
        result = real_step(*args, **kwargs)
        done.append(1)
        if len(done) == steps:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by run.py: the step completes
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "train_step", step_then_sigterm)
        yield


@contextlib.contextmanager
def few_test_images(count=500):
    """Evaluations on the first `count` test images, for tests about something else."""
    real = run.load_data
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "load_data", lambda args, split: tuple(
            t[:count] if split == "test" else t for t in real(args, split)))
        yield


def checkpoint_of(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def assert_same_state(a, b):
    assert a["iteration"] == b["iteration"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    momenta_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momenta_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(momenta_a) == len(momenta_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(momenta_a, momenta_b))


# ---------------------------------------------------------------- schedule

def test_lr_drops_at_32k_and_48k():
    lr = lambda i: run.lr_at(i, 0.1, [32_000, 48_000])
    assert lr(0) == lr(31_999) == 0.1
    assert lr(32_000) == lr(47_999) == pytest.approx(0.01)
    assert lr(48_000) == lr(63_999) == pytest.approx(0.001)


def test_warmup_lr_is_001_until_train_error_below_80_percent():
    assert run.lr_at(0, 0.1, [32_000, 48_000], warming_up=True) == 0.01
    assert not run.warmup_ends(400, 80.0)
    assert run.warmup_ends(400, 79.9)
    assert run.warmup_ends(run.WARMUP_MAX_ITERS, 90.0)


def test_warmup_defaults_to_resnet110_and_deeper():
    config = {"warmup": "auto", "n": 9}
    assert not run.uses_warmup(config)
    assert run.uses_warmup({**config, "n": 18})
    assert run.uses_warmup({"warmup": "on", "n": 1})
    assert not run.uses_warmup({"warmup": "off", "n": 18})


def test_defaults_are_the_papers_recipe():
    args = run.parse_args(["9", "train"])
    assert (args.lr, args.milestones, args.iters, args.batch_size, args.weight_decay,
            args.momentum, args.shortcut, args.plain) == (
        0.1, [32_000, 48_000], 64_000, 128, 1e-4, 0.9, "A", False)


def test_shorter_schedule_keeps_the_milestone_fractions():
    assert run.parse_args(["3", "train", "--iters", "6400"]).milestones == [3200, 4800]


@pytest.mark.parametrize("argv, name", [
    (["9", "train"], "resnet56"),
    (["3", "train", "--plain"], "plain20"),
    (["3", "train", "--shortcut", "B"], "resnet20-B"),
    (["18", "train", "--seed", "3"], "resnet110-seed3"),
    (["3", "train", "--amp", "bf16", "--iters", "6400"], "resnet20-bf16-iters6400"),
    (["3", "train", "--milestones", "30000", "50000"], "resnet20-ms30000-50000"),
    (["3", "train", "--val-size", "5000", "--lr", "0.05"], "resnet20-lr0.05-val5000"),
    (["3", "train", "--dataset", "cifar100"], "resnet20-cifar100"),
    (["3", "train", "--dataset", "cifar100", "--shortcut", "B", "--amp", "bf16"],
     "resnet20-B-cifar100-bf16"),
    (["9", "train", "--amp", "bf16", "--bn-batch", "64"], "resnet56-bf16"),  # the default
    (["9", "train", "--bn-batch", "128"], "resnet56-bn128"),  # the default before 64
    (["9", "train", "--batch-size", "96"], "resnet56-bs96-bn96"),  # 64 does not divide 96
    (["9", "train", "--batch-size", "96", "--bn-batch", "32"], "resnet56-bs96-bn32"),
    (["9", "train", "--batch-size", "256"], "resnet56-bs256"),  # 4 groups of 64
    # --sync-bn normalises over the whole batch, as --bn-batch 128 does in one process: the same
    # net, and never the default's folder.
    (["9", "train", "--sync-bn"], "resnet56-bn128"),
])
def test_run_names_follow_the_configuration(argv, name):
    assert run.parse_args(argv).name == name


@pytest.mark.parametrize("processes, batch, bn_batch", [
    (1, 128, 64),  # the paper's two GPUs of 64 images, in one process
    (2, 128, 64),  # torchrun's two processes: each one's whole share, the same net
    (1, 256, 64),  # four groups of 64
    (1, 96, 96), (2, 64, 32),  # where 64 does not divide the share: the share
])
def test_batch_norm_is_over_the_papers_64_images_by_default(monkeypatch, processes, batch,
                                                           bn_batch):
    for key, value in (("RANK", 0), ("WORLD_SIZE", processes), ("LOCAL_RANK", 0),
                       ("LOCAL_WORLD_SIZE", processes)):
        monkeypatch.setenv(key, str(value))
    args = run.parse_args(["9", "train", "--batch-size", str(batch), "--device", "cpu"])
    assert args.bn_batch == bn_batch
    # The name says the BN batch where it is not the paper's 64, whatever the processes: one
    # process and two with --batch-size 64 normalise over 64 and 32, in folders of their own.
    assert ("bn" in args.name) == (bn_batch != 64)


def test_data_dir_defaults_to_the_data_sets_own_variable_or_folder(monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("CIFAR100_DIR", "/data/c100")
    assert run.parse_args(["3", "train"]).data_dir == os.path.join("data", "cifar-10-batches-bin")
    assert run.parse_args(["3", "train", "--dataset", "cifar100"]).data_dir == "/data/c100"
    monkeypatch.delenv("CIFAR100_DIR")
    monkeypatch.setenv("CIFAR10_DIR", "/data/c10")
    assert run.parse_args(["3", "train"]).data_dir == "/data/c10"
    assert run.parse_args(["3", "train", "--dataset", "cifar100"]).data_dir == \
        os.path.join("data", "cifar-100-binary")
    assert run.parse_args(["3", "train", "--data-dir", "here"]).data_dir == "here"


# ---------------------------------------------------------------- data order

def test_every_epoch_is_a_fresh_permutation_with_no_image_dropped():
    order = run.BatchOrder(seed=0, size=1000, batch_size=128, device="cpu")
    iterations = -(-3 * 1000 // 128)  # enough batches for three epochs
    stream = torch.cat([order(i) for i in range(iterations)])
    epochs = stream[:3000].view(3, 1000)
    for epoch in epochs:
        assert torch.equal(epoch.sort().values, torch.arange(1000))
    assert not torch.equal(epochs[0], epochs[1])
    assert all(len(order(i)) == 128 for i in range(iterations))


def test_batch_order_is_a_function_of_seed_and_iteration():
    a = run.BatchOrder(seed=1, size=1000, batch_size=128, device="cpu")
    b = run.BatchOrder(seed=1, size=1000, batch_size=128, device="cpu")
    c = run.BatchOrder(seed=2, size=1000, batch_size=128, device="cpu")
    assert torch.equal(a(7), b(7))  # b never saw iterations 0-6
    assert not torch.equal(a(7), c(7))


def test_a_process_whose_evaluation_shard_is_empty_adds_zeros(monkeypatch):
    # Under torchrun, --val-size 1 leaves the second process no image of the validation split.
    from resnet import ResNet
    reduced = []
    monkeypatch.setattr(run.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(run.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(run.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(run.dist, "all_reduce", lambda sums: reduced.append(sums.clone()))
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    result = run.evaluate(ResNet(1), images, torch.tensor([3]), torch.zeros(3, 32, 32), "none")
    (sums,) = reduced
    assert sums.shape == (11,) and not sums.any()  # 10 classes' errors and the loss: zeros
    assert len(result["per_class_error"]) == 10


def test_the_processor_is_named_with_its_vector_units(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    core = ("processor\t: {}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD  EPYC 9B45\n"
            "flags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n")
    cpuinfo.write_text(core.format(0) + core.format(1))
    assert plumbing.cpu_model(str(cpuinfo)) == "AMD EPYC 9B45 (AVX-512, AVX512-BF16)"
    cpuinfo.write_text(core.format(0).replace(" avx512f avx512_bf16", " amx_bf16"))
    assert plumbing.cpu_model(str(cpuinfo)) == "AMD EPYC 9B45 (AMX-BF16)"
    assert plumbing.cpu_model(str(tmp_path / "absent")) != ""


# ---------------------------------------------------------------- train and test runs

@pytest.fixture(scope="module")
def finished_run(synthetic_cifar, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    assert train(synthetic_cifar, logdir) == 0
    return os.path.join(logdir, "resnet8-iters12")


def test_a_run_folder_holds_config_checkpoint_events_and_result(finished_run):
    files = os.listdir(finished_run)
    assert {"config.json", "checkpoint.pt", "model.pt", "result.json"} <= set(files)
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert not any(".tmp-" in f for f in files)
    with open(os.path.join(finished_run, "config.json")) as f:
        config = json.load(f)
    assert config["params"] == 75_290 and config["depth"] == 8 and config["milestones"] == [6, 9]
    assert config["start"]["torch"] == torch.__version__ and config["start"]["threads"] == 2
    assert config["start"]["processor"] == plumbing.cpu_model() != ""
    assert config["start"]["cores"] == plumbing.usable_cores() >= 1
    with open(os.path.join(finished_run, "result.json")) as f:
        result = json.load(f)
    assert result["iterations"] == 12 and 0 <= result["test_error"] <= 100
    assert {"params", "plain", "shortcut", "seed", "train_seconds", "images_per_second"} <= result.keys()


def test_checkpoint_loads_weights_only_without_wrapper_prefixes(finished_run):
    state = checkpoint_of(finished_run)
    assert state["iteration"] == 12
    assert state["per_pixel_mean"].shape == (3, 32, 32)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    model = run.build_model(state["config"], torch.device("cpu"))
    model.load_state_dict(state["model"])


@pytest.mark.slow
def test_a_run_ends_with_a_checkpoint_of_its_final_iteration(synthetic_cifar, tmp_path,
                                                             monkeypatch):
    # Checkpoints, not test errors: a stand-in for the final evaluation of 10,000 images.
    monkeypatch.setattr(run, "evaluate", lambda *args: {"error": 50.0, "loss": 2.0})
    assert train(synthetic_cifar, tmp_path, "--iters", "6") == 0  # --ckpt-every 4: at 4 and 6
    folder = tmp_path / "resnet8-iters6"
    state, final = checkpoint_of(folder), torch.load(folder / "model.pt", weights_only=True)
    assert state["iteration"] == final["iteration"] == 6
    assert all(torch.equal(state["model"][k], final["model"][k]) for k in final["model"])


def test_final_weights_evaluate_alone_to_the_runs_test_error(finished_run, synthetic_cifar,
                                                             capsys):
    model_path = os.path.join(finished_run, "model.pt")
    assert "optimizer" not in torch.load(model_path, weights_only=True)
    assert run.main(["1", "test", "--checkpoint", model_path, "--data-dir", synthetic_cifar]) == 0
    with open(os.path.join(finished_run, "result.json")) as f:
        expected = json.load(f)["test_error"]
    assert f"test error {expected:.2f}%" in capsys.readouterr().out


def test_event_files_hold_the_curves_by_iteration(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(finished_run)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/error", "train/loss", "test/error", "test/loss", "lr",
            "speed/images_per_second"} <= tags
    assert [e.step for e in events.Scalars("train/error")] == [4, 8, 12]
    assert [e.step for e in events.Scalars("test/error")] == [8, 12]
    assert [round(e.value, 6) for e in events.Scalars("lr")] == [0.1, 0.01, 0.001]


def test_a_finished_run_says_so_and_exits_0(finished_run, synthetic_cifar, capsys):
    logdir = os.path.dirname(finished_run)
    assert train(synthetic_cifar, logdir) == 0
    assert "already finished" in capsys.readouterr().out


def test_test_mode_writes_errors_and_layer_responses(finished_run, synthetic_cifar, capsys):
    logdir = os.path.dirname(finished_run)
    assert run.main(["1", "test", "--iters", "12", "--data-dir", synthetic_cifar,
                     "--logdir", str(logdir)]) == 0
    out = capsys.readouterr().out
    with open(os.path.join(finished_run, "test.json")) as f:
        report = json.load(f)
    with open(os.path.join(finished_run, "result.json")) as f:
        result = json.load(f)
    assert report["test_error"] == pytest.approx(result["test_error"])  # same evaluation code
    assert f"{report['test_error']:.2f}%" in out and "iteration 12" in out
    assert len(report["per_class_error"]) == 10 and report["iteration"] == 12
    assert len(report["layer_responses"]) == 6 * 1 + 1
    assert all(s > 0 for s in report["layer_responses"])


def test_test_mode_refuses_a_checkpoint_of_another_network(finished_run, synthetic_cifar, capsys):
    path = os.path.join(finished_run, "checkpoint.pt")
    assert run.main(["2", "test", "--checkpoint", path, "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert "ResNet-8" in err and "ResNet-14" in err


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_test_mode_refuses_missing_or_foreign_checkpoints(tmp_path, synthetic_cifar, content, capsys):
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    assert run.main(["1", "test", "--checkpoint", str(path), "--data-dir", synthetic_cifar]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1


def test_resume_with_another_configuration_is_refused(finished_run, synthetic_cifar, capsys):
    logdir = os.path.dirname(finished_run)
    code = train(synthetic_cifar, logdir, "--name", "resnet8-iters12", "--plain", "--seed", "4")
    assert code == 1
    err = capsys.readouterr().err
    assert "plain" in err and "seed" in err and "--fresh" in err


@pytest.mark.slow
def test_bn_batch_is_the_runs_and_a_resume_with_another_is_refused(synthetic_cifar, tmp_path,
                                                                    capsys):
    assert train(synthetic_cifar, tmp_path, "--batch-size", "32", "--bn-batch", "16",
                 "--iters", "8") == 0
    folder = tmp_path / "resnet8-iters8-bs32-bn16"
    with open(folder / "config.json") as f:
        assert json.load(f)["bn_batch"] == 16
    model = torch.load(folder / "model.pt", weights_only=True)
    assert model["config"]["bn_batch"] == 16
    capsys.readouterr()
    code = train(synthetic_cifar, tmp_path, "--batch-size", "32", "--bn-batch", "8",
                 "--iters", "8", "--name", folder.name)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "bn_batch" in err and "--bn-batch 16" in err


@pytest.mark.slow
def test_a_run_of_the_old_default_is_refused_with_the_flags_that_resume_it(synthetic_cifar,
                                                                           tmp_path, capsys):
    # begun when BN was over the whole batch by default, in the folder the command still names
    assert train(synthetic_cifar, tmp_path, "--iters", "8", "--bn-batch", "128",
                 "--name", "resnet8-iters8") == 0
    capsys.readouterr()
    assert train(synthetic_cifar, tmp_path, "--iters", "8") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "add --bn-batch 128 --name resnet8-iters8" in err
    assert train(synthetic_cifar, tmp_path, "--iters", "8", "--bn-batch", "128",
                 "--name", "resnet8-iters8") == 0
    assert "finished" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet8-iters8"]


@pytest.mark.parametrize("config, bn_batch", [
    ({"batch_size": 128}, 128),  # a checkpoint's: one process
    ({"batch_size": 128, "start": {"processes": 2}}, 64),
    ({"batch_size": 128, "start": {"processes": 2}, "sync_bn": True}, 128),
    ({"batch_size": 96, "start": {"processes": 4}}, 24),
    # a config.json damaged or foreign in these fields: the batch, as one process
    ({"batch_size": 128, "start": {"processes": 3}}, 128),
    ({"batch_size": 128, "start": {"processes": "2"}}, 128),
    ({"batch_size": 128, "start": {"processes": 0}}, 128),
    ({"batch_size": 128, "start": [2]}, 128),
    ({"batch_size": "128", "start": {"processes": 2}}, "128"),
])
def test_the_bn_batch_of_a_run_begun_before_bn_batch_was_recorded(config, bn_batch):
    assert run.with_added_defaults(config)["bn_batch"] == bn_batch


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_begun_before_bn_batch_reads_as_bn_over_each_processs_share(processes,
                                                                         synthetic_cifar,
                                                                         tmp_path, capsys):
    # A run begun before --bn-batch: its checkpoint and config.json name no BN batch; each of
    # its processes normalised over its own share of the batch, the whole 128 in one process,
    # 64 under torchrun with two (config.json's start says how many).
    assert train(synthetic_cifar, tmp_path, "--iters", "8", "--bn-batch", "128",
                 "--name", "resnet8-iters8") == 0
    folder = tmp_path / "resnet8-iters8"
    state = run.load_checkpoint(str(folder / "checkpoint.pt"), run.CHECKPOINT_KEYS)
    info = json.loads((folder / "config.json").read_text())
    for config in (state["config"], info):
        del config["bn_batch"], config["dataset"]
    info["start"]["processes"] = processes
    run.save_checkpoint(str(folder / "checkpoint.pt"), state)
    (folder / "config.json").write_text(json.dumps(info))
    assert plot_curves.read_config(str(folder))["bn_batch"] == 128 // processes  # Table 6's label
    capsys.readouterr()
    code = train(synthetic_cifar, tmp_path, "--iters", "8")  # BN over each 64 images
    out, err = capsys.readouterr()
    if processes == 1:
        assert code == 1 and "add --bn-batch 128 --name resnet8-iters8" in err
    else:
        assert code == 0 and "finished" in out, err


@pytest.mark.slow
def test_fresh_moves_the_old_run_aside(synthetic_cifar, tmp_path, capsys):
    assert train(synthetic_cifar, tmp_path, "--iters", "4") == 0
    assert train(synthetic_cifar, tmp_path, "--iters", "4", "--fresh") == 0
    replaced = os.listdir(tmp_path / ".replaced")
    assert len(replaced) == 1 and replaced[0].startswith("resnet8-iters4-")
    assert os.path.exists(tmp_path / ".replaced" / replaced[0] / "result.json")
    assert os.path.exists(tmp_path / "resnet8-iters4" / "result.json")


@pytest.mark.slow
def test_a_second_process_on_the_same_run_folder_is_refused_even_without_its_lock_file(
        synthetic_cifar, tmp_path, capsys):
    with plumbing.run_folder(str(tmp_path), "resnet8-iters12", fresh=False) as folder:
        os.remove(os.path.join(folder, ".lock"))  # tidied away: the folder stays locked
        assert train(synthetic_cifar, tmp_path) == 1
    assert "in use by another process" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(folder, "checkpoint.pt"))


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
        synthetic_cifar, tmp_path, capsys):
    folder = tmp_path / "diverge"
    assert train(synthetic_cifar, tmp_path, "--name", "diverge", "--iters", "40",
                 "--log-every", "1", "--ckpt-every", "1", "--lr", "1e12") == 1
    err = capsys.readouterr().err
    assert "not finite" in err and "checkpoint" in err
    state = checkpoint_of(folder)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not os.path.exists(folder / "result.json")


@pytest.mark.slow
def test_resume_is_bit_exact_after_kill_9(synthetic_cifar, tmp_path):
    flags = ["--iters", "40", "--log-every", "5", "--ckpt-every", "5", "--eval-every", "1000",
             "--threads", "2"]
    assert run.main(["1", "train", "--data-dir", synthetic_cifar, "--logdir",
                     str(tmp_path / "once"), *flags]) == 0
    logdir = tmp_path / "killed"
    folder = logdir / "resnet8-iters40"
    process = start(synthetic_cifar, logdir, *flags)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill between checkpoints, once training is under way
        if (folder / "checkpoint.pt").exists() and checkpoint_of(folder)["iteration"] >= 10:
            break
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert checkpoint_of(folder)["iteration"] < 40, "the run finished before it was killed"
    resumed = start(synthetic_cifar, logdir, *flags)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming from iteration" in out
    assert_same_state(checkpoint_of(tmp_path / "once" / "resnet8-iters40"), checkpoint_of(folder))


@pytest.mark.slow
def test_a_run_stopped_at_an_evaluation_and_resumed_logs_every_point_once(synthetic_cifar,
                                                                         tmp_path):
    # Iteration 8 is a logging, evaluation and checkpoint iteration: what the stopped process
    # logged there must survive the resume, and the evaluation must not be skipped.
    with sigterm_after(8):
        assert train(synthetic_cifar, tmp_path / "stopped", "--eval-every", "4") == \
            128 + signal.SIGTERM
    assert checkpoint_of(tmp_path / "stopped" / "resnet8-iters12")["iteration"] == 8
    assert train(synthetic_cifar, tmp_path / "stopped", "--eval-every", "4") == 0
    assert train(synthetic_cifar, tmp_path / "once", "--eval-every", "4") == 0
    resumed, once = (plot_curves.load_scalars(str(tmp_path / kind / "resnet8-iters12"))
                     for kind in ("stopped", "once"))
    assert resumed["train/error"][0] == resumed["test/error"][0] == [4, 8, 12]
    for tag in ("train/error", "train/loss", "test/error", "test/loss", "lr"):
        assert resumed[tag] == once[tag], tag  # bit-exact resume: the same values


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_nonzero(synthetic_cifar, tmp_path):
    folder = tmp_path / "resnet8-iters2000"
    process = start(synthetic_cifar, tmp_path, "--iters", "2000", "--ckpt-every", "1000",
                    "--log-every", "1", "--eval-every", "1000")
    deadline = time.time() + 120
    while time.time() < deadline and not list(folder.glob("events.out.tfevents*")):
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps in
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "checkpoint written" in err and "Traceback" not in err
    iteration = checkpoint_of(folder)["iteration"]
    assert 0 < iteration < 1000  # written at the signal, not at --ckpt-every


def test_a_short_real_data_run_learns(real_cifar, tmp_path):
    assert run.main(["1", "train", "--data-dir", real_cifar, "--logdir", str(tmp_path),
                     "--iters", "200", "--eval-every", "1000", "--log-every", "50"]) == 0
    with open(tmp_path / "resnet8-iters200" / "result.json") as f:
        result = json.load(f)
    print(f"ResNet-8, 200 iterations on CIFAR-10: test error {result['test_error']:.2f}%")
    assert result["test_error"] < 75.0  # chance is 90%; ~55-60% is typical here


@pytest.mark.slow
def test_warmup_on_trains_at_001_while_the_error_stays_above_80_percent(synthetic_cifar, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert train(synthetic_cifar, tmp_path, "--warmup", "on") == 0  # random labels: ~90% error
    events = EventAccumulator(str(tmp_path / "resnet8-iters12-warmup-on"))
    events.Reload()
    assert [round(e.value, 6) for e in events.Scalars("lr")] == [0.01, 0.01, 0.01]
    assert "warmup/ended_at" not in events.Tags()["scalars"]


@pytest.mark.slow
def test_the_speed_of_a_window_spanning_a_resume_counts_only_its_own_seconds(synthetic_cifar,
                                                                            tmp_path):
    # A clock on which every training step takes one second, and setting a run up (a start or
    # a resume) 100: a window's speed and the run's training seconds count only the steps.
    now = [0.0]
    real_step, real_run_info = run.train_step, run.write_run_info

    def one_second_step(*args, **kwargs):
        now[0] += 1.0
        return real_step(*args, **kwargs)

    def slow_setup(*args, **kwargs):
        now[0] += 100.0
        return real_run_info(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "perf_counter", lambda: now[0])
        patch.setattr(run, "train_step", one_second_step)
        patch.setattr(run, "write_run_info", slow_setup)
        with sigterm_after(6):  # mid-window: windows end at 4, 8, 12
            assert train(synthetic_cifar, tmp_path) == 128 + signal.SIGTERM
        assert train(synthetic_cifar, tmp_path) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "resnet8-iters12")).Reload()
    speeds = {e.step: e.value for e in events.Scalars("speed/images_per_second")}
    assert speeds == {4: 128.0, 8: 128.0, 12: 128.0}  # 128 images a second, resume or not
    assert json.loads((tmp_path / "resnet8-iters12" / "result.json").read_text())[
        "train_seconds"] == 12.0


@pytest.mark.slow
def test_without_a_terminal_progress_is_a_plain_line_and_the_time_left_is_estimated(
        synthetic_cifar, tmp_path, capsys):
    assert train(synthetic_cifar, tmp_path) == 0  # captured output: no terminal, no bar
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("iter 4/12") and "img/s" in line for line in out) == 1
    assert not any(line.startswith("iter 8/12") for line in out)  # at most once a minute
    assert sum("left at" in line and "images/s" in line for line in out) == 1


@pytest.mark.slow
def test_the_stop_message_starts_on_a_line_of_its_own_after_the_progress_bar(
        synthetic_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # the bar draws
    with sigterm_after(5):
        assert train(synthetic_cifar, tmp_path) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    line = next(part for part in err.split("\n") if "stopped by a signal" in part)
    assert line.split("\r")[-1].startswith("stopped by a signal"), repr(line)

