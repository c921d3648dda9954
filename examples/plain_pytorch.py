"""Distil a student from a fusion-cache cache with a plain PyTorch loop (no trainer framework).

    python examples/plain_pytorch.py --student ./student --cache ./cache/smollm2 --steps 20
    torchrun --nproc-per-node 2 examples/plain_pytorch.py ...   # each rank streams its own half of the rows

The stream joins, renders and aligns the cache for the student; `collate` pads a batch and indexes its answer
positions; `loss_from_logits` is (1 - lambda) * CE + lambda * KD on the logits at those positions. A student with
the teacher's tokenizer can use "kl" (top-K KL); any other student uses "uld" (sorted-probability L1).
"""

import argparse
import functools
import itertools

import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer

import fusion_cache as fc

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--student", required=True, help="the student: a local directory or HF id")
parser.add_argument("--cache", required=True, help="a cache directory (fusion-cache build --out)")
parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
parser.add_argument("--loss", default="kl", help="distillation loss: kl (same tokenizer) or uld (any)")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.student)
student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

# rank and world size come from torch.distributed (or torchrun's RANK/WORLD_SIZE); DataLoader workers split too
stream = fc.DistillStream(args.cache, tokenizer, chat_template=True, max_length=512, shuffle_buffer=64, epochs=None)
collate = functools.partial(fc.collate, pad_id=pad_id, n_teachers=1)  # picklable: the worker process runs it
loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=1, collate_fn=collate)
losses = [fc.make_loss(args.loss)]
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

student.train()
for step, batch in enumerate(itertools.islice(loader, args.steps), start=1):
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, L, V]
    answer_logits = logits.flatten(0, 1)[batch["answer_index"]]  # [M, V]: the positions that predict answers
    out = fc.loss_from_logits(answer_logits, batch, losses, lambda_=0.5)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {out.loss.item():.4f} ce {out.ce.item():.4f} kd {out.kd.item():.4f}")
