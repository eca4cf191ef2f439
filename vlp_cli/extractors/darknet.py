"""A pure-PyTorch reader for Darknet ``.cfg``/``.weights`` files (YOLOv3 and YOLOv3-tiny).

The Darknet format is two files: a ``.cfg`` text file made of ``[section]`` blocks of
``key=value`` lines, one block per layer, and a ``.weights`` binary file holding a small header
followed by every convolution's parameters as raw little-endian float32, in cfg order.

This module supports the subset of layers that YOLOv3-style detectors use:

* ``[net]`` / ``[network]``: input width, height and channels.
* ``[convolutional]``: ``batch_normalize``, ``filters``, ``size``, ``stride``, ``pad`` /
  ``padding``, ``groups``, ``dilation``, ``activation`` (``leaky``, ``linear``, ``mish``,
  ``logistic``, ``relu``, ``swish``).
* ``[maxpool]``: ``size``, ``stride``, ``padding``, with Darknet's asymmetric padding.
* ``[upsample]``: ``stride`` (nearest neighbour), ``scale``.
* ``[route]``: ``layers`` (relative or absolute), ``groups``, ``group_id``.
* ``[shortcut]``: ``from``, ``activation``.
* ``[yolo]``: ``mask``, ``anchors``, ``classes``, ``num``, ``scale_x_y``.

Anything else raises :class:`DarknetError` naming the cfg file, line and section, so an
unsupported network fails loudly instead of running with a silently wrong graph.

Inference only: batch normalisation is folded into the convolution when the weights are loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp_cli import VlpError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Darknet (pjreddie, the version the official YOLOv3 weights were released with) normalises with
# (x - mean) / (sqrt(var) + 1e-6): the epsilon is added to the standard deviation, not to the
# variance as in PyTorch's BatchNorm. Folding with the same formula keeps us bit-close to Darknet.
DARKNET_BN_EPS = 1e-6
LEAKY_SLOPE = 0.1


class DarknetError(VlpError, ValueError):
    """A malformed or unsupported Darknet cfg, or a weights file that does not match its cfg."""


# --------------------------------------------------------------------------------------------
# cfg parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CfgSection:
    """One ``[type]`` block of a Darknet cfg file.

    Attributes:
        type: Section name, lower-cased, without brackets (``"convolutional"``).
        options: The block's ``key=value`` pairs, keys lower-cased, values stripped strings.
        line: 1-based line number of the ``[type]`` header, for error messages.
        source: The cfg file's path (or ``"<string>"``), for error messages.
    """

    type: str
    options: dict[str, str]
    line: int
    source: str

    def where(self) -> str:
        """Return ``"file:line [type]"`` for error messages."""
        return f"{self.source}:{self.line} [{self.type}]"

    def _get(self, key: str, default: object, cast: Callable[[str], object]) -> object:
        if key not in self.options:
            return default
        raw = self.options[key]
        try:
            return cast(raw)
        except ValueError:
            raise DarknetError(f"{self.where()}: bad value {key}={raw!r}") from None

    def get_int(self, key: str, default: int) -> int:
        """Return option ``key`` as an int (Darknet's ``atoi``), or ``default`` if absent."""
        # Darknet parses ints with atoi, so "1.0" is never written for ints; accept only ints.
        return int(self._get(key, default, int))  # type: ignore[arg-type]

    def get_float(self, key: str, default: float) -> float:
        """Return option ``key`` as a float, or ``default`` if absent."""
        return float(self._get(key, default, float))  # type: ignore[arg-type]

    def get_str(self, key: str, default: str) -> str:
        """Return option ``key`` as a string, or ``default`` if absent."""
        return self.options.get(key, default)

    def get_ints(self, key: str, default: Sequence[int] | None = None) -> list[int]:
        """Return a comma-separated option as a list of ints.

        Raises:
            DarknetError: If the option is absent and there is no default, or is not ints.
        """
        if key not in self.options:
            if default is None:
                raise DarknetError(f"{self.where()}: missing required option {key}=")
            return list(default)
        raw = self.options[key]
        try:
            return [int(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise DarknetError(f"{self.where()}: bad value {key}={raw!r}") from None

    def get_floats(self, key: str) -> list[float]:
        """Return a comma-separated option as a list of floats (empty if absent)."""
        raw = self.options.get(key, "")
        try:
            return [float(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise DarknetError(f"{self.where()}: bad value {key}={raw!r}") from None


def parse_cfg_text(text: str, source: str = "<string>") -> list[CfgSection]:
    """Parse the text of a Darknet cfg file into its sections.

    Comments start with ``#`` or ``;`` at the beginning of a line (after whitespace); blank lines
    are ignored; spaces around keys and values are ignored (``saturation = 1.5`` is valid).

    Args:
        text: The cfg file's contents.
        source: Name used in error messages, normally the file's path.

    Returns:
        The sections in file order; the first is normally ``[net]``.

    Raises:
        DarknetError: On a ``key=value`` line before any section, or a line that is neither.
    """
    sections: list[CfgSection] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise DarknetError(f"{source}:{lineno}: malformed section header {line!r}")
            sections.append(CfgSection(line[1:-1].strip().lower(), {}, lineno, source))
            continue
        if "=" not in line:
            raise DarknetError(f"{source}:{lineno}: expected key=value, got {line!r}")
        if not sections:
            raise DarknetError(f"{source}:{lineno}: option {line!r} before any [section]")
        key, value = line.split("=", 1)
        sections[-1].options[key.strip().lower()] = value.strip()
    return sections


def parse_cfg(path: PathLike) -> list[CfgSection]:
    """Read and parse a Darknet cfg file. See :func:`parse_cfg_text`."""
    path = Path(path)
    return parse_cfg_text(path.read_text(encoding="utf-8"), source=str(path))


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


def _activation(name: str, section: CfgSection) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation `name`; it works in place on its (always freshly computed) input when
    autograd is off: a new output buffer per layer costs YOLOv3-tiny about a fifth of its CPU
    time at 416x416 (the buffers are large, freshly mapped and page-faulted)."""
    if name == "linear":
        return lambda x: x
    fns: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
        "leaky": (lambda x: F.leaky_relu(x, LEAKY_SLOPE),
                  lambda x: F.leaky_relu_(x, LEAKY_SLOPE)),
        "logistic": (torch.sigmoid, torch.sigmoid_),
        "relu": (F.relu, F.relu_),
        "mish": (F.mish, lambda x: F.mish(x, inplace=True)),
        "swish": (F.silu, lambda x: F.silu(x, inplace=True)),
    }
    if name not in fns:
        raise DarknetError(f"{section.where()}: unsupported activation={name!r}")
    out_of_place, in_place = fns[name]
    return lambda x: out_of_place(x) if torch.is_grad_enabled() else in_place(x)


class DarknetConv(nn.Module):
    """A ``[convolutional]`` layer: convolution (+ folded batch norm) + activation.

    Attributes:
        batch_normalize: Whether the weights file stores batch-norm parameters for this layer.
        in_channels, filters, size, groups: As in the cfg; they fix the weights-file layout.
    """

    def __init__(self, section: CfgSection, in_channels: int) -> None:
        """Build the layer from its cfg section and the number of input channels."""
        super().__init__()
        self.batch_normalize = bool(section.get_int("batch_normalize", 0))
        self.filters = section.get_int("filters", 1)
        self.size = section.get_int("size", 1)
        self.stride = section.get_int("stride", 1)
        self.groups = section.get_int("groups", 1)
        dilation = section.get_int("dilation", 1)
        # Darknet: pad=1 means "same" padding (size/2) and overrides an explicit padding=.
        padding = section.get_int("padding", 0)
        if section.get_int("pad", 0):
            padding = self.size // 2
        self.in_channels = in_channels
        if in_channels % self.groups or self.filters % self.groups:
            raise DarknetError(
                f"{section.where()}: groups={self.groups} does not divide "
                f"{in_channels} input channels and filters={self.filters}"
            )
        self.activation_name = section.get_str("activation", "logistic")
        self.act = _activation(self.activation_name, section)
        self.conv = nn.Conv2d(
            in_channels,
            self.filters,
            self.size,
            stride=self.stride,
            padding=padding * dilation,
            dilation=dilation,
            groups=self.groups,
            bias=True,
        )

    def num_weights(self) -> int:
        """Number of float32 values this layer reads from a weights file."""
        per_filter = 4 if self.batch_normalize else 1
        kernel = self.filters * (self.in_channels // self.groups) * self.size * self.size
        return per_filter * self.filters + kernel

    def load_flat(self, values: np.ndarray) -> None:
        """Set parameters from this layer's slice of a weights file.

        Darknet order: biases (beta when batch-normalised), then gamma, running mean, running
        variance (batch-normalised layers only), then the kernel as [filters, in/groups, k, k].
        """
        n = self.filters
        biases = torch.from_numpy(values[:n].copy())
        offset = n
        weight_shape = self.conv.weight.shape
        if self.batch_normalize:
            gamma = torch.from_numpy(values[offset : offset + n].copy())
            mean = torch.from_numpy(values[offset + n : offset + 2 * n].copy())
            var = torch.from_numpy(values[offset + 2 * n : offset + 3 * n].copy())
            offset += 3 * n
        kernel = torch.from_numpy(values[offset:].copy()).view(weight_shape)
        if self.batch_normalize:
            # Fold batch norm in double precision so the fold itself adds no rounding error.
            factor = gamma.double() / (var.double().clamp_min(0).sqrt() + DARKNET_BN_EPS)
            kernel = (kernel.double() * factor.view(-1, 1, 1, 1)).float()
            biases = (biases.double() - mean.double() * factor).float()
        with torch.no_grad():
            self.conv.weight.copy_(kernel)
            self.conv.bias.copy_(biases)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply convolution then activation."""
        return self.act(self.conv(x))


class DarknetMaxPool(nn.Module):
    """A ``[maxpool]`` layer with Darknet's padding rule.

    Darknet pads by ``padding`` (default ``size - 1``) in total, ``padding // 2`` of it before
    the data and the rest after, and computes ``out = (in + padding - size) // stride + 1``.
    Out-of-range cells never win the max. For ``size=2 stride=1`` (YOLOv3-tiny layer 11) this
    means one row/column of padding on the bottom/right only, so the map keeps its size and the
    features are not shifted; a symmetric PyTorch padding would shift them by half a cell.
    """

    def __init__(self, section: CfgSection) -> None:
        """Build the layer from its cfg section."""
        super().__init__()
        self.size = section.get_int("size", section.get_int("stride", 1))
        self.stride = section.get_int("stride", 1)
        self.padding = section.get_int("padding", self.size - 1)
        if self.size < 1 or self.stride < 1 or self.padding < 0:
            raise DarknetError(f"{section.where()}: bad size/stride/padding")

    def _pads(self, n: int) -> tuple[int, int]:
        before = self.padding // 2
        out = (n + self.padding - self.size) // self.stride + 1
        after = max(0, (out - 1) * self.stride + self.size - n - before)
        return before, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad with -inf the Darknet way, then max-pool without implicit padding."""
        left, right = self._pads(x.shape[-1])
        top, bottom = self._pads(x.shape[-2])
        if left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class DarknetUpsample(nn.Module):
    """An ``[upsample]`` layer: nearest-neighbour upsampling by an integer ``stride``."""

    def __init__(self, section: CfgSection) -> None:
        """Build the layer from its cfg section."""
        super().__init__()
        self.stride = section.get_int("stride", 2)
        self.scale = section.get_float("scale", 1.0)
        if self.stride < 1:
            # Darknet reads a negative stride as "downsample"; no YOLOv3 network uses it.
            raise DarknetError(f"{section.where()}: only positive upsample strides are supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat every cell ``stride`` x ``stride`` times (then multiply by ``scale``)."""
        x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return x * self.scale if self.scale != 1.0 else x


class DarknetRoute(nn.Module):
    """A ``[route]`` layer: channel-concatenation of earlier outputs (optionally one group).

    Attributes:
        sources: Absolute indices of the layers whose outputs are concatenated.
    """

    def __init__(self, section: CfgSection, index: int, channels: Sequence[int]) -> None:
        """Build the layer; ``channels`` holds the output channels of all earlier layers."""
        super().__init__()
        self.sources = [_resolve_index(section, index, i) for i in section.get_ints("layers")]
        if not self.sources:
            raise DarknetError(f"{section.where()}: layers= is empty")
        self.groups = section.get_int("groups", 1)
        self.group_id = section.get_int("group_id", 0)
        if not 0 <= self.group_id < self.groups:
            raise DarknetError(f"{section.where()}: group_id must be in [0, groups)")
        for s in self.sources:
            if channels[s] % self.groups:
                raise DarknetError(
                    f"{section.where()}: layer {s} has {channels[s]} channels, "
                    f"not divisible by groups={self.groups}"
                )
        self.out_channels = sum(channels[s] // self.groups for s in self.sources)

    def forward(self, outputs: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate the selected group of each source layer's output along channels."""
        parts = []
        for s in self.sources:
            x = outputs[s]
            assert x is not None
            if self.groups > 1:
                x = x.chunk(self.groups, dim=1)[self.group_id]
            parts.append(x)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class DarknetShortcut(nn.Module):
    """A ``[shortcut]`` layer: residual sum of the previous output and an earlier one."""

    def __init__(self, section: CfgSection, index: int, channels: Sequence[int]) -> None:
        """Build the layer; ``channels`` holds the output channels of all earlier layers."""
        super().__init__()
        froms = section.get_ints("from")
        if len(froms) != 1:
            raise DarknetError(f"{section.where()}: only a single from= layer is supported")
        self.source = _resolve_index(section, index, froms[0])
        if section.get_str("weights_type", "none") != "none":
            raise DarknetError(f"{section.where()}: weighted shortcuts are not supported")
        if channels[self.source] != channels[index - 1]:
            # Darknet adds the overlapping channels of mismatched maps; YOLOv3 never does that,
            # and silently supporting it would hide a mis-parsed cfg.
            raise DarknetError(
                f"{section.where()}: from layer {self.source} has {channels[self.source]} "
                f"channels but the previous layer has {channels[index - 1]}"
            )
        self.act = _activation(section.get_str("activation", "linear"), section)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Add the earlier output, then apply the activation."""
        return self.act(x + other)


class YoloHead(nn.Module):
    """A ``[yolo]`` layer: decodes a conv map into boxes, objectness and class scores.

    Decoding follows Darknet: for anchor ``a`` at cell ``(i, j)`` of a ``W x H`` map,
    ``cx = (i + s * sigmoid(tx) - (s - 1) / 2) / W`` (``s`` = ``scale_x_y``, default 1),
    likewise ``cy``; ``w = exp(tw) * anchor_w / net_w``, ``h = exp(th) * anchor_h / net_h``;
    objectness and every class score are independent sigmoids (YOLOv3 has no softmax).

    Attributes:
        anchors: The masked anchors in network-input pixels, shape [A, 2].
        classes: Number of classes.
    """

    anchors: torch.Tensor

    def __init__(self, section: CfgSection, in_channels: int) -> None:
        """Build the head from its cfg section and the number of input channels."""
        super().__init__()
        self.classes = section.get_int("classes", 20)
        num = section.get_int("num", 1)
        anchors = section.get_floats("anchors")
        mask = section.get_ints("mask", list(range(num)))
        if len(anchors) < 2 * num:
            raise DarknetError(f"{section.where()}: anchors= has fewer than num={num} pairs")
        if any(not 0 <= m < num for m in mask):
            raise DarknetError(f"{section.where()}: mask= indexes outside num={num} anchors")
        if section.get_int("new_coords", 0):
            raise DarknetError(f"{section.where()}: new_coords=1 (scaled-YOLOv4) is not supported")
        self.scale_x_y = section.get_float("scale_x_y", 1.0)
        pairs = [(anchors[2 * m], anchors[2 * m + 1]) for m in mask]
        self.register_buffer("anchors", torch.tensor(pairs, dtype=torch.float32), persistent=False)
        self.num_anchors = len(mask)
        expected = self.num_anchors * (5 + self.classes)
        if in_channels != expected:
            raise DarknetError(
                f"{section.where()}: input has {in_channels} channels but "
                f"{self.num_anchors} anchors x (5 + {self.classes} classes) = {expected}"
            )

    def forward(self, x: torch.Tensor, net_w: int, net_h: int) -> torch.Tensor:
        """Decode one head.

        Args:
            x: The preceding conv output, [B, A * (5 + C), H, W].
            net_w: Network input width in pixels (anchors are in these pixels).
            net_h: Network input height in pixels.

        Returns:
            [B, A * H * W, 5 + C], rows ordered anchor-major then row then column (Darknet's
            memory order); columns ``cx, cy, w, h`` as fractions of the network input, then
            objectness, then the C class probabilities (not multiplied by objectness).
        """
        b, _, h, w = x.shape
        p = x.view(b, self.num_anchors, 5 + self.classes, h, w).permute(0, 1, 3, 4, 2)
        s = self.scale_x_y
        xy = torch.sigmoid(p[..., 0:2])
        if s != 1.0:
            xy = xy * s - (s - 1.0) / 2.0
        gy, gx = torch.meshgrid(
            torch.arange(h, device=x.device, dtype=x.dtype),
            torch.arange(w, device=x.device, dtype=x.dtype),
            indexing="ij",
        )
        cx = (xy[..., 0] + gx) / w
        cy = (xy[..., 1] + gy) / h
        anchors = self.anchors.to(x.dtype).view(1, self.num_anchors, 1, 1, 2)
        wh = torch.exp(p[..., 2:4]) * anchors
        bw = wh[..., 0] / net_w
        bh = wh[..., 1] / net_h
        rest = torch.sigmoid(p[..., 4:])
        out = torch.cat([cx[..., None], cy[..., None], bw[..., None], bh[..., None], rest], -1)
        return out.reshape(b, -1, 5 + self.classes)


def _resolve_index(section: CfgSection, index: int, ref: int) -> int:
    # Darknet: negative indices are relative to the current layer, others are absolute.
    absolute = index + ref if ref < 0 else ref
    if not 0 <= absolute < index:
        raise DarknetError(
            f"{section.where()}: layer reference {ref} resolves to {absolute}, "
            f"which is not an earlier layer (this is layer {index})"
        )
    return absolute


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


@dataclass
class DarknetOutput:
    """What :meth:`DarknetModel.forward` returns.

    Attributes:
        detections: All heads' decoded predictions concatenated, [B, M, 5 + C] (see
            :meth:`YoloHead.forward` for the columns), heads in cfg order.
        heads: The same per head, each [B, A * H * W, 5 + C].
        features: The feature map of ``DarknetModel.feature_layer`` when requested, else None.
        layers: Outputs of any layers requested with ``keep_layers``, by absolute index.
    """

    detections: torch.Tensor
    heads: list[torch.Tensor]
    features: torch.Tensor | None = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


class DarknetModel(nn.Module):
    """A Darknet network built from a parsed cfg (YOLOv3 / YOLOv3-tiny family).

    Layer ``i`` of this model is the ``i``-th section after ``[net]``, which is how Darknet and
    cfg ``[route]`` / ``[shortcut]`` references count.

    Attributes:
        net_width, net_height, channels: The ``[net]`` input size (the default letterbox size).
        layers: One module per cfg section.
        layer_types: The section type of each layer.
        out_channels: Output channels of each layer.
        strides: Downsampling factor of each layer's output relative to the input.
        max_stride: Input sizes must be multiples of this.
        yolo_layers: Indices of the ``[yolo]`` layers.
        classes: Number of classes predicted by the heads.
        feature_layer: Layer whose output ``forward(..., return_features=True)`` returns. By
            default the last layer before the first head with the coarsest stride and the most
            channels: the 1024-channel 13x13 (at 416) map of YOLOv3-tiny (layer 12) and of the
            YOLOv3 large-object branch (layer 80).
        source: The cfg path, for messages.
    """

    def __init__(self, sections: Sequence[CfgSection], feature_layer: int | None = None) -> None:
        """Build the network from parsed cfg sections.

        Args:
            sections: Output of :func:`parse_cfg`; the first must be ``[net]`` or ``[network]``.
            feature_layer: Override the default feature layer (negative counts from the end).

        Raises:
            DarknetError: For an unknown section type, a bad reference, or a shape mismatch.
        """
        super().__init__()
        if not sections or sections[0].type not in ("net", "network"):
            where = sections[0].where() if sections else "empty cfg"
            raise DarknetError(f"{where}: a Darknet cfg must start with [net]")
        net = sections[0]
        self.source = net.source
        self.net_width = net.get_int("width", 416)
        self.net_height = net.get_int("height", 416)
        self.channels = net.get_int("channels", 3)
        self.layers = nn.ModuleList()
        self.layer_types: list[str] = []
        self.out_channels: list[int] = []
        self.strides: list[float] = []
        self.yolo_layers: list[int] = []
        referenced: set[int] = set()

        for index, section in enumerate(sections[1:]):
            in_ch = self.out_channels[-1] if self.out_channels else self.channels
            in_stride = self.strides[-1] if self.strides else 1.0
            module: nn.Module
            if section.type in ("convolutional", "conv"):
                module = DarknetConv(section, in_ch)
                out_ch, stride = module.filters, in_stride * module.stride
            elif section.type in ("maxpool", "max"):
                module = DarknetMaxPool(section)
                out_ch, stride = in_ch, in_stride * module.stride
            elif section.type == "upsample":
                module = DarknetUpsample(section)
                out_ch, stride = in_ch, in_stride / module.stride
            elif section.type == "route":
                module = DarknetRoute(section, index, self.out_channels)
                referenced.update(module.sources)
                out_ch, stride = module.out_channels, self.strides[module.sources[0]]
            elif section.type == "shortcut":
                module = DarknetShortcut(section, index, self.out_channels)
                referenced.add(module.source)
                out_ch, stride = in_ch, in_stride
            elif section.type in ("yolo",):
                module = YoloHead(section, in_ch)
                self.yolo_layers.append(index)
                out_ch, stride = in_ch, in_stride
            elif section.type in ("net", "network"):
                raise DarknetError(f"{section.where()}: [net] may only be the first section")
            else:
                raise DarknetError(f"{section.where()}: unsupported Darknet section type")
            self.layers.append(module)
            self.layer_types.append(section.type)
            self.out_channels.append(out_ch)
            self.strides.append(stride)

        if not self.yolo_layers:
            raise DarknetError(f"{self.source}: no [yolo] layer; only YOLO detectors are supported")
        class_counts = {self.layers[i].classes for i in self.yolo_layers}
        if len(class_counts) != 1:
            raise DarknetError(f"{self.source}: [yolo] layers disagree on classes= {class_counts}")
        self.classes: int = class_counts.pop()
        self.max_stride = max(1, round(max(self.strides)))
        # Only outputs that a later route/shortcut reads are kept during forward; the rest are
        # dropped as soon as the next layer has consumed them, to bound memory.
        self._referenced = frozenset(referenced)
        self.feature_layer = (
            self._default_feature_layer()
            if feature_layer is None
            else (feature_layer if feature_layer >= 0 else len(self.layers) + feature_layer)
        )
        if not 0 <= self.feature_layer < len(self.layers):
            raise DarknetError(f"{self.source}: feature_layer {feature_layer} out of range")
        self.eval()

    def _default_feature_layer(self) -> int:
        first_head = self.yolo_layers[0]
        candidates = [i for i in range(first_head) if self.layer_types[i] != "yolo"]
        coarsest = max(self.strides[i] for i in candidates)
        candidates = [i for i in candidates if self.strides[i] == coarsest]
        widest = max(self.out_channels[i] for i in candidates)
        return max(i for i in candidates if self.out_channels[i] == widest)

    @property
    def conv_layers(self) -> list[DarknetConv]:
        """The convolutional layers in cfg order (the order of the weights file)."""
        return [m for m in self.layers if isinstance(m, DarknetConv)]

    def num_weights(self) -> int:
        """Total float32 values the weights file must hold after its header."""
        return sum(conv.num_weights() for conv in self.conv_layers)

    def forward(
        self,
        x: torch.Tensor,
        return_features: bool = False,
        keep_layers: Collection[int] = (),
    ) -> DarknetOutput:
        """Run the network on a batch of preprocessed images.

        Args:
            x: [B, channels, H, W] float in [0, 1] (RGB for the COCO models); H and W must be
                multiples of ``max_stride``. Letterboxing is the caller's job.
            return_features: Also return the output of ``feature_layer``.
            keep_layers: Absolute indices of extra layer outputs to return (for debugging and
                for comparing with other Darknet implementations).

        Returns:
            A :class:`DarknetOutput`.
        """
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected input [B, {self.channels}, H, W], got {list(x.shape)}")
        net_h, net_w = int(x.shape[-2]), int(x.shape[-1])
        if net_h % self.max_stride or net_w % self.max_stride:
            raise ValueError(
                f"input size {net_w}x{net_h} must be a multiple of {self.max_stride} "
                f"for {self.source}"
            )
        keep = set(keep_layers)
        saved: dict[int, torch.Tensor] = {}
        outputs: list[torch.Tensor | None] = []
        heads: list[torch.Tensor] = []
        features: torch.Tensor | None = None
        prev = x
        for index, layer in enumerate(self.layers):
            if isinstance(layer, DarknetRoute):
                out = layer(outputs)
            elif isinstance(layer, DarknetShortcut):
                other = outputs[layer.source]
                assert other is not None
                out = layer(prev, other)
            elif isinstance(layer, YoloHead):
                heads.append(layer(prev, net_w, net_h))
                out = prev  # Darknet's yolo layer passes its input through for later routes.
            else:
                out = layer(prev)
            outputs.append(out if index in self._referenced else None)
            if index in keep:
                saved[index] = out
            if return_features and index == self.feature_layer:
                features = out
            prev = out
        return DarknetOutput(torch.cat(heads, dim=1), heads, features, saved)


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsHeader:
    """The header of a Darknet weights file.

    Attributes:
        major, minor, revision: Format version.
        seen: Number of training images seen (int64 from version 0.2 on, int32 before).
        nbytes: Header size in bytes (20 or 16).
    """

    major: int
    minor: int
    revision: int
    seen: int
    nbytes: int


def read_weights_header(path: PathLike) -> WeightsHeader:
    """Read the header of a Darknet weights file.

    Raises:
        DarknetError: If the file is shorter than a header or uses the transposed layout.
    """
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 16:
        raise DarknetError(f"{path}: {len(head)} bytes is too short for a Darknet weights header")
    major, minor, revision = (int(v) for v in np.frombuffer(head, dtype="<i4", count=3))
    if major > 1000 or minor > 1000:
        raise DarknetError(f"{path}: transposed (version {major}.{minor}) weights not supported")
    # Darknet wrote `seen` as a size_t from version 0.2 on and as an int before.
    if major * 10 + minor >= 2:
        if len(head) < 20:
            raise DarknetError(
                f"{path}: {len(head)} bytes is too short for a v{major}.{minor} header"
            )
        seen = int(np.frombuffer(head, dtype="<i8", count=1, offset=12)[0])
        return WeightsHeader(major, minor, revision, seen, 20)
    seen = int(np.frombuffer(head, dtype="<i4", count=1, offset=12)[0])
    return WeightsHeader(major, minor, revision, seen, 16)


def load_darknet_weights(model: DarknetModel, weights_path: PathLike) -> WeightsHeader:
    """Load a Darknet ``.weights`` file into ``model`` (folding batch norm).

    The file must hold exactly the parameters the cfg asks for: a truncated file or one for a
    different cfg (other class count, other network) is refused rather than half-loaded.

    Args:
        model: A model built from the matching cfg.
        weights_path: The ``.weights`` file.

    Returns:
        The file's header.

    Raises:
        DarknetError: One line naming both files and the byte counts, on a size mismatch.
    """
    header = read_weights_header(weights_path)
    needed = model.num_weights()
    expected = header.nbytes + 4 * needed
    actual = os.path.getsize(weights_path)
    if actual != expected:
        raise DarknetError(
            f"weights file {weights_path} has {actual} bytes but cfg {model.source} needs "
            f"{expected} ({header.nbytes}-byte header + {needed} float32 values); "
            "the two files do not belong together"
        )
    values = np.fromfile(weights_path, dtype="<f4", offset=header.nbytes)
    offset = 0
    for conv in model.conv_layers:
        n = conv.num_weights()
        conv.load_flat(values[offset : offset + n])
        offset += n
    logger.info(
        "loaded %s (v%d.%d.%d, seen %d): %d conv layers, %d parameters",
        weights_path,
        header.major,
        header.minor,
        header.revision,
        header.seen,
        len(model.conv_layers),
        needed,
    )
    return header


def load_darknet(
    cfg_path: PathLike, weights_path: PathLike | None = None, feature_layer: int | None = None
) -> DarknetModel:
    """Build a model from a cfg file and (optionally) load its weights; returns it in eval mode.

    Args:
        cfg_path: The ``.cfg`` file.
        weights_path: The ``.weights`` file, or None to keep random initialisation.
        feature_layer: See :class:`DarknetModel`.
    """
    model = DarknetModel(parse_cfg(cfg_path), feature_layer=feature_layer)
    if weights_path is not None:
        load_darknet_weights(model, weights_path)
    return model.eval()


def num_parameters_for_cfg(cfg_path: PathLike) -> int:
    """Float32 values (after the header) that a weights file for ``cfg_path`` must hold."""
    return DarknetModel(parse_cfg(cfg_path)).num_weights()


__all__ = [
    "CfgSection",
    "DarknetConv",
    "DarknetError",
    "DarknetMaxPool",
    "DarknetModel",
    "DarknetOutput",
    "DarknetRoute",
    "DarknetShortcut",
    "DarknetUpsample",
    "WeightsHeader",
    "YoloHead",
    "load_darknet",
    "load_darknet_weights",
    "num_parameters_for_cfg",
    "parse_cfg",
    "parse_cfg_text",
    "read_weights_header",
]
