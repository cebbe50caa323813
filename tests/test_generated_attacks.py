"""Generated hostile inputs, one strategy per class, each draw checked against the contract: exit 0,
or exit 2 with one `error:` line; the sandbox's runs, data and records unchanged; never a traceback.
Bounded in examples; hypothesis prints the seed and the failing draw (rerun with --hypothesis-seed)."""

import contextlib
import io
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

import evaluate
import train
from engine import checkpoint
from test_attack import TRAIN, box, fill, tree  # noqa: F401 (box: the sandbox fixture)

BOUNDED = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def folder_times(root):
    return {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()}


def contract(box, main, argv, env=None):
    """Run an entry point in-process on a draw: -> its exit code, having checked the contract."""
    before, times = tree(box), folder_times(box)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code
    lines = err.getvalue().strip().splitlines()
    assert "Traceback" not in err.getvalue()
    assert code in (0, 2), (code, lines)
    if code == 2:
        assert len([line for line in lines if line.startswith("error: ")]) == 1, lines
        assert folder_times(box) == times, "a refused command touched a folder (a write probe?)"
    assert tree(box) == before, "the sandbox changed"
    return code


SCALARS = st.one_of(
    st.sampled_from(["010", "0o17", "0x1f", "1:30", "yes", "no", "on", "off", "~", "null", ".nan", "-.inf", "1e3",
                     "5e-4", "[1, 2]", "{a: 1}", "'010'", '!!int "0x10"', '!!int "1:30"', '!!bool "yes"',
                     '!!float "1_0"', '!!int "16"', "!!python/object:os.system x", "&a 1", "*a", "", "- 1"]),
    st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True).map(repr),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).map(lambda t: repr(t)))
KEYS = st.sampled_from(["seed", "lr", "epochs", "rho", "nesterov", "augment", "cutout_placement", "m_sharpness",
                        "label_noise_rule", "eta", "workers", "base", "not_a_setting", "wandb_tags"])


@BOUNDED
@given(st.lists(st.tuples(KEYS, SCALARS), min_size=1, max_size=3))
def test_yaml_files_of_generated_values(box, tmp_path_factory, entries):
    """A YAML file of drawn keys and values (duplicates included): refused in one line, or read as a
    person reads it (an int setting is an int of the same digits, never octal or sexagesimal)."""
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in entries))
    code = contract(box, train.main, ["--config", str(path), "--check", *fill(TRAIN, box)])
    if code == 0:
        from engine.config import parse_config
        config = parse_config(["--config", str(path), *fill(TRAIN, box)]).config
        for key, value in entries:
            if key == "seed":
                assert str(config["seed"]) == value.strip().lstrip("+")


ENV = st.sampled_from(["WORLD_SIZE", "RANK", "LOCAL_RANK", "WANDB_MODE", "SAM_DATA_DIR"])
ENV_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2", "99", " ", "1.5", "garbage", "offline", "disabled",
                                        "/nonexistent", "9" * 30]),
                       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=8))


@BOUNDED
@given(st.dictionaries(ENV, ENV_VALUES, min_size=1, max_size=3))
def test_environment_variables_of_generated_values(box, env):
    args = [a for a in fill(TRAIN, box)]
    if "SAM_DATA_DIR" in env:  # the variable is what chooses the data here
        at = args.index("--data-dir")
        args = args[:at] + args[at + 2:]
    contract(box, train.main, ["--check", *args], env)


W_AND_B_ENV = st.one_of(
    st.fixed_dictionaries({"NETRC": st.sampled_from(["fifo", "folder", "binary", "/dev/zero", "missing", "text"])}),
    st.fixed_dictionaries({"WANDB_BASE_URL": st.sampled_from(["http://[::1", "://", "", "http://x:99999999",
                                                              "https://api.wandb.ai"])}))


@BOUNDED
@given(W_AND_B_ENV)
@example({"NETRC": "fifo"})
@example({"WANDB_BASE_URL": "http://[::1"})
def test_the_environment_w_and_b_reads_for_its_credentials_is_read_safely(box, tmp_path_factory, env):
    """Where no --wandb-mode says it, the mode follows from W&B's credentials: $NETRC (or ~/.netrc) and
    $WANDB_BASE_URL's host. A netrc that is a named pipe, a folder, a device or binary, a URL that does not
    parse: one error line (never a wait, never a bug line); a missing or plain-text netrc: no key."""
    folder = tmp_path_factory.mktemp("netrc")
    if "NETRC" in env:
        kind = env["NETRC"]
        path = {"/dev/zero": Path("/dev/zero")}.get(kind, folder / kind)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        elif kind == "binary":
            path.write_bytes(bytes(range(256)))
        elif kind == "text":
            path.write_text("machine example.org login a password b\n")
        env = {"NETRC": str(path)}
    args = [a for a in fill(TRAIN, box) if a not in ("--wandb-mode", "disabled")]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_MODE", "WANDB_API_KEY"):
            mp.delenv(name, raising=False)
        signal.signal(signal.SIGALRM, lambda *a: pytest.fail("waited on the netrc"))
        signal.alarm(60)
        try:
            code = contract(box, train.main, ["--check", *args], env)
        finally:
            signal.alarm(0)
    readable = env.get("NETRC", "").endswith(("missing", "text")) or env.get("WANDB_BASE_URL") in ("://", "",
                                                                                                 "https://api.wandb.ai")
    assert code == (0 if readable or env.get("WANDB_BASE_URL") == "http://x:99999999" else 2), env


PATH_PROBLEMS = st.sampled_from(["a name of 300 bytes", "4200 bytes in all", "a NUL byte"])


@BOUNDED
@given(PATH_PROBLEMS, st.sampled_from(["train --out-dir", "train --data-dir", "train --config", "train --resume",
                                       "YAML base:", "evaluate --json", "evaluate run", "plot --out", "plot run",
                                       "sharpness --out", "sharpness run", "summarize folder", "suite --out"]))
