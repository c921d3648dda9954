"""Distil a student from a fusion-cache cache with TRL: an `SFTTrainer` subclass whose `compute_loss` adds the
cached teacher's top-K KL to the SFT cross-entropy on the answer tokens.

    pip install 'fusion-cache[trl]'
    python examples/trl_sft.py --student ./student --cache ./cache/smollm2 --out ./runs/trl --steps 20

SFTTrainer trains on a `datasets` dataset: `fusion_cache.load_cache` decodes the cache into one (input_ids,
answer_start, topk_ids / topk_logprobs [n_answer, K], messages). Its rows are the teacher's tokens, so this path is
for a student with the teacher's tokenizer and a codec that stores ids (full, raw); for any other student, stream
the cache with `DistillStream` as in hf_trainer.py. Each process collates its own rows (a map-style dataset), so
`collate`'s flat layout is kept.
"""

import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer
from trl import SFTConfig
from trl import SFTTrainer

import fusion_cache as fc


def to_example(row: dict) -> fc.Example:
    """A `load_cache` row as the stream's `Example`: the teacher's tokens, and its top-K at every answer row."""
    ids = np.asarray(row["topk_ids"], dtype=np.int32)  # [n_answer, K]
    values = np.asarray(row["topk_logprobs"], dtype=np.float32)  # [n_answer, K]
    target = fc.TeacherTarget(student_rows=np.arange(len(values)), values=values, ids=ids)
    return fc.Example(row["sample_id"], np.asarray(row["input_ids"], np.int64), row["answer_start"], [target])


class DistillSFTTrainer(SFTTrainer):
    """An SFTTrainer whose loss is (1 - lambda) * CE + lambda * top-K KL to the cached teacher."""

    def __init__(self, *args, pad_id: int, lambda_: float = 0.5, **kwargs):
        collator = lambda rows: fc.collate([to_example(r) for r in rows], pad_id, n_teachers=1)  # noqa: E731
        super().__init__(*args, data_collator=collator, **kwargs)
        self.losses, self.lambda_ = [fc.make_loss("kl")], lambda_

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        answer_logits = outputs.logits.flatten(0, 1)[inputs["answer_index"]]  # [M, V]
        out = fc.loss_from_logits(answer_logits, inputs, self.losses, lambda_=self.lambda_)
        return (out.loss, outputs) if return_outputs else out.loss


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--student", required=True, help="the student: a directory or HF id with the teacher's tokenizer")
parser.add_argument("--cache", required=True, help="a cache directory (fusion-cache build --out)")
parser.add_argument("--out", required=True, help="SFTTrainer's output_dir")
parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.student)
student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
config = SFTConfig(
    output_dir=args.out,
    max_steps=args.steps,
    per_device_train_batch_size=2,
    learning_rate=1e-4,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=not torch.cuda.is_available(),  # on CPU, only this makes torchrun's processes one gloo group
    bf16=torch.cuda.is_available(),  # SFTConfig's default asks for bf16, which a CPU run refuses
    remove_unused_columns=False,  # the collator reads the cache's columns
    dataset_kwargs={"skip_prepare_dataset": True},  # the rows are tokenized already (the teacher's tokens)
)
trainer = DistillSFTTrainer(
    model=student, args=config, train_dataset=fc.load_cache(args.cache), processing_class=tokenizer, pad_id=pad_id
)
trainer.train()
print(f"final loss {trainer.state.log_history[-1]['train_loss']:.4f}")
