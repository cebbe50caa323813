"""Every setting of a run is declared once, in SETTINGS: type, default, allowed values, a one-line
help, and where the default comes from. The defaults ARE the paper's headline run (WRN-28-10,
CIFAR-10, basic augmentation, SAM, rho 0.05, m = 32, 200 epochs), so `python train.py` runs it
and `--help` shows exactly what it uses. Values flow one way:

    SETTINGS defaults -> YAML file (--config; it may extend a `base:` file) -> flags -> validate()

A YAML file holds only what differs from these defaults, each value with its source. YAML keys
are the flag names with '_' for '-'. docs/settings.md is generated from SETTINGS
(`python -m engine.config --markdown > docs/settings.md`; a test keeps it true)."""

import argparse
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from data.augment import AUGMENTATIONS, AUTOAUGMENT_POLICIES, CUTOUT_PLACEMENTS, PADDING_MODES
from data.cifar import RELEASES
from data.loaders import LOADERS
from data.splits import NOISE_RULES
from engine.groups import IMPLEMENTATIONS as GROUP_IMPLEMENTATIONS
from models import model_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = "Foret et al. 2021"
OFFICIAL = "google-research/sam"


FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


class ConfigError(Exception):
    """Bad user input; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Setting:
    type: type
    default: object
    help: str                 # one line
    source: str = ""          # where the default comes from: the paper's section or the official code
    choices: tuple = None
    bounds: str = None        # allowed interval, e.g. "[0, 1)"; floats must also be finite
    experiment: bool = True   # False: changes how a run is carried out, not what it computes
    unset: str = ""           # what the default None means


S = Setting
SETTINGS = {
    # what is trained
    "model": S(str, "sam_wrn28_10", "sam_wrn<d>_<k> (the SAM authors'), wrn<d>_<k>, resnet18, resnet32(_jiang)", f"{PAPER} Table 1 (WRN-28-10); {OFFICIAL} sam_jax/models/wide_resnet.py"),
    "dropout": S(float, 0.0, "dropout inside wrn<d>_<k> blocks", f"{OFFICIAL} wide_resnet.py has none",
                 bounds="[0, 1)"),
    "norm": S(str, "batch", "normalisation in WideResNets (none: for Hessian spectra, Section 4.2)",
              choices=("batch", "none")),
    "dataset": S(str, "cifar10", "dataset", f"{PAPER} Table 1", choices=tuple(RELEASES)),
    "augment": S(str, "basic", "augmentation as named in Table 1", f"{PAPER} Table 1",
                 choices=AUGMENTATIONS),
    "autoaugment_policy": S(str, "official", "the official code's AutoAugment policy, or torchvision's", f"{OFFICIAL} autoaugment/policies.py policy_cifar",
                            choices=AUTOAUGMENT_POLICIES),
    "cutout_placement": S(str, "batch", "one Cutout window per batch, or per image (DeVries & Taylor)",
                          f"{OFFICIAL} sam_jax/datasets/augmentation.py cutout", choices=CUTOUT_PLACEMENTS),
    "padding_mode": S(str, "reflect", "padding before the random crop", f"{OFFICIAL} augmentation.py "
                      "weak_image_augmentation (REFLECT)", choices=PADDING_MODES),
    # how it is optimised
    "epochs": S(int, 200, "training epochs", f"{PAPER} Table 1 (200 epochs)", bounds="[1, 100000]"),
    "batch_size": S(int, 256, "global batch size (split across processes under torchrun)", f"{PAPER} Appendix C.1",
                    bounds="[1, 1000000]"),
    "lr": S(float, 0.1, "peak learning rate of the per-step cosine schedule (no warmup)",
            f"{PAPER} Appendix C.1; schedule: {OFFICIAL} flax_training.py get_cosine_schedule", bounds="(0, 10]"),
    "momentum": S(float, 0.9, "SGD momentum", f"{PAPER} Appendix C.1", bounds="[0, 1)"),
    "nesterov": S(bool, True, "Nesterov momentum (needs momentum > 0)", f"{OFFICIAL} flax_training.py "
                  "create_optimizer (nesterov=True)"),
    "weight_decay": S(float, 5e-4, "L2 weight decay on every parameter (BatchNorm and biases too)",
                      f"{PAPER} Appendix C.1", bounds="[0, 0.1]"),
    "weight_decay_in": S(str, "loss", "loss: inside SAM's ascent (official); optimizer: SGD's (davda54/sam)", f"{OFFICIAL} flax_training.py train_step (weight_penalty in the loss)",
                         choices=("loss", "optimizer")),
    "grad_clip": S(float, 5.0, "clip the global norm of the descent gradient; 0: off",
                   f"{OFFICIAL} flax_training.py flag gradient_clipping, clip_by_global_norm", bounds="[0, 1000]"),
    "optimizer": S(str, "sam", "sam, or sgd for the paper's baseline", f"{PAPER} Table 1", choices=("sam", "sgd")),
    "rho": S(float, 0.05, "SAM neighbourhood size (SAM only)", f"{PAPER} Appendix C.1 (CIFAR-10)", bounds="[0, 10]"),
    "adaptive": S(bool, False, "ASAM (Kwon et al. 2021): scale the ascent by |w| (SAM only)",
                  "SAM; ASAM is configs/wrn28-10_asam.yaml"),
    "eta": S(float, 0.01, "ASAM's eta in T_w = |w| + eta (--adaptive only)",
             "Kwon et al. 2021; SamsungLabs/ASAM asam.py ASAM(eta=0.01)", bounds="[0, 1]"),
    "sam_p": S(float, 2.0, "ascent over a p-norm ball, 1.5 <= p <= inf (nearer 1, |g|^(p/(p-1)) overflows; SAM only)",
               f"{PAPER} Appendix C.5 (p = 2 in every main result)", bounds="[1.5, inf]"),
    "sam_second_order": S(bool, False, "keep SAM's second-order term (a Hessian-vector product per step)",
                          f"{PAPER} Appendix C.4 (dropped in every main result)"),
    "sam_start_epoch": S(int, 0, "late-phase SAM: SGD steps before this epoch, SAM steps from it (SAM only)",
                         "SAM throughout; Zhou et al. 2025 (arXiv 2410.10373) switch late", bounds="[0, 100000]"),
    "sam_prob": S(float, 1.0, "randomized SAM: each step is SAM with this probability, else SGD (SAM only)",
                  "SAM every step; Zhao et al. 2022 (SS-SAM) draw it per step", bounds="[0, 1]"),
    "m_sharpness": S(int, 32, "images per ascent and BatchNorm group in each process's batch; 0: whole batch",
                     f"{PAPER} Section 4.1: batch 256 over 8 accelerators, 32 each (official: per-device pmap)",
                     bounds="[0, 1000000]"),
    "m_sharpness_impl": S(str, "vmap", "how the m-sharpness groups run: vmap (batched) or loop (the reference)",
                          choices=GROUP_IMPLEMENTATIONS, experiment=False),
    "label_smoothing": S(float, 0.0, "label smoothing of the cross-entropy loss",
                         f"{OFFICIAL} flax_training.py flag label_smoothing", bounds="[0, 1)"),
    "seed": S(int, 0, "seed for initialisation, data order and augmentation", bounds="[0, 4294967295]"),
    # data
    "data_dir": S(str, None, "folder holding cifar-10-batches-py/", experiment=False,
                  unset="$SAM_DATA_DIR, else ~/.cache/sam-cifar"),
    "download": S(bool, False, "download the dataset with torchvision if it is missing", experiment=False),
    "subset": S(int, 0, "use only the first N training and test images; 0: all", bounds="[0, inf)"),
    "val_split": S(float, 0.0, "fraction of training images held out as validation (the last ones)",
                   f"{OFFICIAL} holds out train[45000:] to tune rho", bounds="[0, 1)"),
    "label_noise": S(float, 0.0, "training labels redrawn with probability p", f"{PAPER} Section 3.3, Table 4",
                     bounds="[0, 1]"),
    "label_noise_rule": S(str, "uniform", "uniform: redrawn over all classes; other: p move to another class", "Jiang et al. 2019, which Table 4 follows", choices=NOISE_RULES),
    "mixup_alpha": S(float, 0.0, "mixup's Beta(alpha, alpha), one weight per batch; 0: off",
                     f"{OFFICIAL} sam_jax/datasets/augmentation.py mixup; Table 4", bounds="[0, 100]"),
    "relabel_from": S(str, None, "bootstrap: train on the labels a finished run (folder) predicts",
                      f"{PAPER} Table 4 (Bootstrap rows), after Jiang et al. 2019", unset="the data's labels"),
    # where and how it runs: none of these changes what a run computes
    "out_dir": S(str, "runs", "folder that holds run folders", experiment=False),
    "name": S(str, None, "run folder name", experiment=False, unset="built from the settings"),
    "device": S(str, "auto", "auto (cuda if available), cuda, cuda:N or cpu", experiment=False),
    "precision": S(str, "auto", "autocast precision; auto: bf16 on CUDA, fp32 on the CPU",
                   f"{OFFICIAL} on TPU multiplies in bfloat16", choices=("auto", "bf16", "fp16", "fp32")),
    "channels_last": S(bool, None, "channels_last memory format", experiment=False, unset="on for CUDA"),
    "compile": S(str, "off", "torch.compile mode; off: eager", choices=("off", "default", "reduce-overhead",
                                                                           "max-autotune"), experiment=False),
    "loader": S(str, "auto", "auto: device (data on the device), or workers for torchvision's AA",
                choices=LOADERS),
    "workers": S(int, 4, "DataLoader workers (--loader workers only)", bounds="[0, 256]", experiment=False),
    "eval_batch_size": S(int, 1000, "batch size for evaluation", bounds="[1, 1000000]", experiment=False),
    "log_every": S(int, 50, "steps between step logs (the loop's only host syncs)", bounds="[1, inf)",
                   experiment=False),
    "checkpoint_every_min": S(float, 60.0, "also checkpoint mid-epoch once this many minutes passed; 0: off",
                              f"{OFFICIAL} train.py flag save_progress_seconds (3600)", bounds="[0, 100000]",
                              experiment=False),
    "sharpness_every": S(int, 0, "log lambda_max of the Hessian every N epochs (one fixed batch); 0: off",
                         f"{PAPER} Section 4.2", bounds="[0, 100000]", experiment=False),
    "wandb_mode": S(str, None, "W&B mode", choices=("online", "offline", "disabled"), experiment=False,
                    unset="$WANDB_MODE, else online if logged in, offline if not"),
    "wandb_project": S(str, "sam-cifar", "W&B project", experiment=False),
    "wandb_entity": S(str, None, "W&B entity, team or user", experiment=False, unset="your default"),
    "wandb_group": S(str, None, "W&B group, e.g. one per sweep", experiment=False, unset="none"),
    "wandb_tags": S(str, None, "comma-separated W&B tags", experiment=False, unset="none"),
    "save_artifact": S(bool, False, "upload the final checkpoint to W&B as an artifact", experiment=False),
}
del S
EXPERIMENT = tuple(k for k, s in SETTINGS.items() if s.experiment)
SAM_ONLY = ("rho", "adaptive", "eta", "sam_p", "sam_second_order", "sam_start_epoch", "sam_prob")
NAMED = ("model", "dataset", "augment", "optimizer", "rho", "seed")  # always in a run's name


def defaults():
    """Every setting at its default: the paper's headline run, the base under YAML and flags, and what
    completes the saved settings of a run older than a setting."""
    return {key: spec.default for key, spec in SETTINGS.items()}


def shown(value):
    """How a value appears in --help, docs/settings.md and run names."""
    if value is None:
        return "unset"
    return repr(value) if isinstance(value, float) else str(value)


# ---- the command line ------------------------------------------------------------------------------

META = (  # flags that are not settings: (flag, metavar, help)
    ("--config", "FILE", "YAML file of settings, applied over the defaults (configs/*.yaml)"),
    ("--resume", "[RUN]", "continue a stopped run, the same experiment: its folder or last.pt (alone: the "
                          "folder these settings name)"),
    ("--check", "", "validate this command (settings, run folder, data files) and exit"),
)


def printable(text):
    """Text as one line a terminal shows as it is: a newline, a tab, an escape or any other control
    character from the input is written as its escape (\\n, \\x1b), never obeyed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def refuse(message):
    """The one way a tool refuses bad input: one `error:` line on stderr -> exit code 2."""
    print(f"error: {printable(message)}", file=sys.stderr)
    return 2


