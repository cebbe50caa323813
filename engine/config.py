"""Configuration flows one way: defaults here -> a YAML file (--config) -> command-line flags.
Every setting is declared once below, with its type, default and help text; the YAML keys
are the flag names with '_' for '-'."""

import argparse
import sys
from pathlib import Path

import yaml

from data.augment import AUGMENTATIONS, PADDING_MODES
from data.cifar import RELEASES
from data.loaders import LOADERS
from models import model_spec

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "wrn28-10_sam.yaml"


class ConfigError(Exception):
    """Bad user input; the message is one line naming the problem and the fix."""


def _flag(type_, default, help_, choices=None):
    return dict(type=type_, default=default, help=help_, choices=choices)


# name: (type, default, help, choices). bool settings become --x / --no-x flags.
SETTINGS = {
    "model": _flag(str, "wrn28_10", "wrn28_10, wrn16_8, resnet18 or wrn<depth>_<width>"),
    "dropout": _flag(float, 0.0, "dropout inside WideResNet blocks"),
    "dataset": _flag(str, "cifar10", "dataset", tuple(RELEASES)),
    "augment": _flag(str, "basic", "augmentation, named as in the paper's Table 1", AUGMENTATIONS),
    "padding_mode": _flag(str, "reflect", "padding before the random crop (the official code reflects)",
                          PADDING_MODES),
    "epochs": _flag(int, 200, "training epochs"),
    "batch_size": _flag(int, 256, "global batch size (split across GPUs under torchrun)"),
    "eval_batch_size": _flag(int, 1000, "batch size for evaluation"),
    "lr": _flag(float, 0.1, "peak learning rate of the per-step cosine schedule"),
    "momentum": _flag(float, 0.9, "SGD momentum"),
    "nesterov": _flag(bool, True, "Nesterov momentum"),
    "weight_decay": _flag(float, 5e-4, "SGD weight decay (L2)"),
    "optimizer": _flag(str, "sam", "sam, or sgd for the paper's baseline", ("sam", "sgd")),
    "rho": _flag(float, 0.05, "SAM neighbourhood size"),
    "adaptive": _flag(bool, False, "ASAM: scale the ascent by |w| (use rho around 2.0)"),
    "eta": _flag(float, 0.0, "ASAM's eta in T_w = |w| + eta"),
    "label_smoothing": _flag(float, 0.0, "label smoothing of the cross-entropy loss"),
    "seed": _flag(int, 0, "seed for initialisation, data order and augmentation"),
    "data_dir": _flag(str, None, "folder holding cifar-10-batches-py/ or cifar-100-python/ "
                                 "(default: $SAM_DATA_DIR, else ~/.cache/sam-cifar)"),
    "download": _flag(bool, False, "download the dataset with torchvision if it is missing"),
    "subset": _flag(int, 0, "use only the first N training and test images (0: all)"),
    "val_split": _flag(float, 0.0, "fraction of training images held out as validation (fixed seed)"),
    "label_noise": _flag(float, 0.0, "fraction of training labels replaced by another class"),
    "out_dir": _flag(str, "runs", "folder that holds run folders"),
    "name": _flag(str, None, "run folder name (default: built from model, dataset, optimizer, rho, seed)"),
    "device": _flag(str, "auto", "auto (cuda if available), cuda, cuda:N or cpu"),
    "precision": _flag(str, "auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32",
                       ("auto", "bf16", "fp16", "fp32")),
    "channels_last": _flag(bool, None, "channels_last memory format (default: on for CUDA)"),
    "compile": _flag(str, "off", "torch.compile mode; off is plain eager",
                     ("off", "default", "reduce-overhead", "max-autotune")),
    "loader": _flag(str, "auto", "device: data set on the device with batched augmentation; workers: "
                                 "torchvision DataLoader; auto: device unless autoaugment", LOADERS),
    "workers": _flag(int, 4, "DataLoader workers (workers loader only)"),
    "log_every": _flag(int, 50, "steps between step logs (the only host syncs in the loop)"),
    "wandb_mode": _flag(str, None, "online, offline or disabled (default: $WANDB_MODE, else online "
                                   "with credentials, offline without)", ("online", "offline", "disabled")),
    "wandb_project": _flag(str, "sam-cifar", "W&B project"),
    "wandb_entity": _flag(str, None, "W&B entity (team or user)"),
    "wandb_group": _flag(str, None, "W&B group, e.g. one per sweep"),
    "wandb_tags": _flag(str, None, "comma-separated W&B tags"),
    "save_artifact": _flag(bool, False, "upload the final checkpoint to W&B as an artifact"),
}
RUN_ONLY = ("config", "resume")  # command-line only, not part of an experiment's config

