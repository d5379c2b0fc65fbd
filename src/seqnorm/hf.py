"""Hugging Face models built locally from their config classes: random weights
unless you load some, nothing downloaded. Used by the padding-safe tests, the
README's before/after table (``benchmarks/speech_models.py``) and ``seqnorm audit``.

``transformers`` is imported on first use (it is a test dependency, not a
dependency of seqnorm).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["SMALL_SPEECH", "SPEECH_MODELS", "SMALL_CONFIGS", "NO_DROPOUT", "build", "frames"]

#: dropout, LayerDrop and SpecAugment off: what differs between two runs is then padding alone
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  final_dropout=0.0, dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
                  conformer_conv_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

#: a speech model small enough for a test: hidden 32, 2 layers, a 3-layer conv feature encoder (stride 20)
SMALL_SPEECH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)

#: the speech models whose padding leak issue 11 fixes, each with the setting that has the leak
SPEECH_MODELS: Dict[str, dict] = {
    "wav2vec2": dict(feat_extract_norm="group"),            # GroupNorm over time, first conv layer
    "hubert": dict(conv_pos_batch_norm=True),                # BatchNorm before the positional conv
    "wav2vec2-conformer": dict(conv_depthwise_kernel_size=7),  # depthwise conv + BatchNorm per block
    "data2vec-audio": dict(num_conv_pos_embeddings=3, conv_pos_kernel_size=7),   # a positional conv stack
}


#: settings that make other audio models test-sized (the zoo's, ``benchmarks/zoo.py``)
SMALL_CONFIGS: Dict[str, dict] = {
    # NeMo FastConformer: Conv2d subsampling ×8 on (B, 1, T, F), BatchNorm1d in every conv module
    "parakeet_encoder": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             subsampling_conv_channels=16, num_mel_bins=32),
    # a LayerNorm over the relative-position table (no batch or time axis)
    "sew-d": dict(SMALL_SPEECH, squeeze_factor=2, max_position_embeddings=64, position_buckets=32),
}


def build(model_type: str, config: Optional[dict] = None, small: bool = True, seed: int = 0) -> nn.Module:
    """``AutoModel.from_config`` of ``model_type`` (an HF ``model_type`` such as
    ``"wav2vec2"``): dropout off, then :data:`SMALL_SPEECH` for the speech models
    of :data:`SPEECH_MODELS` when ``small``, their leaking setting, then ``config``.
    Random weights drawn with ``seed``; in eval mode."""
    import transformers

    overrides = dict(NO_DROPOUT)
    if model_type in SPEECH_MODELS:
        overrides.update(SMALL_SPEECH if small else {})
        overrides.update(SPEECH_MODELS[model_type])
    overrides.update(config or {})
    defaults = transformers.AutoConfig.for_model(model_type)
    # a setting this model does not have is skipped (but never one the caller gave);
    # passed to the constructor, which derives fields from them (num_feat_extract_layers)
    kwargs = {k: v for k, v in overrides.items() if k in (config or {}) or hasattr(defaults, k)}
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(cfg).eval()


def frames(model: nn.Module, samples) -> torch.Tensor:
    """The frames a speech model makes of ``samples`` (its own formula)."""
    return model._get_feat_extract_output_lengths(torch.as_tensor(samples)).long()