def _ascii_number(kind, pattern):
    def convert(text):
        if not re.fullmatch(pattern, text.strip(), re.IGNORECASE):
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r} (write it plainly: digits "
                                             f"0-9{', a point, an exponent' if kind is float else ''})")
        return kind(text)
    convert.__name__ = kind.__name__
    return convert


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error:` line and exit 2, instead of usage + message. Every entry
    point (train.py, sharpness.py, evaluate.py, summarize.py, plot.py, the benchmarks suite) uses it.
    Numbers are read as a person reads them: ASCII digits only (Python's int() also takes '１２', '1_0')."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", int, _ascii_number(int, r"[-+]?[0-9]+"))
        self.register("type", float, _ascii_number(float, r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)(e[-+]?[0-9]+)?|"
                                                          r"[-+]?(inf|infinity|nan)"))

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        for token in args[:args.index("--") if "--" in args else None]:  # argparse drops the value of `--seed=--`
            if token.startswith("-") and token.partition("=")[2] == "--":
                self.error(f"argument {token.partition('=')[0]}: expected one argument, got '--'")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        sys.exit(refuse(f"{message} (see {self.prog} --help)"))


class _TrainParser(OneLineParser):
    def format_help(self):
        return help_text()

    def error(self, message):  # a ConfigError like every other bad input (train.py --check-all names the run)
        raise ConfigError(f"{message} (see python train.py --help)")


def flag(name):
    return "--" + name.replace("_", "-")


def _label(name, spec):
    if spec.type is bool:
        return f"--[no-]{name.replace('_', '-')}"
    return f"{flag(name)} {'NAME' if spec.choices else {int: 'N', float: 'X'}.get(spec.type, 'TEXT')}"


def default_text(spec):
    return "unset: " + spec.unset if spec.default is None else shown(spec.default)


def help_text():
    """--help: one line per setting with its default; the sources are in docs/settings.md."""
    rows = [(f"{f} {m}".rstrip(), h) for f, m, h in META]
    rows += [(_label(n, s), f"{s.help}{' (' + '|'.join(s.choices) + ')' if s.choices else ''} "
                            f"(default: {default_text(s)})") for n, s in SETTINGS.items()]
    width = 26
    lines = ["usage: python train.py [--config FILE] [--resume [RUN]] [--check] [--SETTING X ...]",
             "",
             "Reproduce SAM (Foret et al., ICLR 2021) on CIFAR. With no flags: the paper's WRN-28-10 CIFAR-10 run.",
             "Settings: these defaults, then --config FILE, then flags. Each default's source: docs/settings.md.",
             ""]
    for label, text in rows:
        lines.append(f"  {label:<{width}} {text}" if len(label) <= width else f"  {label} {text}")
    return "\n".join(lines) + "\n"


def build_parser():
    p = _TrainParser(prog="python train.py", add_help=True)
    # Every default is None: what the namespace holds (not None) is exactly what was given.
    p.add_argument("--config")
    p.add_argument("--resume", nargs="?", const="auto")
    p.add_argument("--check", action="store_true", default=None)
    for name, spec in SETTINGS.items():
        flags = [flag(name)] + ([f"--{name}"] if "_" in name else [])  # --batch_size as YAML spells it, too
        if spec.type is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(*flags, dest=name, type=spec.type, choices=spec.choices)
    return p


def settings_markdown():
    """docs/settings.md: one table of every setting, its default, meaning, allowed values and source."""
    def allowed(spec):
        if spec.choices:
            return ", ".join(spec.choices)
        return spec.bounds or ("true, false" if spec.type is bool else "")

    lines = ["# Settings", "",
             "Generated from `SETTINGS` in `engine/config.py` by `python -m engine.config --markdown > "
             "docs/settings.md`; a test checks it is current. The defaults are the paper's headline run "
             "(`python train.py`). Flags are the names with `-` for `_` (`--batch-size`; `--batch_size` works too, "
             "and of a flag given twice the last counts, as in any argparse tool); YAML keys are the names. "
             "*Experiment* settings change what a run computes: they are in its name and in results.json, and "
             "`--resume` refuses to change them.", "",
             "| setting | default | meaning | allowed | experiment | source of the default |",
             "|---|---|---|---|---|---|"]
    for name, spec in SETTINGS.items():
        cells = [f"`{name}`", f"`{shown(spec.default)}`" + (f" ({spec.unset})" if spec.default is None else ""),
                 spec.help, allowed(spec),
                 "yes" if spec.experiment else "no", spec.source]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---- YAML files --------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """YAML as a person reads it: a key given twice, and YAML 1.1's surprises (010 is 8, 1:30 is 90,
    yes/no/on/off are booleans, 0x10 is 16), are refused instead of silently read."""

    def construct_mapping(self, node, deep=False):
        seen, twice = set(), set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            try:
                twice.update({str(key)} if key in seen else ())
                seen.add(key)
            except TypeError:  # a key YAML allows and Python cannot hash (a list): refused later as unknown
                pass
        twice = sorted(twice)
        if twice:
            raise yaml.YAMLError(f"key {twice[0]!r} is given twice (line {node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep=deep)


def _plain_scalar(loader, node):
    text, tag = node.value, node.tag  # quoted text is a number or a bool only by an explicit tag: checked too
    if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"):
        plain = {"tag:yaml.org,2002:int": r"[-+]?(0|[1-9][0-9]*)",
                 "tag:yaml.org,2002:bool": r"true|false|True|False|TRUE|FALSE",
                 "tag:yaml.org,2002:float": r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|"
                                            r"\.(nan|NaN|NAN)"}[tag]
        if not re.fullmatch(plain, text):
            raise yaml.YAMLError(f"{text!r} (line {node.start_mark.line + 1}) reads differently in YAML 1.1 and to "
                                 f"a person; write it plainly (e.g. 10 for 010, true/false for yes/no) or quote it")
    return yaml.SafeLoader.yaml_constructors[tag](loader, node)


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"):
    _StrictLoader.add_constructor(_tag, _plain_scalar)
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))  # 5e-4 is a number, as a person reads it


