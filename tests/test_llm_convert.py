"""``seqnorm.convert(model, to="rms")`` on today's language models (seqnorm.llm): the eight
families of issue 30, each built small from its config class. Every check below fails for an
identity ``convert`` (see test_an_identity_convert_fails_these_checks)."""

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import seqnorm  # noqa: E402
from seqnorm import llm  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0,
             attn_implementation="eager")

#: family → (config class, base model class, its RMSNorm class, norms in 2 layers)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaModel", "LlamaRMSNorm", 5),
    "mistral": ("MistralConfig", "MistralModel", "MistralRMSNorm", 5),
    "qwen2": ("Qwen2Config", "Qwen2Model", "Qwen2RMSNorm", 5),
    "qwen3": ("Qwen3Config", "Qwen3Model", "Qwen3RMSNorm", 9),        # + q_norm, k_norm per layer
    "gemma": ("GemmaConfig", "GemmaModel", "GemmaRMSNorm", 5),
    "gemma2": ("Gemma2Config", "Gemma2Model", "Gemma2RMSNorm", 9),    # pre/post attention and MLP
    "phi3": ("Phi3Config", "Phi3Model", "Phi3RMSNorm", 5),
    "olmo2": ("Olmo2Config", "Olmo2Model", "Olmo2RMSNorm", 9),        # post-norms + q_norm, k_norm
}


def build(family, dtype=torch.float32, seed=0):
    """The family's base model, small, with norm weights away from their init (a zero-centred γ
    near 0, a plain one near 1), so that a wrong offset or a dropped γ shows."""
    config_name, model_name, norm_name, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(**SMALL)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == norm_name:
                m.weight.normal_(0.0 if llm.FAMILIES[norm_name].offset else 1.0, 0.2)
    return model.to(dtype)


def norms_of(model, norm_name):
    return [n for n, m in model.named_modules() if type(m).__name__ == norm_name]


def hidden_and_grads(model, ids, mask=None, real=None):
    """Last hidden state and every parameter's gradient of a fixed loss (over ``real`` tokens only)."""
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    gen = torch.Generator().manual_seed(7)
    probe = torch.randn(out.shape, generator=gen).to(out.dtype)
    loss = (out * probe if real is None else (out * probe)[real]).float().sum()
    loss.backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def ids_and_mask(left=False):
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 9, dtype=torch.long)
    if left:
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:
        mask[1, 6:] = 0
        mask[2, 4:] = 0
    return ids, mask


# ---------------------------------------------------------------------------
# The checks, written once: the tests run them on convert, and on an identity convert
# ---------------------------------------------------------------------------


def check_all_converted(family, convert):
    model = build(family)
    norm_name, expected = FAMILIES[family][2], FAMILIES[family][3]
    assert len(norms_of(model, norm_name)) == expected
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", seqnorm.ConversionWarning)
        model = convert(model, to="rms")
    assert norms_of(model, norm_name) == []
    converted = [m for m in model.modules() if isinstance(m, seqnorm.RMSNorm)]
    assert len(converted) == expected
    assert list(model.state_dict()) == keys
    fam = llm.FAMILIES[norm_name]
    assert all(m.offset == fam.offset and m.casting == fam.casting for m in converted)


def check_float32_matches_stock(family, convert):
    stock = build(family)
    model = convert(copy.deepcopy(stock), to="rms")
    ids, _ = ids_and_mask()
    h0, g0 = hidden_and_grads(stock, ids)
    h1, g1 = hidden_and_grads(model, ids)
    assert rel(h1, h0) <= 1e-5
    assert g0.keys() == g1.keys()
    for name in g0:
        assert rel(g1[name], g0[name]) <= 1e-5, name
    assert any(isinstance(m, seqnorm.RMSNorm) for m in model.modules())


def check_padding(family, convert, left=False):
    """With attention_mask: padded tokens' last hidden state exactly 0 (stock: not), real tokens
    and the gradients of a loss over real tokens as stock."""
    stock = build(family)
    model = convert(copy.deepcopy(stock), to="rms")
    ids, mask = ids_and_mask(left)
    real = mask.bool()
    h0, g0 = hidden_and_grads(stock, ids, mask, real)
    h1, g1 = hidden_and_grads(model, ids, mask, real)
    assert torch.equal(h1[~real], torch.zeros_like(h1[~real]))
    assert float(h0[~real].abs().max()) > 0
    assert rel(h1[real], h0[real]) <= 1e-5
    for name in g0:
        assert rel(g1[name], g0[name]) <= 1e-5, name


