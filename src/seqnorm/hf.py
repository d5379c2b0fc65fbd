"""Hugging Face models built locally from their config classes: random weights
unless you load some, nothing downloaded. Used by the padding-safe tests, the
README's before/after table (``benchmarks/speech_models.py``) and ``seqnorm audit``.

``transformers`` is imported on first use (it is a test dependency, not a
dependency of seqnorm).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

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
    # the same encoder under a CTC / RNN-T / TDT head
    **{f"parakeet_{head}": dict(encoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, subsampling_conv_channels=16,
                                                    num_mel_bins=32)) for head in ("ctc", "rnnt", "tdt")},
    # a LayerNorm over the relative-position table (no batch or time axis)
    "sew-d": dict(SMALL_SPEECH, squeeze_factor=2, max_position_embeddings=64, position_buckets=32),
    # a 4-stage patch pyramid: one entry per stage in each list, so its 4 layers stay 4
    "muse_spark_audio": dict(hidden_sizes=(32, 32, 64, 64), depths=(1, 1, 1, 1), num_hidden_layers=4,
                             out_hidden_size=64),
    # VibeVoice's σ-VAE tokenizer: 7 stages of doubling channels (32 filters: 2048 at the last, 687M
    # parameters); 8 filters and one block a stage keep its 3200× hop and kernels at 11M, and weights
    # drawn 5× wider keep its activations of order 1 through so few channels (at 0.01 they vanish to
    # 1e-13 at the output, where no leak could show)
    **{f"vibevoice_acoustic_tokenizer{part}": dict(num_filters=8, depths=[1] * 7, hidden_size=64,
                                                   initializer_range=0.05)
       for part in ("", "_encoder", "_decoder")},
    # codecs with a w2v-BERT semantic encoder (1024 wide, its layers cut to 2): the quantizer reads the
    # acoustic and semantic features concatenated
    **{codec: dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=32, quantization_dim=64 + 1024) for codec in ("neucodec", "xcodec2")},
}


def _kv_heads_as_heads(cfg) -> None:
    if not hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = cfg.num_attention_heads       # plain multi-head attention


#: config fields a model reads that its config class does not set (a transformers 5.25 gap): the
#: moonshine_streaming decoder reads ``num_key_value_heads`` from the top config, which has none
CONFIG_GAPS: Dict[str, Callable] = {"moonshine_streaming": _kv_heads_as_heads}

#: the model class built where ``AutoModel``'s takes no audio: SpeechT5Model has no speech
#: pre-net (it takes hidden states); the speech-to-text model's encoder takes the waveform
AUDIO_CLASS = {"speecht5": "SpeechT5ForSpeechToText"}

#: features per frame of ``input_features`` where the config keeps them under no name of
#: :data:`FEATURE_SIZE` (or the model reads a multiple of them)
FEATURES_PER_FRAME: Dict[str, Callable] = {
    # two stride-2 Conv2d over (time, mel), then a Linear over channels × mel / 4: mel = the first's channels
    "gemma4_audio": lambda cfg: cfg.subsampling_conv_channels[0],
    # the feature extractor delta-expands the mel frames (×2) and stacks them in pairs (×2)
    "granite_speech5_encoder": lambda cfg: 4 * cfg.num_mel_bins,
    "granite_speech5_ctc": lambda cfg: 4 * cfg.encoder_config.num_mel_bins,
    # the decoder of latents (B, hidden, T): the encoder's output
    "vibevoice_acoustic_tokenizer_decoder": lambda cfg: cfg.hidden_size,
}

#: models whose forward takes only whole frames of this many samples (its feature extractor pads to a
#: multiple): every sequence's length, alone too, is a multiple of it
STEP_MULTIPLE: Dict[str, Callable] = {
    "muse_spark_audio": lambda cfg: math.prod(cfg.patch_sizes),          # the patch pyramid's stride
    "pe_audio_encoder": lambda cfg: cfg.dac_config.hop_length,           # its DAC encoder's hop
    "qwen3_asr_encoder": lambda cfg: 2 * cfg.n_window,                   # attention windows of 2 n_window frames
    # the processor pads the mel frames to whole subsampled frames
    "nemotron3_5_transcribe_audio": lambda cfg: cfg.asr_config.subsampling_factor,
}


def build(model_type: str, config: Optional[dict] = None, small: bool = True, seed: int = 0) -> nn.Module:
    """``AutoModel.from_config`` of ``model_type`` (an HF ``model_type`` such as
    ``"wav2vec2"``): dropout off, then :data:`SMALL_SPEECH` for the speech models
    of :data:`SPEECH_MODELS` when ``small``, their leaking setting (or :data:`SMALL_CONFIGS`'s
    settings when ``small``), then ``config``.
    Random weights drawn with ``seed``; in eval mode."""
    import transformers

    overrides = dict(NO_DROPOUT)
    if model_type in SPEECH_MODELS:
        overrides.update(SMALL_SPEECH if small else {})
        overrides.update(SPEECH_MODELS[model_type])
    elif small and model_type in SMALL_CONFIGS:
        overrides.update(SMALL_CONFIGS[model_type])
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


# ---------------------------------------------------------------------------
# Any audio model: small configs, its main input, its mask argument
# ---------------------------------------------------------------------------

#: widths tried first for a model seqnorm has no entry for (where the config has them)
SMALL_WIDTH = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
                   d_model=64, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                   decoder_ffn_dim=128)
#: layer counts cut to 2 in the config and every sub-config (encoder_config, audio_config, ...)
LAYER_COUNTS = ("num_hidden_layers", "encoder_layers", "decoder_layers", "num_encoder_layers",
                "num_decoder_layers", "num_conformer_layers")
#: where a config keeps the number of features per frame of its input_features
FEATURE_SIZE = ("num_mel_bins", "input_feat_per_channel", "feature_projection_input_dim", "feature_size",
                "input_feat_size", "input_dim", "n_mels", "num_mels",
                "mel_bins", "input_feature_size", "feature_dim")


def _sub_configs(cfg):
    import transformers

    yield cfg
    for value in vars(cfg).values():
        if isinstance(value, transformers.PretrainedConfig):
            yield from _sub_configs(value)


def small_config(model_type: str, width: bool = True):
    """A test-sized config of ``model_type``: dropout off; seqnorm's own small settings
    (:data:`SMALL_SPEECH`, :data:`SMALL_CONFIGS`) where it has them, else
    :data:`SMALL_WIDTH` (with ``width``) and 2 layers in the config and every sub-config."""
    import transformers

    defaults = transformers.AutoConfig.for_model(model_type)
    overrides = dict(NO_DROPOUT)
    if model_type in SPEECH_MODELS:
        overrides.update(SMALL_SPEECH, **SPEECH_MODELS[model_type])
    elif model_type in SMALL_CONFIGS:
        overrides.update(SMALL_CONFIGS[model_type])
    elif width:
        overrides.update(SMALL_WIDTH)
    cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in overrides.items() if hasattr(defaults, k)})
    fill_config_gaps(cfg)
    for sub in _sub_configs(cfg):
        for key in LAYER_COUNTS:
            # a count seqnorm's own small settings give stays (it matches their per-layer lists)
            if key not in overrides and isinstance(getattr(sub, key, None), int) and getattr(sub, key) > 2:
                setattr(sub, key, 2)
        for key, value in NO_DROPOUT.items():
            if isinstance(getattr(sub, key, None), float):
                setattr(sub, key, value)
    return cfg


def fill_config_gaps(cfg):
    """``cfg`` with the fields of :data:`CONFIG_GAPS` its model reads and its class does not set."""
    fill = CONFIG_GAPS.get(getattr(cfg, "model_type", None))
    if fill is not None:
        fill(cfg)
    return cfg


def feature_size(config) -> Optional[int]:
    """The features per frame of a model's ``input_features``, from its config (or a sub-config)."""
    known = FEATURES_PER_FRAME.get(getattr(config, "model_type", None))
    if known is not None:
        return int(known(config))
    for key in FEATURE_SIZE:
        for sub in _sub_configs(config):
            value = getattr(sub, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def mask_argument(module: nn.Module) -> Optional[str]:
    """The name under which ``module``'s forward takes the (B, T) padding: ``attention_mask``,
    else ``padding_mask``, else ``input_features_mask``, else None."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return next((name for name in ("attention_mask", "padding_mask", "input_features_mask") if name in params), None)


def audited_module(model: nn.Module) -> Tuple[nn.Module, str]:
    """``(module, how)``: an encoder–decoder model is audited through its encoder (its forward
    needs decoder inputs); any other model as it is."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder(), "through its encoder"
    return model, ""


#: the layouts tried for a main input, in order: a waveform (B, T) or (B, 1, T) (codecs); frames (B, T, F)
#: or (B, F, T) (Whisper's)
LAYOUTS = {"input_values": ("(B, T)", "(B, 1, T)", "(B, T, F)", "(B, F, T)"),   # the last: a codec's latents
           "input_features": ("(B, T, F)", "(B, F, T)")}
#: the input's time axis in each layout
TIME_DIM = {"(B, T)": 1, "(B, 1, T)": 2, "(B, T, F)": 1, "(B, F, T)": 2}


def audio_batch(module: nn.Module, config, main: str, batch: int, steps: int, seed: int = 0,
                layout: Optional[str] = None):
    """``(inputs, lengths, forward_kwargs)``: a padded batch of ``main`` in ``layout``
    (default: the first of :data:`LAYOUTS`: ``input_values`` a waveform ``(B, T)``,
    ``input_features`` frames ``(B, T, F)`` with ``F`` from the config; ``(B, F, T)`` as
    Whisper's), lengths from ``T`` down to 45 % of it, and the mask under the forward's own
    name (1 at real steps). A model of :data:`STEP_MULTIPLE` gets ``T`` and the lengths in
    whole frames of it."""
    layout = layout or LAYOUTS[main][0]
    multiple = STEP_MULTIPLE.get(getattr(config, "model_type", None))
    multiple = int(multiple(config)) if multiple is not None else 1
    steps = -(-steps // multiple) * multiple
    gen = torch.Generator().manual_seed(seed)
    if layout in ("(B, T)", "(B, 1, T)"):
        inputs = torch.randn(batch, steps, generator=gen)
    else:
        feat = feature_size(config)
        if feat is not None:      # low frame rate models stack frames before the encoder (FunASR)
            feat *= int(getattr(config, "num_stacked_frames", 1) or 1)
        if feat is None:
            raise ValueError(f"{type(module).__name__}: no feature size in its config (looked for "
                             f"{', '.join(FEATURE_SIZE[:4])}, ...)")
        inputs = torch.randn(batch, steps, feat, generator=gen)
    lengths = torch.linspace(1.0, 0.45, batch).mul(steps).round().long().clamp(1, steps)
    if multiple > 1:        # whole frames only: each length down to a multiple (at least one frame)
        lengths = (lengths // multiple * multiple).clamp_min(multiple)
    real = torch.arange(steps)[None, :] < lengths[:, None]
    inputs = inputs * real.reshape(real.shape + (1,) * (inputs.dim() - 2))
    if layout == "(B, F, T)":
        inputs = inputs.transpose(1, 2).contiguous()
    elif layout == "(B, 1, T)":
        inputs = inputs[:, None]
    name = mask_argument(module)
    return inputs, lengths, ({name: real.long()} if name else {})