def path_problem(path):
    """Why the operating system cannot take `path` (a NUL byte in it, a name over 255 bytes, more than 4095
    bytes in all), or None: said before a tool looks at it (Path.exists() itself raises on such a path)."""
    raw = os.fsencode(str(path))
    if b"\0" in raw:
        return "holds a NUL byte"
    if len(raw) > 4095:
        return f"is {len(raw)} bytes long, longer than a path may be (4095)"
    longest = max(len(part) for part in raw.split(b"/"))
    if longest > 255:
        return f"has a name of {longest} bytes, longer than a file name may be (255)"
    return None


def check_path(path, what):
    """ConfigError naming `what` (an option, a file) when the system cannot take `path` (path_problem)."""
    problem = path_problem(path)
    if problem:
        raise ConfigError(f"{what} {printable(str(path)[:80])}{'...' if len(str(path)) > 80 else ''} {problem}; "
                          f"give {'a shorter' if 'long' in problem else 'another'} path")
    return Path(path)


def read(path):
    """The bytes of a file a tool reads; OSError unless it is a regular file (a named pipe or a device
    would block the reader forever). Every reader of run records, configs and data goes through it."""
    path = Path(path)
    if path_problem(path):
        raise OSError(f"{path} {path_problem(path)}")
    if path.exists() and not path.is_file():
        raise OSError(f"{path} is not a regular file")
    return path.read_bytes()


