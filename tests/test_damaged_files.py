"""Truncated or damaged LMDB files: one line and exit status 1, never a signal (SIGBUS)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LABELS, make_regions
from vlp_cli import VlpError
from vlp_cli.stores.corpus import Corpus, CorpusWriter
from vlp_cli.stores.features import FeatureStore, FeatureStoreWriter

PAGE = 4096


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A feature store of ~1.3 MB (records span overflow pages) and a corpus."""
    root = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    w = FeatureStoreWriter(root / "features", {"extractor": {"name": "t"}, "feature_dim": 256,
                                               "labels": LABELS})
    for i in range(300):
        w.put(f"img/{i}.png", make_regions(rng, 5, 256))
    w.close()
    c = CorpusWriter(root / "corpus", {})
    for i in range(2000):
        c.add({"kind": "caption", "split": "train", "source": "t",
               "images": [f"img/{i % 300}.png"], "texts": [f"caption number {i}"],
               "segments": [list(range(i % 20 + 1))], "label": None, "id": None})
    c.close()
    return {"features": root / "features", "corpus": root / "corpus"}


def _damaged(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / "data.mdb"
    data = bytearray(f.read_bytes())
    if how == "half":
        data = data[: len(data) // 2]
    elif how == "meta":  # both meta pages zeroed
        data[: 2 * PAGE] = bytes(2 * PAGE)
    elif how == "page":  # the first leaf page's contents replaced by noise
        leaf = next(p for p in range(2, len(data) // PAGE) if data[p * PAGE + 10] == 2)
        noise = np.random.default_rng(1).integers(0, 256, PAGE - 16, np.uint8).tobytes()
        data[leaf * PAGE + 16: (leaf + 1) * PAGE] = noise
    f.write_bytes(bytes(data))
    return dst


def test_truncated_store_is_refused_in_process(stores: dict[str, Path], tmp_path: Path) -> None:
    f = _damaged(stores["features"], tmp_path / "f", "half")
    with pytest.raises(VlpError, match=r"data.mdb is truncated .* rebuild it"):
        FeatureStore(f)
    with pytest.raises(VlpError, match="is truncated"):
        FeatureStoreWriter(f, {"extractor": {"name": "t"}, "feature_dim": 256})
    c = _damaged(stores["corpus"], tmp_path / "c", "half")
    with pytest.raises(VlpError, match="is truncated"):
        Corpus(c)
    m = _damaged(stores["features"], tmp_path / "m", "meta")
    with pytest.raises(VlpError, match="not a valid LMDB file"):
        FeatureStore(m)


def test_damaged_files_give_one_line_and_status_1(stores: dict[str, Path],
                                                  tmp_path: Path) -> None:
    cases = [
        ("inspect", _damaged(stores["features"], tmp_path / "f-half", "half")),
        ("verify", tmp_path / "f-half"),
        ("inspect", _damaged(stores["corpus"], tmp_path / "c-half", "half")),
        ("inspect", _damaged(stores["features"], tmp_path / "f-meta", "meta")),
        ("inspect", _damaged(stores["features"], tmp_path / "f-page", "page")),
    ]
    # In parallel: each is a fresh interpreter importing vlp.
    procs = [subprocess.Popen([sys.executable, "-m", "vlp_cli", cmd, str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, path in cases]
    for (cmd, path), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (cmd, path.name, proc.returncode, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (cmd, path.name, err)
        assert "damaged" in lines[0] or "truncated" in lines[0]
