"""Greedy decoding and beam search over toy next-token functions (no model)."""

import itertools
import math

import pytest
import torch

from vlp_cli.decoding import beam_search, greedy

END = 0


class Chain:
    """A next-token function whose log-probabilities depend on the last token only: `table`
    [V, V] (row: last token; row 0 also serves the first step). The state is the row list of
    last tokens, so reorder is row selection."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def start(self, rows: int) -> list[int]:
        return [0] * rows

    def step(self, state: list[int], tokens: torch.Tensor | None):
        last = state if tokens is None else [
            s if t == END else int(t) for s, t in zip(state, tokens.tolist())]
        return self.table[last].clone(), last

    def reorder(self, state: list[int], rows: torch.Tensor) -> list[int]:
        return [state[i] for i in rows.tolist()]


def _score(table: torch.Tensor, seq: list[int], finished: bool, lp: float) -> float:
    """Summed log-probability of seq (then END when finished) / length ** lp."""
    logp = torch.log_softmax(table, -1)
    last, total = 0, 0.0
    for tok in seq + ([END] if finished else []):
        total += float(logp[last, tok])
        last = tok
    return total / (len(seq) + 1) ** lp


def _random_table(seed: int, v: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, v, generator=g) * 2


@pytest.mark.parametrize("seed", range(6))
def test_beam_of_one_without_length_penalty_is_greedy(seed: int) -> None:
    chain = Chain(_random_table(seed))
    want = greedy(chain.step, chain.start(3), 3, 6, END)
    got = beam_search(chain.step, chain.reorder, chain.start(3), 3, 6, END, beam=1,
                      length_penalty=0)
    assert [h[0][0] for h in got] == want


@pytest.mark.parametrize("seed", range(6))
def test_a_wide_beam_finds_the_best_sequence(seed: int) -> None:
    """With a beam wider than every prefix there is and no length penalty, beam search is
    exhaustive: it returns the highest-scoring sequence of at most max_len tokens."""
    table = _random_table(seed, v=4)
    max_len = 3
    cands = [(list(seq), True) for n in range(max_len)
             for seq in itertools.product(range(1, 4), repeat=n)]
    cands += [(list(seq), False) for seq in itertools.product(range(1, 4), repeat=max_len)]
    best = max(cands, key=lambda c: _score(table, c[0], c[1], 0))
    chain = Chain(table)
    got = beam_search(chain.step, chain.reorder, chain.start(1), 1, max_len, END, beam=40,
                      length_penalty=0, n_best=3)[0]
    assert got[0][0] == best[0]
    assert got[0][1] == pytest.approx(_score(table, best[0], best[1], 0), abs=1e-5)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


def test_beam_escapes_the_greedy_trap() -> None:
    """First token 1 (p 0.6) leads to four equally likely tokens; token 2 (p 0.4) to END for
    sure. Greedy takes 1 and pays log 0.25 next; a beam of 2 finds [2]."""
    big = -30.0
    table = torch.full((5, 5), big)
    table[0, 1], table[0, 2] = math.log(0.6), math.log(0.4)
    table[1, 1:] = 0.0  # four tokens, each 0.25
    table[1, END] = big
    table[2, END] = 0.0
    for t in (3, 4):
        table[t, END] = 0.0
    chain = Chain(table)
    g = greedy(chain.step, chain.start(1), 1, 4, END)[0]
    assert g[0] == 1 and len(g) >= 2
    (seq, score), = beam_search(chain.step, chain.reorder, chain.start(1), 1, 4, END, beam=2,
                                length_penalty=0)[0]
    assert seq == [2] and score == pytest.approx(math.log(0.4), abs=1e-4)


def test_length_penalty_divides_by_length_and_rows_are_independent() -> None:
    table = _random_table(3)
    chain = Chain(table)
    out = beam_search(chain.step, chain.reorder, chain.start(2), 2, 5, END, beam=3,
                      length_penalty=1.0, n_best=3)
    assert out[0] == out[1]  # identical rows, identical results
    for seq, score in out[0]:
        # Shorter than the budget: ended by END; at the budget: a live prefix, no END.
        assert score == pytest.approx(_score(table, seq, len(seq) < 5, 1.0), abs=1e-5)


def test_banned_tokens_never_appear_and_bad_widths_are_refused() -> None:
    chain = Chain(_random_table(1))
    out = beam_search(chain.step, chain.reorder, chain.start(2), 2, 6, END, beam=3,
                      banned=torch.tensor([2, 3]), n_best=2)
    assert all(set(seq) <= {1, 4} for hyps in out for seq, _ in hyps)
    with pytest.raises(ValueError, match="n_best"):
        beam_search(chain.step, chain.reorder, chain.start(1), 1, 3, END, beam=2, n_best=3)


# -- captioning: the key-value cache against re-encoding every step ---------------------------

class _Tok:
    """The little of a tokenizer that ExampleBuilder reads."""

    cls_token_id, sep_token_id, pad_token_id, mask_token_id = 1, 2, 0, 3
    all_special_ids = [0, 1, 2, 3, 4]

    def __len__(self) -> int:
        return 99

    def __call__(self, text: str, add_special_tokens: bool = False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[10 + (sum(map(ord, w)) % 80) for w in text.split()])


def _captioning(attn: str, max_caption_len: int = 6):
    import numpy as np

    from vlp_cli.config import CaptioningCfg, DataCfg
    from vlp_cli.data.examples import ExampleBuilder, ImageInput
    from vlp_cli.model import HeadSpec, ModelConfig, VLPModel, tiny_bert
    from vlp_cli.tasks.captioning import CaptionDataset

    builder = ExampleBuilder(_Tok(), None, DataCfg(),
                             labels=["red circle", "blue square", "green triangle", "cat"])
    rng = np.random.default_rng(0)
    images = []
    for i in range(5):
        r = 2 + i % 3
        images.append(ImageInput(
            feats=rng.normal(size=(r, 16)).astype(np.float16),
            pos=rng.random((r, builder.pos_dim)).astype(np.float32),
            tag_classes=[] if i == 3 else list(rng.integers(0, 4, size=1 + i % 3))))
    torch.manual_seed(0)
    cfg = ModelConfig(bert=tiny_bert(99), img_feat_dim=16, pos_dim=builder.pos_dim,
                      heads=[HeadSpec("mlm", "masked_tokens").to_dict()])
    model = VLPModel(cfg).eval()
    model.bert.set_attn_implementation(attn)
    ccfg = CaptioningCfg(max_caption_len=max_caption_len)
    ds = CaptionDataset(None, builder, np.zeros(0), ccfg, DataCfg().max_text_len + max_caption_len,
                        0)
    return model, ds, images


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_cached_decoding_equals_re_encoding(attn: str) -> None:
    """Step by step, on the same tokens, the cached decoder's logits equal re-encoding the
    whole sequence (tags present, absent, several; regions of different counts); beam search
    through either gives the same captions and scores."""
    from vlp_cli.tasks.captioning import CachedCaptionDecoder, CaptionDecoder

    model, ds, images = _captioning(attn)
    full = CaptionDecoder(model, ds, images, torch.device("cpu"))
    cached = CachedCaptionDecoder(model, ds, images, torch.device("cpu"))
    sa, sb = full.start(), cached.start()
    g = torch.Generator().manual_seed(3)
    tokens = None
    for _ in range(5):  # then one more after the reorder: the budget of 6 (max_caption_len)
        la, sa = full.step(sa, tokens)
        lb, sb = cached.step(sb, tokens)
        assert la.shape == lb.shape == (5, 99)
        assert torch.allclose(la, lb, atol=1e-5, rtol=0), (la - lb).abs().max()
        tokens = torch.randint(5, 99, (5,), generator=g)
    # Rows reordered and repeated, as beam search does.
    rows = torch.tensor([4, 4, 0, 2, 1])
    sa, sb = full.reorder(sa, rows), cached.reorder(sb, rows)
    la, _ = full.step(sa, tokens)
    lb, _ = cached.step(sb, tokens)
    assert torch.allclose(la, lb, atol=1e-5, rtol=0)

    def beams(cls):
        dec = cls(model, ds, images, torch.device("cpu"))
        return beam_search(dec.step, dec.reorder, dec.start(), len(images), 6, 2, beam=3,
                           n_best=3, banned=torch.tensor([0, 1, 3, 4]))

    a, b = beams(CaptionDecoder), beams(CachedCaptionDecoder)
    assert [[s for s, _ in row] for row in a] == [[s for s, _ in row] for row in b]
    for ra, rb in zip(a, b):
        for (_, x), (_, y) in zip(ra, rb):
            assert x == pytest.approx(y, abs=1e-5)


# -- sampling ----------------------------------------------------------------------------------

def test_filter_logits_keeps_the_top_k_and_the_nucleus() -> None:
    from vlp_cli.decoding import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: (x > float("-inf")).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.6)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.86)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_p=0.01)) == [0]  # the most likely always stays
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert kept(filter_logits(shuffled, top_k=3, top_p=0.6)) == [1, 4]


def test_sampling_limits_are_greedy_and_draws_follow_the_softmax() -> None:
    from vlp_cli.decoding import sample

    chain = Chain(_random_table(5))
    want = greedy(chain.step, chain.start(4), 4, 6, END)
    g = torch.Generator().manual_seed(0)
    assert sample(chain.step, chain.start(4), 4, 6, END, top_k=1, generator=g) == want
    assert sample(chain.step, chain.start(4), 4, 6, END, top_p=1e-6, generator=g) == want
    assert sample(chain.step, chain.start(4), 4, 6, END, temperature=1e-4, generator=g) == want
    # First tokens of many rows follow softmax(table[0]) (END ends a row at once: []).
    n = 20000
    first = sample(chain.step, chain.start(n), n, 1, END, generator=g)
    counts = torch.bincount(torch.tensor([w[0] if w else END for w in first]), minlength=5)
    probs = torch.softmax(chain.table[0], -1)
    assert torch.allclose(counts / n, probs, atol=0.015), (counts / n, probs)
    # Reproducible with the same generator seed; refused without a sane temperature.
    a = sample(chain.step, chain.start(3), 3, 5, END, generator=torch.Generator().manual_seed(7))
    b = sample(chain.step, chain.start(3), 3, 5, END, generator=torch.Generator().manual_seed(7))
    assert a == b
    with pytest.raises(ValueError, match="temperature"):
        sample(chain.step, chain.start(1), 1, 3, END, temperature=0)


def test_recipe_refuses_sampling_with_a_beam() -> None:
    from vlp_cli import VlpError
    from vlp_cli.config import load_recipe

    with pytest.raises(VlpError, match="beam_size"):
        load_recipe("tiny", ["captioning.sample=true", "captioning.beam_size=3"])
    assert load_recipe("tiny", ["captioning.sample=true", "captioning.beam_size=1",
                            "captioning.top_p=0.9"]).captioning.sample


# -- constrained beam search -------------------------------------------------------------------

def _contains(seq: list[int], piece: list[int]) -> bool:
    return any(seq[i: i + len(piece)] == piece for i in range(len(seq) - len(piece) + 1))


@pytest.mark.parametrize("seed", range(4))
def test_constrained_search_without_constraints_is_beam_search(seed: int) -> None:
    from vlp_cli.decoding import constrained_beam_search

    chain = Chain(_random_table(seed))
    free = beam_search(chain.step, chain.reorder, chain.start(3), 3, 6, END, beam=3,
                       length_penalty=0, n_best=2)
    cbs = constrained_beam_search(chain.step, chain.reorder, chain.start(3), 3, 6, END,
                                  [[], [], []], beam=3, length_penalty=0, n_best=2)
    assert [[s for s, _ in r] for r in cbs] == [[s for s, _ in r] for r in free]
    for ra, rb in zip(cbs, free):
        assert [x for _, x in ra] == pytest.approx([x for _, x in rb], abs=1e-5)


def test_constrained_search_puts_unlikely_tags_in_every_caption() -> None:
    """Tokens 5-9 are all but impossible after every token; the free beam never writes them.
    Each row gets three constraints (one of two pieces) and must satisfy two."""
    from vlp_cli.decoding import constrained_beam_search

    table = _random_table(2, v=10)
    table[:, 5:] -= 8.0
    chain = Chain(table)
    free = beam_search(chain.step, chain.reorder, chain.start(3), 3, 8, END, beam=3)
    assert not any(set(seq) & {5, 6, 7, 8, 9} for row in free for seq, _ in row)
    constraints = [[[5], [6], [7, 8]], [[7, 8], [9, 5], [6]], [[9], [5]]]
    out = constrained_beam_search(chain.step, chain.reorder, chain.start(3), 3, 8, END,
                                  constraints, min_satisfied=2, beam=3, n_best=3)
    for row, cons in zip(out, constraints):
        assert row
        for seq, score in row:
            assert sum(_contains(seq, c) for c in cons) >= 2, (seq, cons)
            assert score == pytest.approx(_score(table, seq, len(seq) < 8, 1.0), abs=1e-4)
    # One constraint: satisfied alone (min(2, 1)).
    one = constrained_beam_search(chain.step, chain.reorder, chain.start(1), 1, 8, END,
                                  [[[7, 8]]], beam=2)[0]
    assert _contains(one[0][0], [7, 8])


@torch.no_grad()
def test_constrained_captions_hold_two_tags_through_the_cached_decoder() -> None:
    """A tiny random captioning model: the free beam writes none of the chosen tags' pieces;
    constrained by them, every caption holds at least two (most tags have two pieces)."""
    from vlp_cli.decoding import constrained_beam_search
    from vlp_cli.tasks.captioning import CachedCaptionDecoder

    model, ds, images = _captioning("sdpa")
    dec = CachedCaptionDecoder(model, ds, images, torch.device("cpu"))
    banned = torch.tensor([0, 1, 3, 4])
    free = beam_search(dec.step, dec.reorder, dec.start(), len(images), 6, 2, beam=3,
                       banned=banned)
    written = {t for row in free for seq, _ in row for t in seq}
    pieces = [p for p in ds.builder.tag_pieces if not set(p) & written]
    assert len(pieces) >= 2 and sum(len(p) == 2 for p in pieces) >= 2  # multi-piece tags
    dec = CachedCaptionDecoder(model, ds, images, torch.device("cpu"))
    out = constrained_beam_search(dec.step, dec.reorder, dec.start(), len(images), 6, 2,
                                  [pieces] * len(images), beam=3, banned=banned)
    for row in out:
        assert sum(_contains(row[0][0], p) for p in pieces) >= 2, (row, pieces)


def test_a_constraint_with_word_forms_is_satisfied_by_any_of_them() -> None:
    """A constraint given as forms (a tag's singular and plural): the search may write
    whichever the model prefers. Here the plural [7, 8] is far likelier than the singular [9],
    so captions hold [7, 8], and each caption still satisfies two constraints."""
    from vlp_cli.decoding import constrained_beam_search

    table = _random_table(4, v=10)
    table[:, 5:] -= 8.0
    table[:, 7] += 4.0  # the plural's first piece: unlikely, far less than the others
    table[7, 8] += 12.0  # and once it is written its second piece follows
    chain = Chain(table)
    forms = [[[9], [7, 8]], [[5]], [[6]]]
    out = constrained_beam_search(chain.step, chain.reorder, chain.start(2), 2, 8, END,
                                  [forms, forms], min_satisfied=2, beam=3, n_best=2)
    for row in out:
        for seq, _ in row:
            held = sum(any(_contains(seq, f) for f in c) for c in forms)
            assert held >= 2, seq
        assert any(_contains(seq, [7, 8]) for seq, _ in row)
    # Forms that share their first piece ("dog" / "dogs" as [5] / [5, 6]): one satisfies.
    one = constrained_beam_search(chain.step, chain.reorder, chain.start(1), 1, 8, END,
                                  [[[[5], [5, 6]]]], beam=2)[0]
    assert 5 in one[0][0]


def test_tags_become_caption_words_with_their_plurals() -> None:
    from vlp_cli.data.examples import plural, tag_words

    assert [tag_words(x) for x in ("pottedplant", "tvmonitor", "dog", "traffic light")] == \
        ["potted plant", "tv", "dog", "traffic light"]
    assert [plural(x) for x in ("dog", "bench", "bus", "person", "sheep", "skis", "cherry",
                                "toy", "traffic light", "potted plant", "knife", "box")] == \
        ["dogs", "benches", "buses", "people", "sheep", "skis", "cherries", "toys",
         "traffic lights", "potted plants", "knives", "boxes"]
