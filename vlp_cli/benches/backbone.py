"""The `backbone` benchmark: images/s of the extraction backbone as vlp runs it / as released.

`load_backbone` folds each BatchNorm into its convolution, pads stride-1 convolutions inside
the convolution and runs the trunk channels-last (extractors/backbone.py). This bench times
that trunk against the released network built the same way without those changes, on the
same batch, and reports how far their feature maps differ (the store keeps fp16, one step of
which is about 1e-3 at these magnitudes).
"""

from __future__ import annotations

import statistics
import time

import torch

from vlp_cli.benches.common import interleave, ratio_summary


@torch.no_grad()
def bench_backbone(reps: int = 5, batch: int = 16, size: tuple[int, int] = (224, 224),
                   calls: int = 2) -> dict:
    """Images/s of the folded, channels-last trunk / the released one (target 1.5x), on one
    batch of random images at `size`, and the largest difference of their feature maps."""
    from vlp_cli.extractors.backbone import load_backbone, released_trunk

    ours = load_backbone().trunk
    released = released_trunk()
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x_last = x.contiguous(memory_format=torch.channels_last)

    def timed(net: torch.nn.Module, inp: torch.Tensor):
        def arm() -> float:
            start = time.perf_counter()
            for _ in range(calls):
                net.extract_features(inp)
            return calls * batch / (time.perf_counter() - start)
        return arm

    rates = interleave({"folded": timed(ours, x_last), "released": timed(released, x)}, reps)
    result = ratio_summary(rates, "folded", "released", 1.5)
    diff = (ours.extract_features(x_last) - released.extract_features(x)).abs().max().item()
    result.update(max_abs_diff=float(f"{diff:.3g}"), batch=batch, size=list(size),
                  ms_per_image=round(1e3 / statistics.median(rates["folded"]), 2),
                  threads=torch.get_num_threads(),
                  note="EfficientNet-lite0 trunk with BatchNorms folded, padding inside the "
                       "convolutions, channels-last / the released network, same images")
    return result
