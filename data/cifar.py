"""Read CIFAR-10/100 from the official python layout, check it against the official
checksums, and download it on request with torchvision's own downloader."""

import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import calculate_md5, download_and_extract_archive

# torchvision's classes carry the official URLs, file lists and MD5s; we reuse them.
RELEASES = {"cifar10": (CIFAR10, "labels", 10), "cifar100": (CIFAR100, "fine_labels", 100)}
DATA_DIR_ENV = "SAM_DATA_DIR"


def is_data_folder(folder):
    """Whether `folder` holds a data set a tool reads: CIFAR-10's or CIFAR-100's python batches, or the .npy
    arrays of CIFAR-10-C (labels.npy) or CIFAR-10.1 (<name>_labels.npy). No tool writes into one."""
    folder = Path(folder)
    has = lambda *names: all((folder / name).is_file() for name in names)  # noqa: E731
    return (has("batches.meta") or has("data_batch_1") or has("meta", "train", "test") or has("labels.npy")
            or (folder.is_dir() and any(folder.glob("*_labels.npy"))))


class DataError(Exception):
    """Missing or unreadable data; the message is one line naming the file and the fix."""


@dataclass
class CifarData:
    train_images: np.ndarray   # uint8, N x 3 x 32 x 32
    train_labels: np.ndarray   # int64
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    fingerprint: dict          # dataset, official (bool), md5 per file
    note: str = None           # a warning line when the files are not the official release: callers print
                               # it once they start for real (bad input stays one error line)

    def warn(self):
        if self.note:
            print(self.note, file=sys.stderr)


def default_data_dir():
    """$SAM_DATA_DIR, else the user cache folder (never inside the code folders)."""
    if DATA_DIR_ENV in os.environ:
        return _folder(os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}")
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "sam-cifar"


def resolve_data_dir(data_dir=None):
    """--data-dir, else $SAM_DATA_DIR, else the user cache folder."""
    return _folder(data_dir, "--data-dir") if data_dir is not None else default_data_dir()


def _folder(text, where):
    """A data folder as given (~ expanded); DataError for an empty one or a ~user that does not exist."""
    text = str(text)
    if not text.strip():
        raise DataError(f"{where} is empty; name the folder of the data (or leave it out for the default)")
    from engine.config import path_problem  # here: engine.config imports this module
    if path_problem(text):
        raise DataError(f"{where} {text[:80]!r} {path_problem(text)}; give another path")
    try:
        return Path(text).expanduser()
    except RuntimeError as e:
        raise DataError(f"{where} {text!r}: {e}; write the folder's full path") from None


def check_files(dataset, data_dir=None, download=False):
    """The data set's files are where they should be (not read; --download would fetch them), or a
    DataError naming the fix."""
    if dataset not in RELEASES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(RELEASES)}")
    release = RELEASES[dataset][0]
    folder = resolve_data_dir(data_dir) / release.base_folder
    if download and not folder.is_dir():
        return
    if not folder.is_dir():
        raise DataError(f"{dataset} not found: no folder {folder}; run with --download, "
                        f"or point --data-dir (or ${DATA_DIR_ENV}) at the folder that holds {release.base_folder}/")
    for name, _ in release.train_list + release.test_list:
        if not (folder / name).is_file():
            raise DataError(f"{not_a_file(folder / name)}; delete it and run with --download, or rebuild the folder")


def not_a_file(path):
    """What a data file that is not a regular file is, in a few words."""
    return (f"data file {path} is not a regular file (a folder, a device, a named pipe or a broken link)"
            if os.path.lexists(path) else f"missing data file {path}")


