"""Distil a student from a fusion-cache cache with `transformers.Trainer`: a subclass whose `compute_loss` adds the
cached teacher's KD loss to the answer cross-entropy.

    python examples/hf_trainer.py --student ./student --cache ./cache/smollm2 --out ./runs/hf --steps 20
    accelerate launch examples/hf_trainer.py ...   # or torchrun: Trainer's accelerate splits each batch

Trainer hands its DataLoader to accelerate, which cuts every tensor of a batch along dim 0. `PaddedCollator` makes
batches whose tensors all have dim 0 = B; `unpad` turns each process's share back into `collate`'s layout. The
stream is built with rank=0, world_size=1 because accelerate does the splitting.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer
from transformers import Trainer
from transformers import TrainingArguments

import fusion_cache as fc


class DistillTrainer(Trainer):
    """A Trainer whose loss is (1 - lambda) * CE + lambda * KD against the teacher cached in the batch."""

    def __init__(self, *args, collator: fc.PaddedCollator, kd_loss: str = "kl", lambda_: float = 0.5, **kwargs):
        super().__init__(*args, data_collator=collator, **kwargs)
        self.collator, self.losses, self.lambda_ = collator, [fc.make_loss(kd_loss)], lambda_

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = self.collator.unpad(inputs)  # this process's samples, in collate's flat layout
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        answer_logits = outputs.logits.flatten(0, 1)[batch["answer_index"]]  # [M, V]
        out = fc.loss_from_logits(answer_logits, batch, self.losses, lambda_=self.lambda_)
        return (out.loss, outputs) if return_outputs else out.loss


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--student", required=True, help="the student: a local directory or HF id")
parser.add_argument("--cache", required=True, help="a cache directory (fusion-cache build --out)")
parser.add_argument("--out", required=True, help="Trainer's output_dir")
parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.student)
student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
stream = fc.DistillStream(args.cache, tokenizer, chat_template=True, max_length=512, epochs=None, rank=0, world_size=1)
training_args = TrainingArguments(
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
trainer = DistillTrainer(
    model=student, args=training_args, train_dataset=stream, collator=fc.PaddedCollator.for_stream(stream, pad_id)
)
trainer.train()
loss, processes = trainer.state.log_history[-1]["train_loss"], trainer.accelerator.num_processes
print(f"final loss {loss:.4f} on {processes} process(es)")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()  # a gloo group left open at exit can abort the process
