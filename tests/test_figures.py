"""The figures of scripts/plot.py, drawn from small real runs and inspected as matplotlib objects: what a
reader needs to read them (integer epoch ticks, a marker on each point of a short series, plain tick
labels, the learning rate per step, legends that hide nothing and list only what is drawn, every
label inside the picture), and the refusal of output paths that must not be written, before anything
is drawn. sharpness.py's figures: tests/test_sharpness.py, with these helpers."""

import json
import math
import re
import sys

import matplotlib
import pytest

matplotlib.use("Agg")

import train  # noqa: E402
from analysis import figures  # noqa: E402
from conftest import REPO, write_cifar10  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import plot  # noqa: E402

NO_MARKER = (None, "None", "none", "", " ")


# -- what every figure must satisfy; tests/test_sharpness.py uses these too --------------------------------

def drawn(fig):
    """The figure laid out and drawn (as savefig does) -> its renderer."""
    if not hasattr(fig.canvas, "get_renderer"):  # a figure pyplot has closed
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def tick_labels(axis):
    """The tick labels an axis draws: those of its ticks inside the view (the locator's list has more)."""
    low, high = sorted(axis.get_view_interval())
    index = 0 if axis.axis_name == "x" else 1
    span = (high - low) * 1e-9
    return [t for t in axis.get_ticklabels(which="both")
            if low - span <= t.get_position()[index] <= high + span and t.get_visible() and t.get_text().strip()]


def texts(fig):
    """Every piece of text the figure shows: titles, axis labels, tick labels, offset texts, legend texts."""
    found = [t for t in fig.texts]
    for ax in fig.axes:
        found += [ax.title, ax._left_title, ax._right_title]
        for axis in (ax.xaxis, ax.yaxis):
            found += [axis.label, axis.get_offset_text(), *tick_labels(axis)]
        if ax.get_legend():
            found += ax.get_legend().get_texts()
    for legend in fig.legends:
        found += legend.get_texts()
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def assert_text_inside(fig):
    renderer = drawn(fig)
    box = fig.bbox
    for t in texts(fig):
        b = t.get_window_extent(renderer)
        assert box.x0 - 1 <= b.x0 and b.x1 <= box.x1 + 1 and box.y0 - 1 <= b.y0 and b.y1 <= box.y1 + 1, \
            f"{t.get_text()!r} is cut off: {b} outside the figure {box}"


def assert_plain_tick_labels(fig):
    """No offset and no "2x10^0": plain numbers ("0.01", "2", never "+2.05"), or on an axis reaching below
    0.001 or to 10^4, one short scientific form for every label ("1e-6", "1e-2"), never the two mixed."""
    drawn(fig)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            assert not axis.get_offset_text().get_text(), f"offset text {axis.get_offset_text().get_text()!r}"
            labels = [label.get_text().replace("\u2212", "-") for label in tick_labels(axis) if label.get_text()]
            for text in labels:
                assert not re.search(r"\$|\\times|×|\^", text), f"tick label {text!r} is not plain"
            scientific = [text for text in labels if re.search(r"\d[eE][-+]?\d", text)]
            if scientific:
                assert len(scientific) == len(labels), f"tick labels of two forms on one axis: {labels}"
                low, high = sorted(abs(v) for v in axis.get_view_interval())
                assert low < 1e-3 or high >= 1e4, f"tick labels {labels}: plain numbers fit this axis"


def assert_legends_hide_nothing(fig):
    """Each legend lies outside every axes and clear of every axis label and tick label."""
    renderer = drawn(fig)
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "a legend covers an axes"
            for t in [ax.xaxis.label, ax.yaxis.label, ax.title, *tick_labels(ax.xaxis), *tick_labels(ax.yaxis)]:
                if t.get_visible() and t.get_text().strip():
                    assert not box.overlaps(t.get_window_extent(renderer)), f"a legend covers {t.get_text()!r}"


def labelled_lines(fig):
    return [line for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")]


def finite_points(line):
    return [(x, y) for x, y in zip(line.get_xdata(), line.get_ydata()) if math.isfinite(x) and math.isfinite(y)]


def data_lines(fig):
    """The lines drawn from data (not axvline's and axhline's, which live partly in axes coordinates)."""
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_transform() is ax.transData]


def assert_short_series_have_markers(fig):
    """A series of at most figures.FEW points shows a marker on each (one point: a marker, not nothing)."""
    for line in data_lines(fig):
        if len(finite_points(line)) <= figures.FEW:
            assert line.get_marker() not in NO_MARKER, f"{line.get_label()!r}: {len(finite_points(line))} points, " \
                                                       f"no markers"


