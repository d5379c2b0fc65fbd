"""One training step of a 4-layer, 768-wide BERT (HF transformers, built from a config:
nothing downloaded), batch 16 × 512 with lengths drawn from [T/4, T], bf16 autocast:
stock, after ``seqnorm.convert(to="layer")`` and after ``to="masked_batch"``, the
padding handed to the norms by ``seqnorm.padding``. Medians of timed steps, in one
process; run by benchmarks/gpu.sh."""

import statistics
import sys
import time

import torch

import seqnorm

try:
    from transformers import BertConfig, BertModel
except ImportError:
    sys.exit("bert_step.py: needs transformers")


def step_time(model, ids, attn, lengths, steps=20, with_padding=True):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if with_padding:
                with seqnorm.padding(lengths=lengths):
                    out = model(input_ids=ids, attention_mask=attn).last_hidden_state
            else:
                out = model(input_ids=ids, attention_mask=attn).last_hidden_state
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=512, attn_implementation="sdpa")
    b, t = 16, 512
    lengths = torch.randint(t // 4, t + 1, (b,), device="cuda")
    ids = torch.randint(1, cfg.vocab_size, (b, t), device="cuda")
    attn = (torch.arange(t, device="cuda")[None] < lengths[:, None]).long()
    results = {}
    for name, to in (("stock", None), ("layer", "layer"), ("masked_batch", "masked_batch")):
        torch.manual_seed(0)
        model = BertModel(cfg).cuda().train()
        if to is not None:
            seqnorm.convert(model, to)
        results[name] = step_time(model, ids, attn, lengths, with_padding=to is not None)
        print(f"{name:13s} {1e3 * results[name]:8.2f} ms   {results[name] / results['stock']:.2f}x stock", flush=True)


if __name__ == "__main__":
    main()
