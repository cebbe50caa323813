import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.cifar import write_synthetic_cifar10

REPO = Path(__file__).resolve().parents[1]
SHARED_PACK = REPO.parent / "shared" / "data" / "build_cifar10.py"


def write_cifar10(root, per_batch=20, seed=0):
    """Small CIFAR-10 batches in the official python layout (protocol-2 pickles)."""
    return write_synthetic_cifar10(root, per_batch, seed)


def without_wandb_service(env):
    """wandb.init exports WANDB_SERVICE, and a train.py started from a process that has it shares
    that process's W&B service, which keeps holding the run id of a child killed with SIGKILL (the
    resumed child then fails: "run ID ... is in use"). Children get their own service, as from a shell."""
    return {k: v for k, v in env.items() if k != "WANDB_SERVICE"}


@pytest.fixture(autouse=True)
def own_wandb_service_per_test():
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture
def synthetic_cifar(tmp_path):
    return write_cifar10(tmp_path / "data")


@pytest.fixture(scope="session")
def cifar_pack(tmp_path_factory):
    """The real CIFAR-10 pack, built once per session ($SAM_TEST_CIFAR_DIR if already built)."""
    prebuilt = os.environ.get("SAM_TEST_CIFAR_DIR")
    if prebuilt and (Path(prebuilt) / "cifar-10-batches-py").is_dir():
        return Path(prebuilt)
    if not SHARED_PACK.is_file():
        pytest.skip(f"CIFAR-10 pack not found at {SHARED_PACK}")
    out = tmp_path_factory.mktemp("cifar_pack")
    subprocess.run([sys.executable, str(SHARED_PACK), str(out)], check=True, capture_output=True)
    return out