def assert_legend_lists_only_drawn(fig):
    """Every legend entry names a series that draws something: a marker, or a line through two points."""
    shown = {}
    for line in labelled_lines(fig):
        points = finite_points(line)
        visible = points and (line.get_marker() not in NO_MARKER or
                              (len(points) >= 2 and line.get_linestyle() not in NO_MARKER))
        shown[re.sub(r"\s+", "", line.get_label())] = shown.get(re.sub(r"\s+", "", line.get_label())) or bool(visible)
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    entries = [re.sub(r"\s+", "", t.get_text()) for legend in legends for t in legend.get_texts()]
    assert entries, "no legend"
    for entry in entries:
        assert shown.get(entry), f"legend entry {entry!r} draws nothing"


def assert_readable(fig):
    assert_text_inside(fig)
    assert_plain_tick_labels(fig)
    assert_legends_hide_nothing(fig)
    assert_short_series_have_markers(fig)
    assert_legend_lists_only_drawn(fig)


# -- scripts/plot.py -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-epoch SGD seeds, one 2-epoch SAM run and a 1-epoch run, logged every 50 steps (the default),
    so each has one lr record an epoch."""
    root = tmp_path_factory.mktemp("figures")
    data = write_cifar10(root / "data", per_batch=40)
    common = ["--model", "wrn10_1", "--batch-size", "32", "--eval-batch-size", "64", "--device", "cpu",
              "--wandb-mode", "disabled", "--data-dir", str(data), "--out-dir", str(root / "runs"), "--m-sharpness", "0"]
    for name, extra in (("sgd-seed0", ["--optimizer", "sgd", "--seed", "0"]), ("sgd-seed1", ["--optimizer", "sgd", "--seed", "1"]),
                        ("sam-seed0", []), ("one-epoch", ["--epochs", "1"])):
        assert train.main([*common, "--epochs", "2", *extra, "--name", name]) == 0
    return root / "runs"


def draw_curves(folders, tmp_path):
    return plot.plot({f: plot.read_curves(f) for f in map(plot.Path, folders)}, tmp_path / "curves.png")


def test_short_runs_draw_markers_integer_epochs_and_only_what_they_hold(runs, tmp_path):
    fig = draw_curves(plot.run_folders([runs]), tmp_path)
    assert_readable(fig)
    loss, error, lr = fig.axes
    for ax in (loss, error, lr):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), f"{ax.get_title()}: epoch ticks {ticks}"
    one = [line for line in loss.get_lines() if line.get_label().startswith("one-epoch")]
    assert len(one) == 1 and len(finite_points(one[0])) == 1 and one[0].get_marker() not in NO_MARKER
    labels = [re.sub(r"\s+", "", t.get_text()) for t in fig.legends[0].get_texts()]
    assert sorted(labels) == ["one-epoch(1seed)", "sam(1seed)", "sgd(2seeds)"]
    assert loss.get_yscale() == "linear"  # 2.2 to 1.7: under a decade


def test_learning_rate_is_drawn_per_step_and_shows_the_cosine(runs, tmp_path):
    fig = draw_curves([runs / "sgd-seed0"], tmp_path)
    lr = fig.axes[2]
    (schedule,) = labelled_lines_of(lr)
    x, y = list(schedule.get_xdata()), list(schedule.get_ydata())
    records = [json.loads(line) for line in open(runs / "sgd-seed0" / "metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "step"]
    per_epoch = [r for r in records if r["kind"] == "epoch"][0]["step"]
    assert len(steps) == 2 and len(x) == 2 * per_epoch + 1  # every step, though only 2 were logged
    assert x[0] == 0 and y[0] == pytest.approx(0.1)  # the peak, at the first step
    for r in steps:  # through every logged value
        assert y[x.index(r["step"] / per_epoch)] == pytest.approx(r["lr"], abs=1e-12)
    quarter = y[round(len(x) / 4)]  # a cosine, not the straight line between the records
    assert quarter == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)), rel=1e-6)
    assert quarter > 0.08


def labelled_lines_of(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_a_schedule_the_records_contradict_is_not_drawn(runs, tmp_path):
    """A run resumed with a new lr or length: config.yaml's cosine is not what it ran; the records alone."""
    import shutil
    copy = tmp_path / "changed-seed0"
    shutil.copytree(runs / "sgd-seed0", copy)
    config = (copy / "config.yaml").read_text()
    assert "\nlr: 0.1\n" in config
    (copy / "config.yaml").write_text(config.replace("\nlr: 0.1\n", "\nlr: 0.2\n"))
    fig = draw_curves([copy], tmp_path)
    (line,) = labelled_lines_of(fig.axes[2])
    assert len(line.get_xdata()) == 2 and line.get_marker() not in NO_MARKER
    assert_readable(fig)


