"""Bootstrapping (Foret et al. Section 3.3, Table 4, after Jiang et al. 2019): train again, from
scratch, on the labels that a finished model predicts for the unaugmented training images."""

import numpy as np
import torch

from data.augment import Normaliser
from engine import checkpoint
from engine.config import ConfigError


def label_predictor(path, config, runtime, batch_size=1000):
    """A function (uint8 images, their labels, mean, std) -> the labels the model of checkpoint or
    run folder `path` predicts, and a record of the source that the function completes with the
    share of labels it changed. ConfigError when the source cannot serve this run."""
    try:
        model, state, path, source = checkpoint.load_model(path, runtime.device)
    except ValueError as e:
        raise ConfigError(f"--relabel-from: {e}; pass a finished run's folder or its last.pt") from None
    if source["dataset"] != config["dataset"]:
        raise ConfigError(f"--relabel-from {path}: that model was trained on {source['dataset']}, this run is "
                          f"on {config['dataset']}; pass a run on the same data set")
    model.eval()
    record = {"from": str(path), "source_model": source["model"], "source_epoch": state["epoch"],
              "source_seed": source.get("seed")}

    @torch.no_grad()
    def predict(images, given, mean, std):
        normalise = Normaliser(mean, std, runtime.device, channels_last=False)
        labels = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).to(runtime.device)
            with runtime.autocast():
                logits = model(normalise(x))
            labels.append(logits.argmax(1).cpu())
        labels = torch.cat(labels).numpy().astype(np.int64)
        record["changed_labels"] = float((labels != given).mean())
        return labels

    return predict, record
