"""The vlp model: one single-stream BERT encoder over words, object tags and image regions.

Input sequence (Oscar's word-tag-region triple):

    [CLS] w_1 .. w_n [SEP] q_1 .. q_m [SEP] | v_1 .. v_R
    type 0 ......... type 1 ............... | image embedding (type 1 added, UNITER's way)

Text goes through BERT's own embeddings. Each region is embedded in UNITER's form:
LN(Linear(feature)) + LN(Linear(position)) + type embedding, then LN and dropout. The joint
sequence runs through BERT's encoder with an explicit [B, L, L] attention mask, so captioning
can make caption tokens causal while tags and regions stay bidirectional (Oscar's seq2seq mask).

Heads: masked tokens (tied to the word embeddings), Oscar's contrastive head on the pooled
[CLS] (2-way polluted tags; 3-way for Oscar+), a matched/unmatched head for retrieval, and a
VQA classifier. The encoder is the public `transformers.BertModel`: any Hugging Face BERT
checkpoint initialises it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; written to config.json in every checkpoint."""

    bert: dict[str, Any]  # transformers.BertConfig as a dict
    img_feat_dim: int  # region feature size of the feature store
    pos_dim: int = 7  # 7 = UNITER's position (box, w, h, area); 6 = Oscar's
    img_dropout: float = 0.1
    num_contrast_classes: int = 2  # Oscar: matched / polluted tags; Oscar+: 3
    num_answers: int = 0  # VQA answer vocabulary (0: no VQA head)
    vqa_classifier: str = "mlp"  # "mlp" (UNITER: 2H, GELU, LN) or "linear" (Oscar's default)
    fresh_weights: list[str] = field(default_factory=list)  # heads not loaded from `init`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tiny_bert(vocab_size: int) -> dict[str, Any]:
    """A BERT small enough for unit tests (transformers' BertModelTester sizes)."""
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, max_position_embeddings=512,
                type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


class ImageEmbeddings(nn.Module):
    """UNITER's region embedding: features and positions each through Linear + LayerNorm."""

    def __init__(self, feat_dim: int, pos_dim: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.feat_linear = nn.Linear(feat_dim, hidden)
        self.feat_norm = nn.LayerNorm(hidden, eps=eps)
        self.pos_linear = nn.Linear(pos_dim, hidden)
        self.pos_norm = nn.LayerNorm(hidden, eps=eps)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor,
                type_emb: torch.Tensor) -> torch.Tensor:
        # feats [B, R, F], pos [B, R, P], type_emb [B, R, H] -> [B, R, H]
        x = self.feat_norm(self.feat_linear(feats)) + self.pos_norm(self.pos_linear(pos))
        return self.dropout(self.norm(x + type_emb))


class MaskedTokenHead(nn.Module):
    """BERT's MLM head; the decoder weight is the word-embedding matrix (tied)."""

    def __init__(self, hidden: int, vocab: int, act: str, eps: float):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(hidden, hidden)
        self.act = ACT2FN[act]
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # h [M, H] -> logits [M, V]
        h = self.norm(self.act(self.dense(h)))
        return h @ word_embeddings.t() + self.bias