def write_run(folder, losses, epochs_lr=None):
    """A run folder as train.py leaves it, as far as plot.py reads it (metrics.jsonl, config.yaml)."""
    folder.mkdir(parents=True)
    rows = []
    for epoch, loss in enumerate(losses, start=1):
        rows.append({"step": 10 * epoch, "kind": "step", "lr": 0.1 * 0.5 * (1 + math.cos(math.pi * epoch / len(losses))),
                     "epoch": epoch})
        rows.append({"step": 10 * epoch, "kind": "epoch", "epoch": epoch, "train/loss": loss, "test/error": 0.5,
                     "test/acc": 0.5})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "config.yaml").write_text(f"lr: 0.1\nepochs: {len(losses)}\n")


def test_a_loss_over_decades_is_on_a_log_axis_with_plain_labels_and_long_names_fit(tmp_path):
    long = "wrn28_10-cifar10-autoaugment-sam-rho0.05+dropout=0.1+epochs=200+batch_size=128+label_noise=0.2"
    for i in range(3):
        write_run(tmp_path / f"{long}+lr={i}-seed0", [2.3 * 10 ** (-3 * e / 40) for e in range(40)])
    fig = draw_curves(plot.run_folders([tmp_path]), tmp_path)
    assert fig.axes[0].get_yscale() == "log"
    labels = [t.get_text().replace("\u2212", "-") for t in tick_labels(fig.axes[0].yaxis)]
    assert {"0.01", "0.1", "1"} <= set(labels)
    assert_readable(fig)  # the three long names wrapped or stacked, inside the picture
    labels = sorted(re.sub(r"\s+", "", t.get_text()) for t in fig.legends[0].get_texts())
    assert labels == [f"wrn28_10-cifar10-autoaugment-sam-rho0.05+lr={i}(1seed)" for i in range(3)]  # what differs
    assert fig._suptitle.get_text() == "all runs: dropout=0.1, epochs=200, batch_size=128, label_noise=0.2"


def out_cases(runs, tmp_path):
    (tmp_path / "a-file").write_text("")
    link = tmp_path / "link.png"
    link.symlink_to(runs / "sgd-seed0" / "config.yaml")
    cases = [(tmp_path, "is a folder"), (tmp_path / "missing" / "c.png", "does not exist"),
             (tmp_path / "a-file" / "c.png", "does not exist"), (link, "own config.yaml"),
             *((runs / "sgd-seed0" / name, f"own {name}") for name in figures.RUN_FILES if (runs / "sgd-seed0" / name).exists())]
    if (plot.Path("/proc/self").is_dir()):
        cases.append((plot.Path("/proc/curves.png"), "not writable"))
    return cases


def test_out_paths_that_must_not_be_written_are_refused_before_anything_is_drawn(runs, tmp_path, capsys, monkeypatch):
    def fail(*args):
        raise AssertionError("read or drew before checking --out")

    monkeypatch.setattr(plot, "plot", fail)
    monkeypatch.setattr(plot, "read_curves", fail)
    before = {p: p.read_bytes() for p in (runs / "sgd-seed0").iterdir() if p.is_file()}
    cases = out_cases(runs, tmp_path)
    assert len(cases) >= 7
    for out, message in cases:
        assert plot.main([str(runs), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (out, err)
    assert before == {p: p.read_bytes() for p in (runs / "sgd-seed0").iterdir() if p.is_file()}


def test_damaged_metrics_lines_are_left_out_with_one_warning_naming_them(tmp_path, capsys):
    """plot.py reads the records of many runs: a damaged line is skipped, and said (file, line numbers)."""
    write_run(tmp_path / "r", [2.0, 1.5, 1.0])
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "kind": "epoch", "epoch": 4, "train/loss": "NaN", "test/error": 0.5}\n')  # line 7
        f.write("[1, 2]\n" + '{"step": 4' + "\n")  # lines 8, 9: not a record; torn
    assert plot.main([str(tmp_path / "r"), "--out", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {tmp_path / 'r' / 'metrics.jsonl'}: 3 damaged lines (7, 8, 9) left out of the plot"]
    assert (tmp_path / "c.png").is_file()


@pytest.mark.parametrize("seeds", [1, 2])
def test_runs_of_one_epoch_have_whole_epoch_ticks_and_their_seeds_range(tmp_path, seeds):
    """One epoch is one point per curve: the epoch axis still shows whole numbers around it (matplotlib's
    integer locator gives up when the view holds one), and two seeds' range is an error bar (a band of one
    point draws nothing)."""
    folders = []
    for seed in range(seeds):
        write_run(tmp_path / f"x-seed{seed}", [2.3 + 0.1 * seed])
        folders.append(tmp_path / f"x-seed{seed}")
    fig = draw_curves(folders, tmp_path)
    loss = fig.axes[0]
    low, high = loss.get_xlim()
    ticks = [t for t in loss.get_xticks() if low <= t <= high]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    bars = [c for c in loss.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == (seeds > 1)
    if bars:
        assert sorted(cap.get_ydata()[0] for cap in bars[0].lines[1]) == pytest.approx([2.3, 2.4])  # min and max
