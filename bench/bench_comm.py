"""Gradient communication: the step time of train_bert.py's model in 1 process against 2 processes on
localhost, with each --comm-hook, and the bytes every rank all-reduces per step.

Each process runs forward, backward and the built-in Lamb step on its own synthetic micro-batch
(weak scaling: 2 processes do twice the work of 1). The workers are started by torchrun, as
train_bert.py is, and use train_bert.wrap_ddp, so the hooks are the ones training uses. Each worker
times steps without communication (DDP's no_sync) and with it; the difference is the communication
that backward did not hide, including the hook's compression work.

    python bench/bench_comm.py                               # CPU, gloo, base, about 4 minutes
    python bench/bench_comm.py --model tiny --steps 5        # a quick look
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_bert  # noqa: E402

HOOKS = ["none", "fp16", "bf16", "powersgd"]


def bytes_per_step(model, hook, powersgd_rank):
    """Bytes one rank hands to all-reduce per optimizer step. fp16/bf16 halve fp32's 4 bytes. PowerSGD
    views each gradient as a matrix (shape[0], rest) and sends P (n x r) and Q (m x r) for it when that
    is under half the matrix (its min_compression_rate 2), the matrix itself otherwise, and the vectors
    (biases, LayerNorms) uncompressed."""
    total = 0
    for p in model.parameters():
        if hook in ("fp16", "bf16"):
            total += 2 * p.numel()
        elif hook == "powersgd" and p.ndim > 1:
            n, m = p.shape[0], p.numel() // p.shape[0]
            rank = min(powersgd_rank, n, m)
            total += 4 * ((n + m) * rank if (n + m) * rank * 2 < n * m else n * m)
        else:
            total += 4 * p.numel()
    return total


def worker(args):
    """One process of a measurement; rank 0 prints its result as one JSON line."""
    torch.set_num_threads(args.threads)
    rank, world_size, device = train_bert.setup_processes()
    torch.manual_seed(0)
    config = train_bert.BertConfig(**train_bert.MODEL_PRESETS[args.model], vocab_size=30528, max_positions=128)
    model = train_bert.BertForMLM(config).to(device).train()
    cfg = train_bert.TrainConfig(comm_hook=args.hook, powersgd_rank=args.powersgd_rank, bucket_mb=args.bucket_mb)
    optimizer, _ = train_bert.make_optimizer(model, cfg, device)
    train_model, powersgd = train_bert.wrap_ddp(model, cfg, device) if world_size > 1 else (model, None)
    if powersgd:
        train_bert.start_powersgd(powersgd)  # compress after the two warm-up steps
    generator = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(1000, 30000, (args.micro_batch, 128), generator=generator).to(device)
    positions = torch.stack([torch.randperm(127, generator=generator)[:20] + 1
                             for _ in range(args.micro_batch)]).sort(dim=1).values.to(device)  # (batch, 20)
    labels = input_ids.gather(1, positions)

    def step(sync):
        started = time.perf_counter()
        with train_model.no_sync() if world_size > 1 and not sync else contextlib.nullcontext():
            train_bert.mlm_loss(train_model(input_ids, positions), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    for _ in range(2):  # DDP rebuilds its buckets after the first step; PowerSGD starts at the third
        step(sync=True)
    compute_s = statistics.median(step(sync=False) for _ in range(args.steps))
    step_s = statistics.median(step(sync=True) for _ in range(args.steps))
    if rank == 0:
        print(json.dumps(dict(processes=world_size, hook=args.hook, step_s=step_s, compute_s=compute_s,
                              bytes=bytes_per_step(model, args.hook, args.powersgd_rank) if world_size > 1 else 0)))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def measure(args, processes, hook):
    worker_args = [os.path.abspath(__file__), "--worker", "--hook", hook, "--model", args.model, "--steps",
                   str(args.steps), "--micro-batch", str(args.micro_batch), "--threads", str(args.threads),
                   "--powersgd-rank", str(args.powersgd_rank), "--bucket-mb", str(args.bucket_mb)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run([sys.executable, *(launcher if processes > 1 else []), *worker_args],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_comm.py: error: the {processes}-process {hook} run failed:\n{result.stderr[-3000:]}")
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", choices=list(train_bert.MODEL_PRESETS))
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per process per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind (the median counts)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--powersgd-rank", type=int, default=4)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--hooks", default=",".join(HOOKS), help="comma-separated, measured with 2 processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hook", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    started = time.time()
    rows = [measure(args, 1, "none")] + [measure(args, 2, hook) for hook in args.hooks.split(",")]
    print(f"{args.model}, {args.micro_batch} x 128 tokens per process, {args.threads} thread(s) per process, gloo "
          f"on localhost, torch {torch.__version__}, median of {args.steps} steps, {time.time() - started:.0f} s")
    print("| processes | comm hook | step s | compute s (no_sync) | exposed comm s | MB all-reduced per rank per step "
          "| step vs 1 process |")
    print("|---|---|---|---|---|---|---|")
    single = rows[0]["step_s"]
    for row in rows:
        hook = row["hook"] if row["processes"] > 1 else "-"
        if hook == "powersgd":
            hook += f" (rank {args.powersgd_rank})"
        print(f"| {row['processes']} | {hook} | {row['step_s']:.2f} | {row['compute_s']:.2f} | "
              f"{max(0.0, row['step_s'] - row['compute_s']):.2f} | {row['bytes'] / 1e6:.1f} | "
              f"{row['step_s'] / single:.2f}x |")
    print("A ring all-reduce sends 2 (W - 1) / W times the all-reduced bytes from each of W ranks: 1x for 2.")


if __name__ == "__main__":
    main()
