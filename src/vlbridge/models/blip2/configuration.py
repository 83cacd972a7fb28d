"""BLIP-2's configs: the Q-Former and the whole model."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlbridge.core.config import LMConfig, VisionConfig

HARD_NEGATIVES = ("exclude_positives", "lavis")  # Blip2Config.hard_negatives


@dataclass
class QFormerConfig:
    """BERT-style Q-Former. Defaults are BLIP-2's (BERT-base, 32 queries, cross-attention every 2nd layer)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # width of the image features; set from the vision backbone
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    # The text side (word/position embeddings, text FFNs) reads captions in stage 1 and, with
    # Blip2Config.qformer_question, questions in stage 2; without that, stage 2 drops it.
    text_branch: bool = True
    # The stage-1 heads (ITG here; ITC projections, temperature and ITM head in Blip2): stage 2 drops them.
    pretrain_heads: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC]: replaces [CLS] as the first token for image-grounded generation


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: LMConfig | None = None  # None: a stage-1 model (no LLM)
    qformer_tokenizer: str = ""  # BERT tokenizer (+ [DEC]) for the Q-Former's text side
    embed_dim: int = 256  # ITC embedding width
    init_temperature: float = 0.07
    label_smoothing: float = 0.1  # ITC and ITG, as in LAVIS
    max_text_length: int = 32  # Q-Former text tokens in stage 1
    # transformers' newer BLIP-2 layout: the LM prompt holds num_query_tokens copies of this token
    # and the projected queries are written there. None: queries are prepended to the text.
    image_token_id: int | None = None
    caption_prompt: str = "a photo of"
    vqa_prompt: str = "Question: {} Answer:"
    # Stage 2: the Q-Former also reads the question (its tokens share self-attention with the queries,
    # bidirectionally), so the queries can pick what the question asks about; BLIP-2's VQA fine-tuning
    # (paper section 4.3). Captions (no question) run the queries alone, as without it.
    qformer_question: bool = False
    # With qformer_question: the Q-Former reads the LM prompt itself (InstructBLIP's instruction) rather
    # than the bare question.
    qformer_reads_prompt: bool = False
    # eps of ln_vision (the trainable LayerNorm on the frozen encoder's output). None: the tower's own
    # eps when the tower is BLIP-2's (transformers' post_layernorm), else 1e-5 (nn.LayerNorm's, LAVIS').
    ln_vision_eps: float | None = None
    # Stage-1 training numerics (pretraining.py). The defaults are vlbridge's choices; the alternatives
    # reproduce LAVIS 1.0.2's BLIP-2 (Blip2Qformer.forward) exactly, e.g. to continue a LAVIS run.
    # True: the learned ITC temperature is clamped to [0.001, 0.5] (BLIP-1 / ALBEF's guard against a
    # collapsing temperature). False: used as learned, as LAVIS' BLIP-2 does.
    itc_temperature_clamp: bool = True
    # How ITM hard negatives are drawn from ITC's softmax, one per text and one per image:
    # "exclude_positives": every pair showing the same image (image_ids: several captions of one image)
    #     has weight 0, so a positive is never labelled no-match; a row with nothing else to draw is
    #     left out instead of giving NaN weights.
    # "lavis": LAVIS 1.0.2's rule: softmax + 1e-4, only the row's own pair set to 0, one multinomial
    #     draw per row (the same draws as LAVIS under the same RNG state). Another caption of the
    #     same image can then be drawn as a negative.
    hard_negatives: str = "exclude_positives"

    def __post_init__(self):
        if self.hard_negatives not in HARD_NEGATIVES:
            raise ValueError(f"hard_negatives {self.hard_negatives!r}: expected one of {HARD_NEGATIVES}")