@example("a name of 300 bytes", "evaluate --json")
@example("4200 bytes in all", "train --out-dir")
def test_a_path_the_system_cannot_take_is_one_error_line_in_every_tool(box, tmp_path_factory, problem, where):
    """A path with a NUL byte, a name over 255 bytes or over 4095 bytes in all, given anywhere a tool takes a
    path: one error line naming it (Path.exists() itself raises on such a path: it must be said first)."""
    import plot
    import sharpness
    import summarize
    from benchmarks import suite
    root = tmp_path_factory.mktemp("paths")
    bad = {"a name of 300 bytes": str(root / ("x" * 300)), "4200 bytes in all": str(root / "/".join(["y" * 200] * 21)),
           "a NUL byte": str(root / "a\0b")}[problem]
    done = str(box / "runs" / "done")
    tool, _, what = where.partition(" ")
    if where == "YAML base:":
        (root / "c.yaml").write_text(f"base: {bad!r}\n".replace("\\x00", "\\0") if "\0" not in bad else
                                     'base: "' + bad.replace("\0", "\\0") + '"\n')
    main, argv = {
        "train --out-dir": (train.main, ["--check", *fill(TRAIN, box), "--out-dir", bad]),
        "train --data-dir": (train.main, ["--check", *fill(TRAIN, box), "--data-dir", bad]),
        "train --config": (train.main, ["--check", *fill(TRAIN, box), "--config", bad]),
        "train --resume": (train.main, ["--check", "--resume", bad]),
        "YAML base:": (train.main, ["--check", *fill(TRAIN, box), "--config", str(root / "c.yaml")]),
        "evaluate --json": (evaluate.main, [done, "--device", "cpu", "--json", bad]),
        "evaluate run": (evaluate.main, [bad, "--device", "cpu"]),
        "plot --out": (plot.main, [done, "--out", bad + ".png"]),
        "plot run": (plot.main, [bad, "--out", str(root / "p.png")]),
        "sharpness --out": (sharpness.main, [done, "--hessian", "1", "--out", bad]),
        "sharpness run": (sharpness.main, [bad, "--hessian", "1"]),
        "summarize folder": (summarize.main, [bad]),
        "suite --out": (suite.main, ["--smoke", "--out", bad]),
    }[where]
    assert contract(box, main, argv) == 2


@BOUNDED
@given(st.sampled_from(["fifo", "char device"]), st.sampled_from(["evaluate --json", "plot --out", "sharpness.json"]))
def test_an_output_that_is_a_device_or_a_pipe_is_refused_never_replaced_or_waited_on(box, tmp_path_factory, kind,
                                                                                    where):
    """/dev/null given as --json (the device node was replaced by a regular file, as root), a named pipe as
    --out (the write probe waited on it forever): one error line, the node as it was."""
    import stat
    import plot
    import sharpness
    if kind == "char device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    root = tmp_path_factory.mktemp("special")
    name = {"evaluate --json": "e.json", "plot --out": "p.png", "sharpness.json": "sharpness.json"}[where]
    node = root / name
    if kind == "fifo":
        os.mkfifo(node)
    else:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
    main, argv = {"evaluate --json": (evaluate.main, [str(box / "runs" / "done"), "--device", "cpu", "--json", str(node)]),
                  "plot --out": (plot.main, [str(box / "runs" / "done"), "--out", str(node)]),
                  "sharpness.json": (sharpness.main, [str(box / "runs" / "done"), "--hessian", "1", "--out", str(root)])}[where]
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("waited on the output"))
    signal.alarm(60)
    try:
        assert contract(box, main, argv) == 2
    finally:
        signal.alarm(0)
    mode = os.lstat(node).st_mode
    assert (stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)), "the node was replaced"


@BOUNDED
@given(st.sampled_from(["rho", "label_smoothing", "weight_decay", "dropout", "momentum", "sam_prob", "lr", "eta",
                        "mixup_alpha", "label_noise", "grad_clip"]),
       st.sampled_from([1e-300, 5e-324, 1e-39, -1e-300, 1.1754943508222875e-38, 1e-37]))
@example("rho", 1e-300)
def test_a_number_float32_reads_as_zero_is_refused(key, value):
    """A setting nonzero in the command but below float32's smallest normal number acts as 0 in the run
    (rho 1e-300: no ascent): refused, as the setting's 0 would be where it does nothing."""
    from engine.config import ConfigError, parse_config
    extra = {"eta": ["--adaptive"], "momentum": ["--no-nesterov"], "dropout": ["--model", "wrn10_1"]}.get(key, [])
    tiny = abs(value) < 1.1754943508222875e-38
    try:
        parse_config([f"--{key.replace('_', '-')}={value!r}", *extra])
    except ConfigError as e:
        assert not tiny or "float32" in str(e) or "must be in" in str(e), (key, value, e)  # or out of its range
        return
    assert not tiny, (key, value)


@BOUNDED
@given(st.integers(0, 10**9), st.integers(1, 255))
def test_a_checkpoint_with_a_flipped_byte_never_resumes_silently(box, tmp_path_factory, where, mask):
    """Any byte of last.pt flipped: refused in one line, or (a byte the archive does not read) the
    checkpoint proves it is whole. Never a run on damaged weights."""
    folder = tmp_path_factory.mktemp("flip") / "half"
    shutil.copytree(box / "runs" / "half", folder)
    data = bytearray((folder / "last.pt").read_bytes())
    data[where % len(data)] ^= mask
    (folder / "last.pt").write_bytes(bytes(data))
    code = contract(box, train.main, ["--resume", str(folder), "--check"])
    if code == 0:
        from engine import checkpoint
        checkpoint.load(folder / "last.pt")  # its digest holds: the flipped byte was not part of the contents


def other_value(key, draw):
    """A value of setting `key` that is valid on its own and differs from the default."""
    from engine.config import SETTINGS
    spec = SETTINGS[key]
    if spec.choices:
        return draw(st.sampled_from([c for c in spec.choices if c != spec.default]))
    if spec.type is bool:
        return not spec.default
    if spec.type is int:
        return draw(st.integers(1, 999).filter(lambda v: v != spec.default))
    if spec.type is float:
        return draw(st.floats(0.001, 0.9).filter(lambda v: v != spec.default))
    return draw(st.sampled_from(["wrn16_4", "resnet18"]))  # model


@BOUNDED
@given(st.data())
def test_a_hand_edited_config_yaml_never_resumes_as_what_it_says(box, tmp_path_factory, data):
    """An experiment setting of config.yaml edited by hand (the checkpoint trained another value): --check
    and the resume itself refuse in one line naming the setting; the folder is unchanged. The same file
    rewritten without an edit (YAML dumped again) resumes."""
    from engine.config import EXPERIMENT
    import yaml
    key = data.draw(st.sampled_from([None, *(k for k in EXPERIMENT if k != "relabel_from")]), label="key")
    folder = tmp_path_factory.mktemp("edited") / "half"
    shutil.copytree(box / "runs" / "half", folder)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    if key is not None:
        value = other_value(key, data.draw)
        assume(saved.get(key) != value)
        saved[key] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = tree(folder)
    for extra in (["--check"], []) if key is not None else (["--check"],):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train.main(["--resume", str(folder), *extra])
        lines = err.getvalue().strip().splitlines()
        if key is None:
            assert code == 0, lines
        else:
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and f"({key} " in lines[0], lines
            assert tree(folder) == before


@BOUNDED
@given(st.sampled_from(["labels", "data", "pickle", "bytes keys", "no key", "not a dict", "no meta", "both keys",
                        "label shape", "uint64", "a folder", "a link to a device"]),
       st.integers(0, 39),
       st.one_of(st.integers(-3, 300), st.sampled_from([10, -1, 2**40, 2**70, "3", 1.5, 1.0, True, None])))
