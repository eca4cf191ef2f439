"""`vlp bench`'s benchmarks: speed (or memory) as ratios against a baseline in the same run.

One module per benchmark; `common` holds what they share. The registry below is what
`vlp bench NAME` offers, in the order `vlp bench all` runs them.
"""

from __future__ import annotations

from collections.abc import Callable

from vlp_cli.benches.backbone import bench_backbone
from vlp_cli.benches.extract import bench_extract
from vlp_cli.benches.collate import bench_collate
from vlp_cli.benches.decode import bench_decode
from vlp_cli.benches.ipot import bench_ipot
from vlp_cli.benches.memory import bench_extract_memory
from vlp_cli.benches.padding import bench_padding
from vlp_cli.benches.pipeline import bench_pipeline
from vlp_cli.benches.retrieval_eval import bench_retrieval_eval
from vlp_cli.benches.store_read import bench_store_read
from vlp_cli.benches.train_step import bench_train_step

BENCHES: dict[str, Callable[..., dict]] = {
    "pipeline": bench_pipeline,
    "extract": bench_extract,
    "backbone": bench_backbone,
    "store-read": bench_store_read,
    "extract-memory": bench_extract_memory,
    "padding": bench_padding,
    "collate": bench_collate,
    "train-step": bench_train_step,
    "ipot": bench_ipot,
    "decode": bench_decode,
    "retrieval-eval": bench_retrieval_eval,
}