def load_yaml(path, _seen=(), named_by="--config"):
    """The settings of a YAML file, after those of the `base:` file it names (relative to it)."""
    path = check_path(path, f"config file ({named_by})")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise ConfigError(f"config file {path} ({named_by}) {what}; name an existing YAML file there")
    try:
        values = yaml.load(read(path).decode(), Loader=_StrictLoader) or {}
    except (yaml.YAMLError, RecursionError, ValueError) as e:  # ValueError: an int of over 4300 digits
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        said = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark and problem else str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML ({said[:160]}); fix it there") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({e}); pass a readable YAML file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    merged = {}
    if "base" in values:
        named = values.pop("base")
        if not isinstance(named, str) or not named.strip() or named.strip() in (".", "..") or named.endswith("/"):
            raise ConfigError(f"config file {path}: base: must name one YAML file (relative to {path.parent}), "
                              f"got {named!r}")
        base = check_path(path.parent / named, f"config file {path}: its base:")
        if base.resolve() in _seen or len(_seen) > 8:
            raise ConfigError(f"config file {path}: its base: chain loops back to {base}")
        merged = load_yaml(base, (*_seen, path.resolve()), f"the base: of {path}")
    for key, value in values.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown key {key!r} in {path}; valid keys: base, {', '.join(SETTINGS)}")
        values[key] = setting_value(key, value, f"in {path}")
    return {**merged, **values}


