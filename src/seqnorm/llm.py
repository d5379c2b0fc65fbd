r"""``seqnorm.convert`` for language models: their own RMSNorm classes, and their padding.

Today's language models do not use ``torch.nn.RMSNorm``: each Hugging Face family defines its
own class (``LlamaRMSNorm``, ``GemmaRMSNorm``, …), and they differ in two places —
where ``γ`` is centred and where the result is cast to the input dtype:

.. math::
    \hat x = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}}, \qquad
    y = \hat x \odot (\mathrm{offset} + \gamma)

=========  ======  ==================================================  =================  ==========
family     offset  what a bfloat16 input gets (``casting``)            eps attribute      Liger mode
=========  ======  ==================================================  =================  ==========
Llama      0       ``γ ⊙ round(x̂)`` (``"llama"``)                       ``variance_epsilon`` llama
Mistral    0       ``γ ⊙ round(x̂)`` (``"llama"``)                       ``variance_epsilon`` llama
Qwen2      0       ``γ ⊙ round(x̂)`` (``"llama"``)                       ``variance_epsilon`` llama
Qwen3      0       ``γ ⊙ round(x̂)`` (``"llama"``; also per-head q/k)    ``variance_epsilon`` llama
Phi3       0       ``γ ⊙ round(x̂)`` (``"llama"``)                       ``variance_epsilon`` llama
Gemma      1       ``round(x̂ ⊙ (1 + γ))``, all float32 (``"float32"``)  ``eps``            gemma
Gemma2     1       ``round(x̂ ⊙ (1 + γ))``, all float32 (``"float32"``)  ``eps``            gemma
Olmo2      0       ``round(x̂ ⊙ γ)``, all float32 (``"float32"``)         ``variance_epsilon`` —
=========  ======  ==================================================  =================  ==========

(:mod:`seqnorm.rms_variants` computes both castings on every backend.) :data:`FAMILIES` is that
table, with the other classes of ``transformers`` 5.25 that compute the same as one of these (read
from the sources, not guessed from names: the same ``__init__`` and ``forward`` up to annotations, or
the same operations with a product's operands swapped or ``γ`` cast to float32 first, as in
Llama4Text, Helium, LaraMini and NemotronH): 176 classes in all.

:func:`convert_family_norms` (what ``seqnorm.convert(model, to="rms")`` calls) swaps each of them
for a :class:`seqnorm.RMSNorm` with the family's ``offset`` and ``casting``, the module's own
``weight`` parameter (the same ``nn.Parameter``: state_dict keys, tied weights and an optimizer
built before still hold) and its eps. **Do no harm**: each swap is first run on a probe input
against the module it replaces (outputs and dtype within a few units in the last place of the
dtype); a mismatch keeps the original and warns. A norm-like class it does not know (a class
named ``…Norm`` outside torch and seqnorm, with a ``weight``) is left alone and named once.

**Padding.** A converted language model gets a forward pre-hook (with kwargs) on the model and on
each Hugging Face sub-model that takes ``attention_mask``: for each call it reads that mask
(``(B, T)``, 1 at real tokens) and opens the :func:`seqnorm.padding` context, so every converted
norm skips padded tokens and gives them exactly 0; real tokens compute what they computed
before (a real token never attends to a padded one). A context the caller opened wins, and so
does an outer call's. With a KV cache, a step's input covers the last ``T`` columns of the mask
(``(B, 1)`` against ``(B, past + 1)`` in ``generate``): the hook takes those columns — the mask's
own convention — so a cached step is masked like the same tokens in one long call. No mask, a
mask without padding (read where that is free: a CPU mask outside ``torch.compile``), or a mask
that is not ``(B, ≥T)``: nothing is opened.

Unlike :func:`seqnorm.make_padding_safe`, which skips text decoders (their padding needs no
guards on convolutions), this route is for exactly those: decoder-only models' norms are
per-token, so the mask of the call is all they need.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from .call_padding import entry_points, mask_argument
from .masks import PaddingContext, call_argument, close_padding, current_padding, host_readable, open_padding, \
    pop_in_flight, push_in_flight
from .modules import RMSNorm

__all__ = ["RMSFamily", "FAMILIES", "family_of", "convert_family_norms", "hook_attention_mask",
           "unhook_attention_mask", "context_for_tokens"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class RMSFamily:
    """What a family's RMSNorm computes (see the module docstring's table)."""

    offset: float        #: ``y = x̂ ⊙ (offset + γ)``: 1.0 for a zero-centred ``γ`` (stored as zeros)
    casting: str         #: :data:`seqnorm.rms_variants.CASTINGS`: where a 16-bit input is rounded
    eps_attribute: str   #: where the module keeps its eps
    liger: str           #: Liger-Kernel's ``casting_mode`` for the same maths ("—": none)


LLAMA = RMSFamily(0.0, "llama", "variance_epsilon", "llama")
GEMMA = RMSFamily(1.0, "float32", "eps", "gemma")
OLMO2 = RMSFamily(0.0, "float32", "variance_epsilon", "—")
MOSHI = RMSFamily(0.0, "float32", "eps", "—")

_SAME_AS_LLAMA = (
    "Aimv2RMSNorm", "ApertusRMSNorm", "Apertus1p5TextRMSNorm", "ArceeRMSNorm", "AriaTextRMSNorm",
    "AXK1RMSNorm", "AXK2RMSNorm", "BailingHybridRMSNorm", "BambaRMSNorm", "BitNetRMSNorm", "BltRMSNorm",
    "ChameleonRMSNorm", "ClvpRMSNorm", "Cohere2MoeRMSNorm", "Cosmos3EdgeTextRMSNorm", "CsmRMSNorm",
    "CwmRMSNorm", "DeepseekOcr2VisionRMSNorm", "DeepseekOcr2TextRMSNorm", "DeepseekV2RMSNorm",
    "DeepseekV3RMSNorm", "DeepseekV32RMSNorm", "Deimv2RMSNorm", "DiaRMSNorm", "DiffLlamaRMSNorm",
    "DogeRMSNorm", "Dots1RMSNorm", "Dots3NoteRMSNorm", "Emu3RMSNorm", "Ernie4_5RMSNorm",
    "Ernie4_5_MoeRMSNorm", "Ernie4_5_VLMoeRMSNorm", "EuroBertRMSNorm", "EvollaRMSNorm", "Exaone4RMSNorm",
    "Exaone4_5_RMSNorm", "ExaoneMoeRMSNorm", "FalconH1RMSNorm", "FalconMambaRMSNorm", "GlmRMSNorm",
    "Glm4RMSNorm", "Glm4MoeRMSNorm", "Glm4MoeLiteRMSNorm", "Glm4vRMSNorm", "Glm4vMoeTextRMSNorm",
    "Glm4vMoeRMSNorm", "Glm5NextTextRMSNorm", "Glm5NextRMSNorm", "GlmImageRMSNorm", "GlmMoeDsaRMSNorm",
    "GlmOcrRMSNorm", "GraniteRMSNorm", "Granite4VisionTextRMSNorm", "GraniteDoclingTextRMSNorm",
    "GraniteSWARMSNorm", "GraniteMoeRMSNorm", "GraniteMoeSWARMSNorm", "GraniteMoeHybridRMSNorm",
    "GraniteMoeSharedRMSNorm", "HiggsAudioV2RMSNorm", "HunYuanDenseV1RMSNorm", "HunYuanMoEV1RMSNorm",
    "HunYuanVLRMSNorm", "HYV3RMSNorm", "HYV4RMSNorm", "HYV4VLRMSNorm", "HyperCLOVAXRMSNorm",
    "Idefics2RMSNorm", "Idefics3RMSNorm", "InklingRMSNorm", "InternVLVisionRMSNorm", "JambaRMSNorm",
    "JetMoeRMSNorm", "KimiLinearRMSNorm", "Kolibri1RMSNorm", "Kolibri1_1RMSNorm", "LagunaRMSNorm",
    "Lfm2RMSNorm", "Lfm2MoeRMSNorm", "Lfm3RMSNorm", "Lfm3VlVisionRMSNorm", "LightOnOcrRMSNorm",
    "LongcatFlashRMSNorm", "MellumRMSNorm", "MiMoV2FlashRMSNorm", "MiniCPM3RMSNorm", "MiniCPM5MoeRMSNorm",
    "MiniMaxRMSNorm", "MiniMaxM2RMSNorm", "MinistralRMSNorm", "Ministral3RMSNorm", "Mistral3RMSNorm",
    "Mistral4RMSNorm", "MistralLarge4RMSNorm", "MixtralRMSNorm", "MllamaTextRMSNorm", "Molmo2RMSNorm",
    "MuseGlimmerAssistantRMSNorm", "NeuCodecRMSNorm", "OlmoeRMSNorm", "Ovis2RMSNorm", "PaddleOCRRMSNorm",
    "PeAudioEncoderRMSNorm", "PeAudioVideoEncoderRMSNorm", "PeVideoEncoderRMSNorm", "Phi4MultimodalRMSNorm",
    "PixtralRMSNorm", "QianfanOCRVisionRMSNorm", "Qwen2_5OmniRMSNorm", "Qwen2_5_VLRMSNorm",
    "Qwen2MoeRMSNorm", "Qwen2VLRMSNorm", "Qwen3MoeRMSNorm", "Qwen3OmniMoeThinkerTextRMSNorm",
    "Qwen3OmniMoeTextRMSNorm", "Qwen3OmniMoeRMSNorm", "Qwen3OmniMoeCode2WavRMSNorm", "Qwen3VLTextRMSNorm",
    "Qwen3VLMoeTextRMSNorm", "Sapiens2RMSNorm", "SeedOssRMSNorm", "SmolLM3RMSNorm", "SolarOpenRMSNorm",
    "TimesFmRMSNorm", "TimesFm2_5RMSNorm", "UltrabertRMSNorm", "UltraVBertRMSNorm",
    "UnlimitedOcrTextRMSNorm", "VibeVoiceRMSNorm", "VibeVoiceAcousticTokenizerRMSNorm",
    "VibeVoiceAsrRMSNorm", "VoxtralRealtimeRMSNorm", "Xcodec2RMSNorm", "YoutuRMSNorm", "ZayaRMSNorm",
    "MambaRMSNorm", "Mamba2RMSNorm", "ZambaRMSNorm", "Zamba2RMSNorm", "Llama4TextRMSNorm",
)
_SAME_AS_GEMMA = (
    "Gemma3RMSNorm", "MiniMaxM3VLRMSNorm", "MuseGlimmerTextCenteredRMSNorm", "Qwen3_5RMSNorm",
    "Qwen3_5MoeRMSNorm", "Qwen3NextRMSNorm", "RecurrentGemmaRMSNorm", "Step3p7RMSNorm", "T5GemmaRMSNorm",
    "T5Gemma2RMSNorm", "VaultGemmaRMSNorm",
)
_SAME_AS_OLMO2 = (
    "AfmoeRMSNorm", "BeamRMSNorm", "DeepseekV4RMSNorm", "FlexOlmoRMSNorm", "FlintRMSNorm", "GptOssRMSNorm",
    "Inkling2RMSNorm", "Inkling2LoopRMSNorm", "Olmo3RMSNorm", "OlmoHybridRMSNorm",
    "OpenAIPrivacyFilterRMSNorm", "HeliumRMSNorm", "LaraMiniRMSNorm", "NemotronHRMSNorm",
    "NemotronH_Omni_RMSNorm",
)
_SAME_AS_MOSHI = (
    "KyutaiSpeechToTextRMSNorm", "MoshiRMSNorm",
)

#: class name → what it computes: the eight families of issue 30 by name, then every class of
#: ``transformers`` 5.25 that computes what one of theirs does (see the module docstring).
#: The probe (:func:`convert_family_norms`) still checks each swap: a later release that changes a
#: class keeps its original, with a warning.
FAMILIES: Dict[str, RMSFamily] = {
    "LlamaRMSNorm": LLAMA, "MistralRMSNorm": LLAMA, "Qwen2RMSNorm": LLAMA, "Qwen3RMSNorm": LLAMA,
    "Phi3RMSNorm": LLAMA, "GemmaRMSNorm": GEMMA, "Gemma2RMSNorm": GEMMA, "Olmo2RMSNorm": OLMO2,
    **{name: LLAMA for name in _SAME_AS_LLAMA},
    **{name: GEMMA for name in _SAME_AS_GEMMA},
    **{name: OLMO2 for name in _SAME_AS_OLMO2},
    **{name: MOSHI for name in _SAME_AS_MOSHI},
}


def family_of(module: nn.Module) -> Optional[RMSFamily]:
    """The :data:`FAMILIES` entry of ``module``'s class, if it has the parts that entry reads
    (a 1-D ``weight`` parameter and the eps attribute); else None."""
    fam = FAMILIES.get(type(module).__name__)
    if fam is None:
        return None
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(
            getattr(module, fam.eps_attribute, None), (int, float)):
        return None
    return fam


def _swap_for(module: nn.Module, fam: RMSFamily) -> RMSNorm:
    """A :class:`seqnorm.RMSNorm` computing what ``module`` computes, holding its ``weight``."""
    weight = module.weight
    new = RMSNorm(weight.shape[0], eps=float(getattr(module, fam.eps_attribute)), offset=fam.offset,
                  casting=fam.casting, device="meta")
    new.weight = weight          # the same Parameter: state_dict key, ties and optimizer state hold
    new.train(module.training)
    return new


def _checked_swap(module: nn.Module, fam: RMSFamily, eps: Optional[float]):
    """``(replacement, None)``, or ``(None, why)`` where the probe finds a mismatch. The probe runs
    with the module's own eps: an ``eps`` the caller asks for is a change they mean, set after."""
    new = _swap_for(module, fam)
    why = _probe_mismatch(module, new)
    if why is not None:
        return None, why
    if eps is not None:
        new.eps = float(eps)
    return new, None


