"""Backbones shipped with vlbridge (transformers' own format), pre-trained on ShapesWorld by
scripts/pretrain_backbones.py: shapesworld/vision (tiny CLIP), shapesworld/lm (tiny causal LM),
shapesworld/qformer_tokenizer (BERT-style WordPiece + [DEC])."""

from pathlib import Path

SHAPESWORLD = Path(__file__).parent / "shapesworld"
