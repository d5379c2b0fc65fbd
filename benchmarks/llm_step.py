"""A small language model's training step, stock vs ``seqnorm.convert(model, to="rms")``, and
the per-family accuracy figures of issue 30.

Step: a Llama (HF transformers, built from its config: nothing downloaded) of 4 layers, hidden
1024, 16 heads, sequence 512, batch 4 with lengths drawn from [T/2, T] and the matching
``attention_mask``; forward + backward of a loss over the real tokens. Stock and converted runs
alternate in one process (so load drifts hit both); the figure is the ratio of medians.
``--device cuda`` runs the same on a GPU and adds a row for Liger-Kernel's patched model where
``liger_kernel`` is installed.

Accuracy (``--accuracy``): each of the eight families small (hidden 64, 2 layers, 4 heads): norms
converted, last hidden state and gradients vs stock in float32 (relative: max |diff| / max |stock|),
and in bfloat16 each converted norm against the family's own module (max difference in units in
the last place) and the whole model's last hidden state (relative).

    python benchmarks/llm_step.py                 # CPU step, issue 30's size
    python benchmarks/llm_step.py --accuracy [--backend fused]      # the per-family table
"""

import argparse
import copy
import os
import statistics
import time

import torch

import seqnorm
from seqnorm import llm

import transformers


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build_llama(hidden, layers, heads, seq, device, dtype, seed=0):
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, max_position_embeddings=seq,
                                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def step(model, ids, mask, device):
    """``(wall seconds, this process's CPU seconds)`` of one forward + backward: on a shared VM the
    CPU time is what the step itself costs, the wall time also what other processes took."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = logits[mask.bool()].float().logsumexp(-1).mean()
    loss.backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, time.process_time() - c


def run_step(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    b, t = args.batch, args.seq
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=gen)
    ids = torch.randint(1, 1024, (b, t), generator=gen).to(device)
    mask = (torch.arange(t)[None] < lengths[:, None]).long().to(device)
    stock = build_llama(args.hidden, args.layers, args.heads, t, device, dtype)
    models = {"stock": stock, "seqnorm": seqnorm.convert(copy.deepcopy(stock), to="rms")}
    n = sum(isinstance(m, seqnorm.RMSNorm) for m in models["seqnorm"].modules())
    if device == "cuda":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            liger = copy.deepcopy(stock)
            apply_liger_kernel_to_llama(model=liger, rms_norm=True, swiglu=False, rope=False,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
            models["liger"] = liger
        except ImportError:
            print("liger_kernel not installed: no Liger row")
    times = {k: [] for k in models}
    for k in models:                       # warm-up
        step(models[k], ids, mask, device)
    for _ in range(args.steps):            # alternate: a load change hits every model
        for k in models:
            times[k].append(step(models[k], ids, mask, device))
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    print(f"Llama {args.layers} layers, hidden {args.hidden}, seq {t}, batch {b}, {args.dtype}, {device}; "
          f"{n} norms converted; torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.2f}; "
          f"{args.steps} alternating steps")
    print("| model | wall median | ratio | wall min–max | CPU time median | ratio |")
    print("|---|---|---|---|---|---|")
    for k in times:
        lo, hi = min(w for w, _ in times[k]) * 1e3, max(w for w, _ in times[k]) * 1e3
        print(f"| {k} | {wall[k] * 1e3:.0f} ms | {wall[k] / wall['stock']:.3f}x | {lo:.0f}–{hi:.0f} ms "
              f"| {cpu[k] * 1e3:.0f} ms | {cpu[k] / cpu['stock']:.3f}x |")


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaModel", "LlamaRMSNorm"),
    "mistral": ("MistralConfig", "MistralModel", "MistralRMSNorm"),
    "qwen2": ("Qwen2Config", "Qwen2Model", "Qwen2RMSNorm"),
    "qwen3": ("Qwen3Config", "Qwen3Model", "Qwen3RMSNorm"),
    "gemma": ("GemmaConfig", "GemmaModel", "GemmaRMSNorm"),
    "gemma2": ("Gemma2Config", "Gemma2Model", "Gemma2RMSNorm"),
    "phi3": ("Phi3Config", "Phi3Model", "Phi3RMSNorm"),
    "olmo2": ("Olmo2Config", "Olmo2Model", "Olmo2RMSNorm"),
}
SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0,
             attn_implementation="eager")


def _family(name, dtype):
    config_name, model_name, norm_name = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**SMALL)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == norm_name:
                m.weight.normal_(0.0 if llm.FAMILIES[norm_name].offset else 1.0, 0.2)
    return model.to(dtype), norm_name


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _hidden_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids).last_hidden_state
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out * probe).float().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_accuracy(args):
    with seqnorm.use_backend(args.backend):
        _accuracy_table()
    print(f"(seqnorm backend: {args.backend})")


def _accuracy_table():
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    print("| family | norms converted | fp32 last hidden (rel) | fp32 grads (max rel) | bf16 per norm (max ulp) "
          "| bf16 last hidden (rel) |")
    print("|---|---|---|---|---|---|")
    for name in FAMILIES:
        stock, norm_name = _family(name, torch.float32)
        before = sum(type(m).__name__ == norm_name for m in stock.modules())
        model = seqnorm.convert(copy.deepcopy(stock), to="rms")
        after = sum(isinstance(m, seqnorm.RMSNorm) for m in model.modules())
        h0, g0 = _hidden_and_grads(stock, ids)
        h1, g1 = _hidden_and_grads(model, ids)
        grad = max(_rel(g1[k], g0[k]) for k in g0)
        stock16, _ = _family(name, torch.bfloat16)
        model16 = seqnorm.convert(copy.deepcopy(stock16), to="rms")
        gen, ulp = torch.Generator().manual_seed(5), 0.0
        for old, new in zip(stock16.modules(), model16.modules()):
            if isinstance(new, seqnorm.RMSNorm):
                x = (torch.randn(4, 9, old.weight.shape[0], generator=gen) * 2).bfloat16()
                with torch.no_grad():
                    want, got = old(x).float(), new(x).float()
                ulp = max(ulp, float(((got - want).abs() / want.abs().clamp_min(1e-30)).max()) * 2 ** 7)
        with torch.no_grad():
            r16 = _rel(model16(input_ids=ids).last_hidden_state, stock16(input_ids=ids).last_hidden_state)
        print(f"| {name} | {after}/{before} | {_rel(h1, h0):.1e} | {grad:.1e} | {ulp:.2f} | {r16:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", action="store_true", help="the per-family accuracy table instead")
    parser.add_argument("--backend", default="auto", help="seqnorm backend of the accuracy table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    (run_accuracy if args.accuracy else run_step)(args)


if __name__ == "__main__":
    main()
