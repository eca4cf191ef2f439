"""Self-critical sequence training: the CIDEr-D reward with fixed document frequencies, sampling
with log-probabilities, the policy gradient's direction, and `finetune captioning` with SCST
through the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import COLORS, LABELS, make_regions, tiny_recipe_obj, tiny_recipe_sets
from vlp_cli.cli import app
from vlp_cli.decoding import sample, sample_with_log_probs
from vlp_cli.metrics import CiderD

pycoco = pytest.importorskip("pycocoevalcap.cider.cider")


def _sentences(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "a the red blue circle square big small left right of on is".split()
    return [" ".join(rng.choice(words, rng.integers(2, 12))) for _ in range(n)]


def test_cider_d_on_its_own_references_equals_pycocoevalcap() -> None:
    refs = [_sentences(i, 1 + i % 4) for i in range(30)]
    cands = _sentences(99, 30)
    with contextlib.redirect_stdout(io.StringIO()):
        mean, each = pycoco.Cider().compute_score({i: r for i, r in enumerate(refs)},
                                                  {i: [c] for i, c in enumerate(cands)})
    ours = CiderD(refs).scores(cands, refs)
    assert np.abs(ours - each).max() < 1e-12 and ours.mean() == pytest.approx(mean)


def test_cider_d_document_frequencies_are_fixed_by_its_documents() -> None:
    """Words every training document holds carry no weight; a word none holds carries the
    most: the same candidate and references score by the training corpus, not the batch."""
    refs = ["a red circle", "a red circle left of a square"]
    common = CiderD([["a red circle"], ["a red square"], ["a red thing"]])
    rare = CiderD([["a blue square"], ["the square"], ["one thing"]])
    assert common.score("a red circle", refs) < rare.score("a red circle", refs)
    # Every n-gram of the candidate in every document: idf 0, CIDEr-D 0.
    assert CiderD([["a red circle"]] * 3).score("a red circle", refs) == 0.0
    # Batch-independent: scoring one candidate alone or among others gives the same number.
    c = CiderD([_sentences(i, 3) for i in range(10)])
    alone = c.score("a red circle", refs)
    assert c.scores(["a blue", "a red circle"], [refs, refs])[1] == alone


class _Chain(torch.nn.Module):
    """Logits depend on the last token only: a learnable [V, V] table (row 0 also starts)."""

    def __init__(self, v: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(v, v, generator=g))

    def step(self, state: list[int], tokens: torch.Tensor | None):
        last = state if tokens is None else [int(t) for t in tokens.tolist()]
        return self.table[last], last


def test_sample_with_log_probs_draws_as_sample_and_scores_the_draws() -> None:
    chain = _Chain()
    end, rows = 0, 8
    banned = torch.tensor([5])
    want = sample(chain.step, [1] * rows, rows, 7, end, banned=banned, temperature=0.7,
                  generator=torch.Generator().manual_seed(4))
    got, logp = sample_with_log_probs(chain.step, [1] * rows, rows, 7, end, banned=banned,
                                      temperature=0.7,
                                      generator=torch.Generator().manual_seed(4))
    assert got == want and all(5 not in w for w in got)
    table = torch.log_softmax(chain.table.detach() / 0.7 + torch.nn.functional.one_hot(
        torch.tensor(5), 6) * -1e9, -1)
    for w, lp in zip(got, logp.tolist()):
        last, total = 1, 0.0
        seq = w + ([end] if len(w) < 7 else [])  # the end token counts, when it was drawn
        for tok in seq:
            total += float(table[last, tok])
            last = tok
        assert lp == pytest.approx(total / len(seq), abs=1e-5)
    logp.sum().backward()
    assert chain.table.grad is not None and chain.table.grad.abs().sum() > 0


def test_the_self_critical_gradient_raises_the_reward() -> None:
    """REINFORCE with a greedy baseline (SCST's loss) on a toy chain: the reward (how many of
    the tokens are 3) rises from its start within 60 steps."""
    chain = _Chain(seed=1)
    opt = torch.optim.Adam(chain.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)

    def reward(seqs: list[list[int]]) -> np.ndarray:
        return np.array([sum(t == 3 for t in s) / 5 for s in seqs])

    def mean_reward() -> float:
        with torch.no_grad():
            seqs, _ = sample_with_log_probs(chain.step, [1] * 256, 256, 5, 0, generator=gen)
        return float(reward(seqs).mean())

    before = mean_reward()
    for _ in range(60):
        with torch.no_grad():
            logits, _ = chain.step([1] * 8, None)
        seqs, logp = sample_with_log_probs(chain.step, [1] * 16, 16, 5, 0, generator=gen)
        base = reward([[int(torch.argmax(logits[0]))]] * 16)
        loss = -(logp * torch.as_tensor(reward(seqs) - base, dtype=torch.float32)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert mean_reward() > before + 0.3


runner = CliRunner()


def vlp(*args: str | Path, ok: bool = True) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result.stdout + (result.stderr if not ok else "")


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """24 images with two reference captions each, a tiny pre-training and captioning."""
    from vlp_cli.stages import corpus
    from vlp_cli.stores.features import FeatureStoreWriter

    root = tmp_path_factory.mktemp("scst")
    rng = np.random.default_rng(0)
    w = FeatureStoreWriter(root / "features", {"extractor": {"name": "synthetic"},
                                               "feature_dim": 16, "labels": LABELS})
    lines = []
    for i in range(24):
        key = f"img/{i}.png"
        w.put(key, make_regions(rng, 5, 16))
        split = "test" if i >= 18 else "train"
        color = COLORS[i % 3]
        lines += [{"image": key, "caption": f"a {color} thing", "split": split},
                  {"image": key, "caption": f"the thing is {color}", "split": split}]
    w.close()
    (root / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    corpus.run([str(root / "data.jsonl")], root / "features", root / "corpus", tiny_recipe_obj())
    io_ = ["-c", root / "corpus", "-f", root / "features"]
    s = [a for x in tiny_recipe_sets() for a in ("--set", x)]
    vlp("pretrain", "recipes/tiny.yaml", *io_, "-o", root / "pre", *s)
    vlp("finetune", "captioning", "-k", root / "pre", *io_, "-o", root / "ce", *s,
        "--set", "captioning.train.steps=30", "--set", "captioning.train.lr=1e-3")
    return {"root": root, "io": io_, "sets": s}  # type: ignore[dict-item]


def test_finetune_captioning_with_scst(captions: dict) -> None:
    root, io_, s = captions["root"], captions["io"], captions["sets"]
    vlp("finetune", "captioning", "-k", root / "ce", *io_, "-o", root / "scst", *s,
        "--set", "captioning.scst=true", "--set", "captioning.scst_samples=3")
    rows = [json.loads(x) for x in (root / "scst" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert len(train) == 3 and val
    for r in train:  # CIDEr-D of the samples and of the greedy baseline, both finite
        assert math.isfinite(r["loss"]) and r["reward"] >= 0 and r["reward_greedy"] >= 0
    assert all(set(r) >= {"reward_greedy"} and "reward" not in r for r in val)
    meta = json.loads((root / "scst" / "meta.json").read_text())
    recipe = yaml.safe_load((root / "scst" / "recipe.yaml").read_text())
    assert meta["task"] == "captioning" and recipe["captioning"]["scst"] is True
    out = json.loads(vlp("evaluate", "captioning", "-k", root / "scst", *io_))
    assert out["images"] == 6 and out["cider"] >= 0
    # The other baseline: the mean of the image's other samples (no greedy decode).
    vlp("finetune", "captioning", "-k", root / "ce", *io_, "-o", root / "scst-mean", *s,
        "--set", "captioning.scst=true", "--set", "captioning.scst_baseline=mean")
    rows = [json.loads(x) for x in
            (root / "scst-mean" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r and "reward_greedy" not in r for r in rows if r["split"] == "train")


def test_scst_settings_are_checked_before_any_work(captions: dict, tmp_path: Path) -> None:
    root, io_, s = captions["root"], captions["io"], captions["sets"]
    out = vlp("finetune", "captioning", "-k", root / "ce", *io_, "-o", tmp_path / "x", *s,
              "--set", "captioning.scst=true", "--set", "captioning.scst_baseline=mean",
              "--set", "captioning.scst_samples=1", ok=False)
    assert "captioning.scst_samples" in out and "Traceback" not in out
    assert not (tmp_path / "x").exists()
