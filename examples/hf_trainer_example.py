"""deadwatch in the Hugging Face Trainer: `Trainer(..., callbacks=[DeadwatchCallback(...)])`.

A tiny BERT (2 layers, hidden size 32), built from a BertConfig with random weights (no download),
is fine-tuned for sequence classification on generated token data (label: does token 7 occur?),
with gradient accumulation over 2 batches: deadwatch counts one step per optimizer step.

    python examples/hf_trainer_example.py [--logdir runs/examples/hf_trainer]
"""

import argparse
import os

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from deadwatch.integrations.transformers import DeadwatchCallback

VOCAB, LENGTH, EXAMPLES = 64, 16, 512


def token_data(n, seed):
    """Random sequences; label 1 when token 7 occurs in them (about half do)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(1, LENGTH, (n,), generator=g)
    ids[labels == 1, where[labels == 1]] = 7
    ids[:, 0] = 1  # [CLS]
    return [{"input_ids": i, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default=os.path.join("runs", "examples", "hf_trainer"),
                        help="the Trainer's output_dir (deadwatch's logs go to its logging dir)")
    output_dir = parser.parse_args().logdir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2)
    model = BertForSequenceClassification(config)

    args = TrainingArguments(output_dir=output_dir, num_train_epochs=5, learning_rate=2e-3,
                             per_device_train_batch_size=16, gradient_accumulation_steps=2,
                             report_to="none", save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    deadwatch_cb = DeadwatchCallback(window=20, report_every=40)  # logdir: the Trainer's logging dir
    data = token_data(EXAMPLES, seed=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[deadwatch_cb])
    trainer.train()

    report = deadwatch_cb.report()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.stack([d["input_ids"] for d in data])).logits
    accuracy = (logits.argmax(1) == torch.stack([d["labels"] for d in data])).float().mean()
    print(f"\ntraining accuracy {accuracy:.1%}; {report.step} optimizer steps "
          f"({trainer.state.global_step} in the Trainer), {len(report.flagged)} site(s) flagged")
    logdir = deadwatch_cb.monitor.logdir
    print(f"deadwatch logs: {logdir}")
    print(f"  deadwatch summary {logdir}")
    print(f"  tensorboard --logdir {logdir}")


if __name__ == "__main__":
    main()
