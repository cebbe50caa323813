"""Every setting of a run is declared once, in SETTINGS: type, default, allowed values, help,
and where the default comes from. Values flow one way:

    SETTINGS defaults -> YAML file (--config; it may extend a `base:` file) -> flags -> validate()

A YAML file holds only what differs from these defaults, each value with its source. YAML keys
are the flag names with '_' for '-'."""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from data.augment import AUGMENTATIONS, AUTOAUGMENT_POLICIES, CUTOUT_PLACEMENTS, PADDING_MODES
from data.cifar import RELEASES
from data.loaders import LOADERS
from data.splits import NOISE_RULES
from engine.groups import IMPLEMENTATIONS as GROUP_IMPLEMENTATIONS
from models import model_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "wrn28-10_sam.yaml"
PAPER = "Foret et al. 2021"
OFFICIAL = "google-research/sam"


class ConfigError(Exception):
    """Bad user input; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Setting:
    type: type
    default: object
    help: str
    source: str = ""          # where the default comes from: the paper's section or the official code
    choices: tuple = None
    bounds: str = None        # allowed interval, e.g. "[0, 1)"; floats must also be finite
    experiment: bool = True   # False: changes how a run is carried out, not what it computes


S = Setting
SETTINGS = {
    # what is trained
    "model": S(str, "sam_wrn28_10", "sam_wrn<d>_<k> (the SAM authors' WideResNet), wrn<d>_<k> (Zagoruyko & "
                                    "Komodakis', as in davda54/sam), resnet18, resnet32 or resnet32_jiang (Table 4)", f"{PAPER} Table 1 (WRN-28-10); "
                                    f"{OFFICIAL} sam_jax/models/wide_resnet.py"),
    "dropout": S(float, 0.0, "dropout inside wrn<d>_<k> blocks", f"{OFFICIAL} wide_resnet.py has none",
                 bounds="[0, 1)"),
    "norm": S(str, "batch", "normalisation in WideResNets: batch, or none (the paper's Hessian spectra, "
                            "Section 4.2, used a WideResNet without BatchNorm)", choices=("batch", "none")),
    "dataset": S(str, "cifar10", "dataset", choices=tuple(RELEASES)),
    "augment": S(str, "basic", "augmentation, named as in the paper's Table 1 (autoaugment_cutout: both)",
                 f"{PAPER} Table 1", choices=AUGMENTATIONS),
    "autoaugment_policy": S(str, "official", "official: the SAM code's CIFAR policy, magnitudes and grey fill, "
                            "before flip and crop, on the device; torchvision: its CIFAR10 policy after crop and "
                            "flip, in DataLoader workers", f"{OFFICIAL} autoaugment/policies.py policy_cifar, "
                            "autoaugment.py", choices=AUTOAUGMENT_POLICIES),
    "cutout_placement": S(str, "batch", "one Cutout window per batch, or per image (DeVries & Taylor's code)",
                          f"{OFFICIAL} sam_jax/datasets/augmentation.py cutout (one centre per batch)",
                          choices=CUTOUT_PLACEMENTS),
    "padding_mode": S(str, "reflect", "padding before the random crop", f"{OFFICIAL} augmentation.py "
                      "weak_image_augmentation (REFLECT)", choices=PADDING_MODES),
    # how it is optimised
    "epochs": S(int, 200, "training epochs", f"{PAPER} Table 1 (200 epochs)", bounds="[1, 100000]"),
    "batch_size": S(int, 256, "global batch size (split across processes under torchrun)",
                    f"{PAPER} Appendix C.1", bounds="[1, 1000000]"),
    "lr": S(float, 0.1, "peak learning rate of the per-step cosine schedule (no warmup)", f"{PAPER} Appendix C.1; "
            f"schedule: {OFFICIAL} flax_training.py get_cosine_schedule", bounds="(0, 10]"),
    "momentum": S(float, 0.9, "SGD momentum", f"{PAPER} Appendix C.1", bounds="[0, 1)"),
    "nesterov": S(bool, True, "Nesterov momentum (needs momentum > 0)", f"{OFFICIAL} flax_training.py "
                  "create_optimizer (nesterov=True)"),
    "weight_decay": S(float, 5e-4, "L2 weight decay, on every parameter (BatchNorm and biases too, as the official "
                      "code)", f"{PAPER} Appendix C.1", bounds="[0, 0.1]"),
    "weight_decay_in": S(str, "loss", "loss: (wd/2)||w||^2 is part of the loss, so SAM's ascent gradient includes "
                         "wd*w (official); optimizer: SGD applies it, outside the ascent (davda54/sam)",
                         f"{OFFICIAL} flax_training.py train_step (weight_penalty added to the loss)",
                         choices=("loss", "optimizer")),
    "grad_clip": S(float, 5.0, "clip the global norm of the descent gradient (after averaging over processes, "
                   "before the base step; with --weight-decay-in optimizer SGD adds its decay after); 0: off", f"{OFFICIAL} flax_training.py flag gradient_clipping and "
                   "clip_by_global_norm", bounds="[0, 1000]"),
    "optimizer": S(str, "sam", "sam, or sgd for the paper's baseline", choices=("sam", "sgd")),
    "rho": S(float, 0.05, "SAM neighbourhood size (SAM only; ASAM's authors use 0.5 on CIFAR-10, 1.0 on CIFAR-100)",
             f"{PAPER} Appendix C.1 (CIFAR-10)", bounds="[0, 10]"),
    "adaptive": S(bool, False, "ASAM (Kwon et al. 2021): scale the ascent by |w| (SAM only); see "
                               "configs/wrn28-10_asam.yaml"),
    "eta": S(float, 0.01, "ASAM's eta in T_w = |w| + eta (--adaptive only)", "Kwon et al. 2021; SamsungLabs/ASAM "
             "asam.py ASAM(eta=0.01)", bounds="[0, 1]"),
    "sam_p": S(float, 2.0, "ascent over a p-norm ball, 1 < p <= inf (inf: e = rho sign(g)) (SAM only)",
               f"{PAPER} Appendix C.5 (p = 2 in every main result)", bounds="(1, inf]"),
    "sam_second_order": S(bool, False, "keep SAM's second-order term (one Hessian-vector product a step; SAM "
                                       "only, p = 2, not ASAM)", f"{PAPER} Appendix C.4 (dropped in every main "
                                       "result)"),
    "m_sharpness": S(int, 0, "m-sharpness: images per ascent group and per BatchNorm group within each process's "
                     "batch; 0: the whole per-process batch", f"{PAPER} Section 4.1; the paper's CIFAR runs had "
                     "m = 32 (batch 256 over 8 accelerators)", bounds="[0, 1000000]"),
    "m_sharpness_impl": S(str, "vmap", "how the groups run: vmap (batched by torch.func) or loop (one after "
                          "another, the reference); same result", choices=GROUP_IMPLEMENTATIONS, experiment=False),
    "label_smoothing": S(float, 0.0, "label smoothing of the cross-entropy loss",
                         f"{OFFICIAL} flax_training.py flag label_smoothing", bounds="[0, 1)"),
    "seed": S(int, 0, "seed for initialisation, data order and augmentation", bounds="[0, 4294967295]"),
    # data
    "data_dir": S(str, None, "folder holding cifar-10-batches-py/ or cifar-100-python/ "
                             "(default: $SAM_DATA_DIR, else ~/.cache/sam-cifar)", experiment=False),
    "download": S(bool, False, "download the dataset with torchvision if it is missing", experiment=False),
    "subset": S(int, 0, "use only the first N training and test images (0: all)", bounds="[0, inf)"),
    "val_split": S(float, 0.0, "fraction of training images held out as validation (fixed images)",
                   bounds="[0, 1)"),
    "label_noise": S(float, 0.0, "p: training labels redrawn with probability p (see --label-noise-rule)",
                     f"{PAPER} Section 3.3, Table 4 (20/40/60/80%)", bounds="[0, 1]"),
    "label_noise_rule": S(str, "uniform", "uniform: a label is redrawn over all classes with probability p (it "
                          "may keep its class; p(K-1)/K end up wrong); other: exactly p of the labels move to another "
                          "class", "Jiang et al. 2019 (via MentorNet 2018 and Zhang et al. 2017), which Table 4 "
                          "follows", choices=NOISE_RULES),
    "mixup_alpha": S(float, 0.0, "mixup (Zhang et al. 2017): one Beta(alpha, alpha) weight per batch, each image "
                     "mixed with the batch reversed; 0: off", f"{OFFICIAL} sam_jax/datasets/augmentation.py mixup; "
                     "Table 4 tries alpha in {1, 8, 16, 32}", bounds="[0, 100]"),
    "relabel_from": S(str, None, "bootstrap: train on the labels that a finished run's model (its folder or "
                                 "last.pt) predicts for the unaugmented training images", f"{PAPER} Table 4 "
                                 "(Bootstrap rows), after Jiang et al. 2019"),
    # where and how it runs: none of these changes what a run computes
    "out_dir": S(str, "runs", "folder that holds run folders", experiment=False),
    "name": S(str, None, "run folder name (default: built from model, dataset, optimizer, rho, seed)",
              experiment=False),
    "device": S(str, "auto", "auto (cuda if available), cuda, cuda:N or cpu", experiment=False),
    "precision": S(str, "auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32",
                   choices=("auto", "bf16", "fp16", "fp32")),
    "channels_last": S(bool, None, "channels_last memory format (default: on for CUDA)", experiment=False),
    "compile": S(str, "off", "torch.compile mode; off is plain eager",
                 choices=("off", "default", "reduce-overhead", "max-autotune"), experiment=False),
    "loader": S(str, "auto", "device: data set on the device with batched augmentation; workers: "
                             "torchvision DataLoader; auto: device unless torchvision's AutoAugment", choices=LOADERS),
    "workers": S(int, 4, "DataLoader workers (--loader workers only)", bounds="[0, 256]", experiment=False),
    "eval_batch_size": S(int, 1000, "batch size for evaluation", bounds="[1, 1000000]", experiment=False),
    "log_every": S(int, 50, "steps between step logs (the only host syncs in the loop)", bounds="[1, inf)",
                   experiment=False),
    "sharpness_every": S(int, 0, "every N epochs, log lambda_max of the Hessian (20 power iterations on one fixed "
                         "batch of training images, BatchNorm in eval mode); 0: off", f"{PAPER} Section 4.2",
                         bounds="[0, 100000]", experiment=False),
    "wandb_mode": S(str, None, "online, offline or disabled (default: $WANDB_MODE, else online with "
                               "credentials, offline without)", choices=("online", "offline", "disabled"),
                    experiment=False),
    "wandb_project": S(str, "sam-cifar", "W&B project", experiment=False),
    "wandb_entity": S(str, None, "W&B entity (team or user)", experiment=False),
    "wandb_group": S(str, None, "W&B group, e.g. one per sweep", experiment=False),
    "wandb_tags": S(str, None, "comma-separated W&B tags", experiment=False),
    "save_artifact": S(bool, False, "upload the final checkpoint to W&B as an artifact", experiment=False),
}
del S
EXPERIMENT = tuple(k for k, s in SETTINGS.items() if s.experiment)
SAM_ONLY = ("rho", "adaptive", "eta", "sam_p", "sam_second_order")  # the ascent's settings: not for SGD


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of usage + message
        print(f"error: {message} (see python train.py --help)", file=sys.stderr)
        sys.exit(2)


def _help(spec):
    parts = [spec.help]
    if spec.bounds:
        parts.append(f"in {spec.bounds}")
    parts.append(f"(default: {spec.default}{'; ' + spec.source if spec.source else ''})")
    return " ".join(parts).replace("%", "%%")  # argparse formats help with %


def build_parser():
    p = _Parser(description="Reproduce SAM (Foret et al., ICLR 2021) on CIFAR. Settings: the defaults below, "
                            "then --config (default configs/wrn28-10_sam.yaml, the paper's headline run), "
                            "then flags. Defaults name their source.")
    # Every default is SUPPRESS: the parsed namespace then holds exactly what was given.
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="YAML file of settings (default: configs/wrn28-10_sam.yaml, the paper's headline run)")
    p.add_argument("--resume", nargs="?", const="auto", default=argparse.SUPPRESS,
                   help="continue a run: alone, the run folder that --out-dir/--name (or the config) names; "
                        "or the given checkpoint or run folder. The run keeps its own settings.")
    p.add_argument("--allow-changes", action="store_true", default=argparse.SUPPRESS,
                   help="with --resume: accept settings that change the experiment; the change is recorded "
                        "in config.yaml and W&B")
    for name, spec in SETTINGS.items():
        flags = ["--" + name.replace("_", "-")] + (["--batch_size"] if name == "batch_size" else [])
        if spec.type is bool:
            p.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=_help(spec))
        else:
            p.add_argument(*flags, dest=name, type=spec.type, default=argparse.SUPPRESS, choices=spec.choices,
                           metavar=name.upper() if not spec.choices else None, help=_help(spec))
    return p


def load_yaml(path, _seen=()):
    """The settings of a YAML file, after those of the `base:` file it names (relative to it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({e}); pass a readable YAML file") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    merged = {}
    if "base" in values:
        base = path.parent / str(values.pop("base"))
        if base.resolve() in _seen or len(_seen) > 8:
            raise ConfigError(f"config file {path}: its base: chain loops back to {base}")
        merged = load_yaml(base, (*_seen, path.resolve()))
    for key, value in values.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown key {key!r} in {path}; valid keys: base, {', '.join(SETTINGS)}")
        _check_type(key, value, f"in {path}")
    return {**merged, **values}


def _check_type(key, value, where):
    spec = SETTINGS[key]
    ok = value is None and spec.default is None
    ok = ok or (isinstance(value, spec.type) and not (spec.type is int and isinstance(value, bool)))
    ok = ok or (spec.type is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} {where} must be of type {spec.type.__name__}, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{key} {where} must be one of {', '.join(spec.choices)}, got {value!r}")


@dataclass
class Parsed:
    """What the command line asked for: the resolved config, and which settings were given."""
    config: dict           # every SETTINGS key
    config_file: str       # the YAML file read (the default one when --config is absent)
    resume: str = None     # None, "auto", or a path
    allow_changes: bool = False
    given: dict = None     # settings set explicitly, by --config or by flags
    flags: frozenset = frozenset()  # settings set by flags


def defaults():
    """Every setting at its default: the base under YAML and flags, and what completes the saved
    settings of a run older than a setting."""
    return {key: spec.default for key, spec in SETTINGS.items()}


def parse_config(argv=None):
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    resume, allow_changes = args.pop("resume", None), args.pop("allow_changes", False)
    from_yaml = load_yaml(config_file or DEFAULT_CONFIG)
    config = {**defaults(), **from_yaml, **args}
    # On resume, only what the user wrote counts as a request to change the run.
    given = {**(from_yaml if config_file or not resume else {}), **args}
    validate(config, flags=frozenset(args))
    if allow_changes and not resume:
        raise ConfigError("--allow-changes only applies to --resume; drop it")
    return Parsed(config, str(config_file or DEFAULT_CONFIG), resume, allow_changes, given, frozenset(args))


def _interval(text):
    low, high = (float(v) for v in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def _within(value, bounds):
    low, high, low_closed, high_closed = _interval(bounds)
    if isinstance(value, float) and math.isnan(value):
        return False
    return (value >= low if low_closed else value > low) and (value <= high if high_closed else value < high)


def validate(config, flags=frozenset()):
    """Ranges, then combinations that would silently do nothing. `flags`: settings given as flags
    (a value from a YAML file that does not apply is recorded, not refused: a SAM config may
    serve its SGD baseline)."""
    for key, spec in SETTINGS.items():
        if spec.bounds and config[key] is not None and not _within(config[key], spec.bounds):
            raise ConfigError(f"{key} must be in {spec.bounds}, got {config[key]}")
    if config["optimizer"] == "sgd":
        for key in SAM_ONLY:
            if key in flags:
                raise ConfigError(f"--{key.replace('_', '-')} applies only to SAM, not to --optimizer sgd; drop it "
                                  f"or use --optimizer sam")
            config[key] = SETTINGS[key].default if key != "rho" else 0.0  # keep the recorded config honest
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
    if "m_sharpness_impl" in flags and not config["m_sharpness"]:
        raise ConfigError("--m-sharpness-impl applies only with --m-sharpness M; add it or drop the flag")
    if "workers" in flags and loader_kind(config) != "workers":
        raise ConfigError("--workers applies only to --loader workers (the device loader uses no worker processes)")
    if "padding_mode" in flags and config["augment"] == "none":
        raise ConfigError("--padding-mode applies only to cropping augmentations; --augment none does not pad")
    if "autoaugment_policy" in flags and not config["augment"].startswith("autoaugment"):
        raise ConfigError("--autoaugment-policy applies only with --augment autoaugment or autoaugment_cutout")
    if "label_noise_rule" in flags and not config["label_noise"]:
        raise ConfigError("--label-noise-rule applies only with --label-noise p; add it or drop the rule")
    if config["mixup_alpha"] and config["augment"].endswith("cutout"):
        raise ConfigError("--mixup-alpha with a Cutout augmentation is not supported; use --augment basic or "
                          "autoaugment with mixup")
    if "cutout_placement" in flags and not config["augment"].endswith("cutout"):
        raise ConfigError("--cutout-placement applies only with --augment cutout or autoaugment_cutout")
    if config["wandb_mode"] == "disabled":
        for key in ("wandb_project", "wandb_entity", "wandb_group", "wandb_tags", "save_artifact"):
            if key in flags and config[key]:
                raise ConfigError(f"--{key.replace('_', '-')} needs W&B, but --wandb-mode is disabled; "
                                  f"drop one of them")
    try:
        model_spec(config["model"], **model_options(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def model_options(config):
    """The model's own options from the config, where they differ from the plain model."""
    options = {"dropout": config["dropout"]} if config["dropout"] else {}
    return {**options, "norm": config["norm"]} if config["norm"] != "batch" else options


def default_name(config):
    parts = [config["model"], config["dataset"], config["augment"], config["optimizer"]]
    if config["optimizer"] == "sam":
        parts.append(f"rho{config['rho']:g}" + ("-asam" if config["adaptive"] else ""))
        if config["sam_p"] != 2:
            parts.append(f"p{config['sam_p']:g}")
        if config["sam_second_order"]:
            parts.append("second-order")
    if config["m_sharpness"]:
        parts.append(f"m{config['m_sharpness']}")
    return "-".join(parts + [f"seed{config['seed']}"])


if __name__ == "__main__":  # for the sweep scripts: python -m engine.config SETTING [train.py flags]
    try:
        print(parse_config(sys.argv[2:]).config[sys.argv[1]])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
