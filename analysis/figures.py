"""What every figure of scripts/plot.py and sharpness.py shares, so each stays readable at the sizes
people look at them (a README column, a slide): fonts sized for a figure shrunk to half its width,
a marker on every point of a short series (a one-point series is a marker, never an invisible line),
integer epoch ticks, tick labels as plain numbers (never "4x10^0"), a log axis only where the values
span more than a decade, legends outside the axes (they never hide data or an axis label), and
distinct line styles, so curves that coincide stay visible. And the checks of an output path,
made before anything is computed or drawn. No torch here: scripts/plot.py imports it."""

import math
import os
from pathlib import Path

from data.cifar import is_data_folder
from engine.checkpoint import RUN_FILES, RUN_FOLDERS, enclosing_run, holder, in_use, is_run_folder
from engine.config import ConfigError, check_path

FEW = 20  # series of at most this many points are drawn with a marker on each
STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
RC = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
      "legend.fontsize": 9, "lines.linewidth": 1.6}


def style(i):
    """Line style and marker of the i-th series drawn on an axes."""
    return {"linestyle": STYLES[i % len(STYLES)], "marker": MARKERS[i % len(MARKERS)]}


def line(ax, x, y, marker="o", **kwargs):
    """ax.plot, with `marker` on every point when the series has at most FEW points."""
    x, y = list(x), list(y)
    if len(x) <= FEW:
        kwargs.update(marker=marker, markersize=6 if len(x) == 1 else 4.5)
    return ax.plot(x, y, **kwargs)


def integer_ticks(axis):
    """Ticks at whole numbers only (epochs): never 1.0, 1.2, 1.4 on a 2-epoch run; a view holding fewer
    than two whole numbers (one epoch's points) is widened to two units about its middle."""
    from matplotlib.ticker import MaxNLocator
    low, high = axis.get_view_interval()
    if math.floor(high) - math.ceil(low) < 1:
        middle = round((low + high) / 2)
        axis.set_view_interval(middle - 1, middle + 1, ignore=True)
    axis.set_major_locator(MaxNLocator(integer=True))


def plain(axis):
    """Linear axis, labels as plain numbers: no offset ("+2.05") and no scientific notation."""
    from matplotlib.ticker import ScalarFormatter
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)


def plain_log_formatter():
    """matplotlib's LogFormatter (it thins the minor labels to what fits), with every label a plain
    number: 0.01, 0.2, 1, 30 (its own writes 1e-02); on an axis reaching below 0.001 or to 10^4 and
    beyond, every label in one short scientific form (1e-6, 3e-4, 1e-2), never the two mixed."""
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            if min(vmin, vmax) < 1e-3 or max(vmin, vmax) >= 1e4:
                mantissa, exponent = f"{x:.0e}".split("e")
                return f"{mantissa}e{int(exponent)}"
            return f"{x:.3g}"

    return PlainLog(labelOnlyBase=False)


def log_or_linear(ax, values, which="y"):
    """A log scale when the finite positive `values` span more than a decade, else linear; either way
    labelled with plain numbers (0.5, 1, 2 or 0.01, 0.1, 1), never "2x10^0". -> the scale chosen."""
    finite = [v for v in values if math.isfinite(v)]
    axis = ax.yaxis if which == "y" else ax.xaxis
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        axis.set_major_formatter(plain_log_formatter())
        axis.set_minor_formatter(plain_log_formatter())
        return "log"
    plain(axis)
    return "linear"


def wrap(text, width):
    """`text` in lines of at most about `width` characters, broken at spaces, '-', '+' and '/' where it can."""
    import textwrap
    marked = text.replace("/", "/\u200b").replace("+", "+\u200b")
    lines = textwrap.wrap(marked.replace("\u200b", " \u200b"), width, break_on_hyphens=True)
    return "\n".join(line.replace(" \u200b", "").replace("\u200b", "") for line in lines) or text


