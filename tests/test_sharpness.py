"""analysis/ and sharpness.py against independent references: the exact Hessian, hand
computations of m-sharpness and of Li et al.'s filter normalisation; the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torch.func import functional_call

import sharpness
import train
from analysis.hessian import HessianOperator, power_iteration, spectral_density, top_eigenvalues
from analysis.landscape import along, filter_normalised_direction
from analysis.m_sharpness import m_sharpness
from conftest import write_cifar10


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()  # 51 parameters
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
               for _ in range(2)]
    return model, batches


def exact_hessian(model, batches):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        weights = {n: v.view(s) for n, v, s in zip(names, pieces, shapes)}
        return sum(nn.functional.cross_entropy(functional_call(model, weights, (x,)), y) for x, y in batches) / 2

    return torch.autograd.functional.hessian(loss, flat)


def operator(model, batches):
    return HessianOperator(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), model.parameters(), batches)


def test_top_eigenvalues_are_the_exact_hessians():
    model, batches = tiny()
    want = torch.linalg.eigvalsh(exact_hessian(model, batches)).flip(0)
    got = top_eigenvalues(operator(model, batches), 6)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want[:6], rtol=1e-6, atol=1e-10)
    assert want[0] > 10 * abs(want[5]) or want[0] != want[5]  # a spectrum with structure, not a constant
    assert power_iteration(operator(model, batches), iters=200) == pytest.approx(
        max(want[0].item(), -want[-1].item(), key=abs), rel=1e-4)


def test_spectral_density_integrates_to_one_and_sits_on_the_spectrum():
    model, batches = tiny()
    exact = torch.linalg.eigvalsh(exact_hessian(model, batches))
    grid, density = spectral_density(operator(model, batches), runs=3, steps=51)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)
    mean = torch.trapezoid(density * grid, grid).item()  # the density's mean is the trace / n
    assert mean == pytest.approx(exact.mean().item(), abs=0.05 * exact.abs().max().item())


def test_m_sharpness_is_the_mean_rise_after_each_groups_ascent():
    model, batches = tiny()
    rho = 0.1
    want = []
    for x, y in batches:  # by hand: the group's gradient, one step of size rho, the rise of its loss
        w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        names = [n for n, _ in model.named_parameters()]

        def loss(weights):
            return nn.functional.cross_entropy(functional_call(model, dict(zip(names, weights)), (x,)), y)

        g = torch.autograd.grad(loss(w), w)
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        want.append((loss([a + rho * b / norm for a, b in zip(w, g)]) - loss(w)).item())
    before = [p.detach().clone() for p in model.parameters()]
    got = m_sharpness(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), model.parameters(), batches, rho)
    assert got == pytest.approx(sum(want) / 2, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights back exactly


def test_filter_normalisation_follows_li_et_al():
    conv = nn.Conv2d(3, 8, 3)
    bn = nn.BatchNorm2d(8)
    params = [conv.weight, conv.bias, bn.weight]
    d_weight, d_bias, d_bn = filter_normalised_direction(params, torch.Generator().manual_seed(0))
    for i in range(8):  # each filter of the direction has the norm of the weight's filter
        assert d_weight[i].norm().item() == pytest.approx(conv.weight[i].norm().item(), rel=1e-6)
    assert not torch.allclose(d_weight[0] / d_weight[0].norm(), conv.weight[0] / conv.weight[0].norm())
    assert torch.equal(d_bias, torch.zeros(8)) and torch.equal(d_bn, torch.zeros(8))  # ignore='biasbn'


def test_landscape_evaluates_the_grid_and_restores_the_weights():
    model, batches = tiny()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    d = [torch.ones_like(p) for p in params]
    x, y = batches[0]
    losses = along(lambda: nn.functional.cross_entropy(model(x), y).item(), params, [d], [(0.0,), (0.5,)])
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
        shifted = nn.functional.cross_entropy(model(x), y).item()
        for p, b in zip(params, before):
            p.copy_(b)
    assert losses == [nn.functional.cross_entropy(model(x), y).item(), shifted]
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharpness")
    data = write_cifar10(root / "data", per_batch=40)
    common = ["--model", "wrn10_1", "--batch-size", "32", "--device", "cpu", "--wandb-mode", "offline",
              "--data-dir", str(data), "--out-dir", str(root / "runs"), "--epochs", "1", "--m-sharpness", "0"]
    assert train.main([*common, "--name", "sam", "--sharpness-every", "1"]) == 0
    assert train.main([*common, "--name", "sgd", "--optimizer", "sgd"]) == 0
    return root


@pytest.mark.slow
def test_cli_end_to_end_writes_json_and_valid_pictures(tiny_runs, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tiny_runs / "runs" / "sam"
    code = sharpness.main([str(run), "--hessian", "5", "--density", "--density-runs", "2", "--density-steps", "10",
                           "--m-sharpness", "16", "--landscape", "2d", "--points", "5", "--batches", "2",
                           "--batch-size", "32"])
    assert code == 0
    result = json.loads((run / "sharpness.json").read_text())
    values = result["hessian_eigenvalues"]
    assert len(values) == 5 and values == sorted(values, reverse=True)
    assert result["lambda_max"] == values[0] and result["lambda_max_over_lambda_5"] == values[0] / values[4]
    assert result["m_sharpness"]["m"] == 16 and result["m_sharpness"]["rho"] == 0.05
    assert len(result["landscape_2d"]["loss"]) == 5 and len(result["landscape_2d"]["loss"][0]) == 5
    for name in ("hessian_density.png", "landscape_2d.png"):
        Image.open(run / name).verify()
    # the lambda_max that training logged comes from the same kind of measurement
    logged = [json.loads(line) for line in open(run / "metrics.jsonl") if "sharpness/lambda_max" in line]
    assert len(logged) == 1 and logged[0]["sharpness/time_s"] > 0
    # and the results went to the run's own W&B run (offline here), resumed by its id
    from wandb_records import read_records, run_files_in_start_order
    state = torch.load(run / "last.pt", weights_only=True)
    offline = run_files_in_start_order(run)  # training's, then sharpness.py's
    assert len(offline) == 2 and all(p.name == f"run-{state['run_id']}.wandb" for p in offline)
    records = read_records(offline[-1])
    summary = {item.key for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert {"sharpness/lambda_max", "sharpness/m_sharpness"} <= summary


@pytest.mark.slow
def test_cli_compares_two_runs_on_one_figure(tiny_runs, tmp_path):
    runs = tiny_runs / "runs"
    code = sharpness.main(["--compare", str(runs / "sgd"), str(runs / "sam"), "--landscape", "1d", "interp",
                           "--points", "5", "--batches", "1", "--batch-size", "32", "--out", str(tmp_path),
                           "--wandb-mode", "disabled"])
    assert code == 0
    result = json.loads((tmp_path / "sharpness.json").read_text())
    assert set(result["runs"]) == {"sgd", "sam"} and len(result["interpolation"]["loss"]) == 5
    assert all(len(r["landscape_1d"]["loss"]) == 5 for r in result["runs"].values())
    for name in ("landscape_1d.png", "interpolation.png"):
        Image.open(tmp_path / name).verify()


@pytest.mark.parametrize("args, message", [
    ([], "give one run folder"),
    (["RUN"], "nothing to measure"),
    (["RUN", "--landscape", "interp"], "add --compare"),
    (["RUN", "--hessian", "3", "--m-sharpness", "5"], "must divide --batch-size"),
    (["nowhere", "--hessian", "3"], "is not a readable train.py checkpoint"),
])
def test_cli_bad_input_is_one_line_exit_2(tiny_runs, capsys, args, message):
    args = [str(tiny_runs / "runs" / "sam") if a == "RUN" else a for a in args]
    assert sharpness.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


# -- --lanczos-steps ----------------------------------------------------------------------------------------

class CountingOperator(HessianOperator):
    products = 0

    def __call__(self, vector):
        type(self).products += 1
        return super().__call__(vector)


def test_fewer_lanczos_steps_run_fewer_hessian_vector_products():
    model, batches = tiny()
    counted = {}
    for steps in (None, 4):
        CountingOperator.products = 0
        op = CountingOperator(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), model.parameters(), batches)
        values = top_eigenvalues(op, 2, steps=steps)
        counted[steps] = CountingOperator.products
        assert len(values) == 2
    assert counted == {None: 32, 4: 4}  # the default max(3k, k + 30) for k = 2, then exactly what was asked


@pytest.mark.slow
def test_lanczos_steps_reach_the_lanczos_routine(tiny_runs, tmp_path, monkeypatch):
    import analysis.hessian
    asked, real = [], analysis.hessian.lanczos

    def recording(operator, start, steps, progress=None):
        asked.append(steps)
        return real(operator, start, steps, progress)

    monkeypatch.setattr(analysis.hessian, "lanczos", recording)
    run = tiny_runs / "runs" / "sgd"
    common = [str(run), "--hessian", "2", "--batches", "1", "--batch-size", "32", "--wandb-mode", "disabled"]
    assert sharpness.main([*common, "--lanczos-steps", "3", "--out", str(tmp_path / "three")]) == 0
    assert asked == [3]
    result = json.loads((tmp_path / "three" / "sharpness.json").read_text())
    assert result["lanczos_steps"] == 3 and len(result["hessian_eigenvalues"]) == 2
    monkeypatch.setattr(analysis.hessian, "lanczos", lambda op, start, steps, progress=None:
                        asked.append(steps) or ([1.0] * steps, [0.5] * (steps - 1)))  # the default, without its cost
    assert sharpness.main([*common, "--out", str(tmp_path / "default")]) == 0
    assert asked == [3, 32]
    assert json.loads((tmp_path / "default" / "sharpness.json").read_text())["lanczos_steps"] == 32


@pytest.mark.parametrize("args, message", [
    (["RUN", "--hessian", "3", "--lanczos-steps", "2"], "--lanczos-steps must be an integer in [3, 10000]"),
    (["RUN", "--hessian", "1", "--lanczos-steps", "0"], "--lanczos-steps must be an integer in [1, 10000]"),
    (["RUN", "--hessian", "1", "--lanczos-steps", "-5"], "--lanczos-steps must be"),
    (["RUN", "--hessian", "1", "--lanczos-steps", "10001"], "--lanczos-steps must be"),
    (["RUN", "--density", "--lanczos-steps", "5"], "is a setting of --hessian K"),
    (["RUN", "--hessian", "2", "--lanczos-steps", "2.5"], "invalid int value"),
    (["RUN", "--hessian", "2", "--lanczos-steps", "many"], "invalid int value"),
])
def test_bad_lanczos_steps_are_one_line_exit_2(tiny_runs, capsys, args, message):
    args = [str(tiny_runs / "runs" / "sam") if a == "RUN" else a for a in args]
    try:
        code = sharpness.main(args)
    except SystemExit as e:  # argparse's own errors: OneLineParser exits 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_lanczos_steps_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        sharpness.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lanczos-steps N" in help_text and "default: max(3K, K + 30)" in help_text


# -- output paths: refused before anything is loaded, measured or drawn ---------------------------------------

def test_out_paths_that_must_not_be_written_are_refused_first(tiny_runs, tmp_path, capsys, monkeypatch):
    from analysis import figures

    def fail(*args, **kwargs):
        raise AssertionError("loaded, measured or drew before checking the output paths")

    monkeypatch.setattr(sharpness, "Measured", fail)
    run = tiny_runs / "runs" / "sam"
    (tmp_path / "a-file").write_text("")
    (tmp_path / "json-is-a-folder" / "sharpness.json").mkdir(parents=True)
    (tmp_path / "png-is-a-folder" / "landscape_1d.png").mkdir(parents=True)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "sharpness.json").symlink_to(run / "last.pt")
    cases = [(tmp_path / "a-file", "it is a file"), (tmp_path / "missing" / "deeper", "does not exist"),
             (tmp_path / "json-is-a-folder", "is a folder"), (tmp_path / "png-is-a-folder", "is a folder"),
             (tmp_path / "linked", "own last.pt"),
             *((run / name, f"own {name}") for name in figures.RUN_FILES if (run / name).exists())]
    if Path("/proc/self").is_dir():
        cases.append((Path("/proc/sharpness-out"), "not writable"))
    before = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for out, message in cases:
        assert sharpness.main([str(run), "--landscape", "1d", "--out", str(out)]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (out, err)
    assert before == {p: p.read_bytes() for p in run.iterdir() if p.is_file()}


def test_a_run_folder_that_cannot_take_the_outputs_is_refused_before_measuring(tiny_runs, tmp_path, capsys,
                                                                               monkeypatch):
    import shutil
    run = tmp_path / "sam"
    shutil.copytree(tiny_runs / "runs" / "sam", run, ignore=shutil.ignore_patterns("wandb", "sharpness.json", "*.png"))
    (run / "landscape_1d.png").mkdir()
    monkeypatch.setattr(sharpness, "measure", lambda *a: (_ for _ in ()).throw(AssertionError("measured")))
    assert sharpness.main([str(run), "--landscape", "1d", "--batches", "1", "--batch-size", "32",
                           "--wandb-mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "landscape_1d.png is a folder" in err[0]


# -- the figures: readable at the sizes people look at them -------------------------------------------------

@pytest.fixture(scope="module")
def comparison(tiny_runs, tmp_path_factory):
    """sharpness.json of an SGD-SAM comparison with every figure, on tiny runs."""
    out = tmp_path_factory.mktemp("comparison")
    runs = tiny_runs / "runs"
    assert sharpness.main(["--compare", str(runs / "sgd"), str(runs / "sam"), "--density", "--density-runs", "1",
                           "--density-steps", "8", "--landscape", "1d", "2d", "interp", "--points", "5",
                           "--batches", "1", "--batch-size", "32", "--out", str(out), "--wandb-mode", "disabled"]) == 0
    return json.loads((out / "sharpness.json").read_text())


@pytest.mark.slow
def test_every_figure_is_readable(comparison):
    from test_figures import assert_readable
    drawn = sharpness.draw(comparison["runs"], comparison["interpolation"])
    assert set(drawn) == {"hessian_density.png", "landscape_1d.png", "landscape_2d.png", "interpolation.png"}
    for name, fig in drawn.items():
        assert_readable(fig)


@pytest.mark.slow
def test_landscape_1d_marks_its_few_points_and_its_legend_clears_the_axis_label(comparison):
    from test_figures import drawn as render, labelled_lines
    fig = sharpness.draw(comparison["runs"])["landscape_1d.png"]
    renderer = render(fig)
    (ax,) = fig.axes
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for label in (ax.xaxis.label, ax.yaxis.label):
        assert not box.overlaps(label.get_window_extent(renderer))
    lines = labelled_lines(fig)
    assert [line.get_label() for line in lines] == ["sgd", "sam"]
    assert all(len(line.get_xdata()) == 5 and line.get_marker() not in (None, "None", "") for line in lines)
    assert lines[0].get_linestyle() != lines[1].get_linestyle()  # curves that coincide stay visible


@pytest.mark.slow
def test_density_axis_keeps_every_bump_and_drops_the_empty_decades(comparison):
    fig = sharpness.draw(comparison["runs"])["hessian_density.png"]
    (ax,) = fig.axes
    bottom, top = ax.get_ylim()
    peaks = []
    for run in comparison["runs"].values():
        d = run["density"]["density"]
        peaks += [v for a, v, b in zip(d, d[1:], d[2:]) if v >= a and v >= b and v > max(d) * 1e-15]
        assert max(d) <= top
    assert peaks and bottom <= min(peaks)  # every Ritz value's bump in view
    assert bottom >= min(peaks) / 100  # and not twelve decades of nothing under them
    assert ax.get_yscale() == "log"


@pytest.mark.slow
def test_landscape_2d_fills_its_minimum_and_marks_the_trained_weights(comparison):
    fig = sharpness.draw(comparison["runs"])["landscape_2d.png"]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["sgd", "sam"]
    lowest = min(v for run in comparison["runs"].values() for row in run["landscape_2d"]["loss"] for v in row)
    for ax in panels:
        (filled,) = [c for c in ax.collections if getattr(c, "filled", False)]
        assert filled.levels[0] <= lowest  # no blank hole around the minimum
        (marker,) = [line for line in ax.get_lines() if line.get_marker() == "x"]
        assert list(marker.get_xdata()) == [0] and list(marker.get_ydata()) == [0]


@pytest.mark.slow
def test_interpolation_marks_where_each_run_sits(comparison):
    fig = sharpness.draw(comparison["runs"], comparison["interpolation"])["interpolation.png"]
    (ax,) = fig.axes
    vertical = [line for line in ax.get_lines() if line.get_transform() is not ax.transData]
    assert sorted((line.get_xdata()[0], line.get_label()) for line in vertical) == [(0, "alpha 0: sgd"),
                                                                                    (1, "alpha 1: sam")]


def test_ctrl_c_during_a_measurement_is_one_line_and_exit_130(monkeypatch, capsys):
    """A long Lanczos run answers Ctrl-C at once, without a traceback."""
    from engine.stopping import entry

    def measuring(argv):
        raise KeyboardInterrupt
    assert entry(measuring, []) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted by Ctrl-C: stopped at once; nothing more was written"]


# -- a setting of a measurement this command does not take does nothing: refused ---------------------------
from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

MODES = {"--hessian K": ["--hessian", "2"], "--density": ["--density"], "--m-sharpness M": ["--m-sharpness", "16"],
         "--landscape": ["--landscape", "1d"]}
OWNED = {"--lanczos-steps": ("--hessian K", "6"), "--density-runs": ("--density", "3"),
         "--density-steps": ("--density", "8"), "--rho": ("--m-sharpness M", "0.1"), "--points": ("--landscape", "5"),
         "--span": ("--landscape", "0.5")}


@hsettings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(OWNED)), st.lists(st.sampled_from(sorted(MODES)), min_size=1, max_size=3, unique=True))
def test_a_setting_of_a_measurement_not_asked_for_is_refused(option, modes):
    """Any option that belongs to one measurement, given with any other measurements: refused in one line
    naming the measurement it belongs to; given with its own, accepted."""
    mode, value = OWNED[option]
    argv = ["RUN", *[a for m in modes for a in MODES[m]], option, value]
    if mode in modes:
        sharpness.parse(argv)
    else:
        with pytest.raises(sharpness.ConfigError, match=f"{option} is a setting of {mode}, which this command"):
            sharpness.parse(argv)


@pytest.mark.parametrize("losses, scale", [([0.004, 0.6, 2.3, 0.7, 0.01], "log"), ([1.0, 1.2, 1.5, 1.1, 1.0], "linear")])
def test_an_interpolation_between_trained_runs_keeps_its_ends_in_view(losses, scale):
    """Two trained runs' losses sit decades under the middle of the line between them: on a linear axis
    both ends lie flat on zero. A log axis (plain labels) where the losses span more than a decade."""
    from test_figures import assert_readable
    fig = sharpness.draw({"sgd": {}, "sam": {}}, {"alpha": [0, 0.25, 0.5, 0.75, 1], "loss": losses})["interpolation.png"]
    (ax,) = fig.axes
    assert ax.get_yscale() == scale and ("log scale" in ax.get_ylabel()) == (scale == "log")
    assert_readable(fig)