@example(what="labels", index=0, value=True)  # one bool among integers: numpy reads the list as integers
@example(what="bytes keys", index=0, value=0)  # as Python 3's pickle.dump writes a batch read with bytes keys
def test_damaged_data_is_refused_before_anything_is_written(box, tmp_path_factory, what, index, value):
    """A batch file damaged (labels, image shapes, a hostile pickle, its keys, its type) or batches.meta
    gone: refused in one line before anything is written, or read as the same data (bytes keys), or
    (batches.meta, which no image needs) a warning that names the file missing."""
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copytree(box / "data", folder / "data")
    path = folder / "data" / "cifar-10-batches-py" / "data_batch_2"
    entry = pickle.load(open(path, "rb"), encoding="latin1")
    marker = folder / "ran"
    if what == "labels":
        entry["labels"][index] = value
    elif what == "data":
        entry["data"] = entry["data"][:, : max(1, (value if type(value) is int else 7) % 3072)]
    elif what == "bytes keys":
        entry = {k.encode(): v for k, v in entry.items()}
    elif what == "no key":
        entry = {k: v for k, v in entry.items() if k != ("data", "labels")[index % 2]}
    elif what == "not a dict":
        entry = [entry["data"], entry["labels"]][: 1 + index % 2]
    elif what == "no meta":
        (path.parent / "batches.meta").unlink()
    elif what == "both keys":  # which labels are meant is not known
        entry[b"labels"] = [0] * len(entry["labels"])
    elif what == "label shape":
        entry["labels"] = [[label] for label in entry["labels"]]
    elif what == "uint64":  # 2**64 - 1 is no label, whatever int64 would wrap it to
        import numpy as np
        entry["labels"] = np.array(entry["labels"], np.uint64)
        entry["labels"][index] = np.iinfo(np.uint64).max - (value if type(value) is int and 0 <= value < 10 else 0)
    elif what in ("a folder", "a link to a device"):
        path.unlink()
        path.mkdir() if what == "a folder" else path.symlink_to("/dev/zero")
    else:
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        entry["extra"] = Payload()
    if what not in ("a folder", "a link to a device"):
        pickle.dump(entry, open(path, "wb"), protocol=2)
    args = [a if a != str(box / "data") else str(folder / "data") for a in fill(TRAIN, box)]
    code = contract(box, train.main, ["--check", *args])
    if what in ("a folder", "a link to a device"):  # not called missing: it is there, as something else
        from data.cifar import DataError, load_cifar
        with pytest.raises(DataError, match="data_batch_2 is not a regular file"):
            load_cifar("cifar10", str(folder / "data"))
    assert not marker.exists(), "the pickle's payload ran"
    if what in ("bytes keys", "no meta"):
        assert code == 0
        from data.cifar import load_cifar
        data = load_cifar("cifar10", str(folder / "data"))
        reference = load_cifar("cifar10", str(box / "data"))
        assert (data.train_images == reference.train_images).all() and (data.train_labels == reference.train_labels).all()
        if what == "no meta":
            assert "(missing: batches.meta;" in data.note
    if what in ("pickle", "data", "no key", "not a dict", "both keys", "label shape", "uint64", "a folder",
                "a link to a device") or (what == "labels" and not (type(value) is int and 0 <= value < 10)):
        assert code == 2  # a label that is not an integer 0-9 (a string, 1.5, even 1.0 or True) is refused


def shift_folder(root, kind):
    """A CIFAR-10.1 folder (30 images) or a CIFAR-10-C one (one corruption, 1 severity)."""
    import numpy as np
    root.mkdir()
    n = 30 if kind == "10.1" else 10000
    x, y = np.zeros((n, 32, 32, 3), np.uint8), np.arange(n, dtype=np.int64) % 10
    names = ("v6_data.npy", "v6_labels.npy") if kind == "10.1" else ("fog.npy", "labels.npy")
    np.save(root / names[0], x)
    np.save(root / names[1], y)
    return root / names[0], root / names[1]


@BOUNDED
@given(st.sampled_from(["10.1", "C"]), st.sampled_from(["images", "labels"]),
       st.sampled_from(["missing", "pickle", "truncated", "text", "float", "shape", "range", "length", "empty",
                        "huge header", "npz", "a checkpoint"]))
@example(kind="C", which="labels", damage="huge header")
def test_damaged_shift_sets_are_refused_in_one_line(box, tmp_path_factory, kind, which, damage):
    """evaluate.py --data-dir with a CIFAR-10.1 or CIFAR-10-C folder one of whose arrays is damaged:
    one error line naming it, never a traceback, never a pickle loaded."""
    import numpy as np
    images, labels = shift_folder(tmp_path_factory.mktemp("shift") / "set", kind)
    path = images if which == "images" else labels
    a = np.load(path)
    if damage == "missing":
        path.unlink()
    elif damage == "pickle":
        np.save(path, np.array([{"a": 1}] * len(a), dtype=object), allow_pickle=True)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "text":
        path.write_text("not an array\n")
    elif damage == "float":
        np.save(path, a.astype(np.float32))
    elif damage == "shape":
        np.save(path, a.reshape(len(a), -1) if which == "labels" or a.ndim == 1 else a.transpose(0, 3, 1, 2))
    elif damage == "range":
        np.save(path, (a.astype(np.int64) + 10) if which == "labels" else a.astype(np.int64))
    elif damage == "length":
        np.save(path, a[:-1])
    elif damage == "npz":  # np.load opens an .npz archive under any name
        np.savez(path.with_suffix(".tmp"), a)
        path.with_suffix(".tmp.npz").rename(path)
    elif damage == "a checkpoint":  # a zip file too
        path.unlink()
        path.symlink_to(box / "runs" / "done" / "last.pt")
    elif damage == "huge header":  # a header claiming terabytes, over a few bytes: never an allocation
        header = str({"descr": a.dtype.str, "fortran_order": False, "shape": (10**12, *a.shape[1:])})
        header += " " * (63 - (len(header) + 10) % 64) + "\n"
        path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64))
    else:
        np.save(path, a[:0])
    assert contract(box, evaluate.main, [str(box / "runs" / "done"), "--data-dir", str(path.parent),
                                         "--device", "cpu"]) == 2


RUN_FILES = st.sampled_from(["last.pt", "config.yaml", "metrics.jsonl", "results.json", ".lock"])