def chars_across(width_in, fontsize):
    """About how many characters of `fontsize` points fit `width_in` inches (DejaVu Sans: ~0.6 em each)."""
    return max(10, int(width_in * 72 / (0.6 * fontsize)))


def legend_below(fig, handles, labels, width_in):
    """The figure's legend under its axes (a constrained-layout figure makes room for it), in as many
    columns as fit `width_in` inches, a label too long for the width wrapped. -> the legend, or None
    without entries."""
    if not handles:
        return None
    across = chars_across(width_in, RC["legend.fontsize"]) - 8  # the handle and the margins
    labels = [wrap(label, across) for label in labels]
    longest = max(len(line) for label in labels for line in label.splitlines()) + 8
    ncols = min(len(labels), max(1, (across + 8) // longest), 4)
    return fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)


class OutputError(ValueError):
    """An output path that must not be written; one line naming it and the fix."""


def run_folder_file(path):
    """The run folder whose own file `path` is (after following links), or None."""
    real = Path(os.path.realpath(path))
    folder = real.parent
    if real.name in RUN_FILES and is_run_folder(folder):
        return folder
    return None


def check_output_file(path, option="--out", example="curves.png", own=(), formats=(), kind=None):
    """A file about to be written (or overwritten): its folder exists and is writable, it is not a folder,
    not a file of a run folder train.py wrote, not inside a run folder other than the tool's own runs
    (`own`: the runs it reads), not inside a data set's folder, named with one of `formats` (suffixes,
    when given), and, when it exists, a file of the `kind` written (a suffix: ".json", ".png", ...; by
    default the path's own): a tool replaces only what a tool like it wrote, never a checkpoint, a log or
    a user's file. OutputError otherwise; nothing is written before every check but the last has passed."""
    if not str(path).strip():
        raise OutputError(f"{option} is empty; name the file to write, e.g. {option} {example}")
    path = system_path(path, option)
    folder = run_folder_file(path)
    if folder is not None:
        raise OutputError(f"{option} {path}: that is run folder {folder}'s own {Path(os.path.realpath(path)).name}, "
                          f"which no tool overwrites; choose another {option}")
    check_place(path, option, own)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name in it, e.g. {path / example}" if example else
                          f"{option}: {path} is a folder, where a file is to be written; move it or choose another")
    if path.exists() and not path.is_file():  # a device (/dev/null), a named pipe, a socket: never replaced, never waited on
        raise OutputError(f"{option} {path} is not a regular file (a device, a named pipe or a socket), which no tool "
                          f"replaces or writes into; choose a file path")
    if formats and path.suffix.lower() not in formats:
        raise OutputError(f"{option} {path}: write a {', '.join(formats)} file")
    kind = kind or path.suffix.lower()
    if path.is_file() and not is_kind(path, kind):
        raise OutputError(f"{option} {path} exists and is not a {kind} file a tool wrote (a tool replaces only its own "
                          f"kind of output, never a checkpoint, a log or another file); choose another path, or move "
                          f"that file away first")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: folder {parent} does not exist; create it or choose another")
    if not writable(parent) or (path.exists() and not writable(path)):
        raise OutputError(f"{option} {path}: {path if path.exists() else parent} is not writable; choose another")


MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".pdf": (b"%PDF-",), ".svg": (b"<?xml", b"<svg")}
TEXT = (".md", ".txt", ".csv")


def is_kind(path, kind):
    """Whether the existing file `path` is empty or a `kind` file (".json": one JSON object, ".png", ".pdf",
    ".svg": their signature, ".md", ".txt", ".csv": UTF-8 text); of another kind, only when empty."""
    if kind not in (".json", *MAGIC, *TEXT):
        return os.path.getsize(path) == 0
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        whole = not f.read(1)
    if not head:
        return True
    if kind in MAGIC:
        return head.lstrip().startswith(MAGIC[kind])
    try:
        text = head.decode()
    except UnicodeDecodeError:
        return False
    if kind != ".json":
        return "\0" not in text
    import json
    try:
        return whole and isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def system_path(path, option):
    """`path` as a Path, OutputError when the system cannot take it (engine.config.check_path's line)."""
    try:
        return check_path(path, option)
    except ConfigError as e:
        raise OutputError(str(e)) from None


