from pathlib import Path

import pytest
import torch

from vlp_cli.data.datasets import caption_attention
from vlp_cli.model import ModelConfig, VLPModel, tiny_bert

VOCAB = 99


def tiny_model(num_answers: int = 0, n_contrast: int = 2) -> VLPModel:
    torch.manual_seed(0)
    cfg = ModelConfig(bert=tiny_bert(VOCAB), img_feat_dim=16, pos_dim=7,
                      num_contrast_classes=n_contrast, num_answers=num_answers)
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
    assert m.mlm_logits(h[:, :6], where).shape == (2, VOCAB)
    assert m.contrast_logits(h).shape == (2, 3)
    assert m.match_logits(h).shape == (2, 2)
    assert m.vqa_logits(h).shape == (2, 5)


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
    m.mlm_logits(h[:, :6], where).sum().backward()
    assert m.bert.embeddings.word_embeddings.weight.grad is not None
    names = {n for n, _ in m.named_parameters()}
    assert not any("decoder" in n for n in names)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    from vlp_cli.checkpoint import describe, load_checkpoint, load_tokenizer, save_checkpoint

    m = tiny_model(num_answers=4)
    tok = load_tokenizer("embedded:minilm")
    save_checkpoint(tmp_path / "ck", m, tok, {"task": "vqa", "step": 3, "answers": list("abcd")})
    m2, tok2, meta = load_checkpoint(tmp_path / "ck")
    m2.eval()
    x = batch()
    assert torch.allclose(m(**x), m2(**x), atol=1e-6)
    assert meta["task"] == "vqa" and meta["step"] == 3 and "vlp_version" in meta
    assert len(tok2) == len(tok)
    info = describe(tmp_path / "ck")
    assert info["parameters"] == sum(p.numel() for p in m.parameters())
    assert info["num_answers"] == 4


def test_from_embedded_text_encoder_loads_weights() -> None:
    from transformers import BertModel

    from vlp_cli.assets import text_encoder_dir

    m = VLPModel.from_text_encoder(str(text_encoder_dir()), img_feat_dim=16)
    ref = BertModel.from_pretrained(str(text_encoder_dir()), add_pooling_layer=True)
    w = m.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(w, ref.encoder.layer[0].attention.self.query.weight)
    # MiniLM ships no MLM or NSP head: they start fresh and the checkpoint says so.
    assert {"mlm_head", "contrast_head", "img_embed"} <= set(m.config.fresh_weights)
    assert m.bert_config.hidden_size == 384


def test_random_tiny_needs_vocab() -> None:
    with pytest.raises(ValueError):
        VLPModel.from_text_encoder("random:tiny", 16)