@BOUNDED
@given(RUN_FILES, st.booleans())
def test_no_tool_writes_onto_a_runs_own_files(box, tmp_path_factory, name, through_link):
    target = box / "runs" / "done" / name
    if not target.exists():
        return
    out = target
    if through_link:
        out = tmp_path_factory.mktemp("link") / "out.json"
        os.symlink(target, out)
    assert contract(box, evaluate.main, [str(box / "runs" / "done"), "--json", str(out), "--device", "cpu"]) == 2
    import plot
    assert contract(box, plot.main, [str(box / "runs" / "done"), "--out", str(out)]) == 2


LYING_IN_WAIT = st.sampled_from(["config.yaml", "metrics.jsonl", "last.pt", "results.json", ".lock", "stdout.log",
                                  "wandb", "slurm", "last.pt.tmp", "config.yaml.tmp", "results.json.tmp",
                                  "metrics.jsonl.tmp"])


@BOUNDED
@given(LYING_IN_WAIT, st.sampled_from(["another run's results.json", "a data file"]))
@example(name=".lock", victim="a data file")
@example(name="results.json.tmp", victim="another run's results.json")
@example(name="metrics.jsonl", victim="another run's results.json")
def test_a_link_lying_in_a_run_folder_never_carries_a_write_elsewhere(box, tmp_path_factory, name, victim):
    """A link put where a resumed run writes a file (its own files, W&B's and submitit's folders, the
    temporary file names of its atomic writes): a link where a run keeps its own file or folder is refused
    before anything is written; the others are never written through (each write makes a new temporary
    file). Either way the file the link leads to is unchanged."""
    import hashlib
    root = tmp_path_factory.mktemp("waiting")
    shutil.copytree(box / "runs" / "half", root / "half")
    shutil.copytree(box / "runs" / "done", root / "done")
    target = {"another run's results.json": root / "done" / "results.json",
              "a data file": box / "data" / "cifar-10-batches-py" / "data_batch_1"}[victim]
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    link = root / "half" / name
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    os.symlink(target, link)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "project", lambda run: None)
        code = contract(box, train.main, ["--resume", str(root / "half")])
    assert code == (0 if name.endswith(".tmp") else 2)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before and os.readlink(link) == str(target)


@BOUNDED
@given(st.integers(1, 200000), st.sampled_from(["[", "{\"a\":"]))
def test_deeply_nested_record_lines_are_skipped_by_every_reader(box, tmp_path_factory, depth, opener):
    """A metrics.jsonl line or a results.json nested past what json can read: a resume, plot.py and
    summarize.py go on (the line or record skipped), never a RecursionError."""
    import plot
    import summarize
    from engine.tracker import Tracker
    folder = tmp_path_factory.mktemp("deep") / "run"
    shutil.copytree(box / "runs" / "done", folder)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(opener * depth + "\n")
    (folder / "results.json").write_text(opener * depth)
    Tracker(folder, {}, mode="disabled", project=None, entity=None, group=None, tags=None, run_id="x",
            resumed_step=6)
    assert opener * 5 not in (folder / "metrics.jsonl").read_text()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        plot.read_curves(folder)
        assert summarize.main([str(folder)]) == 2  # its one record skipped: nothing to summarise


TOOLS = [("train.py", []), ("evaluate.py", ["runs/x"]), ("sharpness.py", ["runs/x"]), ("scripts/plot.py", ["runs/x"]),
         ("scripts/summarize.py", ["runs"]), ("-m engine.sweep", []), ("-m benchmarks.suite", ["--smoke"]),
         ("-m benchmarks.throughput", []), ("-m benchmarks.sam_overhead", []),
         ("-m benchmarks.loader_throughput", ["--data-dir", "x"])]
ERRORS = st.sampled_from([RuntimeError, KeyError, TypeError, AttributeError, ZeroDivisionError, IndexError,
                          AssertionError, NotImplementedError, LookupError, ArithmeticError, MemoryError])


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(TOOLS), ERRORS, st.text(max_size=40))
def test_any_other_exception_of_any_tool_is_one_bug_line_naming_its_saved_traceback(tool, error, message):
    """Every entry point, a failure that no check turned into an `error:` line (here: thrown where
    each starts, in argparse): exit 1, one `bug:` line naming a file that holds the traceback, which is
    written outside the repository and the runs."""
    import subprocess
    import sys
    from conftest import REPO
    name, args = tool
    target = f"runpy.run_module({name[3:]!r}, run_name='__main__')" if name.startswith("-m ") else \
        f"runpy.run_path({name!r}, run_name='__main__')"
    code = (f"import argparse, runpy, sys\n"
            f"def boom(*a, **k): raise {error.__name__}({message!r})\n"
            f"argparse.ArgumentParser.parse_known_args = boom\n"
            f"sys.argv = [{name.split()[-1]!r}, *{args!r}]\n"
            f"sys.path.insert(0, {str(REPO / (name.rsplit('/', 1)[0] if '/' in name else '.'))!r})\n{target}\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("bug: "), (result.returncode, lines)
    assert f"({error.__name__}: " in lines[0] and "Traceback" not in result.stderr
    saved = Path(lines[0].split("the traceback is saved in ")[1].split(": please report")[0])
    try:
        assert "Traceback" in saved.read_text() and f"{error.__name__}" in saved.read_text()
        assert REPO not in saved.parents
    finally:
        saved.unlink()


@BOUNDED
@given(st.sampled_from(["config.yaml", "metrics.jsonl", "results.json", ".lock", "last.pt"]),
       st.sampled_from(["fifo", "folder"]), st.sampled_from(["check", "resume", "plot", "summarize", "evaluate"]))
def test_a_run_file_that_is_not_a_regular_file_is_refused_never_waited_on(box, tmp_path_factory, name, kind, tool):
    """A named pipe (which would block a reader forever) or a folder where a run keeps a file: every
    tool that reads the run refuses it in one line or skips it, before anything is written."""
    import signal as signals
    import plot
    import summarize
    folder = tmp_path_factory.mktemp("odd") / "half"
    shutil.copytree(box / "runs" / "half", folder)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name) if kind == "fifo" else (folder / name).mkdir()

    def hung(*_):
        raise AssertionError(f"{tool} waited on the {kind} {name}")
    previous = signals.signal(signals.SIGALRM, hung)
    signals.alarm(60)
    try:
        if tool in ("check", "resume"):
            code = contract(box, train.main, [*(["--check"] if tool == "check" else []), "--resume", str(folder),
                                              "--device", "cpu", "--wandb-mode", "disabled"])
            assert code == 2 and not (folder / "results.json").is_file()
        elif tool == "plot":
            contract(box, plot.main, [str(folder), "--out", str(folder.parent / "p.png")])
        elif tool == "summarize":
            contract(box, summarize.main, [str(folder)])
        else:
            contract(box, evaluate.main, [str(folder), "--device", "cpu"])
    finally:
        signals.alarm(0)
        signals.signal(signals.SIGALRM, previous)


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                        st.sampled_from([10**400, -10**400, 1e308, -1e308, 1e-320]),  # past a float, at its edges
                        st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                                  st.integers(), max_size=1))


