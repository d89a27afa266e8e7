"""Loads the compiled op library and checks it was built for the torch that is running."""

import json
import os

import torch

BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


class BuildMismatchError(ImportError):
    pass


def read_build_info(path: str = BUILD_INFO_PATH) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ImportError(
            f"psa: the compiled extension is missing ({path} does not exist): this psa package at "
            f"{os.path.dirname(path)} was never built. From a source checkout, build it in place with "
            "`pip install --no-build-isolation -e .`; if psa is installed from a wheel, run Python from "
            "outside the checkout so that the installed package is imported.") from None


def check_build_info(info: dict, torch_version: str = torch.__version__,
                     cuda_version=torch.version.cuda) -> None:
    """Raises BuildMismatchError naming both versions when psa._C was built for another torch."""
    if info.get("torch") != torch_version:
        raise BuildMismatchError(
            f"psa._C was built for torch {info.get('torch')} but torch {torch_version} is running; rebuild psa "
            "with `pip install --no-build-isolation -e .`")
    if info.get("cuda") and info.get("cuda") != cuda_version:
        raise BuildMismatchError(
            f"psa._C was built for CUDA {info.get('cuda')} but torch runs CUDA {cuda_version}; rebuild psa "
            "with `pip install --no-build-isolation -e .`")


def load_library() -> dict:
    info = read_build_info()
    check_build_info(info)
    try:
        from . import _C  # noqa: F401  (registers torch.ops.psa)
    except ImportError as error:
        raise ImportError(f"psa: could not load psa._C (built for torch {info.get('torch')}, CUDA "
                          f"{info.get('cuda')}; running torch {torch.__version__}): {error}") from error
    return info