def check_place(path, option, own=(), folder=False):
    """`path` (a file to be written, or a `folder` to write into) lies neither inside a run folder other
    than `own` (the runs the tool reads), nor inside a run folder a live run holds, nor inside a data set's
    folder (a file that is a link: where the link leads). OutputError otherwise."""
    path = system_path(path, option)
    where = path if folder else Path(os.path.realpath(path)).parent
    inside = enclosing_run(where)
    sub = inside is not None and Path(os.path.realpath(where)).relative_to(inside).parts[:1]
    if sub and sub[0] in RUN_FOLDERS:
        raise OutputError(f"{option} {path} is inside run folder {inside}'s {sub[0]}/, which only "
                          f"{'W&B' if sub[0] == 'wandb' else 'SLURM'} writes; choose a path outside it")
    if inside is not None and inside not in {Path(os.path.realpath(r)) for r in own}:
        raise OutputError(f"{option} {path} is inside run folder {inside}, which this command does not read; "
                          f"that folder holds its own run's records only: choose a path outside it")
    if inside is not None and holder(inside) is not None:
        raise OutputError(f"{option} {path}: {in_use(inside)}; or choose a path outside it")
    real = Path(os.path.realpath(where))
    data = next((f for f in (real, *real.parents) if is_data_folder(f)), None)
    if data is not None:
        raise OutputError(f"{option} {path} is inside data folder {data}, which no tool writes into; "
                          f"choose a path outside it")


ENVIRONMENT_PLACES = ("WANDB_DIR", "TMPDIR")  # folders the environment names for W&B's files, temporary files


def check_environment_places():
    """The folders that environment variables name for a tool's files are places a tool may write (as
    check_place): never inside a run folder or a data set's folder. OutputError otherwise."""
    for name in ENVIRONMENT_PLACES:
        value = os.environ.get(name)
        if value is None:
            continue
        if not value.strip() or (Path(value).exists() and not Path(value).is_dir()):
            raise OutputError(f"${name} {value!r} is {'empty' if not value.strip() else 'not a folder'}; unset it, "
                              f"or name a folder")
        check_place(Path(value), f"${name}", folder=True)


def check_output_folder(path, names, option="--out", own=()):
    """A folder about to receive the files `names`: it is a folder (or is to be created in an existing
    one), writable, and none of those files is a folder or a run's own file. OutputError otherwise."""
    path = system_path(path, option)
    folder = run_folder_file(path)
    if folder is not None:
        raise OutputError(f"{option} {path}: that is run folder {folder}'s own {Path(os.path.realpath(path)).name}; "
                          f"give a folder (the run folder itself, or another)")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path}: cannot write the output folder there, it is a file; give a folder")
    check_place(path, option, own, folder=True)  # before any probe: a refused place is not touched
    if not path.exists():
        if not path.parent.is_dir():
            raise OutputError(f"{option} {path}: folder {path.parent} does not exist; create it or choose another")
        if not writable(path.parent):
            raise OutputError(f"{option} {path}: {path.parent} is not writable, so {path} cannot be created; "
                              f"choose another")
        return
    if not writable(path):
        raise OutputError(f"{option} {path} is not writable; choose another folder")
    for name in names:
        check_output_file(path / name, option, example=None, own=own)


def writable(path):
    """Whether a file can be written at `path` (an existing file: opened for appending, unchanged) or in
    it (a folder: a temporary file created there and removed, and the folder's modification time put
    back), tried for real: permission bits say nothing to root, nor about a read-only mount or /proc."""
    import tempfile
    if not os.access(path, os.W_OK):
        return False
    try:
        if Path(path).is_dir():
            times = os.stat(path)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))  # a refusal after the probe leaves no trace
        else:
            with open(path, "ab"):
                pass
        return True
    except OSError:
        return False