@BOUNDED
@given(st.sampled_from(["epoch", "step", "train/loss", "test/error", "lr", "kind"]), JSON_VALUES,
       st.sampled_from(["settings.lr", "settings.model", "settings.seed", "settings.rho", "settings.mixup_alpha",
                        "passes_per_step", "git_commit", "dataset_md5", "seed", "final_test_error"]), JSON_VALUES)
@example(field="train/loss", value=1e308, key="settings.rho", other=10**400)
@example(field="lr", value=-1e308, key="passes_per_step", other=10**400)
def test_records_with_values_of_any_type_are_skipped_or_refused_never_a_crash(box, tmp_path_factory, field, value,
                                                                              key, other):
    """metrics.jsonl rows and results.json fields holding any JSON value: plot.py draws what is sound and
    summarize.py skips a record it cannot trust (with a warning), or each says why it has nothing."""
    import json
    import plot
    import summarize
    folder = tmp_path_factory.mktemp("values") / "done"
    shutil.copytree(box / "runs" / "done", folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if field in row or field == "kind":
            row[field] = value
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = json.loads((folder / "results.json").read_text())
    where = result.get("settings", result) if key.startswith("settings.") else result
    where[key.split(".")[-1]] = other
    (folder / "results.json").write_text(json.dumps(result))
    contract(box, plot.main, [str(folder), "--out", str(folder.parent / "p.png")])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        code = summarize.main([str(folder)])
    assert code in (0, 2) and "Traceback" not in err.getvalue()
    if key == "settings.lr" and not (type(other) in (int, float)) and other is not None:
        assert code == 2 and "skipped" in err.getvalue()  # an lr of {other!r}: not a run's record


@BOUNDED
@given(st.sampled_from(["half", "done"]), st.lists(st.sampled_from(["a", "b", "."]), max_size=3),
       st.sampled_from(["train", "sharpness"]))
def test_outputs_inside_another_runs_folder_are_refused(box, tmp_path_factory, run, below, tool):
    """A new run's --out-dir, or sharpness.py's --out for another run, in (or below) a run folder: its
    records would mix with that run's, so it is refused before anything is written."""
    import sharpness
    target = box / "runs" / run / Path(*below) if below else box / "runs" / run
    if tool == "train":
        code = contract(box, train.main, [*fill(TRAIN, box), "--out-dir", str(target), "--name", "new"])
    else:
        other = "done" if run == "half" else "half"
        code = contract(box, sharpness.main, [str(box / "runs" / other), "--hessian", "1", "--batches", "1",
                                              "--batch-size", "8", "--device", "cpu", "--out", str(target)])
    assert code == 2


def test_a_projects_own_config_yaml_does_not_make_a_run_folder(tmp_path):
    """A folder of the user's own, with its own config.yaml (not one train.py wrote), is no run folder."""
    from engine.checkpoint import enclosing_run
    (tmp_path / "config.yaml").write_text("model: resnet18\nlr: 0.1\n")
    assert enclosing_run(tmp_path / "runs") is None
    (tmp_path / "config.yaml").write_text("model: resnet18\nmeta: {git_commit: abc}\n")
    assert enclosing_run(tmp_path / "runs") == tmp_path.resolve()


CONTROL = st.lists(st.sampled_from(["\n", "\r", "\t", "\x1b[2J", "\x07", "\x08", "\x85", "\u2028", "a", "/", " "]),
                   min_size=1, max_size=6).map("".join).filter(lambda t: not t.isprintable())


@BOUNDED
@given(st.sampled_from(["train --data-dir", "train --config", "train --resume", "evaluate", "sharpness", "plot",
                        "summarize", "sweep"]), CONTROL)
def test_control_characters_from_the_input_never_break_the_error_line(box, tmp_path_factory, where, text):
    """A path holding newlines, carriage returns or terminal escapes: still exactly one `error:` line on
    stderr, with the characters written as escapes, not obeyed."""
    import plot
    import sharpness
    import summarize
    from engine import sweep
    bad = str(tmp_path_factory.mktemp("ctl") / f"x{text}y")
    tool, *option = where.split()
    mains = {"train": train.main, "evaluate": evaluate.main, "sharpness": sharpness.main, "plot": plot.main,
             "summarize": summarize.main, "sweep": sweep.main}
    argv = {"train": [*fill(TRAIN, box), *option, bad], "evaluate": [bad, "--device", "cpu"],
            "sharpness": [bad, "--hessian", "1", "--device", "cpu"], "plot": [bad], "summarize": [bad],
            "sweep": ["--group", "g", "--out-dir", bad, "--dry-run", "--", "--data-dir", bad]}[tool]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO("--seed 1\n"))  # the sweep reads its run lines from stdin
        try:
            code = mains[tool](argv)
        except SystemExit as e:
            code = e.code
    text_out = err.getvalue()
    assert code == 2, text_out
    assert text_out.startswith("error: ") and text_out.endswith("\n") and text_out.count("\n") == 1, repr(text_out)
    assert all(c.isprintable() for c in text_out[:-1]), repr(text_out)


GIVEN = {"eta": "0.02", "workers": "2", "padding_mode": "constant", "autoaugment_policy": "torchvision",
         "cutout_placement": "image", "label_noise_rule": "other", "m_sharpness_impl": "loop",
         "weight_decay_in": "optimizer"}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["none", "basic", "cutout", "autoaugment", "autoaugment_cutout"]), st.booleans(),
       st.sampled_from(["auto", "device", "workers"]), st.sampled_from(["0", "0.2"]), st.sampled_from(["0", "32", "64"]),
       st.sampled_from(["0", "5e-4"]), st.sampled_from(sorted(GIVEN)), st.booleans())
@example(augment="basic", adaptive=False, loader="auto", noise="0", m="32", decay="0", key="weight_decay_in",
         in_yaml=True)
