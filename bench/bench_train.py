"""Training-step throughput of train_bert.py's model against transformers' BertForMaskedLM.

Both models have the same shape, precision, optimizer, dropout and batch; each step is forward,
backward and optimizer step on a synthetic batch with 15% of the positions masked (20 of 128).
The two models alternate, several repetitions each, and the script reports the median of each.

    python bench/bench_train.py                                      # CPU: base, seq 128, fp32
    python bench/bench_train.py --model large --precision bf16 --micro-batch 64   # a GPU

transformers is a benchmark/test dependency only; train_bert.py does not need it.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_bert  # noqa: E402


def build_models(args, device):
    """(ours, Hugging Face's), both in training mode with dropout 0.1 and BERT's initialisation."""
    import transformers
    shape = train_bert.MODEL_PRESETS[args.model]
    ours = train_bert.BertForMLM(train_bert.BertConfig(**shape, vocab_size=30528, max_positions=args.seq_len))
    hf_config = transformers.BertConfig(vocab_size=30522, hidden_size=shape["hidden_size"],
                                        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                                        intermediate_size=shape["intermediate_size"], max_position_embeddings=args.seq_len,
                                        hidden_act="gelu")
    theirs = transformers.BertForMaskedLM._from_config(hf_config, attn_implementation="sdpa")
    return ours.to(device).train(), theirs.to(device).train()


def synthetic_batch(args, device, predictions=20):
    """Random ids with `predictions` masked positions per row, in each model's label format."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (args.micro_batch, args.seq_len), generator=generator)
    positions = torch.stack([torch.randperm(args.seq_len - 1, generator=generator)[:predictions] + 1
                             for _ in range(args.micro_batch)]).sort(dim=1).values  # (batch, predictions)
    labels = input_ids.gather(1, positions)
    full_labels = torch.full_like(input_ids, -100).scatter(1, positions, labels)  # (batch, seq): HF's format
    return {name: t.to(device) for name, t in dict(input_ids=input_ids, mlm_positions=positions, mlm_labels=labels,
                                                   full_labels=full_labels).items()}


def make_step(model, batch, args, device, is_ours):
    settings = argparse.Namespace(optimizer=args.optimizer, lr=1e-4)  # the fields make_optimizer reads
    optimizer, optimizer_name = train_bert.make_optimizer(model, settings, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    forward = torch.compile(model) if args.compile else model

    def step():
        with train_bert.autocast(device, args.precision):
            if is_ours:
                logits = forward(batch["input_ids"], batch["mlm_positions"])
            else:
                logits = forward(input_ids=batch["input_ids"]).logits
        if is_ours:
            loss = train_bert.mlm_loss(logits, batch["mlm_labels"])
        else:  # the loss BertForMaskedLM computes from labels=, over all positions with ignore_index -100
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["full_labels"].flatten())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, optimizer_name


def timed(step, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # waits for the device
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", choices=list(train_bert.MODEL_PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=train_bert.TrainConfig.micro_batch)
    parser.add_argument("--precision", default="fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--optimizer", default="lamb", choices=["lamb", "adamw"])
    parser.add_argument("--steps", type=int, default=1, help="training steps per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings of each model, alternating")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU; 0: look up the GPU's name")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    ours, theirs = build_models(args, device)
    batch = synthetic_batch(args, device)
    steps = {"train_bert": make_step(ours, batch, args, device, True),
             "transformers": make_step(theirs, batch, args, device, False)}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.model}, seq {args.seq_len}, micro-batch "
          f"{args.micro_batch}, {args.precision}, optimizer {steps['train_bert'][1]}"
          f"{', compiled' if args.compile else ''}", flush=True)
    for label, (step, _) in steps.items():  # warm-up: allocations, kernels selection, compilation
        timed(step, 2, device)
    seconds = {label: [] for label in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))  # alternate who goes first
        for label in order:
            seconds[label].append(timed(steps[label][0], args.steps, device))
        tokens = args.steps * args.micro_batch * args.seq_len
        print(f"repeat {repeat + 1}: " + ", ".join(f"{label} {tokens / seconds[label][-1]:,.0f} tokens/s"
                                                   for label in steps), flush=True)

    tokens = args.steps * args.micro_batch * args.seq_len
    tokens_per_s = {label: tokens / statistics.median(s) for label, s in seconds.items()}
    ratios = [b / a for a, b in zip(seconds["train_bert"], seconds["transformers"])]
    peak = args.peak_tflops * 1e12
    if not peak and device.type == "cuda":
        peak = next((tf * 1e12 for gpu, tf in train_bert.PEAK_TFLOPS.items() if gpu in name), 0.0)
    # the same useful FLOPs for both (nanoGPT-style, the head counted at the masked positions only)
    flops_per_token = train_bert.flops_per_sequence(ours.config, args.seq_len, 20) / args.seq_len
    for label, value in tokens_per_s.items():
        mfu = f", MFU {value * flops_per_token / peak:.1%}" if peak else ""
        print(f"{label:>13}: {value:,.0f} tokens/s (median of {args.repeats}){mfu}")
    print(f"ratio train_bert / transformers: {tokens_per_s['train_bert'] / tokens_per_s['transformers']:.2f}x "
          f"(per-repeat ratios {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x)")


if __name__ == "__main__":
    main()