class VLPModel(nn.Module):
    """Single-stream vision-language encoder with Oscar/UNITER heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        bc = BertConfig(**config.bert)
        self.bert_config = bc
        h = bc.hidden_size
        self.bert = BertModel(bc, add_pooling_layer=True)
        self.img_embed = ImageEmbeddings(config.img_feat_dim, config.pos_dim, h,
                                         config.img_dropout, bc.layer_norm_eps)
        self.mlm_head = MaskedTokenHead(h, bc.vocab_size, bc.hidden_act, bc.layer_norm_eps)
        self.dropout = nn.Dropout(bc.hidden_dropout_prob)
        self.contrast_head = nn.Linear(h, config.num_contrast_classes)
        self.match_head = nn.Linear(h, 2)
        self.vqa_head: nn.Module | None = None
        if config.num_answers > 0:
            if config.vqa_classifier == "linear":
                self.vqa_head = nn.Linear(h, config.num_answers)
            else:
                self.vqa_head = nn.Sequential(
                    nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=bc.layer_norm_eps),
                    nn.Linear(2 * h, config.num_answers),
                )
        for module in (self.img_embed, self.mlm_head, self.contrast_head, self.match_head,
                       self.vqa_head):
            if module is not None:
                module.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.bert_config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- encoder -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        token_type_ids: torch.Tensor,  # [B, T]
        text_mask: torch.Tensor,  # [B, T] bool
        img_feats: torch.Tensor,  # [B, R, F]
        img_pos: torch.Tensor,  # [B, R, P]
        img_mask: torch.Tensor,  # [B, R] bool
        attn_mask: torch.Tensor | None = None,  # [B, L, L] bool (query, key); None = full
        position_ids: torch.Tensor | None = None,  # [B, T]
    ) -> torch.Tensor:
        """Contextual states of the joint sequence, [B, T + R, H]."""
        text = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                    position_ids=position_ids)  # [B, T, H]
        img_type = self.bert.embeddings.token_type_embeddings(
            torch.ones_like(img_mask, dtype=torch.long))  # [B, R, H]
        img = self.img_embed(img_feats.to(text.dtype), img_pos.to(text.dtype), img_type)
        x = torch.cat([text, img], dim=1)  # [B, L, H]
        keys = torch.cat([text_mask, img_mask], dim=1).bool()  # [B, L]
        allowed = keys[:, None, :] if attn_mask is None else attn_mask & keys[:, None, :]
        # An additive float mask works for every attention implementation (eager adds it,
        # sdpa accepts it); a fully blocked row (padding queries) stays finite, not NaN.
        additive = (~allowed).to(x.dtype)[:, None] * torch.finfo(x.dtype).min  # [B, 1, L|1, L]
        return self.bert.encoder(x, attention_mask=additive).last_hidden_state

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler (dense + tanh) over [CLS], then dropout: [B, H]."""
        return self.dropout(self.bert.pooler(hidden))

    # -- heads ---------------------------------------------------------------------------------

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at the masked positions only ([B, L] bool) -> [M, V]."""
        return self.mlm_head(hidden[positions], self.bert.embeddings.word_embeddings.weight)

    def contrast_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.contrast_head(self.pooled(hidden))  # [B, num_contrast_classes]

    def match_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.match_head(self.pooled(hidden))  # [B, 2]

    def vqa_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.vqa_head is None:
            raise RuntimeError("this model has no VQA head (num_answers=0)")
        return self.vqa_head(self.pooled(hidden))  # [B, num_answers]

    def set_vqa_head(self, num_answers: int, classifier: str) -> None:
        """Add (or replace) a freshly initialised VQA classifier, e.g. when fine-tuning."""
        self.config.num_answers = num_answers
        self.config.vqa_classifier = classifier
        h = self.bert_config.hidden_size
        if classifier == "linear":
            head: nn.Module = nn.Linear(h, num_answers)
        else:
            head = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(),
                                 nn.LayerNorm(2 * h, eps=self.bert_config.layer_norm_eps),
                                 nn.Linear(2 * h, num_answers))
        head.apply(self._init_weights)
        self.vqa_head = head

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_text_encoder(cls, name: str, img_feat_dim: int, *, pos_dim: int = 7,
                          img_dropout: float = 0.1, num_contrast_classes: int = 2,
                          vocab_size: int | None = None) -> VLPModel:
        """Start from a Hugging Face BERT checkpoint (a directory or hub id).

        `random:tiny` builds a tiny random BERT instead (tests); it needs `vocab_size`.
        Heads the checkpoint lacks (e.g. MiniLM has no MLM head) start fresh and are listed
        in `config.fresh_weights`.
        """
        if name == "random:tiny":
            if vocab_size is None:
                raise ValueError("random:tiny needs vocab_size")
            cfg = ModelConfig(bert=tiny_bert(vocab_size), img_feat_dim=img_feat_dim,
                              pos_dim=pos_dim, img_dropout=img_dropout,
                              num_contrast_classes=num_contrast_classes,
                              fresh_weights=["all"])
            return cls(cfg)

        from transformers import BertForPreTraining

        pt, info = BertForPreTraining.from_pretrained(name, output_loading_info=True)
        missing = set(info.get("missing_keys", []))
        cfg = ModelConfig(bert=pt.config.to_dict(), img_feat_dim=img_feat_dim, pos_dim=pos_dim,
                          img_dropout=img_dropout, num_contrast_classes=num_contrast_classes)
        for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype",
                  "dtype", "id2label", "label2id"):
            cfg.bert.pop(k, None)
        model = cls(cfg)
        model.bert.load_state_dict(pt.bert.state_dict())
        fresh = ["img_embed", "match_head"]
        if any(k.startswith("cls.predictions.transform") for k in missing):
            fresh.append("mlm_head")
        else:
            t = pt.cls.predictions.transform
            model.mlm_head.dense.load_state_dict(t.dense.state_dict())
            model.mlm_head.norm.load_state_dict(t.LayerNorm.state_dict())
            model.mlm_head.bias.data.copy_(pt.cls.predictions.decoder.bias.data)
        if num_contrast_classes == 2 and not any("seq_relationship" in k for k in missing):
            # BERT's next-sentence head is a natural start for Oscar's binary contrastive head.
            model.contrast_head.load_state_dict(pt.cls.seq_relationship.state_dict())
        else:
            fresh.append("contrast_head")
        if any(k.startswith("bert.pooler") for k in missing):
            fresh.append("pooler")
        model.config.fresh_weights = fresh
        logger.info("initialised from %s; fresh: %s", name, ", ".join(fresh))
        return model