def test_a_setting_is_recorded_as_null_exactly_when_giving_it_is_refused(augment, adaptive, loader, noise, m, decay,
                                                                         key, in_yaml):
    """Any combination: a setting the run does not use is refused when given (as a flag, or in a YAML
    file) and stated as null in the records (engine.config.recorded); one the run uses is accepted and
    recorded as given."""
    import tempfile
    from engine.config import ConfigError, parse_config, recorded, unused
    base = ["--augment", augment, "--loader", loader, "--label-noise", noise, "--m-sharpness", m,
            "--weight-decay", decay, "--batch-size", "64", *(["--adaptive"] if adaptive else [])]
    idle = {"eta": not adaptive, "workers": loader != "workers", "padding_mode": augment == "none",
            "autoaugment_policy": not augment.startswith("autoaugment"), "cutout_placement": not augment.endswith("cutout"),
            "label_noise_rule": noise == "0", "m_sharpness_impl": m in ("0", "64"),  # 64: the batch, one group
            "weight_decay_in": decay == "0"}[key]
    conflict = key == "autoaugment_policy" and loader == "device"  # torchvision's runs in workers only
    with_key = {**parse_config(base).config, key: type(parse_config(base).config[key])(GIVEN[key])}
    assert (key in unused(with_key)) == idle, (key, idle)  # the rule, stated independently of engine.config
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(f"{key}: {GIVEN[key]}\n")
        given = ["--config", str(path)] if in_yaml else [f"--{key.replace('_', '-')}", GIVEN[key]]
        try:
            config = parse_config([*base, *given]).config
        except ConfigError as e:
            assert key in unused(with_key) or conflict, f"{key} refused though the run would use it: {e}"
            return
    assert key not in unused(config), f"{key} accepted though the run does not use it"
    assert recorded(config)[key] == config[key]
    assert all(recorded(config)[k] is None for k in unused(config))


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_process_whose_peers_never_come_is_one_error_line_not_a_hang(box, monkeypatch, rank):
    """WORLD_SIZE=2 set by hand, one process started: it waits for its peer a bounded time (600 s; 3 s
    here), then says so in one line, exit 2, nothing written. Rank 0 waits for clients; rank 1 for a server."""
    import socket
    from engine import distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(distributed, "JOIN_S", 3)
    env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    assert contract(box, train.main, [*fill(TRAIN, box), "--name", "alone"], env) == 2


PLACES = st.sampled_from(["another run", "inside another run", "data", "inside data", "beside the data",
                          "the run itself", "elsewhere"])


@BOUNDED
@given(PLACES, st.sampled_from([False, True, "file"]), st.sampled_from(["evaluate", "plot", "sharpness", "train", "suite"]),
       st.booleans())
@example(place="data", through_link="file", tool="plot", live=False)
@example(place="inside another run", through_link="file", tool="sharpness", live=False)
@example(place="the run itself", through_link="file", tool="evaluate", live=True)
@example(place="beside the data", through_link=False, tool="sharpness", live=False)
@example(place="inside data", through_link=True, tool="evaluate", live=False)
@example(place="inside another run", through_link=False, tool="plot", live=False)
@example(place="data", through_link=False, tool="train", live=False)
@example(place="inside data", through_link=False, tool="suite", live=False)
@example(place="the run itself", through_link=False, tool="sharpness", live=True)
def test_outputs_never_land_in_another_runs_folder_or_a_data_folder(box, tmp_path_factory, place, through_link, tool,
                                                                    live):
    """Where a tool's output may go: its own run's folder (unless a live run holds it: `live`), a folder
    beside the data, anywhere else; not a run folder it does not read (nor any folder inside one), not a
    data set's folder (nor inside one), also when the path goes through a link. Refused in one line, before
    anything is written or probed (no folder's modification time changes); a link is where it leads, be it
    the folder (`through_link` True) or the output file itself ("file"). train.py's run folder is its
    output (--check: resolved only); the suite is only tried where it must refuse (else it would run)."""
    import plot
    import sharpness
    from benchmarks import suite
    from test_attack import tree as hashes
    allowed = place in ("beside the data", "elsewhere") or (place == "the run itself" and tool not in ("train", "suite")
                                                            and not live)
    assume(tool != "suite" or not allowed)
    assume(through_link != "file" or tool not in ("train", "suite"))  # their outputs are folders they create
    root = tmp_path_factory.mktemp("places")
    shutil.copytree(box / "runs" / "done", root / "runs" / "done")
    shutil.copytree(box / "runs" / "half", root / "runs" / "other")
    shutil.copytree(box / "data", root / "data")
    (root / "runs" / "other" / "sub").mkdir()
    (root / "data" / "cifar-10-batches-py" / "sub").mkdir()
    (root / "elsewhere").mkdir()
    folder = {"another run": root / "runs" / "other", "inside another run": root / "runs" / "other" / "sub",
              "data": root / "data" / "cifar-10-batches-py", "inside data": root / "data" / "cifar-10-batches-py" / "sub",
              "beside the data": root / "data", "the run itself": root / "runs" / "done",
              "elsewhere": root / "elsewhere"}[place]
    names = {"evaluate": ["e.json"], "plot": ["c.png"], "sharpness": ["sharpness.json", "sharpness.png"]}.get(tool, [])
    if through_link == "file":  # the output's own name is a link to where it would land
        (root / "links").mkdir()
        for name in names:
            os.symlink(folder / name, root / "links" / name)
    elif through_link:
        os.symlink(folder, root / "link")
    target, folder = folder, {"file": root / "links", True: root / "link"}.get(through_link, folder)
    lock = checkpoint.RunLock(root / "runs" / "done").acquire() if live else None
    before = hashes(root)
    times = folder_times(root)
    run = str(root / "runs" / "done")
    if tool == "train":
        main, argv, written = train.main, ["--check", *fill(TRAIN, box), "--out-dir", str(folder)], []
    elif tool == "suite":
        main, argv, written = suite.main, ["--smoke", "--out", str(folder / "bench")], []
    elif tool == "evaluate":
        main, argv, written = evaluate.main, [run, "--json", str(folder / "e.json"), "--device", "cpu"], ["e.json"]
    elif tool == "plot":
        main, argv, written = plot.main, [run, "--out", str(folder / "c.png")], ["c.png"]
    else:
        main, argv = sharpness.main, [run, "--out", str(folder), "--m-sharpness", "8", "--batches", "1", "--batch-size", "16",
                                      "--device", "cpu", "--wandb-mode", "disabled"]
        written = ["sharpness.json"]
    try:
        code = contract(box, main, argv)
    finally:
        if lock is not None:
            lock.release()
    assert code == (0 if allowed else 2), (place, tool, live, code)
    after = hashes(root)
    new = {p for p in after if p not in before}
    if allowed:
        real = Path(os.path.realpath(target)).relative_to(root)
        links = {Path("links") / name for name in names} if through_link == "file" else set()
        # a file written through its link lands where the link leads, or replaces the link (an atomic write)
        assert all(real / name in new or Path("links") / name in links and not after[Path("links") / name].startswith(
            "link:") for name in written), (new, after)
        assert {p for p, h in before.items() if after.get(p) != h} <= links
    else:
        assert after == before
        assert folder_times(root) == times, "a refused output's folder was touched"


