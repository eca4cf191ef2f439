from pathlib import Path

import pytest
import torch

from vlp_cli.model import HeadSpec, ModelConfig, VLPModel, tiny_bert
from vlp_cli.tasks.captioning import caption_attention

VOCAB = 99
FIXTURES = Path(__file__).parent / "fixtures"


def tiny_model(num_answers: int = 0, n_contrast: int = 2) -> VLPModel:
    torch.manual_seed(0)
    heads = [HeadSpec("mlm", "masked_tokens"), HeadSpec("contrast", "linear", n_contrast),
             HeadSpec("match", "linear", 2)]
    if num_answers:
        heads.append(HeadSpec("answers", "mlp", num_answers))
    cfg = ModelConfig(bert=tiny_bert(VOCAB), img_feat_dim=16, pos_dim=7,
                      heads=[h.to_dict() for h in heads])
    return VLPModel(cfg).eval()


def batch(b: int = 2, t: int = 6, r: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    text_mask = torch.ones(b, t, dtype=torch.bool)
    img_mask = torch.ones(b, r, dtype=torch.bool)
    if b > 1:
        text_mask[1, 4:] = False
        img_mask[0, 2] = False
    return dict(input_ids=torch.randint(5, VOCAB, (b, t), generator=g),
                token_type_ids=torch.zeros(b, t, dtype=torch.long), text_mask=text_mask,
                img_feats=torch.randn(b, r, 16, generator=g),
                img_pos=torch.rand(b, r, 7, generator=g), img_mask=img_mask)


def test_shapes_and_heads() -> None:
    m = tiny_model(num_answers=5, n_contrast=3)
    x = batch()
    h = m(**x)
    assert h.shape == (2, 9, 32) and torch.isfinite(h).all()
    where = torch.zeros(2, 6, dtype=torch.bool)
    where[0, 1] = where[1, 2] = True
    assert m.mlm_logits(h[:, :6], where, "mlm").shape == (2, VOCAB)
    assert m.cls_logits("contrast", h).shape == (2, 3)
    assert m.cls_logits("match", h).shape == (2, 2)
    assert m.cls_logits("answers", h).shape == (2, 5)
    assert list(m.heads) == ["mlm", "contrast", "match", "answers"]


def test_with_heads_keeps_same_specs_and_never_changes_a_shared_config() -> None:
    m = tiny_model(num_answers=5)
    old_cfg = m.config
    contrast = m.heads["contrast"].weight.detach().clone()
    m.with_heads([HeadSpec("contrast", "linear", 2), HeadSpec("new", "linear", 7)])
    assert list(m.heads) == ["contrast", "new"]
    assert torch.equal(m.heads["contrast"].weight, contrast)  # same spec: weights kept
    assert [h["name"] for h in old_cfg.heads] == ["mlm", "contrast", "match", "answers"]
    assert [h["name"] for h in m.config.heads] == ["contrast", "new"]
    m.with_heads([HeadSpec("contrast", "linear", 2)], keep=False)
    assert not torch.equal(m.heads["contrast"].weight, contrast)


def test_v1_checkpoint_loads_through_the_key_map() -> None:
    """A VQA checkpoint written by vlp 0.2 (schema 1: `vqa_head.*`, fixed heads) loads, and
    gives the outputs it gave then."""
    from safetensors.torch import load_file

    from vlp_cli.checkpoint import load_checkpoint

    m, tok, meta = load_checkpoint(FIXTURES / "checkpoint-v1-vqa")
    m.eval()
    assert list(m.heads) == ["mlm", "contrast", "vqa", "retrieval"]
    saved = load_file(str(FIXTURES / "checkpoint-v1-vqa-expected.safetensors"))
    inputs = {k[6:]: v for k, v in saved.items() if k.startswith("input/")}
    with torch.no_grad():
        h = m(**inputs)
        assert torch.allclose(m.cls_logits("vqa", h), saved["expected/vqa"], atol=1e-6)
        assert torch.allclose(m.cls_logits("retrieval", h), saved["expected/match"], atol=1e-6)
        assert torch.allclose(m.cls_logits("contrast", h), saved["expected/contrast"],
                              atol=1e-6)
    from vlp_cli.tasks import TASKS

    assert TASKS["vqa"].state_from_meta(meta) == {"answers": ["yes", "no", "red"]}


def test_padding_is_invisible() -> None:
    m = tiny_model()
    x = batch()
    h = m(**x)
    y = dict(x)
    y["input_ids"] = x["input_ids"].clone()
    y["input_ids"][1, 5] = 7  # a padded text position
    y["img_feats"] = x["img_feats"].clone()
    y["img_feats"][0, 2] += 10  # a padded region
    h2 = m(**y)
    assert torch.allclose(h[1, :4], h2[1, :4], atol=1e-5)
    assert torch.allclose(h[0, :8], h2[0, :8], atol=1e-5)


def test_caption_mask_is_causal_over_caption_and_tags_never_see_it() -> None:
    m = tiny_model()
    x = batch(b=1, t=6, r=2)
    x["text_mask"][:] = True
    x["img_mask"][:] = True
    a_len = 4  # caption segment = positions 0..3, then tags 4..5, then 2 regions
    attn = caption_attention(a_len, 6, 2, 1)
    h = m(**x, attn_mask=attn)
    y = dict(x)
    y["input_ids"] = x["input_ids"].clone()
    y["input_ids"][0, 3] = (x["input_ids"][0, 3] + 1) % VOCAB  # change the last caption token
    h2 = m(**y, attn_mask=attn)
    assert torch.allclose(h[0, :3], h2[0, :3], atol=1e-5)  # earlier caption tokens unchanged
    assert torch.allclose(h[0, 4:], h2[0, 4:], atol=1e-5)  # tags and regions unchanged
    assert not torch.allclose(h[0, 3], h2[0, 3])


def test_mlm_decoder_is_tied_to_word_embeddings() -> None:
    m = tiny_model().train()
    x = batch()
    h = m(**x)
    where = torch.zeros(2, 6, dtype=torch.bool)
    where[0, 0] = True
    m.mlm_logits(h[:, :6], where, "mlm").sum().backward()
    assert m.bert.embeddings.word_embeddings.weight.grad is not None
    names = {n for n, _ in m.named_parameters()}
    assert not any("decoder" in n for n in names)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    from vlp_cli.checkpoint import describe, load_checkpoint, load_tokenizer, save_checkpoint

    m = tiny_model(num_answers=4)
    tok = load_tokenizer("embedded:minilm")
    save_checkpoint(tmp_path / "ck", m, tok, {"task": "vqa", "step": 3,
                                              "tasks": {"vqa": {"answers": list("abcd")}}})
    m2, tok2, meta = load_checkpoint(tmp_path / "ck")
    m2.eval()
    x = batch()
    assert torch.allclose(m(**x), m2(**x), atol=1e-6)
    assert meta["task"] == "vqa" and meta["step"] == 3 and "vlp_version" in meta
    assert len(tok2) == len(tok)
    info = describe(tmp_path / "ck")
    assert info["parameters"] == sum(p.numel() for p in m.parameters())
    assert [h["name"] for h in info["heads"]] == ["mlm", "contrast", "match", "answers"]
    assert info["tasks"] == ["vqa"]


def test_from_embedded_text_encoder_loads_weights() -> None:
    from transformers import BertModel

    from vlp_cli.assets import text_encoder_dir

    heads = [HeadSpec("mlm", "masked_tokens", init="bert_mlm"),
             HeadSpec("contrast", "linear", 2, init="bert_nsp")]
    m = VLPModel.from_text_encoder(str(text_encoder_dir()), 16, heads)
    ref = BertModel.from_pretrained(str(text_encoder_dir()), add_pooling_layer=True)
    w = m.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(w, ref.encoder.layer[0].attention.self.query.weight)
    # MiniLM ships no MLM or NSP head: they start fresh and the checkpoint says so.
    assert {"heads.mlm", "heads.contrast", "img_embed"} <= set(m.config.fresh_weights)
    assert m.bert_config.hidden_size == 384


def test_random_tiny_needs_vocab() -> None:
    with pytest.raises(ValueError):
        VLPModel.from_text_encoder("random:tiny", 16, [])


def test_a_fresh_head_depends_on_the_seed_and_its_name_only() -> None:
    """Fine-tuning results must not depend on which other heads a checkpoint holds."""
    a = [HeadSpec("mlm", "masked_tokens"), HeadSpec("answers", "mlp", 5)]
    b = [HeadSpec("answers", "mlp", 5)]
    m1 = VLPModel(ModelConfig(bert=tiny_bert(VOCAB), img_feat_dim=16,
                              heads=[h.to_dict() for h in a]), seed=3)
    m2 = VLPModel(ModelConfig(bert=tiny_bert(VOCAB), img_feat_dim=16,
                              heads=[h.to_dict() for h in b]), seed=3)
    for p, q in zip(m1.heads["answers"].parameters(), m2.heads["answers"].parameters()):
        assert torch.equal(p, q)
    state = torch.random.get_rng_state()
    m2.with_heads([HeadSpec("answers", "mlp", 5), HeadSpec("new", "linear", 2)], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator untouched
    m3 = tiny_model().with_heads([HeadSpec("new", "linear", 2)], seed=3)
    assert torch.equal(m2.heads["new"].weight, m3.heads["new"].weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padding_and_causal_masks_stay_finite_under_autocast(dtype: torch.dtype) -> None:
    """The additive mask is finfo(float32).min, -inf once cast to fp16: harmless because no
    query row is ever wholly masked (every query sees [CLS]), so padded words, padded regions
    and captioning's causal words stay finite. The CPU's autocast; not yet run on a GPU."""
    from vlp_cli.model import HeadSpec, VLPModel

    torch.manual_seed(0)
    model = VLPModel.from_text_encoder("random:tiny", 16, [HeadSpec("itm", "linear", 2)],
                                       vocab_size=100).eval()
    b, t, r = 3, 7, 5
    ids = torch.randint(0, 100, (b, t))
    text_mask = torch.ones(b, t, dtype=torch.bool)
    text_mask[0, 4:] = False
    img_mask = torch.ones(b, r, dtype=torch.bool)
    img_mask[1, 2:] = False
    attn = torch.ones(b, t + r, t + r, dtype=torch.bool)
    attn[:, :t, :t] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    args = (ids, torch.zeros_like(ids), text_mask, torch.randn(b, r, 16), torch.rand(b, r, 7),
            img_mask)
    plain = model(*args)
    with torch.autocast("cpu", dtype=dtype):
        full, causal = model(*args), model(*args, attn)
    assert torch.isfinite(full).all() and torch.isfinite(causal).all()
    keep = torch.cat([text_mask, img_mask], 1)
    assert (full - plain)[keep].abs().max() < 0.1  # the same function, at lower precision


def test_fourier_positions_tell_a_box_from_its_double_and_survive_a_checkpoint(
        tmp_path: Path) -> None:
    from vlp_cli.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
    from vlp_cli.model import ImageEmbeddings, fourier_positions

    p = torch.tensor([[0.2, 0.2, 0.4, 0.4, 0.2, 0.2, 0.04]])
    f = fourier_positions(p, 3)
    assert f.shape == (1, 7 * 7) and torch.equal(f[:, :7], p)
    assert torch.allclose(f[0, 7 + 3 * 2 + 1], torch.sin(torch.pi * 2 * p[0, 2]))  # x2, 2 pi
    assert torch.equal(fourier_positions(p, 0), p)
    feats = torch.zeros(2, 1, 5)
    pos = torch.stack([p, 2 * p])  # the same box shape, twice the size, further out
    type_emb = torch.zeros(2, 1, 8)

    def embedded(octaves: int) -> torch.Tensor:
        torch.manual_seed(0)
        e = ImageEmbeddings(5, 7, 8, 0.0, 1e-12, octaves).eval()
        nn_init = torch.nn.init
        nn_init.normal_(e.pos_linear.weight, std=0.02)
        nn_init.zeros_(e.pos_linear.bias)
        return e(feats, pos, type_emb)[:, 0]

    plain, fourier = embedded(0), embedded(4)
    # UNITER's LN(Linear(p)) with its bias at zero: p and 2p embed alike
    assert torch.allclose(plain[0], plain[1], atol=1e-4)
    assert (fourier[0] - fourier[1]).norm() > 0.5 * fourier[0].norm()

    torch.manual_seed(0)
    cfg = ModelConfig(bert=tiny_bert(VOCAB), img_feat_dim=16, pos_dim=7, pos_fourier=2)
    m = VLPModel(cfg).eval()
    assert m.img_embed.pos_linear.in_features == 7 * 5
    save_checkpoint(tmp_path / "ck", m, load_tokenizer("embedded:minilm"), {"task": "pretrain"})
    m2 = load_checkpoint(tmp_path / "ck")[0].eval()
    assert m2.config.pos_fourier == 2
    x = batch()
    assert torch.allclose(m(**x), m2(**x), atol=1e-6)