def setting_value(key, value, where):
    """A setting's value read from a file (YAML, a checkpoint) -> the value as the flag would give it (an
    int for a float setting becomes that float: `lr: 1` is --lr 1.0, one experiment, one folder name);
    ConfigError for a wrong type or choice."""
    spec = SETTINGS[key]
    ok = value is None and spec.default is None
    ok = ok or (isinstance(value, spec.type) and not (spec.type is int and isinstance(value, bool)))
    ok = ok or (spec.type is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} {where} must be of type {spec.type.__name__}, got {value!r}")
    if spec.choices and value is not None and value not in spec.choices:
        raise ConfigError(f"{key} {where} must be one of {', '.join(spec.choices)}, got {value!r}")
    return float(value) if spec.type is float and value is not None else value


def setting_in_range(key, value, where):
    """setting_value, and within the setting's range (a finite number): a value train.py could run with."""
    value = setting_value(key, value, where)
    if SETTINGS[key].bounds and value is not None and not _within(value, SETTINGS[key].bounds):
        raise ConfigError(f"{key} {where} must be in {SETTINGS[key].bounds}, got {value!r}")
    return value


# ---- parsing and validation ----------------------------------------------------------------------------

@dataclass
class Parsed:
    """What the command line asked for: the resolved config, and which settings were given."""
    config: dict           # every SETTINGS key
    resume: str = None     # None, "auto", or a path
    check: bool = False
    given: dict = None     # settings set explicitly, by --config or by flags
    flags: frozenset = frozenset()  # settings set by flags