# A probe row: a few awkward sizes of values, the same on every call (a generator of its own)
_PROBE_SHAPE = (2, 3)
#: (rtol, atol) of the probe per dtype: a few units in the last place (the family's rsqrt and the
#: backend's differ in the last bit; a 16-bit result may round the other way)
_PROBE_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6),
              torch.bfloat16: (2.0 ** -6, 1e-5), torch.float16: (2.0 ** -9, 1e-5)}


def _probe_mismatch(old: nn.Module, new: RMSNorm) -> Optional[str]:
    """None where ``new`` gives ``old``'s output (values and dtype) on a probe input, else what
    differs. A module on the meta device computes nothing: it is trusted to the table."""
    weight = new.weight
    if weight.is_meta or weight.dtype not in _PROBE_TOL:
        return None
    gen = torch.Generator().manual_seed(30)
    x = (torch.randn(*_PROBE_SHAPE, weight.shape[0], generator=gen, dtype=torch.float32) * 3).to(
        device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            want = old(x)
            # an explicit no-padding mask: a context open around convert is not this probe's
            got = new(x, padding_mask=torch.zeros(_PROBE_SHAPE, dtype=torch.bool, device=x.device))
    except Exception as err:     # noqa: BLE001 — whatever failed, the original stays
        return f"the probe call failed ({type(err).__name__}: {err})"
    if not isinstance(want, Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return (f"the original returns {getattr(want, 'dtype', type(want).__name__)} "
                f"{tuple(getattr(want, 'shape', ()))}, seqnorm's {got.dtype} {tuple(got.shape)}")
    rtol, atol = _PROBE_TOL[weight.dtype]
    if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True):
        return f"outputs differ by up to {float((got.double() - want.double()).abs().max()):.3g} on a probe input"
    return None


def _norm_like(module: nn.Module) -> bool:
    """A class named ``…Norm`` outside torch and seqnorm with a ``weight``: a norm this table may lack."""
    cls = type(module)
    return (cls.__name__.endswith("Norm") and not cls.__module__.startswith(("torch.", "seqnorm."))
            and isinstance(getattr(module, "weight", None), Tensor))


def convert_family_norms(model: nn.Module, to: str, eps: Optional[float] = None, warn=None) -> nn.Module:
    """Swap the language-model RMSNorms of ``model`` (:data:`FAMILIES`) for :class:`seqnorm.RMSNorm`
    when ``to == "rms"``, each checked on a probe first (a mismatch keeps it and warns); name each
    unknown norm-like class once (``warn(name, message)``). Where anything was swapped and a
    forward takes ``attention_mask``, :func:`hook_attention_mask`. Returns ``model`` (or the
    swapped module, where ``model`` itself is one)."""
    warn = warn or (lambda name, msg: warnings.warn(f"seqnorm.convert: {name}: {msg}", stacklevel=3))
    fam = family_of(model)
    if fam is not None:
        if to != "rms":
            warn(type(model).__name__, f"a language model's RMSNorm converts to 'rms' only, not {to!r}: left as it is")
            return model
        new, why = _checked_swap(model, fam, eps)
        if why is not None:
            warn(type(model).__name__, f"kept as it is: {why}")
            return model
        return new
    swapped, unknown = 0, {}
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            fam = family_of(child)
            if fam is None:
                if _norm_like(child) and not isinstance(child, RMSNorm):
                    unknown.setdefault(type(child).__name__, []).append(full)
                continue
            if to != "rms":
                unknown.setdefault(type(child).__name__, []).append(full)
                continue
            new, why = _checked_swap(child, fam, eps)
            if why is not None:
                warn(full, f"{type(child).__name__} kept as it is: {why}")
                continue
            setattr(parent, child_name, new)
            swapped += 1
    for cls, where in unknown.items():
        more = f" and {len(where) - 3} more" if len(where) > 3 else ""
        what = ("converts to 'rms' only" if FAMILIES.get(cls) else
                "not a class seqnorm.convert knows (seqnorm.llm.FAMILIES)")
        warn(cls, f"{len(where)} module(s) left as they are ({', '.join(where[:3])}{more}): {what}")
    if swapped:
        hook_attention_mask(model)
    return model


# ---------------------------------------------------------------------------
# The padding of each call, from the model's attention_mask
# ---------------------------------------------------------------------------

_IN_FLIGHT = "attention_mask"


class _OpenHook:
    """The forward pre-hook: opens the call's context (a class, not a closure, so that a
    converted model still pickles whole)."""

    def __init__(self, arg):
        self.arg = arg

    def __call__(self, module, args, kwargs):
        if current_padding() is not None:        # the caller's context, or an outer call's, wins
            return None
        arg = self.arg
        ctx = context_for_tokens(call_argument(args, kwargs, arg.index, arg.name),
                                 call_argument(args, kwargs, 0 if args else None, arg.input_name),
                                 kwargs.get("inputs_embeds"))
        if ctx is not None:
            push_in_flight(module, _IN_FLIGHT, open_padding(ctx))
        return None


def _close_hook(module, args, output):
    entry = pop_in_flight(module, _IN_FLIGHT)
    if entry is not None:
        close_padding(entry[1])
    return None


def context_for_tokens(mask, input_ids=None, inputs_embeds=None) -> Optional[PaddingContext]:
    """The padding context of one language-model call: ``mask (B, ≥T)`` (1 / True at real tokens;
    its last ``T`` columns are this call's tokens, as with a KV cache) over the ``(B, T)`` of
    ``input_ids`` (or ``inputs_embeds (B, T, D)``); None where there is nothing to open."""
    x = input_ids if isinstance(input_ids, Tensor) else inputs_embeds
    if not isinstance(mask, Tensor) or mask.dim() != 2 or not isinstance(x, Tensor) or x.dim() < 2 \
            or x.is_nested:
        return None
    batch, steps = x.shape[0], x.shape[1]
    if mask.shape[0] != batch or mask.shape[1] < steps:
        return None
    pad = mask[:, mask.shape[1] - steps:] == 0
    if host_readable(pad) and not bool(pad.any()):
        return None       # no padding: the model computes exactly what it did
    return PaddingContext(pad, None, True)


def _our_hooks(m: nn.Module):
    """The keys of this module's :class:`_OpenHook` pre-hooks and :func:`_close_hook` hooks. Read
    from the module itself, not from a registry of handles: a deep copy or a pickled model carries
    its hooks but no handle to them."""
    return ([k for k, h in m._forward_pre_hooks.items() if isinstance(h, _OpenHook)],
            [k for k, h in m._forward_hooks.items() if h is _close_hook])


def hook_attention_mask(model: nn.Module) -> list:
    """Give ``model`` and each Hugging Face sub-model whose forward takes ``attention_mask``
    the hooks that open the padding context from it for each call (see the module docstring);
    calling it again (on the model, a copy of it, or a loaded one) adds none. Returns the names
    of the hooked modules."""
    names = []
    for name, m in entry_points(model):
        arg = mask_argument(m)
        if arg is None or arg.name != "attention_mask":
            continue
        if not any(_our_hooks(m)):
            m.register_forward_pre_hook(_OpenHook(arg), with_kwargs=True)
            m.register_forward_hook(_close_hook, always_call=True)
        names.append(name)
    return names


def unhook_attention_mask(model: nn.Module) -> None:
    """Remove :func:`hook_attention_mask`'s hooks (from the model, a copy of it or a loaded one):
    the converted norms then see padding only inside :func:`seqnorm.padding`."""
    for m in model.modules():
        pre, post = _our_hooks(m)
        # what RemovableHandle.remove() pops: the hook and its entries in the flag dicts
        for k in pre:
            m._forward_pre_hooks.pop(k)
            m._forward_pre_hooks_with_kwargs.pop(k, None)
        for k in post:
            m._forward_hooks.pop(k)
            m._forward_hooks_with_kwargs.pop(k, None)
            m._forward_hooks_always_called.pop(k, None)
