import numpy as np
import pytest
import torch

from vlp_cli.data.datasets import Collator
from vlp_cli.data.examples import ExampleBuilder, mask_tokens, truncate_pair
from vlp_cli.tasks import TASKS, Context
from vlp_cli.tasks.captioning import CaptionDataset
from vlp_cli.tasks.oscar import PretrainDataset
from vlp_cli.tasks.retrieval import RetrievalTrainDataset
from vlp_cli.tasks.vqa import VqaDataset


@pytest.fixture(scope="module")
def parts(tiny_data: dict) -> tuple:
    from conftest import tiny_recipe_obj
    from vlp_cli.checkpoint import load_tokenizer
    from vlp_cli.stores.corpus import Corpus
    from vlp_cli.stores.features import FeatureStore

    recipe = tiny_recipe_obj()
    tok = load_tokenizer("embedded:minilm")
    store = FeatureStore(tiny_data["features"])
    corpus = Corpus(tiny_data["corpus"])
    return recipe, tok, store, corpus, ExampleBuilder(tok, store, recipe.data)


def test_truncate_pair_longest_first() -> None:
    a, b = truncate_pair(list(range(10)), list(range(4)), 8)
    assert (len(a), len(b)) == (4, 4)
    a, b = truncate_pair([1, 2], [3, 4, 5, 6, 7], 5)
    assert a == [1, 2] and b == [3, 4, 5]


def test_sequence_layout_tags_and_regions(parts: tuple) -> None:
    recipe, tok, store, corpus, builder = parts
    img = builder.regions("img/0.png")
    # whole-image region first, then at most max_regions - 1 selected boxes
    assert 1 <= len(img.feats) <= recipe.data.max_regions
    assert img.pos.shape == (len(img.feats), 7)
    np.testing.assert_allclose(img.pos[0][:4], [0, 0, 1, 1])
    words = tok("a red thing", add_special_tokens=False).input_ids
    tags = builder.tag_ids([1])  # "traffic light" stays one tag of two word pieces
    assert tok.decode(tags) == "traffic light"
    t = builder.text(words, tags, 35)
    assert t.ids[0] == tok.cls_token_id and t.ids[t.a_span[1]] == tok.sep_token_id
    assert t.ids[-1] == tok.sep_token_id
    assert t.types == [0] * (len(words) + 2) + [1] * (len(tags) + 1)
    assert t.ids[slice(*t.b_span)] == tags


def test_mask_tokens_rate_and_labels(parts: tuple) -> None:
    builder = parts[4]
    rng = np.random.default_rng(0)
    ids = list(range(1000, 1100))
    total = 0
    for _ in range(200):
        out, labels = mask_tokens(ids, list(range(100)), 0.15, builder, rng)
        chosen = [i for i, x in enumerate(labels) if x != -100]
        total += len(chosen)
        assert all(labels[i] == ids[i] for i in chosen)
        assert all(out[i] == ids[i] for i in range(100) if i not in chosen)
    assert 0.13 < total / (200 * 100) < 0.17
    out, labels = mask_tokens([5, 6], [0, 1], 0.0, builder, rng)
    assert sum(x != -100 for x in labels) == 1  # at least one
    _, labels = mask_tokens(ids, list(range(100)), 0.9, builder, rng, max_masked=3)
    assert sum(x != -100 for x in labels) == 3


def test_pretrain_dataset_pollution(parts: tuple) -> None:
    recipe, tok, store, corpus, builder = parts
    idx = corpus.indices("caption", "train")
    ds = PretrainDataset(corpus, builder, idx, recipe.oscar, 35, seed=0)
    labels = [ds[i]["contrast"] for i in range(len(ds)) for _ in range(1)]
    ds.set_epoch(1)
    labels += [ds[i]["contrast"] for i in range(len(ds))]
    assert set(labels) == {0, 1}
    assert 0.2 < np.mean(labels) < 0.8
    assert ds[0]["contrast"] == ds[0]["contrast"]  # deterministic per (seed, epoch, index)
    import dataclasses

    cfg3 = dataclasses.replace(recipe.oscar, caption_pollute_prob=0.25)
    ds3 = PretrainDataset(corpus, builder, idx, cfg3, 35, seed=0)
    assert {ds3[i]["contrast"] for i in range(len(ds3))} <= {0, 1, 2}
    oscar = TASKS["oscar"].bind(recipe)
    batch = Collator(builder.pad_id, oscar.collate)([ds[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["mlm_labels"].shape
    assert (batch["mlm_labels"] != -100).sum(1).min() >= 1
    assert batch["img_feats"].dtype == torch.float32 and batch["img_feats"].shape[2] == 16


def test_vqa_targets(parts: tuple) -> None:
    recipe, tok, store, corpus, builder = parts
    task = TASKS["vqa"].bind(recipe)
    answers = task.prepare(Context(recipe, corpus, builder, tok))["answers"]
    task = task.bind(recipe, {"answers": answers})
    ds = VqaDataset(corpus, builder, corpus.indices("vqa", "train"), 24, answers)
    batch = Collator(builder.pad_id, task.collate)([ds[i] for i in range(6)])
    assert batch["vqa_targets"].shape == (6, len(answers))
    assert torch.all(batch["vqa_targets"].sum(1) == 1.0)
    for row, i in zip(batch["vqa_targets"], batch["index"].tolist()):
        ans = corpus.get(i)["label"][0]
        assert answers[int(row.argmax())] == ans


def test_retrieval_pairs_and_caption_layout(parts: tuple) -> None:
    recipe, tok, store, corpus, builder = parts
    idx = corpus.indices("caption", "train")
    ds = RetrievalTrainDataset(corpus, builder, idx, 35, 0)
    batch = Collator(builder.pad_id, TASKS["retrieval"].bind(recipe).collate)([ds[0], ds[1]])
    assert batch["match"].tolist() == [1, 0, 1, 0]
    cds = CaptionDataset(corpus, builder, idx, recipe.captioning, 40, 0)
    item = cds[0]
    a_len = recipe.captioning.max_caption_len + 2
    assert item["causal"] == a_len
    assert all(t == 0 for t in item["types"][:a_len])
    labels = [i for i, x in enumerate(item["mlm_labels"]) if x != -100]
    assert 1 <= len(labels) <= recipe.captioning.max_masked
    assert all(0 < i < a_len for i in labels)
    cb = Collator(builder.pad_id, TASKS["captioning"].bind(recipe).collate)([cds[0], cds[1]])
    assert cb["attn_mask"].shape[1] == cb["input_ids"].shape[1] + cb["img_feats"].shape[1]


def test_shared_tag_negatives(parts: tuple) -> None:
    recipe, tok, store, corpus, builder = parts
    idx = corpus.indices("caption", "train")
    ds = RetrievalTrainDataset(corpus, builder, idx, 35, 0, shared_tag_negatives=1.0)
    checked = 0
    for i in range(len(ds)):
        ex = corpus.get(int(idx[i]))
        group = ds.tag_groups[ds.tags_of[i]]
        if len(group) < 2:
            continue
        neg = ds.negative_example(ds.rng(i), i, ex["images"][0])
        assert neg["images"][0] != ex["images"][0]
        assert tuple(sorted(set(builder.tag_classes(neg["images"][0])))) == ds.tags_of[i]
        checked += 1
    assert checked > 0
