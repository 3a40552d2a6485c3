"""plot_curves.py: Figure 6, Figure 7 and Table 6 from small synthetic run folders."""
import glob
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys

import pytest
from matplotlib.colors import to_rgba
from torch.utils.tensorboard import SummaryWriter

import plot_curves
import plumbing
from conftest import ROOT, no_hang

PARAMS = {3: 269_722, 5: 464_154, 7: 658_586, 9: 853_018, 18: 1_727_962, 200: 19_421_274}
PROJECTIONS = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64  # option B's two 1x1 conv + BN


def params_of(n, plain, shortcut, dataset):
    """The parameters run.py records for the net: option B's projections, CIFAR-100's fc."""
    extra_classes = 90 if dataset == "cifar100" else 0
    return (PARAMS[n] + (PROJECTIONS if shortcut == "B" and not plain else 0)
            + 65 * extra_classes)


def make_run(logdir, name, n=3, plain=False, shortcut="A", seed=0, amp="none", iters=64_000,
             final=8.0, stop_at=None, events=True, responses=None, dataset=None, tested=None,
             bn_batch=None):
    """A run folder as run.py writes it, with synthetic curves that end at `final` % test error:
    training error every iters/10 iterations, test error every iters/4.
    stop_at: the run was interrupted there (no result.json). responses: a test.json with these
    layer responses, of the last iteration, in the format of the published ones (without the
    fields of `tested`, which it adds). dataset: in config.json (older ones have none)."""
    folder = os.path.join(logdir, name)
    os.makedirs(folder)
    params = params_of(n, plain, shortcut, dataset)
    milestones = [32_000, 48_000] if iters == 64_000 else [iters // 2, iters * 3 // 4]
    config = dict(n=n, plain=plain, shortcut=shortcut, iters=iters, milestones=milestones, lr=0.1,
                  batch_size=128, weight_decay=1e-4, momentum=0.9, seed=seed, val_size=0,
                  warmup="auto", amp=amp, depth=6 * n + 2, params=params, name=name,
                  eval_every=iters // 4, log_every=iters // 10, start={}, resumes=[])
    if dataset is not None:
        config["dataset"] = dataset
    if bn_batch is not None:  # older ones have none: BN over the whole batch of 128
        config["bn_batch"] = bn_batch
    write_json(os.path.join(folder, "config.json"), config)
    end = stop_at or iters
    if events:
        writer = SummaryWriter(folder)
        for step in range(1, end + 1):
            if step % (iters // 10) == 0:
                writer.add_scalar("train/error", final - 2 + 80 * (1 - step / iters) ** 2, step)
            if step % (iters // 4) == 0:
                writer.add_scalar("test/error", final + 60 * (1 - step / iters) ** 2, step)
        writer.close()
    if stop_at is None:
        write_json(os.path.join(folder, "result.json"), dict(
            test_error=final, test_loss=0.3, iterations=iters, depth=6 * n + 2, params=params,
            plain=plain, shortcut=shortcut, seed=seed, amp=amp, warmup_end=None))
    if responses is not None:
        write_json(os.path.join(folder, "test.json"), dict(dict(
            test_error=final, per_class_error={}, iteration=end, params=params,
            depth=6 * n + 2, plain=plain, shortcut=shortcut, checkpoint="checkpoint.pt",
            layer_responses=responses), **(tested or {})))
    return folder


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def row(table, method, depth):
    """The cells of the table row that starts with `method | depth`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [method, str(depth)]:
            return cells
    raise AssertionError(f"no row {method} {depth} in\n{table}")


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


# ---------------------------------------------------------------- event files

def test_resumed_run_keeps_later_file_values_and_drops_purged_steps(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step in range(100, 1001, 100):
        writer.add_scalar("train/error", step / 100, step)
    writer.close()
    [first] = os.listdir(tmp_path)
    # Resumed from the checkpoint at 500, and its name sorts first (as another process's can,
    # within one second): the order must come from the files' own times.
    writer = SummaryWriter(str(tmp_path), purge_step=500)
    for step in (600, 700, 800):
        writer.add_scalar("train/error", 100 + step / 100, step)
    writer.close()
    [resumed] = set(os.listdir(tmp_path)) - {first}
    os.rename(tmp_path / resumed, tmp_path / "events.out.tfevents.0000000000.first-by-name")
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2
    steps, values = plot_curves.load_scalars(str(tmp_path))["train/error"]
    assert steps == [100, 200, 300, 400, 600, 700, 800]
    assert values == [1, 2, 3, 4, 106, 107, 108]


def test_restart_without_purge_step_drops_earlier_steps_from_its_first_step_on(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step in (100, 200, 300):
        writer.add_scalar("test/error", 50.0, step)
    writer.close()
    writer = SummaryWriter(str(tmp_path))  # run.py: resume at iteration 0
    writer.add_scalar("test/error", 40.0, 200)
    writer.close()
    assert plot_curves.load_scalars(str(tmp_path))["test/error"] == ([100, 200], [50.0, 40.0])


def test_corrupted_event_file_is_named_and_its_readable_part_kept(tmp_path, capsys):
    folder = make_run(str(tmp_path), "resnet20")
    path = glob.glob(os.path.join(folder, "events.out.tfevents.*"))[0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(data)
    (run,) = plot_curves.find_runs(str(tmp_path))
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and path in message and "corrupted" in message
    steps, _ = run.scalars["train/error"]
    assert steps[0] == 6_400 and steps[-1] < 64_000


# ---------------------------------------------------------------- Table 6

def test_table_gives_best_mean_std_over_seeds(tmp_path):
    errors = [8.5, 8.0, 9.5]
    for seed, error in enumerate(errors):
        make_run(str(tmp_path), f"resnet20-seed{seed}", seed=seed, final=error, events=False)
    cells = row(plot_curves.table6(plot_curves.find_runs(str(tmp_path))), "ResNet", 20)
    assert statistics.stdev(errors) == pytest.approx(0.7638, abs=1e-4)  # sample std; ddof=0 gives 0.62
    assert cells[2:] == ["0.27M", "8.00 (8.67±0.76)", "8.75", "-0.75", "3", "64,000"]


def write_test_curve(folder, points):
    """A test error curve [(iteration, error %)] in the run folder's event file."""
    writer = SummaryWriter(folder)
    for step, error in points:
        writer.add_scalar("test/error", error, step)
    writer.close()


def test_final_test_error_is_the_result_never_the_best_evaluation(tmp_path):
    # Seeds whose test error dipped below where it ended (final -> the curve's lowest): by
    # final error the median is seed 2 (8.0), by lowest evaluation seed 1 (7.0).
    curves = {9.0: [30.0, 5.0, 6.0], 7.0: [30.0, 12.0, 7.5], 8.0: [30.0, 7.75, 7.875]}
    for seed, (final, points) in enumerate(curves.items()):
        folder = make_run(str(tmp_path), f"resnet20-seed{seed}", seed=seed, final=final,
                          events=False)
        write_test_curve(folder, zip((16_000, 32_000, 48_000, 64_000), points + [final]))
    folder = make_run(str(tmp_path), "resnet20-seed3", seed=3, stop_at=48_000, events=False)
    write_test_curve(folder, [(16_000, 30.0), (32_000, 20.0), (48_000, 25.0)])
    runs = plot_curves.find_runs(str(tmp_path))
    table = plot_curves.table6(runs)
    assert row(table, "ResNet", 20)[3:7] == ["7.00 (8.00±1.00)", "8.75", "-1.75", "3"]
    unfinished = row(table, "ResNet (unfinished: 48,000 / 64,000 iters)", 20)
    assert unfinished[3] == "25.00 (last eval, iter 48,000)"
    _, ax, _ = plot_curves.figure6(runs).axes
    assert list(ax.lines[0].get_ydata()) == [30.0, 7.75, 7.875, 8.0]  # the median, by final


def test_unfinished_run_gets_its_own_labelled_row_outside_the_mean(tmp_path):
    make_run(str(tmp_path), "a", n=18, seed=1, final=6.0)
    make_run(str(tmp_path), "b", n=18, seed=2, final=7.0)
    make_run(str(tmp_path), "c", n=18, seed=3, final=6.5, stop_at=19_200)
    table = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    assert row(table, "ResNet", 110)[3:7] == ["6.00 (6.50±0.71)", "6.43 (6.61±0.16)",
                                             "-0.43 (-0.11)", "2"]
    unfinished = row(table, "ResNet (unfinished: 19,200 / 64,000 iters)", 110)
    # its last test evaluation was at 16,000: 6.5 + 60 * (1 - 16000/64000)^2
    assert unfinished[3:] == ["40.25 (last eval, iter 16,000)", "6.43 (6.61±0.16)", "-", "1",
                              "19,200"]


def test_paper_figure_only_beside_runs_of_its_recipe_and_whole_schedule(tmp_path):
    make_run(str(tmp_path), "resnet20-iters6400", iters=6400, final=13.0, events=False)
    make_run(str(tmp_path), "resnet20-bf16-iters6400", amp="bf16", iters=6400, final=13.2,
             events=False)
    folder = make_run(str(tmp_path), "resnet20-lr0.2", final=8.5, events=False)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    write_json(os.path.join(folder, "config.json"), dict(config, lr=0.2))
    table = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    assert row(table, "ResNet (float32, 6,400 iters, lr/10 at 3,200/4,800)", 20)[3:6] == \
        ["13.00", "-", "-"]
    assert row(table, "ResNet (bf16, 6,400 iters, lr/10 at 3,200/4,800)", 20)[3:6] == \
        ["13.20", "-", "-"]
    assert row(table, "ResNet (float32, lr 0.2)", 20)[3:6] == ["8.50", "-", "-"]


def test_cifar100_runs_are_their_own_rows_without_the_papers_figure(tmp_path):
    make_run(str(tmp_path), "resnet20", final=8.0, events=False)  # config.json without dataset
    make_run(str(tmp_path), "resnet20-seed1", seed=1, final=9.0, dataset="cifar10", events=False)
    make_run(str(tmp_path), "resnet20-cifar100", final=31.0, dataset="cifar100", events=False)
    table = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    assert row(table, "ResNet", 20)[3:7] == ["8.00 (8.50±0.71)", "8.75", "-0.75", "2"]
    assert row(table, "ResNet (dataset cifar100)", 20)[3:7] == ["31.00", "-", "-", "1"]


def test_plain_option_b_and_bf16_runs_are_separate_rows(tmp_path):
    make_run(str(tmp_path), "resnet56", n=9, final=7.0, events=False)
    make_run(str(tmp_path), "resnet56-B", n=9, shortcut="B", final=6.8, events=False)
    make_run(str(tmp_path), "resnet56-bf16", n=9, amp="bf16", final=7.2, events=False)
    make_run(str(tmp_path), "plain56", n=9, plain=True, shortcut="B", final=12.0, events=False)
    table = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    # float32 is named where some rows are bf16
    assert row(table, "ResNet (float32)", 56)[3:6] == ["7.00", "6.97", "+0.03"]
    assert row(table, "ResNet (option B, float32)", 56)[3:6] == ["6.80", "-", "-"]
    assert row(table, "ResNet (bf16)", 56)[3:6] == ["7.20", "6.97", "+0.23"]
    assert row(table, "plain (float32)", 56)[3:6] == ["12.00", "-", "-"]  # shortcut is moot


def test_float32_is_named_only_where_some_runs_are_bf16(tmp_path):
    make_run(str(tmp_path), "resnet56", n=9, final=7.0)
    make_run(str(tmp_path), "plain56", n=9, plain=True, final=12.0, events=False)
    table = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    assert row(table, "ResNet", 56)[3] == "7.00" and row(table, "plain", 56)[3] == "12.00"
    make_run(str(tmp_path), "resnet56-bf16", n=9, amp="bf16", final=7.2)
    runs = plot_curves.find_runs(str(tmp_path))
    assert row(plot_curves.table6(runs), "ResNet (float32)", 56)[3] == "7.00"
    legends = [text.get_text() for ax in plot_curves.figure6(runs).axes
               if ax.get_legend() for text in ax.get_legend().get_texts()]
    assert "ResNet-56 (float32)" in legends and "ResNet-56 (bf16)" in legends


# ---------------------------------------------------------------- figures

def test_bn_batch_is_labelled_and_its_own_row_only_where_runs_differ(tmp_path, capsys):
    make_run(tmp_path, "resnet56", n=9, final=8.2)
    make_run(tmp_path, "resnet56-seed1", n=9, seed=1, final=8.4, bn_batch=128)
    alone = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    assert row(alone, "ResNet", 56)[3] == "8.20 (8.30±0.14)"  # no bn_batch reads as 128
    make_run(tmp_path, "resnet56-bn64", n=9, final=7.1, bn_batch=64, responses=[1.0] * 55)
    runs = plot_curves.find_runs(str(tmp_path))
    table = plot_curves.table6(runs)
    assert row(table, "ResNet (BN 128)", 56)[3] == "8.20 (8.30±0.14)"
    assert row(table, "ResNet (BN 64)", 56)[3:5] == ["7.10", "6.97"]
    legends = [text.get_text() for ax in plot_curves.figure6(runs).axes
               if ax.get_legend() for text in ax.get_legend().get_texts()]
    assert "ResNet-56 (BN 64)" in legends and "ResNet-56 (BN 128, median of 2)" in legends


def test_figure6_has_the_papers_three_panels_with_a_line_pair_per_depth(tmp_path):
    for n, plain in ((3, True), (9, True), (3, False), (18, False), (200, False)):
        make_run(str(tmp_path), f"{'plain' if plain else 'resnet'}{6 * n + 2}", n=n, plain=plain)
    fig = plot_curves.figure6(plot_curves.find_runs(str(tmp_path)))
    plain, resnets, deep = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["plain nets", "ResNets",
                                                   "ResNet-110 vs ResNet-1202"]
    assert [t.get_text() for t in plain.get_legend().get_texts()] == ["plain-20", "plain-56"]
    assert [t.get_text() for t in resnets.get_legend().get_texts()] == ["ResNet-20", "ResNet-110"]
    assert [t.get_text() for t in deep.get_legend().get_texts()] == ["ResNet-110", "ResNet-1202"]
    test_line, train_line = plain.lines[:2]  # bold test error, dashed training error
    assert test_line.get_linestyle() == "-" and train_line.get_linestyle() == "--"
    assert test_line.get_linewidth() > train_line.get_linewidth()
    assert test_line.get_color() == train_line.get_color()
    assert plain.get_xlabel() == "iter. (1e4)" and plain.get_ylabel() == "error (%)"
    assert plain.get_xlim() == (0, 6.4) and plain.get_ylim() == (0, 20)


def test_figure6_leaves_out_panels_without_runs_with_a_note(tmp_path, capsys):
    # A schedule other than the paper's: its row has only the panels with runs.
    make_run(str(tmp_path), "resnet20", iters=6400)
    make_run(str(tmp_path), "resnet110", n=18, iters=6400)  # no 1202: the panel would repeat it
    fig = plot_curves.figure6(plot_curves.find_runs(str(tmp_path)), ylim=(0, 50))
    assert [ax.get_title() for ax in fig.axes] == ["ResNets"]
    assert fig.axes[0].get_ylim() == (0, 50)
    out = capsys.readouterr().out
    assert "panel 'plain nets' left out" in out
    assert "panel 'ResNet-110 vs ResNet-1202' left out: no ResNet-1202 run" in out


def panel_texts(ax):
    return [text.get_text() for text in ax.texts]


def test_figure6_papers_schedule_keeps_its_panels_and_names_the_commands_for_missing_nets(
        tmp_path):
    make_run(str(tmp_path), "resnet20-bf16", amp="bf16")
    make_run(str(tmp_path), "resnet110-bf16", n=18, amp="bf16")
    plain, resnets, deep = plot_curves.figure6(plot_curves.find_runs(str(tmp_path)),
                                               ylim=(0, 50)).axes
    assert [ax.get_title() for ax in (plain, resnets, deep)] == [
        "plain nets", "ResNets", "ResNet-110 vs ResNet-1202"]
    assert plain.get_legend() is None and not plain.lines
    (text,) = panel_texts(plain)
    assert text.startswith("no run yet:\n") and " ".join(text.split()[3:]) == \
        "python reproduce.py --only plain20 plain32 plain44 plain56 --amp bf16"
    (text,) = panel_texts(resnets)
    assert " ".join(text.split()) == ("not run yet: ResNet-32, ResNet-44, ResNet-56: python "
                                      "reproduce.py --only resnet32 resnet44 resnet56 --amp bf16")
    assert [t.get_text() for t in deep.get_legend().get_texts()] == ["ResNet-110 (bf16)"]
    assert "--only resnet1202 --amp bf16" in " ".join(panel_texts(deep)[0].split())
    assert all(ax.get_ylim() == (0, 20) and ax.get_xlim() == (0, 6.4)  # the paper's axes
               for ax in (plain, resnets, deep))


def test_figure6_marks_the_papers_final_error_beside_its_recipes_resnets(tmp_path):
    make_run(str(tmp_path), "resnet56", n=9, final=7.5)
    make_run(str(tmp_path), "resnet56-B", n=9, shortcut="B", final=7.2)  # not in Table 6
    make_run(str(tmp_path), "plain56", n=9, plain=True, final=12.0)  # no figure in the paper
    plain, resnets, _ = plot_curves.figure6(plot_curves.find_runs(str(tmp_path))).axes
    assert not plain.collections
    (marks,) = resnets.collections
    assert marks.get_segments()[0].tolist() == [[1.0, 6.97], [1.03, 6.97]]  # right of the panel
    assert resnets.lines[0].get_ydata()[-1] == 7.5  # ResNet-56 option A, drawn first
    assert tuple(marks.get_color()[0]) == to_rgba(resnets.lines[0].get_color())


def test_figure6_marks_the_papers_error_once_per_depth_whatever_the_bn_batches(tmp_path):
    make_run(str(tmp_path), "resnet56", n=9, final=7.5, bn_batch=64)
    make_run(str(tmp_path), "resnet56-bn128", n=9, final=8.0)
    _, resnets, _ = plot_curves.figure6(plot_curves.find_runs(str(tmp_path))).axes
    assert len(resnets.lines) == 4  # two runs, each a test and a training curve
    (marks,) = resnets.collections
    assert len(marks.get_segments()) == 1
    assert tuple(marks.get_color()[0]) == to_rgba(resnets.lines[0].get_color())


def test_figure6_chooses_the_error_axis_per_row(tmp_path):
    make_run(str(tmp_path), "resnet20", final=8.0)
    make_run(str(tmp_path), "resnet56", n=9, final=7.0, stop_at=32_000)
    make_run(str(tmp_path), "plain20-iters6400", plain=True, iters=6400, final=15.0)
    make_run(str(tmp_path), "plain56-iters6400", n=9, plain=True, iters=6400, final=52.0)
    runs = plot_curves.find_runs(str(tmp_path))
    full, short = plot_curves.figure6(runs).axes[1], plot_curves.figure6(runs).axes[3]
    assert full.get_ylim() == (0, 20)  # the paper's, though an unfinished run is above it
    assert short.get_ylim() == (0, 60)  # above plain-56's final errors, 50 (train) and 52
    short = plot_curves.figure6(runs, ylim=(0, 40)).axes[3]
    assert short.get_ylim() == (0, 40)
    make_run(str(tmp_path), "plain56", n=9, plain=True, final=25.0)  # ends above 20%
    full = plot_curves.figure6(plot_curves.find_runs(str(tmp_path))).axes[0]
    assert full.get_ylim() == (0, 30)


def test_figure6_draws_the_median_seed(tmp_path):
    for seed, error in enumerate([9.0, 7.0, 8.0]):
        make_run(str(tmp_path), f"resnet20-seed{seed}", seed=seed, final=error)
    _, ax, _ = plot_curves.figure6(plot_curves.find_runs(str(tmp_path))).axes
    assert len(ax.lines) == 2
    assert ax.lines[0].get_ydata()[-1] == 8.0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ResNet-20 (median of 3)"]


def test_figures_draw_the_lower_middle_seed_of_an_even_count(tmp_path):
    for seed, error in enumerate([9.0, 7.0, 10.0, 8.0]):
        make_run(str(tmp_path), f"resnet20-seed{seed}", seed=seed, final=error,
                 responses=[error] * 19)
    runs = plot_curves.find_runs(str(tmp_path))
    _, ax, _ = plot_curves.figure6(runs).axes
    assert ax.lines[0].get_ydata()[-1] == 8.0  # of 7, 8, 9, 10
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ResNet-20 (median of 4)"]
    top, _ = plot_curves.figure7(runs).axes
    assert list(top.lines[0].get_ydata()) == [8.0] * 19


def test_figure6_labels_a_single_shorter_schedule_in_the_legend(tmp_path):
    make_run(str(tmp_path), "resnet32", n=5, iters=32_000)
    make_run(str(tmp_path), "resnet44", n=7, iters=32_000, stop_at=12_800)
    (ax,) = plot_curves.figure6(plot_curves.find_runs(str(tmp_path))).axes
    assert ax.get_title() == "ResNets" and ax.get_xlim() == (0, 3.2)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ResNet-32 (32,000 iters, lr/10 at 16,000/24,000)",
        "ResNet-44 (32,000 iters, lr/10 at 16,000/24,000, unfinished: 12,800 iters)"]


def test_figure6_draws_one_row_of_panels_per_schedule(tmp_path):
    make_run(str(tmp_path), "resnet20")
    make_run(str(tmp_path), "resnet44", n=7, stop_at=12_800)
    make_run(str(tmp_path), "plain20-iters6400", plain=True, iters=6400)
    make_run(str(tmp_path), "resnet20-iters6400", iters=6400)
    make_run(str(tmp_path), "resnet56-iters6400", n=9, iters=6400)
    fig = plot_curves.figure6(plot_curves.find_runs(str(tmp_path)))
    _, full, _, short_plain, short_resnets = fig.axes  # the full row keeps all three panels
    assert full.get_title() == "ResNets\nthe paper's schedule"
    assert full.get_xlim() == (0, 6.4)
    assert [t.get_text() for t in full.get_legend().get_texts()] == [
        "ResNet-20", "ResNet-44 (unfinished: 12,800 iters)"]
    schedule = "6,400 iters, lr/10 at 3,200/4,800"
    assert short_plain.get_title() == f"plain nets\n{schedule}"
    assert short_resnets.get_title() == f"ResNets\n{schedule}"
    assert short_plain.get_xlim() == short_resnets.get_xlim() == (0, 0.64)
    assert [t.get_text() for t in short_resnets.get_legend().get_texts()] == [
        "ResNet-20", "ResNet-56"]  # the row says the schedule
    places = [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start)
              for ax in (full, short_plain, short_resnets)]
    assert places == [(0, 1), (1, 0), (1, 1)]  # ResNets in the same column in both rows


def test_figure7_draws_network_order_on_top_and_sorted_below(tmp_path, capsys):
    responses = [1.0 + (i % 3) for i in range(19)]
    make_run(str(tmp_path), "resnet20", responses=responses, events=False)
    make_run(str(tmp_path), "plain20", plain=True, responses=[2.0] * 19, events=False)
    make_run(str(tmp_path), "resnet32", n=5, responses=[1.0] * 31, events=False)
    top, bottom = plot_curves.figure7(plot_curves.find_runs(str(tmp_path))).axes
    assert "left out: ResNet-32\n" in capsys.readouterr().out
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["ResNet-20", "plain-20"]
    assert list(top.lines[0].get_ydata()) == responses
    assert list(bottom.lines[0].get_ydata()) == sorted(responses, reverse=True)
    assert top.lines[1].get_linestyle() == "--"  # plain nets dashed, in their depth's colour
    assert top.lines[1].get_color() == top.lines[0].get_color()
    assert bottom.get_xlabel() == "layer index (sorted by magnitude)"


def test_figure7_leaves_out_test_json_not_of_the_final_weights_and_says_so(tmp_path, capsys):
    make_run(str(tmp_path), "resnet20", responses=[1.0] * 19, events=False)  # published format
    make_run(str(tmp_path), "resnet56", n=9, responses=[2.0] * 55, events=False,
             tested=dict(iters=64_000, final_weights=True, in_training=False))
    # A test.json of iteration 32,000 in the published format: tested before the run finished.
    make_run(str(tmp_path), "plain20", plain=True, responses=[3.0] * 19, stop_at=32_000)
    # run.py's word for it: tested while the run was training, at 16,000 of 64,000.
    make_run(str(tmp_path), "resnet110", n=18, responses=[4.0] * 109, stop_at=16_000,
             tested=dict(iters=64_000, final_weights=False, in_training=True))
    # Even once the run has finished since: the test.json is not of its final weights.
    make_run(str(tmp_path), "plain56", n=9, plain=True, responses=[5.0] * 55,
             tested=dict(iteration=48_000, iters=64_000, final_weights=False, in_training=True))
    top, _ = plot_curves.figure7(plot_curves.find_runs(str(tmp_path))).axes
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["ResNet-20", "ResNet-56"]
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "left out of Figure 7" in line]
    assert len(warnings) == 3
    plain20, plain56, resnet110 = warnings  # in folder order
    assert os.path.join(tmp_path, "plain20", "test.json") in plain20
    assert "not of the run's final weights of iteration 32,000 of 64,000;" in plain20
    assert "iteration 48,000 of 64,000, tested while the run was training" in plain56
    assert "iteration 16,000 of 64,000, tested while the run was training" in resnet110


def test_figure7_left_out_when_no_test_json_is_of_final_weights(tmp_path, capsys):
    make_run(str(tmp_path), "resnet20", responses=[1.0] * 19, stop_at=6_400)
    assert plot_curves.figure7(plot_curves.find_runs(str(tmp_path))) is None
    captured = capsys.readouterr()
    assert "left out of Figure 7" in captured.err and "figure 7 left out" in captured.out


def test_figure7_has_a_column_per_schedule_on_log_axes(tmp_path):
    make_run(str(tmp_path), "resnet20", responses=[0.8] * 19, events=False)
    make_run(str(tmp_path), "resnet20-iters6400", iters=6400, responses=[0.9] * 19, events=False)
    make_run(str(tmp_path), "plain56-iters6400", n=9, plain=True, iters=6400,
             responses=[9.0] + [0.8] * 54, events=False)
    full, short, full_sorted, short_sorted = plot_curves.figure7(
        plot_curves.find_runs(str(tmp_path))).axes
    assert full.get_title() == "the paper's schedule"
    assert short.get_title() == "6,400 iters, lr/10 at 3,200/4,800"
    assert [t.get_text() for t in full.get_legend().get_texts()] == ["ResNet-20"]
    assert [t.get_text() for t in short.get_legend().get_texts()] == ["ResNet-20", "plain-56"]
    assert all(ax.get_yscale() == "log" for ax in (full, short, full_sorted, short_sorted))
    assert list(short_sorted.lines[1].get_ydata()) == [9.0] + [0.8] * 54


# ---------------------------------------------------------------- hostile run folders

def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    write_json(path, dict(data, **changes))


def warnings_naming(err, path):
    return [line for line in err.splitlines() if path in line]


def test_why_unreadable_allows_only_small_regular_files_and_links_to_them(tmp_path):
    regular, link = tmp_path / "config.json", tmp_path / "link.json"
    regular.write_text("{}")
    link.symlink_to(regular)
    why_unreadable = plumbing.why_unreadable
    assert why_unreadable(str(regular), 2) is None and why_unreadable(str(link), 2) is None
    assert why_unreadable(str(regular), 1) == f"{regular}: 2 bytes, more than the 1 allowed"
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name, reason in (("fifo", "a FIFO"), ("zero", "a character device"),
                         (".", "a folder"), ("dangling", "cannot read (No such file")):
        path = os.path.join(tmp_path, name)
        assert why_unreadable(path, 2 ** 20).startswith(f"{path}: {reason}")


@pytest.mark.parametrize("name", ["config.json", "result.json", "test.json",
                                  "events.out.tfevents.1.fifo"])
def test_a_fifo_in_a_run_folder_is_named_and_skipped_instead_of_blocking(tmp_path, capsys, name):
    make_run(tmp_path, "resnet20", final=8.0, events=False)
    folder = make_run(tmp_path, "resnet56", n=9, final=7.0, events=False, responses=[1.0] * 55)
    path = os.path.join(folder, name)
    if os.path.exists(path):
        os.remove(path)
    os.mkfifo(path)
    with no_hang(10):
        assert plot_curves.main(["--logdir", str(tmp_path), "--out", str(tmp_path / "out"),
                                 "--markdown-only"]) == 0
    captured = capsys.readouterr()
    (warning,) = warnings_naming(captured.err, path)
    assert "a FIFO, not a regular file" in warning
    assert row(captured.out, "ResNet", 20)[3] == "8.00"


@pytest.mark.parametrize("name", ["config.json", "result.json", "test.json"])
def test_a_deeply_nested_json_file_is_skipped_in_one_line(tmp_path, capsys, name):
    # Small enough to be read, too deep for Python's json (RecursionError, not a ValueError).
    make_run(tmp_path, "resnet20", final=8.0, events=False)
    folder = make_run(tmp_path, "resnet56", n=9, final=7.0, events=False, responses=[1.0] * 55)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    assert plot_curves.main(["--logdir", str(tmp_path), "--out", str(tmp_path / "out"),
                             "--markdown-only"]) == 0
    captured = capsys.readouterr()
    (warning,) = warnings_naming(captured.err, path)
    assert "unreadable" in warning and "Traceback" not in captured.err
    assert row(captured.out, "ResNet", 20)[3] == "8.00"


def test_a_huge_result_json_is_refused_before_it_is_read(tmp_path, capsys):
    folder = make_run(tmp_path, "resnet20", final=8.0, events=False)
    path = os.path.join(folder, "result.json")
    size = plot_curves.JSON_MAX_BYTES + 1
    os.truncate(path, size)  # sparse: takes no room
    (run,) = plot_curves.find_runs(str(tmp_path))
    assert run.result is None
    (warning,) = warnings_naming(capsys.readouterr().err, path)
    assert f"{size:,} bytes, more than the" in warning


def test_a_copied_run_folder_is_one_run_counted_once_with_a_warning(tmp_path, capsys):
    folder = make_run(tmp_path, "resnet20", final=8.0)
    shutil.copytree(folder, tmp_path / "resnet20-backup")
    make_run(tmp_path, "resnet20-seed1", seed=1, final=9.0)
    runs = plot_curves.find_runs(str(tmp_path))
    assert row(plot_curves.table6(runs), "ResNet", 20)[3:7] == [
        "8.00 (8.50±0.71)", "8.75", "-0.75", "2"]
    (warning,) = capsys.readouterr().err.splitlines()
    assert folder in warning and str(tmp_path / "resnet20-backup") in warning


def test_the_same_seed_begun_on_another_processor_is_a_run_of_its_own(tmp_path, capsys):
    make_run(tmp_path, "resnet20", final=8.0)  # older: its config.json names no processor
    for name, final, processor in [("resnet20-amd", 9.0, "AMD EPYC (AVX-512, AVX512-BF16)"),
                                   ("resnet20-amd-backup", 9.0, "AMD EPYC (AVX-512, AVX512-BF16)"),
                                   ("resnet20-xeon", 10.0, "Intel Xeon (AVX-512, AMX)")]:
        edit_json(os.path.join(make_run(tmp_path, name, final=final), "config.json"),
                  start={"processor": processor, "iteration": 0})
    runs = plot_curves.find_runs(str(tmp_path))
    assert row(plot_curves.table6(runs), "ResNet", 20)[3:7] == [
        "8.00 (9.00±1.00)", "8.75", "-0.75", "3"]
    (warning,) = capsys.readouterr().err.splitlines()
    assert "resnet20-amd-backup" in warning and "counted once" in warning


@pytest.mark.parametrize("other", [dict(compile=True), dict(start={"tf32": True}),
                                   dict(start={"device": "cuda"})])
def test_the_same_seed_computed_otherwise_is_a_run_of_its_own(tmp_path, capsys, other):
    # --compile or TF32 round otherwise, and the run takes its own course: not a copy.
    make_run(tmp_path, "resnet20", final=8.0)
    edit_json(os.path.join(make_run(tmp_path, "resnet20-other", final=9.0), "config.json"),
              **other)
    runs = plot_curves.find_runs(str(tmp_path))
    assert row(plot_curves.table6(runs), "ResNet", 20)[3:7] == [
        "8.00 (8.50±0.71)", "8.75", "-0.75", "2"]
    assert capsys.readouterr().err == ""


def test_of_two_finished_copies_the_one_with_its_test_json_is_kept(tmp_path, capsys):
    make_run(tmp_path, "resnet20-a", final=8.0)
    make_run(tmp_path, "resnet20-b", final=8.0, responses=[1.0] * 19)
    (run,) = plot_curves.find_runs(str(tmp_path))
    assert run.folder == str(tmp_path / "resnet20-b") and run.test is not None


def test_of_two_copies_of_a_run_the_finished_one_is_kept(tmp_path, capsys):
    make_run(tmp_path, "resnet20", final=8.0, stop_at=32_000)
    make_run(tmp_path, "resnet20-backup", final=7.0)
    make_run(tmp_path, "resnet20-copy", final=7.0)
    (run,) = plot_curves.find_runs(str(tmp_path))
    assert run.folder == str(tmp_path / "resnet20-backup")
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and all(run.folder in warning for warning in warnings)


@pytest.mark.parametrize("says", [dict(depth=8, params=75_290),  # trained as n=1
                                  dict(params=853_018), dict(depth=56), dict(shortcut="B")])
def test_a_config_json_whose_n_contradicts_its_depth_or_params_is_skipped(tmp_path, capsys,
                                                                          says):
    make_run(tmp_path, "resnet20", final=8.0)
    path = os.path.join(make_run(tmp_path, "resnet20-edited", final=5.0), "config.json")
    edit_json(path, **says)
    table = plot_curves.table6(plot_curves.find_runs(str(tmp_path)))
    assert row(table, "ResNet", 20)[3:7] == ["8.00", "8.75", "-0.75", "1"]
    (warning,) = capsys.readouterr().err.splitlines()
    assert path in warning and "skipped" in warning


@pytest.mark.parametrize("file, key, value", [
    ("config.json", "n", "3"), ("config.json", "n", 0), ("config.json", "n", 10 ** 12),
    ("config.json", "plain", "false"),
    ("config.json", "milestones", 32_000), ("config.json", "milestones", ["32k"]),
    ("config.json", "iters", None), ("config.json", "lr", [0.1]), ("config.json", "seed", {}),
    ("config.json", "dataset", "svhn"), ("config.json", "bn_batch", "64"),
    ("result.json", "test_error", "7.0"), ("result.json", "iterations", 64_000.5),
    ("test.json", "iteration", "64000"), ("test.json", "layer_responses", [1, "x"])])
def test_a_value_of_the_wrong_type_skips_its_file_in_one_line_and_the_table_is_made(
        tmp_path, capsys, file, key, value):
    make_run(tmp_path, "resnet20", final=8.0, events=False)
    path = os.path.join(make_run(tmp_path, "resnet56", n=9, final=7.0, responses=[1.0] * 55,
                                 events=False), file)
    edit_json(path, **{key: value})
    assert plot_curves.main(["--logdir", str(tmp_path), "--out", str(tmp_path / "out"),
                             "--markdown-only"]) == 0
    captured = capsys.readouterr()
    (warning,) = warnings_naming(captured.err, path)
    assert f"{key} is {json.dumps(value)}, expected" in warning
    assert row(captured.out, "ResNet", 20)[3] == "8.00"


def test_non_finite_curve_points_are_dropped_with_a_warning_and_leave_the_axis_alone(
        tmp_path, capsys):
    folder = make_run(tmp_path, "resnet20", final=8.0, events=False)
    writer = SummaryWriter(folder)
    # Both curves end in NaN, so that max() meets one first whatever order PYTHONHASHSEED gives
    # the set of curves.
    for step, train, test in ((32_000, 10.0, 15.0), (48_000, math.inf, 9.0),
                              (64_000, math.nan, math.nan)):
        writer.add_scalar("train/error", train, step)
        writer.add_scalar("test/error", test, step)
    writer.close()
    make_run(tmp_path, "resnet56", n=9, final=7.0)
    runs = plot_curves.find_runs(str(tmp_path))
    _, resnets, _ = plot_curves.figure6(runs).axes
    assert resnets.get_ylim() == (0, 20)
    assert runs[0].scalars["train/error"] == ([32_000], [10.0])
    assert runs[0].scalars["test/error"] == ([32_000, 48_000], [15.0, 9.0])
    (path,) = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    (warning,) = capsys.readouterr().err.splitlines()
    assert path in warning and "3 non-finite values (test/error, train/error)" in warning


# ---------------------------------------------------------------- command line

def test_main_writes_figures_and_table_despite_bad_run_folders(tmp_path, capsys):
    logdir, out = str(tmp_path / "logs"), str(tmp_path / "out")
    make_run(logdir, "resnet20", responses=[1.0] * 19)
    make_run(logdir, "plain20", plain=True, events=False)  # finished, but its events are lost
    broken = make_run(logdir, "resnet56", n=9)
    open(glob.glob(os.path.join(broken, "events.out.tfevents.*"))[0], "wb").write(b"not a record")
    os.makedirs(os.path.join(logdir, "notes"))  # no config.json
    make_run(os.path.join(logdir, ".replaced"), "resnet20-20240101", final=50.0)
    assert plot_curves.main(["--logdir", logdir, "--out", out]) == 0
    captured = capsys.readouterr()
    assert "resnet56" in captured.err and "corrupted" in captured.err
    assert "plain20: no training curves" in captured.err and "notes: no config.json" in captured.err
    table = open(os.path.join(out, "table6.md")).read()
    assert table in captured.out
    assert [row(table, m, d)[3] for m, d in (("ResNet", 20), ("ResNet", 56), ("plain", 20))] == \
        ["8.00", "8.00", "8.00"]
    assert "50.00" not in table  # .replaced/ holds no runs
    for name in ("figure6", "figure7"):
        width, height = png_size(os.path.join(out, f"{name}.png"))
        assert 600 < width < 3000 and 400 < height < 2000
        assert os.path.getsize(os.path.join(out, f"{name}.pdf")) > 1000


def test_markdown_only_writes_the_table_without_importing_matplotlib(tmp_path):
    make_run(str(tmp_path / "logs"), "resnet20")
    script = ("import sys, plot_curves; code = plot_curves.main(sys.argv[1:]); "
              "assert 'matplotlib' not in sys.modules; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "--logdir", str(tmp_path / "logs"),
                           "--out", str(tmp_path / "out"), "--markdown-only"],
                          cwd=os.path.dirname(plot_curves.__file__), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path / "out") == ["table6.md"]


def test_missing_or_empty_logdir_exits_1_with_one_line(tmp_path, capsys):
    assert plot_curves.main(["--logdir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--logdir {tmp_path / 'nowhere'}" in err
    assert plot_curves.main(["--logdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err


def test_bad_ylim_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        plot_curves.main(["--ylim", "20", "0"])
    assert raised.value.code == 2
    assert "--ylim: expected two finite numbers LO < HI" in capsys.readouterr().err


def test_the_tables_and_the_plan_need_no_torch():
    code = ("import sys, experiment, plot_curves; "
            "sys.exit('torch' in sys.modules or 'run' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
