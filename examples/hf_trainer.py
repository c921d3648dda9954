"""Distil a student from a fusion-cache cache with `transformers.Trainer`: a subclass whose `compute_loss` adds the
cached teacher's KD loss to the answer cross-entropy.

    python examples/hf_trainer.py --student ./student --cache ./cache/smollm2 --out ./runs/hf --steps 20
    accelerate launch examples/hf_trainer.py ...   # or torchrun: Trainer's accelerate splits each batch

Trainer hands its DataLoader to accelerate, which cuts every tensor of a batch along dim 0. `PaddedCollator` makes
batches whose tensors all have dim 0 = B; `unpad` turns each process's share back into `collate`'s layout. The
stream is built with rank=0, world_size=1 because accelerate does the splitting.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer
from transformers import Trainer
from transformers import TrainingArguments

import fusion_cache as fc


class DistillTrainer(Trainer):
    """A Trainer whose loss is (1 - lambda) * CE + lambda * KD against the teacher cached in the batch."""

    def __init__(self, *args, collator: fc.PaddedCollator, kd_loss="kl", lambda_=0.5, kd_gate=False, **kwargs):
        super().__init__(*args, data_collator=collator, **kwargs)
        self.collator, self.losses, self.lambda_, self.kd_gate = collator, [fc.make_loss(kd_loss)], lambda_, kd_gate

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.collator.unpad(inputs)  # this process's samples, in collate's flat layout
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        answer_logits = outputs.logits.flatten(0, 1)[batch["answer_index"]]  # [M, V]
        out = fc.loss_from_logits(answer_logits, batch, self.losses, lambda_=self.lambda_, kd_gate=self.kd_gate)
        return (out.loss, outputs) if return_outputs else out.loss


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--student", required=True, help="the student: a local directory or HF id")
parser.add_argument("--cache", required=True, help="a cache directory (fusion-cache build --out)")
parser.add_argument("--out", required=True, help="Trainer's output_dir")
parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
parser.add_argument("--kd-gate", action="store_true", help="distil a sample only while the teacher beats the student")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.student)
student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
opts = dict(chat_template=True, max_length=512, epochs=None, rank=0, world_size=1, answer_scores=args.kd_gate)
stream = fc.DistillStream(args.cache, tokenizer, **opts)  # answer_scores: the teachers' answer CE, for the gate
targs = TrainingArguments(
    output_dir=args.out,
    max_steps=args.steps,  # an IterableDataset has no length: Trainer needs max_steps
    per_device_train_batch_size=2,
    learning_rate=1e-4,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=not torch.cuda.is_available(),  # on CPU, only this makes torchrun's processes one gloo group
    remove_unused_columns=False,  # keep the teacher's tensors: they are no arguments of the model's forward
)
collator = fc.PaddedCollator.for_stream(stream, pad_id)
trainer = DistillTrainer(model=student, args=targs, train_dataset=stream, collator=collator, kd_gate=args.kd_gate)
trainer.train()
loss, processes = trainer.state.log_history[-1]["train_loss"], trainer.accelerator.num_processes
print(f"final loss {loss:.4f} on {processes} process(es)")
if torch.distributed.is_initialized():
    # A gloo thread frees a finished collective's tensors only once it holds the GIL; one still waiting when the
    # interpreter finalizes aborts the process ("terminate called"). Sleeping releases the GIL so it can finish.
    torch.distributed.barrier()
    time.sleep(0.2)
    torch.distributed.destroy_process_group()