NUMBER_TEXT = st.text(st.one_of(st.characters(whitelist_categories=("Nd", "No", "Zs")), st.sampled_from(list("+-_.e 0123456789"))),
                      min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(NUMBER_TEXT, st.sampled_from(["--seed", "--lr", "--epochs"]))
@example("１２", "--seed")
@example("1_0", "--seed")
@example("٠.١", "--lr")
@example("--", "--seed")  # argparse reads `--seed=--` as no value, an empty list
def test_a_number_flag_is_read_as_a_person_reads_it_or_refused(text, option):
    """Python's int() and float() read '１２' as 12 and '1_0' as 10; a flag is read only when it is
    written with the ASCII digits (as YAML files are), and then as those digits say."""
    import re
    from engine.config import ConfigError, parse_config
    try:
        config = parse_config([f"{option}={text}"]).config
    except ConfigError:
        return
    key = option[2:]
    assert re.fullmatch(r"\s*[-+]?[0-9.eE+-]+\s*", text), (text, config[key])
    assert config[key] == (int if key != "lr" else float)(text.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([0, 1, 20, 32, 33, 100, 199, 200, 201, 60000]),
       st.one_of(st.just(0.0), st.sampled_from([0.001, 0.004, 0.5, 0.9, 0.99, 0.999]), st.floats(0.0001, 0.9999)),
       st.sampled_from([1, 2, 16, 32, 64, 160, 200, 256]))
@example(subset=0, val_split=0.001, batch_size=32)
@example(subset=0, val_split=0.9, batch_size=32)
@example(subset=60000, val_split=0.0, batch_size=32)
def test_check_refuses_exactly_the_splits_training_refuses(box, subset, val_split, batch_size):
    """--check (and so every sweep's check before any run starts) passes a --subset/--val-split/
    --batch-size exactly when training builds its loaders from them."""
    from engine import preflight
    from engine.config import ConfigError, parse_config
    argv = [*fill(TRAIN, box), "--name", "splits", "--subset", str(subset), "--val-split", repr(val_split),
            "--batch-size", str(batch_size), "--m-sharpness", "0"]
    try:
        parsed = parse_config(argv)
    except ConfigError:
        return  # refused by the settings alone: both refuse
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            preflight.check(parsed)
        checked = True
    except ConfigError:
        checked = False
    r = preflight.resolve(parsed)
    data = preflight.read_data(r.config["dataset"], str(box / "data"))
    try:
        train.data_loaders(r.config, data, r.runtime)
        trains = True
    except ConfigError:
        trains = False
    assert checked == trains, (subset, val_split, batch_size, checked, trains)


REFUSED_WITH_AN_OUTPUT = {  # a tool given a good output place and one bad input: (tool, its other arguments)
    "evaluate": [["{done}", "--split", "val"], ["{done}", "--batch-size", "0"], ["{box}/nowhere"],
                 ["{done}", "--data-dir", "{box}/nowhere"], ["{done}", "--device", "tpu"]],
    "sharpness": [["{done}", "--batches", "0"], ["{done}", "--m-sharpness", "7"], ["{box}/nowhere"],
                  ["{done}", "--device", "tpu"], ["{done}", "--hessian", "-1"]],
    "plot": [["{box}/nowhere"], ["{box}/data"]],
}


@BOUNDED
@given(st.sampled_from([(tool, args) for tool, cases in REFUSED_WITH_AN_OUTPUT.items() for args in cases]),
       st.sampled_from(["a file in it", "the folder"]))
def test_a_command_refused_for_another_reason_never_touches_its_output_place(box, tool_args, how):
    """The output check may probe a folder for writing; a command refused by any check (before or after it)
    leaves the folder as it was: no file, no changed modification time (contract() checks both)."""
    import plot
    import sharpness
    tool, args = tool_args
    out = box / "outs" / f"{tool}-{len(list((box / 'outs').glob('*'))) if (box / 'outs').is_dir() else 0}"
    out.mkdir(parents=True)
    name = {"evaluate": "e.json", "plot": "c.png", "sharpness": ""}[tool]
    place = str(out / name) if name else str(out)
    main, flag = {"evaluate": (evaluate.main, "--json"), "plot": (plot.main, "--out"),
                  "sharpness": (sharpness.main, "--out")}[tool]
    argv = [*fill(args, box), flag, place] if how == "a file in it" else [flag, place, *fill(args, box)]
    assert contract(box, main, argv) == 2, argv


OPTION_KINDS = {"int": dict(type=int), "float": dict(type=float), "text": {}, "choice": dict(choices=["a", "b"]),
                "optional": dict(nargs="?", const="auto")}  # every kind of option the entry points declare


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(OPTION_KINDS)), st.one_of(st.sampled_from(["--", "-", "-1", "=", "", " ", "nan", "a"]),
                                                       st.text(max_size=6)), st.booleans())
@example("int", "--", True)
@example("optional", "--", True)
def test_every_parser_reads_an_option_as_its_type_or_refuses_in_one_line(kind, text, joined):
    """OneLineParser, the parser of every entry point: `--x=V` or `--x V` gives a value of the option's
    type (argparse alone gives [] for `--x=--`), or one `error:` line and exit 2."""
    from engine.config import OneLineParser
    parser = OneLineParser(prog="tool")
    parser.add_argument("--x", **OPTION_KINDS[kind])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            value = parser.parse_args([f"--x={text}"] if joined else ["--x", text]).x
        except SystemExit as e:
            assert e.code == 2 and err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1, \
                err.getvalue()
            return
    assert isinstance(value, {"int": int, "float": float}.get(kind, str)), value
    assert kind != "choice" or value in ("a", "b")


# -- third attack round: W&B's and SLURM's folders, files of another kind, copied runs and records -------------
@BOUNDED
@given(st.sampled_from(["wandb", "slurm"]), st.lists(st.sampled_from(["offline-run-1", "files", "."]), max_size=2),
       st.sampled_from(["run-1.wandb", "debug.log", "new.json", "new.png"]),
       st.sampled_from(["evaluate --json", "plot --out", "sharpness --out"]))
def test_no_tool_writes_into_a_runs_w_and_b_or_slurm_folder(box, tmp_path_factory, folder, below, name, tool):
    """W&B's and submitit's files in a run folder belong to them: any output path inside, existing or new,
    is refused and nothing there changes."""
    import plot
    import sharpness
    run = tmp_path_factory.mktemp("own") / "done"
    shutil.copytree(box / "runs" / "done", run)
    inside = run / folder / Path(*below)
    inside.mkdir(parents=True, exist_ok=True)
    (inside / "run-1.wandb").write_bytes(b"\x00W&B binary records\xff")
    (inside / "debug.log").write_text("W&B's log\n")
    out = inside / name
    argv = {"evaluate --json": (evaluate.main, [str(run), "--json", str(out), "--device", "cpu"]),
            "plot --out": (plot.main, [str(run), "--out", str(out.with_suffix(".png"))]),
            "sharpness --out": (sharpness.main, [str(run), "--hessian", "1", "--batches", "1", "--batch-size", "8",
                                                 "--device", "cpu", "--out", str(inside)])}[tool]
    assert contract(run.parent, *argv) == 2