def parse_config(argv=None):
    args = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    config_file, resume = args.pop("config", None), args.pop("resume", None)
    check = args.pop("check", False)
    from_yaml = load_yaml(config_file) if config_file else {}
    config = {**defaults(), **from_yaml, **args}
    # A setting that would do nothing is refused from a YAML file as from a flag, but for a SAM
    # config's SAM settings under --optimizer sgd: the config's own SGD baseline (validate resets them).
    given = {k for k in from_yaml if not (k in SAM_ONLY and args.get("optimizer") == "sgd")} | set(args)
    validate(config, flags=frozenset(given))
    return Parsed(config, resume, check, {**from_yaml, **args}, frozenset(given))


def _interval(text):
    low, high = (float(v) for v in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def _within(value, bounds):
    low, high, low_closed, high_closed = _interval(bounds)
    if isinstance(value, float) and math.isnan(value):
        return False
    return (value >= low if low_closed else value > low) and (value <= high if high_closed else value < high)


def validate(config, flags=frozenset()):
    """Ranges, then combinations that would silently do nothing. `flags`: the settings given (by a
    flag or a YAML file); a setting left at its default is never refused."""
    for key, spec in SETTINGS.items():
        if spec.bounds and config[key] is not None and not _within(config[key], spec.bounds):
            raise ConfigError(f"{key} must be in {spec.bounds}, got {config[key]}")
    for key, spec in SETTINGS.items():  # a number the float32 arithmetic of a run reads as 0 does nothing
        if spec.type is float and config[key] and abs(config[key]) < FLOAT32_TINY:
            raise ConfigError(f"{flag(key)} {config[key]} is below float32's smallest normal number ({FLOAT32_TINY:.3g}), "
                              f"which the run computes in: it would act as 0; use 0 to turn it off, or a larger value")
    for key, spec in SETTINGS.items():  # a text setting given as nothing (--out-dir '', wandb_tags: ' ') does nothing
        if spec.type is str and isinstance(config[key], str) and not config[key].strip():
            raise ConfigError(f"{flag(key)} is empty; give a value, or leave it out for the default")
    if config["wandb_tags"] is not None and not all(0 < len(t.strip()) <= 64 for t in config["wandb_tags"].split(",")):
        raise ConfigError(f"--wandb-tags takes comma-separated tags of 1-64 characters each, got {config['wandb_tags']!r}")
    if config["name"] is not None:
        check_name(config["name"])
    for key in ("out_dir", "data_dir", "relabel_from"):  # paths: ones the system can take
        if config[key] is not None:
            check_path(config[key], flag(key))
    if config["optimizer"] == "sgd":
        for key in SAM_ONLY:
            if key in flags:
                raise ConfigError(f"{flag(key)} applies only to SAM, not to --optimizer sgd; drop it "
                                  f"or use --optimizer sam")
            config[key] = SETTINGS[key].default if key != "rho" else 0.0  # keep the recorded config honest
    if config["sam_start_epoch"] > config["epochs"]:
        raise ConfigError(f"--sam-start-epoch {config['sam_start_epoch']} is after the last epoch "
                          f"({config['epochs']}); use 0..{config['epochs'] - 1}, or --optimizer sgd for no SAM step")
    if config["optimizer"] == "sam":  # a SAM run that takes no SAM step: its SAM settings would do nothing
        idle = ("--rho 0 makes no ascent" if config["rho"] == 0 else
                "--sam-prob 0 draws no SAM step" if config["sam_prob"] == 0 else
                f"--sam-start-epoch {config['sam_start_epoch']} (= --epochs) leaves no SAM epoch"
                if config["sam_start_epoch"] == config["epochs"] else None)
        if idle:
            raise ConfigError(f"{idle}, so every step is an SGD step; use --optimizer sgd for that run")
    if "eta" in flags and not config["adaptive"]:
        raise ConfigError("--eta applies only to ASAM; add --adaptive or drop --eta")
    if config["sam_second_order"] and (config["sam_p"] != 2 or config["adaptive"]):
        raise ConfigError("--sam-second-order supports only p = 2 without --adaptive (the paper's Appendix C.4); "
                          "drop one of them")
    if config["momentum"] == 0:
        if "nesterov" in flags and config["nesterov"]:
            raise ConfigError("--nesterov needs momentum > 0; drop --nesterov or set --momentum")
        config["nesterov"] = False
    if config["m_sharpness"] and config["batch_size"] % config["m_sharpness"]:
        raise ConfigError(m_sharpness_error(config, 1))
    if "m_sharpness_impl" in flags and config["m_sharpness"] in (0, config["batch_size"]):
        raise ConfigError("--m-sharpness-impl applies only with --m-sharpness M smaller than the batch (more than "
                          "one group); set such an M or drop the flag")
    if "workers" in flags and loader_kind(config) != "workers":
        raise ConfigError("--workers applies only to --loader workers (the device loader uses no worker processes)")
    if "padding_mode" in flags and config["augment"] == "none":
        raise ConfigError("--padding-mode applies only to cropping augmentations; --augment none does not pad")
    if "autoaugment_policy" in flags and not config["augment"].startswith("autoaugment"):
        raise ConfigError("--autoaugment-policy applies only with --augment autoaugment or autoaugment_cutout")
    if "weight_decay_in" in flags and not config["weight_decay"]:
        raise ConfigError("--weight-decay-in applies only with --weight-decay > 0; drop it or set --weight-decay")
    if "label_noise_rule" in flags and not config["label_noise"]:
        raise ConfigError("--label-noise-rule applies only with --label-noise p; add it or drop the rule")
    if 0 < config["mixup_alpha"] < 0.01:  # Beta(a, a) for tiny a: weights within 1e-6 of 0 or 1 for most batches
        raise ConfigError(f"--mixup-alpha {config['mixup_alpha']} draws mixing weights of almost exactly 0 or 1, so it "
                          f"would mix almost nothing; use 0.01 or more (Table 4's grid: 1, 8, 16, 32), or 0 for off")
    if config["loader"] == "device" and config["augment"].startswith("autoaugment") and \
            config["autoaugment_policy"] == "torchvision":
        raise ConfigError("torchvision's AutoAugment runs in DataLoader workers; use --loader workers (or auto)")
    if config["mixup_alpha"] and config["augment"].endswith("cutout"):
        raise ConfigError("--mixup-alpha with a Cutout augmentation is not supported; use --augment basic or "
                          "autoaugment with mixup")
    if "cutout_placement" in flags and not config["augment"].endswith("cutout"):
        raise ConfigError("--cutout-placement applies only with --augment cutout or autoaugment_cutout")
    if config["sharpness_every"] > config["epochs"]:
        raise ConfigError(f"--sharpness-every {config['sharpness_every']} is more than --epochs {config['epochs']}, "
                          f"so it would never measure; use 1..{config['epochs']}, or 0 for off")
    if config["subset"] and config["subset"] < config["batch_size"]:
        raise ConfigError(f"--subset {config['subset']} holds fewer images than one batch of {config['batch_size']}; "
                          f"raise --subset or lower --batch-size")
    for key, variable in (("wandb_group", "WANDB_RUN_GROUP"), ("wandb_tags", "WANDB_TAGS")):
        if os.environ.get(variable) is not None:  # W&B would apply it, and the run's records would not state it
            raise ConfigError(f"${variable} sets W&B's {key[6:]} outside the run's settings, so its records would not "
                              f"state it; unset it, and give {flag(key)} instead")
    mode = config["wandb_mode"] or os.environ.get("WANDB_MODE")  # the flag, else W&B's own variable
    if mode == "disabled":
        for key in ("wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "save_artifact"):
            if key in flags and config[key]:
                where = "--wandb-mode is disabled" if config["wandb_mode"] else "$WANDB_MODE is disabled"
                raise ConfigError(f"{flag(key)} needs W&B, but {where}; drop one of them")
    try:
        model_spec(config["model"], **model_options(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def idle_sam_prob(config, steps_per_epoch):
    """Randomized SAM whose SAM steps in this run (sam_prob x the steps from --sam-start-epoch on) are
    expected to be fewer than one: it would be an SGD run -> the error, or None."""
    if config["optimizer"] != "sam" or config["sam_prob"] >= 1:
        return None
    expected = config["sam_prob"] * steps_per_epoch * (config["epochs"] - config["sam_start_epoch"])
    if expected < 1:
        return (f"--sam-prob {config['sam_prob']} draws {expected:.2g} SAM steps on average in this run's "
                f"{steps_per_epoch * (config['epochs'] - config['sam_start_epoch'])} steps from --sam-start-epoch on, "
                f"fewer than one: every step would be an SGD step; raise it, or use --optimizer sgd")
    return None


def unused(config):
    """The settings this run does not use (validate refuses any of them given): the records (config.yaml,
    results.json, W&B) state them as null, never as a value the run did not train with."""
    kind, augment = loader_kind(config), config["augment"]
    return {key for key, idle in (
        ("eta", not config["adaptive"]), ("workers", kind != "workers"), ("padding_mode", augment == "none"),
        ("autoaugment_policy", not augment.startswith("autoaugment")),
        ("cutout_placement", not augment.endswith("cutout")), ("label_noise_rule", not config["label_noise"]),
        ("weight_decay_in", not config["weight_decay"]),
        ("m_sharpness_impl", config["m_sharpness"] in (0, config["batch_size"])),
        *((key, config["optimizer"] == "sgd") for key in SAM_ONLY if key != "rho")) if idle}  # SGD: rho 0


def recorded(config):
    """The settings as a record states them: those the run does not use are null."""
    idle = unused(config)
    return {k: None if k in idle else v for k, v in config.items()}


def check_name(name):
    """--name is one folder name inside --out-dir: not empty, no path separator, not . or .."""
    if not name.strip() or "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
        raise ConfigError(f"--name must be one folder name (no '/' or control characters, not empty, '.' or '..'), got {name!r}; "
                          f"put the parent folder in --out-dir")
    if len(name.encode()) > 200:
        raise ConfigError(f"--name is {len(name.encode())} bytes long; use at most 200")


def m_sharpness_error(config, world_size):
    m, local = config["m_sharpness"], config["batch_size"] // world_size
    divisors = ", ".join(str(d) for d in range(1, local + 1) if local % d == 0)
    return (f"m_sharpness {m} must divide the per-process batch {local} (batch {config['batch_size']} over "
            f"{world_size} process{'es' if world_size > 1 else ''}); use --m-sharpness with one of {divisors}, "
            f"or 0 for whole-batch SAM")


def loader_kind(config):
    """auto: the device loader, except for torchvision's AutoAugment (per image, in DataLoader workers)."""
    if config["loader"] != "auto":
        return config["loader"]
    torchvision_aa = config["augment"].startswith("autoaugment") and config["autoaugment_policy"] == "torchvision"
    return "workers" if torchvision_aa else "device"


def num_classes(config):
    return RELEASES[config["dataset"]][2]


def model_options(config):
    """The model's own options from the config, where they differ from the plain model."""
    options = {"dropout": config["dropout"]} if config["dropout"] else {}
    return {**options, "norm": config["norm"]} if config["norm"] != "batch" else options


def differences(config):
    """The experiment settings of `config` that differ from the defaults (the paper's headline run),
    besides those every name and table shows (NAMED): {setting: value}."""
    return {k: config[k] for k in EXPERIMENT if k not in NAMED and config[k] != SETTINGS[k].default}


def default_name(config):
    """model-dataset-augment-optimizer[-rhoR]-seedS, then +setting=value for every other experiment
    setting that differs from the defaults: two different experiments never share a folder, and the
    same command always finds its own. Past 200 bytes, the +parts become one digest of them."""
    rho = f"-rho{shown(config['rho'])}" if config["optimizer"] == "sam" else ""
    name = f"{config['model']}-{config['dataset']}-{config['augment']}-{config['optimizer']}{rho}-seed{config['seed']}"
    extra = "".join(f"+{k}={quote(shown(v), safe='')}" for k, v in differences(config).items())  # '/' -> %2F
    if len((name + extra).encode()) > 200:
        extra = "+" + hashlib.sha256(extra.encode()).hexdigest()[:12]
    return name + extra


def main(argv):
    """python -m engine.config --markdown: docs/settings.md; python -m engine.config SETTING [flags]: a
    setting's resolved value (for the sweep scripts)."""
    if argv == ["--markdown"]:
        sys.stdout.write(settings_markdown())
        return 0
    try:
        if not argv or argv[0] not in SETTINGS:
            raise ConfigError(f"name a setting first (one of {', '.join(SETTINGS)}), then train.py's flags")
        print(parse_config(argv[1:]).config[argv[0]])
    except ConfigError as e:
        return refuse(e)
    return 0


if __name__ == "__main__":
    from engine.stopping import entry
    sys.exit(entry(main, sys.argv[1:]))
