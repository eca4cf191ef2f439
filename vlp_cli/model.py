"""The vlp model: one single-stream BERT encoder over words, object tags and image regions.

Input sequence (Oscar's word-tag-region triple):

    [CLS] w_1 .. w_n [SEP] q_1 .. q_m [SEP] | v_1 .. v_R
    type 0 ......... type 1 ............... | image embedding (type 1 added, UNITER's way)

Text goes through BERT's own embeddings. Each region is embedded in UNITER's form,
LN(Linear(feature)) + LN(Linear(position)) + type embedding, then LN and dropout; or in Oscar's,
LN(Linear([feature, 6 position numbers])) and dropout, without a type embedding
(`image_embedder`), so that either family's released weights have a place to load into. The joint
sequence runs through BERT's encoder with an explicit [B, L, L] attention mask, so captioning
can make caption tokens causal while tags and regions stay bidirectional (Oscar's seq2seq mask).

Heads live in one `ModuleDict`, built from the `HeadSpec`s that the tasks declare (tasks/):
masked tokens (tied to the word embeddings) and classifiers on the pooled [CLS]. A checkpoint
holds exactly the heads its tasks need, and config.json lists them. The encoder is the public
`transformers.BertModel`: any Hugging Face BERT checkpoint initialises it.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from vlp_cli.decoding import KVCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSpec:
    """One head, as a task declares it.

    kind: "masked_tokens" (BERT's MLM head over the joint sequence, decoder tied to the word
        embeddings), "linear" (Linear(H, size) on the pooled [CLS]), "mlp" (UNITER's
        classifier: Linear(H, 2H), GELU, LayerNorm, Linear(2H, size)); on region states,
        "regions" (UNITER's region classifier: Linear(H, H), GELU, LayerNorm, Linear(H, size))
        or "features" (UNITER's feature regression: Linear(H, H), GELU, LayerNorm, then the
        image embedding's feature Linear transposed (tied) plus a bias of `size` features);
        on two sequences at once (NLVR2's paired settings), "pair" (Linear(2H, size) on the
        two pooled [CLS] side by side) or "pair_attn" (`PairAttnHead`).
    init: where a pre-trained text encoder may fill it from: "bert_mlm" (BERT's MLM head) or
        "bert_nsp" (BERT's next-sentence head, a 2-way classifier); "" = fresh.
    """

    name: str
    kind: Literal["masked_tokens", "linear", "mlp", "regions", "features", "pair",
                  "pair_attn"]
    size: int = 0
    init: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; written to config.json in every checkpoint."""

    bert: dict[str, Any]  # transformers.BertConfig as a dict
    img_feat_dim: int  # region feature size of the feature store
    pos_dim: int = 7  # 7 = UNITER's position (box, w, h, area); 6 = Oscar's
    img_dropout: float = 0.1
    heads: list[dict[str, Any]] = field(default_factory=list)  # HeadSpec dicts, in order
    image_embedder: str = "uniter"  # "uniter" or "oscar" (see the module docstring)
    # Sine and cosine of each position number at this many octaves, beside the numbers
    # themselves (`fourier_positions`); 0: the numbers alone, as UNITER and Oscar feed them.
    pos_fourier: int = 0
    fresh_weights: list[str] = field(default_factory=list)  # parts not loaded from `init`
    schema: int = 2  # 2: heads listed; 1 (vlp <= 0.2): fixed head attributes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def head_specs(self) -> list[HeadSpec]:
        return [HeadSpec(**h) for h in self.heads]


def tiny_bert(vocab_size: int) -> dict[str, Any]:  # presets: `model.init: random:NAME`
    """A BERT small enough for unit tests (transformers' BertModelTester sizes)."""
    return dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=37, max_position_embeddings=512,
                type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def base_bert(vocab_size: int) -> dict[str, Any]:
    """BERT-base / UNITER-base / Oscar-B: L=12, H=768, A=12 (86M parameters in the encoder)."""
    return dict(vocab_size=vocab_size, hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def large_bert(vocab_size: int) -> dict[str, Any]:
    """BERT-large / UNITER-large / Oscar-L: L=24, H=1024, A=16 (303M parameters)."""
    return dict(vocab_size=vocab_size, hidden_size=1024, num_hidden_layers=24,
                num_attention_heads=16, intermediate_size=4096, max_position_embeddings=512,
                type_vocab_size=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


PRESETS = {"tiny": tiny_bert, "base": base_bert, "large": large_bert}


def fourier_positions(pos: torch.Tensor, octaves: int) -> torch.Tensor:
    """[..., P] -> [..., P * (1 + 2 * octaves)]: the numbers, then sin and cos of pi 2^k x.

    UNITER's LN(Linear(7 numbers)) is blind to a box's scale (its bias stays near zero, and
    LN(W p) = LN(W 2p)); sines and cosines are not linear in the numbers, so size and place
    each turn the embedding (README, "Where the box is")."""
    if octaves <= 0:
        return pos
    freqs = torch.pi * 2.0 ** torch.arange(octaves, dtype=pos.dtype, device=pos.device)
    x = pos[..., None] * freqs  # [..., P, K]
    return torch.cat([pos, torch.sin(x).flatten(-2), torch.cos(x).flatten(-2)], -1)


class ImageEmbeddings(nn.Module):
    """UNITER's region embedding: features and positions each through Linear + LayerNorm."""

    def __init__(self, feat_dim: int, pos_dim: int, hidden: int, dropout: float, eps: float,
                 pos_fourier: int = 0):
        super().__init__()
        self.pos_fourier = pos_fourier
        self.feat_linear = nn.Linear(feat_dim, hidden)
        self.feat_norm = nn.LayerNorm(hidden, eps=eps)
        self.pos_linear = nn.Linear(pos_dim * (1 + 2 * pos_fourier), hidden)
        self.pos_norm = nn.LayerNorm(hidden, eps=eps)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor,
                type_emb: torch.Tensor) -> torch.Tensor:
        # feats [B, R, F], pos [B, R, P], type_emb [B, R, H] -> [B, R, H]
        pos = fourier_positions(pos, self.pos_fourier)
        x = self.feat_norm(self.feat_linear(feats)) + self.pos_norm(self.pos_linear(pos))
        return self.dropout(self.norm(x + type_emb))

    def feature_weight(self) -> torch.Tensor:
        return self.feat_linear.weight  # [H, F]


class OscarImageEmbeddings(nn.Module):
    """Oscar's region embedding: one Linear over [features, 6 position numbers], LayerNorm
    (VinVL's `use_img_layernorm`), dropout; regions get no type embedding."""

    def __init__(self, feat_dim: int, pos_dim: int, hidden: int, dropout: float, eps: float,
                 pos_fourier: int = 0):
        super().__init__()
        self.feat_dim, self.pos_fourier = feat_dim, pos_fourier
        self.linear = nn.Linear(feat_dim + pos_dim * (1 + 2 * pos_fourier), hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor,
                type_emb: torch.Tensor) -> torch.Tensor:
        # feats [B, R, F], pos [B, R, P] -> [B, R, H]; type_emb unused (Oscar has none)
        pos = fourier_positions(pos, self.pos_fourier)
        return self.dropout(self.norm(self.linear(torch.cat([feats, pos], -1))))

    def feature_weight(self) -> torch.Tensor:
        return self.linear.weight[:, : self.feat_dim]  # [H, F]


class MaskedTokenHead(nn.Module):
    """BERT's MLM head; the decoder weight is the word-embedding matrix (tied). With the image
    embedding's feature Linear in its place it is UNITER's feature regression (MRFR)."""

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


class PairAttnHead(nn.Module):
    """UNITER's NLVR2 "paired-attn" head over the states of two sequences (the statement with
    each image): each side attends to the other (one multi-head attention per direction), each
    position fuses its state with what it read (Linear(2H, H), GELU, dropout), an attention
    pool (a GELU score per position, softmax over the valid ones) sums each side, and
    Linear(2H, size) classifies the two sums side by side."""

    def __init__(self, hidden: int, heads: int, dropout: float, size: int):
        super().__init__()
        self.left_to_right = nn.MultiheadAttention(hidden, heads, dropout=dropout,
                                                   batch_first=True)
        self.right_to_left = nn.MultiheadAttention(hidden, heads, dropout=dropout,
                                                   batch_first=True)
        self.fuse = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Dropout(dropout))
        self.pool_score = nn.Sequential(nn.Linear(hidden, 1), nn.GELU())
        self.pool_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, size)

    def pool(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        score = self.pool_score(x).squeeze(-1).float().masked_fill(~valid, -1e4)
        weight = self.pool_dropout(score.softmax(-1)).to(x.dtype)  # [B, L]
        return (weight.unsqueeze(1) @ x).squeeze(1)  # [B, H]

    def forward(self, left: torch.Tensor, right: torch.Tensor, left_valid: torch.Tensor,
                right_valid: torch.Tensor) -> torch.Tensor:
        # left, right [B, L, H]; *_valid [B, L] bool -> [B, size]
        l2r, _ = self.left_to_right(left, right, right, key_padding_mask=~right_valid,
                                    need_weights=False)
        r2l, _ = self.right_to_left(right, left, left, key_padding_mask=~left_valid,
                                    need_weights=False)
        left = self.fuse(torch.cat([l2r, left], -1))
        right = self.fuse(torch.cat([r2l, right], -1))
        return self.out(torch.cat([self.pool(left, left_valid), self.pool(right, right_valid)],
                                  -1))


def build_head(spec: HeadSpec, bc: Any) -> nn.Module:
    """The module of one head spec (weights as `_init_weights` leaves them)."""
    h = bc.hidden_size
    if spec.kind == "masked_tokens":
        return MaskedTokenHead(h, bc.vocab_size, bc.hidden_act, bc.layer_norm_eps)
    if spec.kind == "linear":
        return nn.Linear(h, spec.size)
    if spec.kind == "mlp":
        return nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(),
                             nn.LayerNorm(2 * h, eps=bc.layer_norm_eps), nn.Linear(2 * h, spec.size))
    if spec.kind == "regions":
        return nn.Sequential(nn.Linear(h, h), nn.GELU(),
                             nn.LayerNorm(h, eps=bc.layer_norm_eps), nn.Linear(h, spec.size))
    if spec.kind == "features":  # UNITER's MRFR head uses GELU whatever BERT's activation
        return MaskedTokenHead(h, spec.size, "gelu", bc.layer_norm_eps)
    if spec.kind == "pair":
        return nn.Linear(2 * h, spec.size)
    if spec.kind == "pair_attn":
        return PairAttnHead(h, bc.num_attention_heads, bc.hidden_dropout_prob, spec.size)
    raise ValueError(f"unknown head kind {spec.kind!r}")


def head_seed(seed: int, name: str) -> int:
    """The seed a fresh head of this name starts from under a recipe seed."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


class VLPModel(nn.Module):
    """Single-stream vision-language encoder with the heads its tasks declare."""

    def __init__(self, config: ModelConfig, seed: int | None = None):
        """Build the model; with `seed`, each head starts from its own generator seeded by
        (seed, head name), so its initial weights do not depend on the other heads."""
        super().__init__()
        from transformers import BertConfig, BertModel

        self.config = config
        bc = BertConfig(**config.bert)
        self.bert_config = bc
        h = bc.hidden_size
        self.bert = BertModel(bc, add_pooling_layer=True)
        embedder = {"uniter": ImageEmbeddings, "oscar": OscarImageEmbeddings}[
            config.image_embedder]
        self.img_embed = embedder(config.img_feat_dim, config.pos_dim, h, config.img_dropout,
                                  bc.layer_norm_eps, config.pos_fourier)
        self.dropout = nn.Dropout(bc.hidden_dropout_prob)
        self.heads = nn.ModuleDict()
        self.img_embed.apply(self._init_weights)
        for spec in config.head_specs():
            self.heads[spec.name] = self._fresh_head(spec, seed)

    def _fresh_head(self, spec: HeadSpec, seed: int | None) -> nn.Module:
        if seed is None:
            head = build_head(spec, self.bert_config)
            head.apply(self._init_weights)
            return head
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.manual_seed(head_seed(seed, spec.name))
            head = build_head(spec, self.bert_config)
            head.apply(self._init_weights)
        return head

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
        img_type_ids: torch.Tensor | None = None,  # [B, R]; None = 1 for every region
    ) -> torch.Tensor:
        """Contextual states of the joint sequence, [B, T + R, H]. Regions take token type 1,
        or `img_type_ids` (UNITER's NLVR2 triplet: 1 for the first image, 2 for the second,
        after `grow_type_vocab(3)`)."""
        text = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                    position_ids=position_ids)  # [B, T, H]
        img_type = self.bert.embeddings.token_type_embeddings(
            torch.ones_like(img_mask, dtype=torch.long) if img_type_ids is None
            else img_type_ids)  # [B, R, H]
        img = self.img_embed(img_feats.to(text.dtype), img_pos.to(text.dtype), img_type)
        x = torch.cat([text, img], dim=1)  # [B, L, H]
        keys = torch.cat([text_mask, img_mask], dim=1).bool()  # [B, L]
        allowed = keys[:, None, :] if attn_mask is None else attn_mask & keys[:, None, :]
        # An additive float mask works for every attention implementation (eager adds it,
        # sdpa accepts it); a fully blocked row (padding queries) stays finite, not NaN.
        additive = (~allowed).to(x.dtype)[:, None] * torch.finfo(x.dtype).min  # [B, 1, L|1, L]
        return self.bert.encoder(x, attention_mask=additive).last_hidden_state

    def extend(
        self,
        cache: KVCache,
        allowed: torch.Tensor,  # [B, Q, K] bool: query i may attend key j (K: cached + new)
        input_ids: torch.Tensor,  # [B, T]
        token_type_ids: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor,  # [B, T]
        img_feats: torch.Tensor | None = None,  # [B, R, F]
        img_pos: torch.Tensor | None = None,  # [B, R, P]
    ) -> torch.Tensor:
        """Contextual states of new positions (text, then regions) that attend to the keys and
        values in `cache` as well as to each other; their own keys and values join the cache.
        [B, T + R, H]. Key order does not matter to BERT (positions are in the embeddings), so
        a prefix encoded once (tags and regions, for captioning) is reused by every step."""
        x = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                 position_ids=position_ids)
        if img_feats is not None:
            img_type = self.bert.embeddings.token_type_embeddings(
                torch.ones(img_feats.shape[:2], dtype=torch.long, device=img_feats.device))
            x = torch.cat([x, self.img_embed(img_feats.to(x.dtype), img_pos.to(x.dtype),
                                             img_type)], dim=1)
        additive = (~allowed).to(x.dtype)[:, None] * torch.finfo(x.dtype).min  # [B, 1, Q, K]
        return self.bert.encoder(x, attention_mask=additive, cache=cache).last_hidden_state

    def enable_checkpointing(self) -> None:
        """Recompute each encoder layer's activations in the backward pass (non-reentrant:
        works with frozen parameters, keeps dropout's randomness)."""
        bert = self.bert
        # transformers renamed it (5.x); the old name warns that it goes in v6.
        enable = getattr(bert, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            bert.gradient_checkpointing_enable({"use_reentrant": False})

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler (dense + tanh) over [CLS], then dropout: [B, H]."""
        return self.dropout(self.bert.pooler(hidden))

    # -- heads ---------------------------------------------------------------------------------

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor,
                   head: str) -> torch.Tensor:
        """Vocabulary logits at the masked positions only ([B, L] bool) -> [M, V]."""
        return self.heads[head](hidden[positions], self.bert.embeddings.word_embeddings.weight)

    def region_outputs(self, head: str, hidden: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """A region head at the chosen regions only ([B, R] bool) -> [M, size]. A "features"
        head decodes through the image embedding's feature Linear (tied, as UNITER's MRFR)."""
        regions = hidden[:, hidden.shape[1] - positions.shape[1]:][positions]  # [M, H]
        if isinstance(self.heads[head], MaskedTokenHead):
            return self.heads[head](regions, self.img_embed.feature_weight().t())
        return self.heads[head](regions)

    def word_choice_logits(self, head: str, states: torch.Tensor, pieces: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
        """A masked-token head as a classifier over choices, states [B, H] -> [B, C]: each
        choice the mean of its pieces' output embeddings and biases (pieces, weights [C, K])."""
        m = self.heads[head]
        x = m.norm(m.act(m.dense(states)))
        emb = (self.bert.embeddings.word_embeddings.weight[pieces]
               * weights[..., None].to(x.dtype)).sum(1)  # [C, H]
        return x @ emb.t() + (m.bias[pieces] * weights.to(m.bias.dtype)).sum(1)

    def cls_logits(self, head: str, hidden: torch.Tensor) -> torch.Tensor:
        """A classifier head on the pooled [CLS]: [B, size]."""
        return self.heads[head](self.pooled(hidden))

    def pair_logits(self, head: str, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """A head over pairs of sequences, rows (2i, 2i + 1) the two of pair i (hidden
        [2B, L, H], valid [2B, L] bool): "pair" reads the two pooled [CLS], "pair_attn" every
        state. [B, size]."""
        b2, length, h = hidden.shape
        if isinstance(self.heads[head], PairAttnHead):
            x, v = hidden.view(b2 // 2, 2, length, h), valid.view(b2 // 2, 2, length)
            return self.heads[head](x[:, 0], x[:, 1], v[:, 0], v[:, 1])
        return self.heads[head](self.pooled(hidden).reshape(b2 // 2, 2 * h))

    def grow_type_vocab(self, n: int) -> VLPModel:
        """At least `n` token types, each new row a copy of type 1 (UNITER's NLVR2 triplet
        gives the second image type 2, starting from the image type); the config follows."""
        emb = self.bert.embeddings.token_type_embeddings
        have = emb.num_embeddings
        if have >= n:
            return self
        grown = nn.Embedding(n, emb.embedding_dim).to(emb.weight.device, emb.weight.dtype)
        with torch.no_grad():
            grown.weight[:have] = emb.weight
            grown.weight[have:] = emb.weight[min(1, have - 1)]
        self.bert.embeddings.token_type_embeddings = grown
        self.bert.config.type_vocab_size = n
        self.bert_config.type_vocab_size = n
        self.config = replace(self.config, bert={**self.config.bert, "type_vocab_size": n})
        return self

    def with_heads(self, specs: list[HeadSpec], keep: bool = True,
                   seed: int | None = None, always_keep: tuple[str, ...] = ()) -> VLPModel:
        """Keep exactly these heads: those here with the same spec keep their weights (unless
        `keep` is False; those in `always_keep` whatever it says), others start fresh (from
        (seed, name) with `seed`). The config is replaced, never changed in place."""
        have = {s.name: s for s in self.config.head_specs()}
        heads = nn.ModuleDict()
        for spec in specs:
            if (keep or spec.name in always_keep) and have.get(spec.name) == spec:
                heads[spec.name] = self.heads[spec.name]
            else:
                heads[spec.name] = self._fresh_head(spec, seed)
        self.heads = heads
        self.config = replace(self.config, heads=[s.to_dict() for s in specs])
        return self

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_text_encoder(cls, name: str, img_feat_dim: int, heads: list[HeadSpec], *,
                          pos_dim: int = 7, img_dropout: float = 0.1,
                          vocab_size: int | None = None, seed: int | None = None,
                          image_embedder: str = "uniter", pos_fourier: int = 0) -> VLPModel:
        """Start from a Hugging Face BERT checkpoint (a directory or hub id).

        `random:tiny` (tests), `random:base` and `random:large` build a random BERT of that
        preset's size instead; they need `vocab_size`.
        Heads with `init` are filled from BERT's own heads where the checkpoint has them (MiniLM
        has no MLM head); what starts fresh is listed in `config.fresh_weights`.
        """
        specs = [h.to_dict() for h in heads]
        if name.startswith("random:"):
            preset = PRESETS.get(name.split(":", 1)[1])
            if preset is None:
                from vlp_cli import VlpError

                raise VlpError(f"model.init {name!r}: no such preset; choose "
                               + ", ".join(f"random:{p}" for p in PRESETS))
            if vocab_size is None:
                raise ValueError(f"{name} needs vocab_size")
            return cls(ModelConfig(bert=preset(vocab_size), img_feat_dim=img_feat_dim,
                                   pos_dim=pos_dim, img_dropout=img_dropout, heads=specs,
                                   image_embedder=image_embedder, pos_fourier=pos_fourier,
                                   fresh_weights=["all"]), seed)

        from transformers import BertForPreTraining

        pt, info = BertForPreTraining.from_pretrained(name, output_loading_info=True)
        missing = set(info.get("missing_keys", []))
        cfg = ModelConfig(bert=pt.config.to_dict(), img_feat_dim=img_feat_dim, pos_dim=pos_dim,
                          img_dropout=img_dropout, heads=specs, image_embedder=image_embedder,
                          pos_fourier=pos_fourier)
        for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype",
                  "dtype", "id2label", "label2id"):
            cfg.bert.pop(k, None)
        model = cls(cfg, seed)
        model.bert.load_state_dict(pt.bert.state_dict())
        fresh = ["img_embed"]
        for spec in heads:
            head = model.heads[spec.name]
            if spec.init == "bert_mlm" and not any(
                    k.startswith("cls.predictions.transform") for k in missing):
                t = pt.cls.predictions.transform
                head.dense.load_state_dict(t.dense.state_dict())
                head.norm.load_state_dict(t.LayerNorm.state_dict())
                head.bias.data.copy_(pt.cls.predictions.decoder.bias.data)
            elif spec.init == "bert_nsp" and spec.size == 2 and not any(
                    "seq_relationship" in k for k in missing):
                # BERT's next-sentence head: a natural start for a binary [CLS] classifier.
                head.load_state_dict(pt.cls.seq_relationship.state_dict())
            else:
                fresh.append(f"heads.{spec.name}")
        if any(k.startswith("bert.pooler") for k in missing):
            fresh.append("pooler")
        model.config.fresh_weights = fresh
        logger.info("initialised from %s; fresh: %s", name, ", ".join(fresh))
        return model