def check_bfloat16(family, convert):
    """In bfloat16, each converted norm against the family's own module on the same input: at most
    one unit in the last place apart, bit for bit on the torch backend where the family casts as
    Llama does; the whole model's last hidden state close to stock's in bfloat16."""
    stock = build(family, torch.bfloat16)
    model = convert(copy.deepcopy(stock), to="rms")
    fam = llm.FAMILIES[FAMILIES[family][2]]
    gen = torch.Generator().manual_seed(5)
    pairs = [(a, b) for a, b in zip(stock.modules(), model.modules()) if isinstance(b, seqnorm.RMSNorm)]
    assert len(pairs) == FAMILIES[family][3]
    for old, new in pairs:
        x = (torch.randn(4, 9, old.weight.shape[0], generator=gen) * 2).bfloat16()
        with torch.no_grad(), seqnorm.use_backend("torch"):
            want, got = old(x), new(x)
        assert got.dtype == want.dtype == torch.bfloat16
        ulps = (got.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30) * 2 ** 7
        assert float(ulps.max()) <= 1.0 + 1e-6
        if fam.casting == "llama":
            assert torch.equal(got, want)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        h0 = stock(input_ids=ids).last_hidden_state.float()
        h1 = model(input_ids=ids).last_hidden_state.float()
    assert rel(h1, h0) <= 0.05     # stated in the docs: a few bfloat16 units, from 1-ulp norm differences


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_norm_converts(family):
    check_all_converted(family, seqnorm.convert)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_hidden_state_and_gradients_match_stock(family):
    check_float32_matches_stock(family, seqnorm.convert)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_padded_tokens_are_exactly_zero(family, left):
    check_padding(family, seqnorm.convert, left)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_norms_match_the_familys_own(family):
    check_bfloat16(family, seqnorm.convert)


def identity(model, to):
    return model


def naive(model, to):
    """A swap that ignores the family's semantics: every norm of the table becomes a plain
    seqnorm.RMSNorm (offset 0, casting "float32") holding its weight, no probe."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fam = llm.family_of(child)
            if fam is not None:
                new = seqnorm.RMSNorm(child.weight.shape[0], eps=getattr(child, fam.eps_attribute))
                new.weight = child.weight
                setattr(parent, name, new)
    llm.hook_attention_mask(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_an_identity_convert_fails_these_checks(family):
    for check in (check_all_converted, check_float32_matches_stock, check_padding, check_bfloat16):
        with pytest.raises(AssertionError):
            check(family, identity)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_swap_without_the_familys_semantics_fails_them(family):
    """Teeth for the table: without Gemma's offset the float32 check fails; without the Llama
    cast the bfloat16 one does (Olmo2's semantics are the plain norm's: it passes them all)."""
    fam = llm.FAMILIES[FAMILIES[family][2]]
    plain = not fam.offset and fam.casting == "float32"
    if plain:
        check_all_converted(family, naive)
    else:
        with pytest.raises(AssertionError):
            check_all_converted(family, naive)
    if fam.offset:
        with pytest.raises(AssertionError):
            check_float32_matches_stock(family, naive)
    else:
        check_float32_matches_stock(family, naive)
    if plain:
        check_bfloat16(family, naive)
    else:
        with pytest.raises(AssertionError):
            check_bfloat16(family, naive)


def test_the_parameters_are_the_modules_own():
    model = build("gemma")
    before = model.layers[0].input_layernorm.weight
    seqnorm.convert(model, to="rms")
    assert model.layers[0].input_layernorm.weight is before


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_generate_with_a_kv_cache_is_unchanged(family):
    """Greedy generate on a left-padded batch with a KV cache: the same tokens as stock (each
    cached step's input (B, 1) takes the mask's last column)."""
    config_name, model_name = FAMILIES[family][:2]
    config = getattr(transformers, config_name)(**SMALL)
    torch.manual_seed(0)
    stock = getattr(transformers, model_name.replace("Model", "ForCausalLM"))(config).eval()
    model = seqnorm.convert(copy.deepcopy(stock), to="rms")
    ids, mask = ids_and_mask(left=True)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=True)
    assert torch.equal(model.generate(ids, **kw), stock.generate(ids, **kw))


def test_a_cached_step_takes_the_last_columns_of_the_mask():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    ctx = llm.context_for_tokens(mask, torch.zeros(2, 1, dtype=torch.long))
    assert torch.equal(ctx.padding_mask, torch.tensor([[False], [True]]))
    assert llm.context_for_tokens(mask[:, :3] * 0 + 1, torch.zeros(2, 3)) is None        # no padding
    assert llm.context_for_tokens(mask, torch.zeros(2, 5)) is None                       # mask too short
    ctx = llm.context_for_tokens(mask, None, torch.zeros(2, 2, 8))                       # inputs_embeds
    assert torch.equal(ctx.padding_mask, torch.tensor([[False, False], [False, True]]))


def test_the_callers_context_wins():
    model = seqnorm.convert(build("llama"), to="rms")
    ids, mask = ids_and_mask()
    own = torch.zeros(3, 9, dtype=torch.bool)
    own[0, 8] = True                 # the caller's padding, not the attention_mask's
    with torch.no_grad(), seqnorm.padding(own):
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(h[0, 8], torch.zeros(64))
    assert bool((h[1, 7] != 0).any())


def test_unhook_stops_the_padding():
    model = seqnorm.convert(build("qwen3"), to="rms")
    llm.unhook_attention_mask(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert bool((h[2, 5:] != 0).any())


class LlamaRMSNorm(nn.Module):
    """Named like Llama's, computes something else (no eps inside the root): the probe catches it."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) * 2)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x / x.abs().max(-1, keepdim=True).values


