"""The `decode` benchmark: beam-search captions/s, key-value cache / re-encoding every step.

Both arms decode the same images with the same model (MiniLM-L6-H384's shape, as the demo's
checkpoints, random weights: captions then run to the length budget, the most steps there
are) and the same beam search (`decoding.beam_search`, beam 5, 20 word pieces): `cached`
through `CachedCaptionDecoder` (tags and regions encoded once per image, two new positions a
step), `re-encode` through `CaptionDecoder` (the whole sequence every step, as the Oscar
code decodes). Judged at 32 images per batch (target 3x); one image per batch is reported.
Every repetition checks that both arms chose the same captions.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vlp_cli.benches.common import interleave, ratio_summary

MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536}


def _setup(images: int, regions: int, dim: int, tags: int, max_len: int,
           bert: dict | None) -> tuple:
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.config import CaptioningCfg, DataCfg
    from vlp_cli.data.examples import ExampleBuilder, ImageInput
    from vlp_cli.model import ModelConfig, VLPModel, tiny_bert
    from vlp_cli.tasks.captioning import TASK, CaptionDataset

    tok = load_tokenizer("embedded:minilm")
    labels = ["circle", "rectangle", "triangle", "red circle", "blue square", "dog", "cat"]
    builder = ExampleBuilder(tok, None, DataCfg(), labels=labels)
    rng = np.random.default_rng(0)
    inputs = [ImageInput(feats=rng.normal(size=(regions, dim)).astype(np.float16),
                         pos=rng.random((regions, builder.pos_dim)).astype(np.float32),
                         tag_classes=list(rng.integers(0, len(labels), size=tags)))
              for _ in range(images)]
    torch.manual_seed(0)
    cfg = ModelConfig(bert={**tiny_bert(len(tok)), **(bert or MINILM)}, img_feat_dim=dim,
                      pos_dim=builder.pos_dim, heads=[TASK.head_spec().to_dict()])
    model = VLPModel(cfg, seed=0).eval()
    ccfg = CaptioningCfg(max_caption_len=max_len)
    ds = CaptionDataset(None, builder, np.zeros(0), ccfg, DataCfg().max_text_len + max_len, 0)
    banned = torch.tensor(sorted(builder.special_ids - {builder.sep_id}), dtype=torch.long)
    return model, ds, inputs, banned


def _measure(reps: int, batch: int, images: int, beam: int, max_len: int, regions: int,
             dim: int, tags: int, bert: dict | None, target: float) -> dict:
    from vlp_cli.decoding import beam_search
    from vlp_cli.tasks.captioning import CachedCaptionDecoder, CaptionDecoder

    model, ds, inputs, banned = _setup(images, regions, dim, tags, max_len, bert)
    sep = ds.builder.sep_id
    last: dict[str, list] = {}
    steps: list[int] = []

    def arm(name: str, cls: type) -> float:
        start = time.perf_counter()
        out = []
        with torch.no_grad():
            for i in range(0, images, batch):
                part = inputs[i: i + batch]
                dec = cls(model, ds, part, torch.device("cpu"))
                out += beam_search(dec.step, dec.reorder, dec.start(), len(part), max_len, sep,
                                   beam=beam, banned=banned)
        rate = images / (time.perf_counter() - start)
        last[name] = [h[0][0] for h in out]
        if len(last) == 2:
            if last["cached"] != last["re-encode"]:
                raise AssertionError("decode bench: the two arms chose different captions")
            steps.append(max(len(c) for c in last["cached"]))
            last.clear()
        return rate

    rates = interleave({"cached": lambda: arm("cached", CachedCaptionDecoder),
                        "re-encode": lambda: arm("re-encode", CaptionDecoder)}, reps)
    result = ratio_summary(rates, "cached", "re-encode", target)
    result.update(images=images, batch=batch, beam=beam, max_len=max_len, regions=regions,
                  tags=tags, identical_captions=True, longest_caption=max(steps))
    return result


def bench_decode(reps: int = 5, images: int = 32, beam: int = 5, max_len: int = 20,
                 regions: int = 10, dim: int = 1280, tags: int = 4, bert: dict | None = None,
                 target: float = 3.0) -> dict:
    """32 images a batch (judged) and one image a batch (reported), beam 5."""
    result = _measure(reps, images, images, beam, max_len, regions, dim, tags, bert, target)
    single = _measure(reps, 1, min(images, 4), beam, max_len, regions, dim, tags, bert, target)
    result.update(name="decode", parts={
        f"batch {images}": {k: result[k] for k in ("ratio", "ratios", "spread", "met")}
        | {"unit": "ratio"},
        "batch 1 (reported)": {k: single[k] for k in ("ratio", "ratios", "spread")}
        | {"unit": "ratio", "met": True}},
        what=f"beam-{beam} captions/s, key-value cache / re-encoding every step "
             "(identical captions checked every repetition)")
    return result