@BOUNDED
@given(st.one_of(st.binary(max_size=64), st.sampled_from([b"PK\x03\x04torch zip", b"[1, 2]", b"{\"a\": 1}", b"",
                                                           b"\x89PNG\r\n\x1a\n...", b"%PDF-1.4", b"step,loss\n"])),
       st.sampled_from([".json", ".png", ".pdf", ".svg", ".pt", ".csv", ""]))
def test_an_existing_file_is_replaced_only_when_it_is_the_kind_written(tmp_path_factory, content, suffix):
    """A tool's output may replace an earlier output of its kind (or an empty file), never a checkpoint, a
    log or a user's file of another kind: the file is left as it was."""
    import json
    from analysis.figures import OutputError, check_output_file
    path = tmp_path_factory.mktemp("kind") / f"out{suffix}"
    path.write_bytes(content)
    kind = ".json"  # evaluate's --json writes JSON whatever the name
    try:
        json_dict = isinstance(json.loads(content.decode()), dict)
    except (UnicodeDecodeError, ValueError):
        json_dict = False
    try:
        check_output_file(path, "--json", kind=kind)
        accepted = True
    except OutputError as e:
        accepted = False
        assert "is not a .json file a tool wrote" in str(e)
    assert accepted == (not content or json_dict)
    assert path.read_bytes() == content


def test_evaluate_never_replaces_the_checkpoint_it_reads(box, tmp_path):
    copy = tmp_path / "ck.pt"
    shutil.copy(box / "runs" / "done" / "last.pt", copy)
    before = copy.read_bytes()
    code = contract(tmp_path, evaluate.main, [str(copy), "--json", str(copy), "--device", "cpu"])
    assert code == 2 and copy.read_bytes() == before


@BOUNDED
@given(st.sampled_from(["half", "done"]), st.sampled_from(["copy", "rename"]))
def test_a_copied_or_renamed_run_folder_does_not_continue_as_its_own_run(box, tmp_path_factory, run, how):
    """A run continues only in the folder of its name: a copy would log to the same W&B run from two folders."""
    parent = tmp_path_factory.mktemp("copied")
    target = parent / f"{run}-{how}"
    shutil.copytree(box / "runs" / run, target)
    if how == "copy":
        shutil.copytree(box / "runs" / run, parent / run)
    assert contract(parent, train.main, ["--resume", str(target), "--check"]) == 2


@BOUNDED
@given(st.data())
def test_an_edited_config_yaml_of_a_run_without_a_checkpoint_is_refused(box, tmp_path_factory, data):
    """Stopped before its first checkpoint, a run has only its config.yaml: an edit of an experiment setting
    there would train other settings in a folder whose name states the first ones."""
    import yaml
    from engine.config import EXPERIMENT, default_name, defaults
    from engine.resume import known
    key = data.draw(st.sampled_from([k for k in EXPERIMENT if k != "relabel_from"]), label="key")
    saved = yaml.safe_load((box / "runs" / "half" / "config.yaml").read_text())
    saved["name"] = None
    parent = tmp_path_factory.mktemp("early")
    folder = parent / default_name({**defaults(), **known(saved)})
    folder.mkdir()
    value = other_value(key, data.draw)
    assume(saved.get(key) != value)
    saved[key] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert contract(parent, train.main, ["--resume", str(folder), "--check"]) == 2


def test_a_results_json_copied_from_another_run_finishes_nothing(box, tmp_path):
    """results.json names its run: copied into an unfinished run's folder, the run is not taken as finished
    (a sweep would skip it, summarize would list it) and summarize skips it, saying why."""
    import summarize
    folder = tmp_path / "half"
    shutil.copytree(box / "runs" / "half", folder)
    shutil.copy(box / "runs" / "done" / "results.json", folder / "results.json")
    assert checkpoint.finished(box / "runs" / "done") and not checkpoint.finished(folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert summarize.main([str(folder)]) == 2
    assert "is not the run of the folder's config.yaml" in err.getvalue()


@BOUNDED
@given(st.integers(20, 200), st.floats(1e-4, 0.05), st.integers(0, 2**32 - 1), st.sampled_from(["uniform", "other"]))
def test_label_noise_is_refused_exactly_when_it_changes_no_label(n, p, seed, rule):
    """--label-noise p on n images: the labels training would use differ from the clean ones, or the setting
    is refused (and so never recorded) -- whatever the draw, not only when p n rounds to 0."""
    import numpy as np
    from data.splits import make_splits
    from types import SimpleNamespace
    labels = np.arange(n) % 10
    data = SimpleNamespace(train_images=np.zeros((n, 3, 32, 32), np.uint8), train_labels=labels,
                           test_images=np.zeros((10, 3, 32, 32), np.uint8), test_labels=np.arange(10), num_classes=10)
    try:
        noisy = make_splits(data, 0, 0.0, p, seed, rule).train_labels
    except ValueError as e:
        assert "changes no label" in str(e)
        return
    assert (noisy != labels).any()


@BOUNDED
@given(st.integers(0, 3), st.integers(1, 40), st.integers(0, 3), st.integers(1, 12), st.sampled_from(["", "sam_"]),
       st.sampled_from(["0123456789", "０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩"]))
def test_a_model_has_one_name(zeros_d, depth, zeros_w, width, prefix, digits):
    """A WideResNet name that is accepted is the one spelling of its depth and width: leading zeros and
    other scripts' digits would build the same model under another folder name."""
    from models import model_spec
    spell = lambda k: "".join(digits[int(c)] for c in str(k))  # noqa: E731
    name = f"{prefix}wrn{'0' * zeros_d}{spell(depth)}_{'0' * zeros_w}{spell(width)}"
    try:
        _, kwargs = model_spec(name)
    except ValueError:
        return
    assert name == f"{prefix}wrn{kwargs['depth']}_{kwargs['width']}"


@BOUNDED
@given(st.sampled_from(["WANDB_RUN_GROUP", "WANDB_TAGS"]), st.text(min_size=0, max_size=8).filter(lambda v: "\0" not in v))
def test_w_and_b_settings_from_the_environment_are_refused(box, variable, value):
    """$WANDB_RUN_GROUP and $WANDB_TAGS would set what --wandb-group and --wandb-tags set, behind the run's
    records (config.yaml would say null)."""
    assert contract(box, train.main, ["--check", *fill(TRAIN, box)], env={variable: value}) == 2


@pytest.mark.parametrize("option", ["--wandb-project", "--wandb-entity"])
def test_summarize_refuses_w_and_b_places_without_w_and_b_runs_to_read(box, option):
    import summarize
    assert contract(box, summarize.main, [str(box / "runs"), option, "x"]) == 2