class MyRMSNorm(LlamaRMSNorm):
    pass


def test_a_mismatch_keeps_the_original_and_warns():
    model = nn.Sequential(LlamaRMSNorm(8), nn.Linear(8, 8))
    with pytest.warns(seqnorm.ConversionWarning, match="kept as it is: outputs differ"):
        seqnorm.convert(model, to="rms")
    assert type(model[0]) is LlamaRMSNorm


def test_an_unknown_class_is_left_alone_and_named_once():
    model = nn.Sequential(MyRMSNorm(8), MyRMSNorm(8), nn.LayerNorm(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seqnorm.convert(model, to="rms")
    named = [w for w in caught if "MyRMSNorm" in str(w.message)]
    assert len(named) == 1 and "2 module(s) left as they are (0, 1)" in str(named[0].message)
    assert type(model[0]) is MyRMSNorm and isinstance(model[2], seqnorm.RMSNorm)


def test_a_norm_converted_alone_and_to_other_targets():
    norm = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(16, eps=1e-5)
    new = seqnorm.convert(norm, to="rms")
    assert isinstance(new, seqnorm.RMSNorm) and new.offset == 1.0 and new.eps == 1e-5
    with pytest.warns(seqnorm.ConversionWarning, match="converts to 'rms' only"):
        assert seqnorm.convert(norm, to="layer") is norm


def test_a_converted_model_pickles_with_its_hook():
    import io
    model = seqnorm.convert(build("gemma"), to="rms")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        h = again(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(h[~mask.bool()], torch.zeros_like(h[~mask.bool()]))


def test_a_copy_or_a_loaded_model_hooks_once_and_unhooks():
    """The hooks are found on the module itself: a deep copy (or a loaded model) is not hooked
    twice by a second convert, and unhook removes the copy's hooks too."""
    model = seqnorm.convert(build("llama"), to="rms")
    twin = seqnorm.convert(copy.deepcopy(model), to="rms")
    assert len(twin._forward_pre_hooks) == len(model._forward_pre_hooks) == 1
    llm.unhook_attention_mask(twin)
    assert not twin._forward_pre_hooks and not twin._forward_hooks and len(model._forward_pre_hooks) == 1
    ids, mask = ids_and_mask()
    with torch.no_grad():
        h = twin(input_ids=ids, attention_mask=mask).last_hidden_state
        h_own = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert bool((h[2, 5:] != 0).any()) and torch.equal(h_own[2, 5:], torch.zeros_like(h_own[2, 5:]))
    assert llm.hook_attention_mask(twin) == [""] and len(twin._forward_pre_hooks) == 1


def test_an_eps_asked_for_is_set_after_the_probe():
    """convert(..., eps=) is a change the caller means: the probe (run with the module's own eps)
    does not keep the originals for it, and every swapped norm takes the new eps."""
    model = build("qwen3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", seqnorm.ConversionWarning)
        seqnorm.convert(model, to="rms", eps=0.5)
    norms = [m for m in model.modules() if isinstance(m, seqnorm.RMSNorm)]
    assert len(norms) == 9 and all(m.eps == 0.5 for m in norms)


@pytest.mark.parametrize("eps,error", [("1e-5", TypeError), (True, TypeError), (-1e-6, ValueError),
                                       (float("nan"), ValueError)])
def test_a_bad_eps_names_the_argument(eps, error):
    with pytest.raises(error, match="eps"):
        seqnorm.convert(build("llama"), to="rms", eps=eps)


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_converting_twice_keeps_offset_and_casting(family):
    """A second convert(to="rms") rebuilds seqnorm's RMSNorms: the offset and the casting go with
    them (without, a Gemma model's scale 1 + γ would become γ)."""
    stock = build(family, torch.bfloat16)
    once = seqnorm.convert(copy.deepcopy(stock), to="rms")
    twice = seqnorm.convert(copy.deepcopy(once), to="rms")
    fam = llm.FAMILIES[FAMILIES[family][2]]
    assert all(m.offset == fam.offset and m.casting == fam.casting
               for m in twice.modules() if isinstance(m, seqnorm.RMSNorm))
    ids, mask = ids_and_mask()
    with torch.no_grad():
        h1 = once(input_ids=ids, attention_mask=mask).last_hidden_state
        h2 = twice(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(h1, h2)


def test_a_zero_centred_weight_converted_to_layer_is_the_whole_scale():
    """RMSNorm(offset=1) → LayerNorm: the weight copied is 1 + γ (what the norm scaled by)."""
    norm = seqnorm.RMSNorm(8, eps=1e-6, offset=1.0)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.2)
    layer = seqnorm.convert(norm, to="layer")
    assert torch.equal(layer.weight, norm.weight + 1.0)
    with pytest.warns(seqnorm.ConversionWarning, match="casting='llama'"):
        seqnorm.convert(seqnorm.RMSNorm(8, casting="llama"), to="layer")