def load_cifar(dataset, data_dir=None, download=False):
    if dataset not in RELEASES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(RELEASES)}")
    release, label_key, num_classes = RELEASES[dataset]
    root = resolve_data_dir(data_dir)
    folder = root / release.base_folder
    if download and not folder.is_dir():
        made = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)  # the first folder made
        archive, had_archive = root / release.filename, (root / release.filename).exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(release.url, str(root), filename=release.filename, md5=release.tgz_md5)
        except (OSError, RuntimeError) as e:  # no network, bad archive, MD5 mismatch (URLError is an OSError)
            if made is not None:  # a failed download leaves nothing behind
                shutil.rmtree(made, ignore_errors=True)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                if not had_archive:
                    archive.unlink(missing_ok=True)
            raise DataError(f"downloading {release.url} into {root} failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); check the network, or "
                            f"place {release.base_folder}/ in --data-dir yourself") from None
    check_files(dataset, data_dir)
    train = [_read_batch(folder / name, label_key, num_classes) for name, _ in release.train_list]
    test = [_read_batch(folder / name, label_key, num_classes) for name, _ in release.test_list]
    fingerprint = _fingerprint(dataset, folder, release)
    missing = [name for name in fingerprint["mismatched"] if fingerprint["md5"][name] is None]
    differ = [name for name in fingerprint["mismatched"] if name not in missing]
    listed = "; ".join(f"{what}: {', '.join(names)}" for what, names in (("missing", missing), ("mismatched", differ))
                       if names)
    note = None if fingerprint["official"] else (
        f"warning: {dataset} files in {folder} do not match the official checksums ({listed}); accuracies are not "
        f"comparable with results on the official release")
    return CifarData(
        train_images=np.concatenate([b[0] for b in train]), train_labels=np.concatenate([b[1] for b in train]),
        test_images=np.concatenate([b[0] for b in test]), test_labels=np.concatenate([b[1] for b in test]),
        num_classes=num_classes, fingerprint=fingerprint, note=note)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (dicts, lists, strings, numpy arrays) and nothing else: a
    pickle that names any other callable is refused before anything of it runs."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR data never holds (refused unread)")
        return super().find_class(module, name)


def _read_batch(path, label_key, num_classes):
    fix = "delete it and run with --download, or rebuild the folder"
    if not path.is_file():
        raise DataError(f"{not_a_file(path)}; {fix}")
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise TypeError(f"it holds a {type(entry).__name__}, not a CIFAR batch (a dict of data and {label_key})")
        decoded = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}  # Python 3 dumps
        if len(decoded) != len(entry):
            raise ValueError("it holds a key both as bytes and as text (b'labels' and 'labels'), so which is "
                             "meant is not known")
        entry = decoded
        absent = [k for k in ("data", label_key) if k not in entry]
        if absent:
            raise ValueError(f"it has no {' or '.join(absent)} entry (its keys: {', '.join(map(str, entry))[:80]}), "
                           f"so it is not a CIFAR batch of this data set")
        data, raw = np.asarray(entry["data"]), np.asarray(entry[label_key])
        odd = next((v for v in entry[label_key] if isinstance(v, (bool, np.bool_))
                    or not isinstance(v, (int, np.integer))), None) if isinstance(entry[label_key], list) else None
        if raw.dtype.kind not in "iu" or odd is not None:  # strings, floats, bools (even among ints), refused
            raise TypeError(f"its {label_key} hold {odd!r}, not an integer" if odd is not None else
                            f"its {label_key} are {raw.dtype} values, not integers")
        if raw.ndim != 1:
            raise ValueError(f"its {label_key} have shape {raw.shape}, not one label per image")
        labels = raw  # int64 once in range: a uint64 past int64's range is reported as it is
    except Exception as e:  # truncated, corrupt, hostile, or not a CIFAR batch at all
        raise DataError(f"cannot read data file {path} ({type(e).__name__}: {e}); {fix}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"data file {path} has data of shape {data.shape} ({data.dtype}) and "
                        f"{len(labels)} labels, expected N x 3072 uint8 and N labels; {fix}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        found = f"labels from {labels.min()} to {labels.max()}" if labels.size else "no images"
        raise DataError(f"data file {path} holds {found}, expected labels 0..{num_classes - 1}; {fix}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _fingerprint(dataset, folder, release):
    files = release.train_list + release.test_list + [[release.meta["filename"], release.meta["md5"]]]
    md5 = {}
    mismatched = []
    for name, official in files:
        path = folder / name
        md5[name] = calculate_md5(path) if path.is_file() else None
        if md5[name] != official:
            mismatched.append(name)
    return {"dataset": dataset, "official": not mismatched, "md5": md5, "mismatched": mismatched}


def write_synthetic_cifar10(root, per_batch=20, seed=0):
    """Small CIFAR-10 batch files in the official python layout, with random images whose first channel
    carries the class (so a tiny model learns something): for tests and the GPU suite's smoke run."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in np.arange(per_batch) % 10]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = (np.array(labels)[:, None] * 25).astype(np.uint8)
        entry = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"{i:05d}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f, protocol=2)
    return Path(root)