POSITIVE = ("epochs", "batch_size", "eval_batch_size", "lr", "log_every")
NON_NEGATIVE = ("rho", "eta", "weight_decay", "momentum", "label_smoothing", "subset", "workers", "dropout")
FRACTIONS = ("val_split", "label_noise", "label_smoothing", "dropout")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        print(f"error: {message} (see python train.py --help)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = _Parser(description="Reproduce SAM (Foret et al., ICLR 2021) on CIFAR. Settings come from "
                            "--config (default configs/wrn28-10_sam.yaml); flags override it.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file of settings (default: configs/wrn28-10_sam.yaml, the paper's headline run)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run: alone, from <out-dir>/<name>/last.pt; or from the given "
                        "checkpoint or run folder")
    for name, spec in SETTINGS.items():
        flags = ["--" + name.replace("_", "-")] + (["--batch_size"] if name == "batch_size" else [])
        kind = spec["type"]
        if kind is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=spec["default"],
                           help=spec["help"])
        else:
            p.add_argument(*flags, dest=name, type=kind, default=spec["default"], choices=spec["choices"],
                           help=spec["help"])
    return p


def load_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    for key, value in values.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown key {key!r} in {path}; valid keys: {', '.join(SETTINGS)}")
        _check_type(key, value, f"in {path}")
    return values


def _check_type(key, value, where):
    spec = SETTINGS[key]
    kind = spec["type"]
    ok = value is None and spec["default"] is None
    ok = ok or (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} {where} must be of type {kind.__name__}, got {value!r}")
    if spec["choices"] and value not in spec["choices"]:
        raise ConfigError(f"{key} {where} must be one of {', '.join(spec['choices'])}, got {value!r}")


def parse_config(argv=None):
    """-> (config dict with every SETTINGS key, run options {config, resume})."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    first.config = first.config or str(DEFAULT_CONFIG)
    parser.set_defaults(**load_yaml(first.config))
    args = vars(parser.parse_args(argv))
    args["config"] = first.config
    config = {key: args[key] for key in SETTINGS}
    if config["optimizer"] == "sgd":
        config["rho"] = 0.0  # plain SGD has no rho; keep the recorded config honest
    validate(config)
    return config, {key: args[key] for key in RUN_ONLY}


def validate(config):
    for key in POSITIVE:
        if not config[key] > 0:
            raise ConfigError(f"{key} must be > 0, got {config[key]}")
    for key in NON_NEGATIVE:
        if config[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {config[key]}")
    for key in FRACTIONS:
        if not 0 <= config[key] < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {config[key]}")
    try:
        model_spec(config["model"], **model_options(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_options(config):
    """The model's own options from the config: dropout where it is set."""
    return {"dropout": config["dropout"]} if config["dropout"] else {}


def default_name(config):
    parts = [config["model"], config["dataset"], config["augment"], config["optimizer"]]
    if config["optimizer"] == "sam":
        parts.append(f"rho{config['rho']:g}" + ("-asam" if config["adaptive"] else ""))
    return "-".join(parts + [f"seed{config['seed']}"])
