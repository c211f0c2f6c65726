r"""Pretrain BERT with masked language modelling on a wall-clock budget, as in "How to Train BERT with
an Academic Budget" (Izsak et al. 2021): a pre-LayerNorm BERT-large, a sparse MLM head, LAMB, mixed
precision and a learning rate that follows the clock.

    python prepare_data.py                                                 # Wikipedia + BookCorpus -> data/prepared
    torchrun --nproc_per_node 8 train_bert.py --out runs/24h --hours 24 --plan   # what 24 hours buy, in a minute
    torchrun --nproc_per_node 8 train_bert.py --out runs/24h --hours 24          # the 24hBERT recipe
    python train_bert.py --data data/demo --out runs/demo --model tiny --batch 64 --micro-batch 32 --max-steps 300 \
        --lr 1e-2                                                          # the offline demo, on a CPU
    python train_bert.py --plot runs/24h runs/24h-adamw --plot-file compare.png  # two runs in one picture
    python train_bert.py --export-hf runs/24h hf/24h                       # for Hugging Face transformers
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB \
        train_bert.py --data /shared/wiki --out /shared/runs/lans --optimizer lans --schedule lans --lr 0.005 \
        --warmup 0.05 --batch 98304 --micro-batch 64 --comm-hook bf16

The file reads top to bottom: config -> model -> optimizer -> messages -> data -> schedule -> checkpoints (resume,
--init-from) -> pretrained models (load, export) -> processes -> before the loop -> one optimizer step ->
log lines -> the run: train() -> --plan -> the picture -> main(). finetune_glue.py imports load_pretrained
from here.
"""
import signal
import sys
import time

PROCESS_START_S = time.time()  # the --hours budget counts from here, before the slow imports below


def interrupted_while_starting(signum, frame):
    """Ctrl-C or SIGTERM before the training loop takes over the signals (the imports below alone take
    seconds): one line, not a traceback. There is nothing to save yet."""
    print("train_bert.py: interrupted while starting; no checkpoint was written", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)
    signal.signal(signal.SIGTERM, interrupted_while_starting)

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import queue
import resource
import shutil
import socket
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

# -----------------------------------------------------------------------------------------------
# Config


@dataclass
class BertConfig:
    """The model's shape. Stored as a dict in every checkpoint: BertConfig(**checkpoint["model_config"])."""
    vocab_size: int = 30528  # 30522 rounded up to a multiple of 8 for tensor cores
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    max_positions: int = 128
    type_vocab_size: int = 2  # segments A/B; pretraining uses only 0, GLUE sentence pairs use both
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pre_ln: bool = True  # False: the original BERT's post-LayerNorm blocks (and Hugging Face checkpoints)


MODEL_PRESETS = {
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),  # 24hBERT
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),  # for tests
}
MODEL_FLAGS = {  # the BertConfig fields the command line can override, and what they mean
    "hidden_size": "width of the embeddings and of every layer", "num_layers": "number of transformer layers",
    "num_heads": "attention heads; they must divide --hidden-size", "intermediate_size": "width of the feed-forward layers",
    "dropout": "dropout on the embeddings and on every residual branch", "attention_dropout": "dropout on the attention weights",
    "pre_ln": "true: LayerNorm before each attention and feed-forward (24hBERT); false: after (the original BERT)"}


def arg(default, help, **argparse_options):
    return field(default=default, metadata=dict(help=help, **argparse_options))


@dataclass
class TrainConfig:
    """One training run. Each field is a command-line flag (--micro-batch for micro_batch)."""
    data: str = arg("data/prepared", "folder written by prepare_data.py, whose --out has the same default")
    out: str = arg("out", "folder for checkpoints/ and metrics.jsonl")
    hours: float = arg(24.0, "wall-clock budget; the run stops with a checkpoint before it runs out")
    model: str = arg("large", "model shape", choices=list(MODEL_PRESETS))
    batch: int = arg(4096, "global batch in sequences, over all GPUs and accumulation steps")
    micro_batch: int = arg(32, "sequences per GPU per forward pass")
    lr: float = arg(1e-3, "peak learning rate")
    warmup: float = arg(0.06, "fraction of the budget (time, or --max-steps) spent warming up")
    schedule: str = arg("linear", "linear: warmup, then linear decay to 0 (24hBERT); lans: warmup, --constant "
                        "at the peak, then linear decay to 0 (LANS)", choices=["linear", "lans"])
    constant: float = arg(0.25, "with --schedule lans: fraction of the budget held at the peak after warmup")
    optimizer: str = arg("lamb", "lamb (apex FusedLAMB if available), adamw (the paper's recipe) or lans "
                         "(for global batches of 32K-96K)", choices=["lamb", "adamw", "lans"])
    precision: str = arg("auto", "auto: bf16 on GPUs that support it, else fp16; fp32 on CPU",
                         choices=["auto", "bf16", "fp16", "fp32"])
    max_steps: int = arg(0, "stop after this many optimizer steps and schedule by steps (0: schedule by time)")
    resume: str = arg("", "checkpoint file, or a run's --out folder to continue from its latest checkpoint")
    init_from: str = arg("", "start a new run from another run's weights (a checkpoint, or a run's --out): a second "
                         "phase with other data, length, batch, optimizer or schedule")
    init_optimizer: bool = arg(False, "with --init-from: carry the optimizer's moments over too (same --optimizer)")
    seed: int = arg(0, "seed of the initialisation, the data order and dropout")
    compile: bool = arg(False, "run the model through torch.compile")
    plan: bool = arg(False, "time a few dozen real micro-batches, say what the budget buys at that speed (steps, "
                     "sequences, epochs, tokens per parameter) and exit without writing anything")
    checkpoint_minutes: float = arg(30.0, "minutes between checkpoints (one is always written at the end)")
    val_minutes: float = arg(0.0, "minutes between validations on the held-out split (0: about 20 per run, at most "
                             "30 minutes apart); every run also validates at its end")
    log_every: int = arg(10, "optimizer steps between log lines")
    peak_tflops: float = arg(0.0, "the device's peak TFLOP/s for MFU (0: look up the GPU's name)")
    comm_hook: str = arg("none", "how DDP sends gradients between processes: none (fp32 all-reduce), fp16 or "
                         "bf16 (half the bytes), powersgd (low rank, from the end of warmup on)",
                         choices=["none", "fp16", "bf16", "powersgd"])
    powersgd_rank: int = arg(4, "rank of PowerSGD's approximation of each gradient matrix: higher sends more and "
                             "loses less")
    bucket_mb: float = arg(25.0, "DDP's gradient bucket size in MB (bucket_cap_mb): fewer, larger messages when bigger")
    model_overrides: dict = field(default_factory=dict)  # from --hidden-size etc., applied over the preset


TRAIN_FLAGS = [f.name for f in fields(TrainConfig) if f.name != "model_overrides"]


# What each numeric flag accepts, as a test and in words. NaN fails every comparison, so it is refused too.
FLAG_RANGES = {
    "hours": (lambda v: 0 < v <= 10_000, "in (0, 10000]"),
    "batch": (lambda v: 1 <= v <= 1 << 24, "an integer in [1, 16777216]"),
    "micro_batch": (lambda v: 1 <= v <= 1 << 16, "an integer in [1, 65536]"),
    "lr": (lambda v: 0 < v <= 3.4e38, "positive and finite (at most 3.4e38, the largest float32)"),
    "warmup": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "constant": (lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "max_steps": (lambda v: 0 <= v <= 1 << 40, "an integer >= 0 (0: schedule by time)"),
    "seed": (lambda v: 0 <= v < 1 << 62, "an integer in [0, 2**62)"),
    "checkpoint_minutes": (lambda v: 0 <= v < math.inf, "a number of minutes >= 0"),
    "val_minutes": (lambda v: 0 <= v < math.inf, "a number of minutes >= 0"),
    "log_every": (lambda v: 1 <= v <= 1 << 40, "an integer >= 1"),
    "peak_tflops": (lambda v: 0 <= v < math.inf, ">= 0 and finite (0: look up the GPU)"),
    "powersgd_rank": (lambda v: 1 <= v <= 1 << 16, "an integer in [1, 65536]"),
    "bucket_mb": (lambda v: 0 < v <= 1 << 20, "in (0, 1048576]"),
}
KEEP_CHECKPOINTS = 3  # older checkpoints are deleted, never newer ones
NONFINITE_STEPS_LIMIT = 10  # this many skipped steps in a row stop the run
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "V100": 125,
               "TITAN V": 110, "RTX 4090": 165, "RTX 3090": 71}  # dense bf16/fp16 tensor-core peaks


# -----------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    """One transformer layer: self-attention then feed-forward, each with a residual connection."""

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.pre_ln = config.pre_ln
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)  # query, key and value in one matmul
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(hidden, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def attention(self, x, mask):
        batch, seq, hidden = x.shape
        # (batch, seq, 3 * hidden) -> 3 x (batch, heads, seq, head_dim)
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.attn_out(y.transpose(1, 2).reshape(batch, seq, hidden))  # (batch, seq, hidden)

    def ffn(self, x):
        return self.ffn_out(F.gelu(self.ffn_in(x)))

    def forward(self, x, mask):
        if self.pre_ln:  # normalise the input of each branch; the residual stream stays unnormalised
            x = x + self.dropout(self.attention(self.attn_norm(x), mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class BertEncoder(nn.Module):
    """Embeddings and transformer layers: token ids (batch, seq) -> hidden states (batch, seq, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        # pre-LN leaves the residual stream unnormalised, so it ends with one more LayerNorm
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_ln else None

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        """attention_mask: (batch, seq), 1 for real tokens and 0 for padding; None when nothing is padded."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # every token in segment 0, without a lookup
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.dropout(self.embedding_norm(x))
        # Without a mask, SDPA can use its fastest (flash) kernel. With one: True = attend, and
        # (batch, 1, 1, seq) broadcasts over heads and query positions.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.final_norm is None else self.final_norm(x)


class BertForMLM(nn.Module):
    """The encoder with a masked-language-model head whose decoder shares the word embeddings."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = BertEncoder(config)
        self.head_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.head_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(init_weights)

    def forward(self, input_ids, mlm_positions, attention_mask=None):
        """mlm_positions: (batch, predictions) -> logits (batch, predictions, vocab).

        Sparse prediction: the head runs on the ~15% masked positions only, never on all seq of them,
        which saves most of the cost of the (hidden x vocab) decoder."""
        hidden = self.encoder(input_ids, attention_mask=attention_mask)  # (batch, seq, hidden)
        index = mlm_positions[:, :, None].expand(-1, -1, hidden.size(-1))  # (batch, predictions, hidden)
        return self.predict(torch.gather(hidden, 1, index))

    def predict(self, hidden):
        """The MLM head: (..., hidden) -> (..., vocab)."""
        x = self.head_norm(F.gelu(self.head_dense(hidden)))
        return F.linear(x, self.encoder.word_embeddings.weight, self.decoder_bias)


def model_config_problem(config, spell=str):
    """Why a BertConfig cannot work, in words, or None. spell(field) names a field as the user wrote it
    (a flag, or a config.json key)."""
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions",
                 "type_vocab_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 24:
            return f"{spell(name)} must be an integer in [1, 16777216], not {value!r}"
    if config.hidden_size % config.num_heads:
        return f"{spell('hidden_size')} {config.hidden_size} is not divisible by {spell('num_heads')} {config.num_heads}"
    for name in ("dropout", "attention_dropout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            return f"{spell(name)} must be a probability in [0, 1), not {value!r}"
    if isinstance(config.layer_norm_eps, bool) or not isinstance(config.layer_norm_eps, (int, float)) \
            or not 0 < config.layer_norm_eps < 1:
        return f"{spell('layer_norm_eps')} must be in (0, 1), not {config.layer_norm_eps!r}"
    if not isinstance(config.pre_ln, bool):
        return f"{spell('pre_ln')} must be true or false, not {config.pre_ln!r}"
    return None


def parameter_count(config):
    """BertForMLM's parameters, counted from its shape (what --plan and the memory check need before
    building it): embeddings, layers, the final LayerNorm of pre-LN, the MLM head."""
    hidden, inner = config.hidden_size, config.intermediate_size
    embeddings = (config.vocab_size + config.max_positions + config.type_vocab_size) * hidden + 2 * hidden
    layer = 4 * hidden * hidden + 2 * hidden * inner + 9 * hidden + inner  # qkv, out, ffn, 2 LayerNorms
    head = hidden * hidden + 3 * hidden + config.vocab_size  # dense, LayerNorm, decoder bias (tied weights)
    return embeddings + config.num_layers * layer + (2 * hidden if config.pre_ln else 0) + head


def init_weights(module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases; LayerNorm keeps its 1 and 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def mlm_loss(logits, labels):
    """Mean cross-entropy over the used prediction slots; unused slots have label -100. A micro-batch
    with no masked token at all (rows of [UNK] have nothing to mask) counts 0, not the NaN of a mean
    over nothing, which would throw the whole step away."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def flops_per_sequence(config, seq_len, predictions):
    """Training FLOPs (forward and backward) of one sequence, counted as nanoGPT does: 6 per weight
    per token it multiplies, plus attention's two (seq x seq) matmuls. The head counts only at the
    masked positions, because that is where it runs."""
    hidden, layers = config.hidden_size, config.num_layers
    layer_weights = 4 * hidden * hidden + 2 * hidden * config.intermediate_size
    head_weights = hidden * hidden + hidden * config.vocab_size
    attention = 12 * layers * hidden * seq_len * seq_len
    return 6 * layers * layer_weights * seq_len + attention + 6 * head_weights * predictions


# -----------------------------------------------------------------------------------------------
# Optimizer


def global_grad_norm(params):
    """L2 norm of all gradients together, as a tensor (no host synchronisation)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class Lamb(torch.optim.Optimizer):
    """LAMB with the constructor, defaults and math of apex.optimizers.FusedLAMB, in torch._foreach ops.

    Per step: clip all gradients together to max_grad_norm; Adam moments with bias correction and eps
    outside the square root; weight decay added to the update (adam_w_mode); then each tensor moves by
    lr * ||p|| / ||update|| * update. That trust ratio applies only in groups with weight decay (or
    everywhere with use_nvlamb), and is 1 when either norm is 0."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False):
        if amsgrad:
            raise RuntimeError("Lamb does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.adam_w_mode = adam_w_mode
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb

    def zero_grad(self, set_to_none=None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not all_params:
            return loss
        # FusedLAMB divides by norm / max_grad_norm when the norm exceeds it; a tensor, so no sync
        grad_norm = global_grad_norm(all_params)
        max_norm = self.defaults["max_grad_norm"]
        clip_divisor = torch.where(grad_norm > max_norm, grad_norm / max_norm, torch.ones_like(grad_norm))
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] = group.get("step", 0) + 1  # one step count per group, as FusedLAMB
            beta1, beta2 = group["betas"]
            decay, lr = group["weight_decay"], group["lr"]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            grads = [p.grad for p in params]
            torch._foreach_div_(grads, clip_divisor)  # in place, as torch.nn.utils.clip_grad_norm_
            if not self.adam_w_mode and decay != 0:  # classic L2: decay enters the gradient
                torch._foreach_add_(grads, params, alpha=decay)
            if group["grad_averaging"]:
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
            else:
                torch._foreach_mul_(exp_avgs, beta1)
                torch._foreach_add_(exp_avgs, grads)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            # update = (m / c1) / (sqrt(v / c2) + eps) = sqrt(c2) / c1 * m / (sqrt(v) + eps sqrt(c2)),
            # the form torch's Adam uses: scalars fold into fewer passes over the tensors
            c1 = 1 - beta1 ** group["step"] if group["bias_correction"] else 1.0
            c2 = 1 - beta2 ** group["step"] if group["bias_correction"] else 1.0
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, group["eps"] * math.sqrt(c2))
            if self.adam_w_mode and decay != 0:  # decoupled decay: part of the update the trust ratio scales
                updates = torch._foreach_mul(params, decay)
                torch._foreach_addcdiv_(updates, exp_avgs, denominators, value=math.sqrt(c2) / c1)
            else:
                updates = torch._foreach_div(exp_avgs, denominators)
                torch._foreach_mul_(updates, math.sqrt(c2) / c1)
            del denominators
            if self.use_nvlamb or decay != 0:
                ratios = trust_ratios(params, updates)
                torch._foreach_addcmul_(params, updates, list((-lr * ratios).unbind()))
            else:
                torch._foreach_add_(params, updates, alpha=-lr)
        return loss


def trust_ratios(numerators, denominators):
    """||a|| / ||b|| per pair of tensors, 1 where either norm is 0; stays on the device (no host sync)."""
    a = torch.stack(torch._foreach_norm(numerators))
    b = torch.stack(torch._foreach_norm(denominators))
    return torch.where((a > 0) & (b > 0), a / b, torch.ones_like(a))


class Lans(torch.optim.Optimizer):
    """LANS (Zheng et al. 2020, arXiv 2006.13484), in torch._foreach ops. Per tensor x with gradient g:

        g~ = g / ||g||  (0 where ||g|| = 0)          m = b1 m + (1 - b1) g~     v = b2 v + (1 - b2) g~^2
        d = sqrt(v / c2) + eps                        r = (m / c1) / d + wd x    c = g~ / d + wd x
        x <- x - lr b1 (||x|| / ||r||) r - lr (1 - b1) (||x|| / ||c||) c   (each ratio 1 where a norm is 0)

    with bias corrections c1 = 1 - b1^step, c2 = 1 - b2^step. The second term is Nesterov's look-ahead.
    max_grad_norm (None: off) clips all gradients together before the per-tensor normalisation; note that
    this normalisation divides out any common factor, so the clip changes the step only by rounding."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if all_params and self.max_grad_norm is not None:
            grad_norm = global_grad_norm(all_params)
            clip_divisor = torch.clamp(grad_norm / self.max_grad_norm, min=1.0)
            torch._foreach_div_([p.grad for p in all_params], clip_divisor)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            decay, lr = group["weight_decay"], group["lr"]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
            grads = [p.grad for p in params]
            grad_norms = torch.stack(torch._foreach_norm(grads))
            # a zero gradient divided by 1 stays 0, which is the rule for ||g|| = 0
            divisors = torch.where(grad_norms > 0, grad_norms, torch.ones_like(grad_norms))
            torch._foreach_div_(grads, list(divisors.unbind()))  # g~, in place as Lamb's clipping
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            # (m / c1) / (sqrt(v / c2) + eps) = sqrt(c2) / c1 * m / (sqrt(v) + eps sqrt(c2)), as in Lamb
            c1, c2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, group["eps"] * math.sqrt(c2))
            adam_updates = torch._foreach_mul(params, decay)  # r = m^ / d + wd x
            torch._foreach_addcdiv_(adam_updates, exp_avgs, denominators, value=math.sqrt(c2) / c1)
            grad_updates = torch._foreach_mul(params, decay)  # c = g~ / d + wd x
            torch._foreach_addcdiv_(grad_updates, grads, denominators, value=math.sqrt(c2))
            del denominators
            # both trust ratios use x before either update moves it
            adam_ratios = trust_ratios(params, adam_updates)
            grad_ratios = trust_ratios(params, grad_updates)
            torch._foreach_addcmul_(params, adam_updates, list((-lr * beta1 * adam_ratios).unbind()))
            torch._foreach_addcmul_(params, grad_updates, list((-lr * (1 - beta1) * grad_ratios).unbind()))
        return loss


def make_optimizer(model, cfg, device):
    """(optimizer, a line saying which implementation runs). No weight decay on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":  # the paper's released recipe: no gradient clipping
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True), "torch AdamW (fused)"
    if cfg.optimizer == "lans":  # no clipping: LANS normalises each gradient tensor itself
        return Lans(groups, lr=cfg.lr), "built-in Lans"
    reason = "the model is not on CUDA"
    if device.type == "cuda":
        try:  # a PyPI package also called apex is unrelated; only NVIDIA's has apex.optimizers
            from apex.optimizers import FusedLAMB
            return FusedLAMB(groups, lr=cfg.lr, max_grad_norm=1.0), "apex FusedLAMB"
        except (ImportError, RuntimeError) as error:
            reason = f"apex FusedLAMB is unavailable: {error}"
    return Lamb(groups, lr=cfg.lr, max_grad_norm=1.0), f"built-in Lamb ({reason})"


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


# -----------------------------------------------------------------------------------------------
# Messages: one line for the user on a mistake, rank 0's log lines, numbers as people say them


def fail(message):
    """Ends the program with one line for the user, without a traceback."""
    raise SystemExit(f"train_bert.py: error: {message}")


def log(message, rank):
    if rank == 0:
        print(message, flush=True)


def readable(seconds):
    """A duration as people say it: 0 s, 0.34 s, 7.7 s, 45 s, 12.5 min, 3.2 h."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def amount(count):
    """A large count as people say it: 850, 12.3k, 4.56M, 1.23B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return f"{count:.3g}"


# -----------------------------------------------------------------------------------------------
# Data: the memory-mapped arrays of prepare_data.py (the contract is meta.json, see its docstring)


ARRAYS = ("input_ids", "mask_positions", "mask_tokens")


def open_data(data_dir):
    """Reads DATA/meta.json, checks every value it states, checks tokenizer.json against the hash meta.json
    records, and memory-maps every shard after checking its shape against meta.json's. Returns (meta,
    splits, tokenizer JSON, sha256 of meta.json): that hash names the data, wherever the folder lies."""
    def incomplete(reason):
        fail(f"data directory {data_dir} is incomplete: {reason}; run prepare_data.py again")

    if not os.path.isdir(data_dir) and os.path.isdir(data_dir.rstrip("/") + ".partial"):
        incomplete(f"only {data_dir.rstrip('/')}.partial exists, so prepare_data.py is still running or was stopped")
    if os.path.isfile(data_dir):
        fail(f"--data {data_dir} is a file; pass the folder that prepare_data.py wrote")
    if not os.path.isdir(data_dir):
        fail(f"data directory {data_dir} does not exist; create it with prepare_data.py --out {data_dir}")
    prepared_inside = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(data_dir, "*", "meta.json")))
    if prepared_inside and not os.path.exists(os.path.join(data_dir, "meta.json")):
        fail(f"{data_dir} is not a prepared data folder but holds {len(prepared_inside)}: "
             f"{', '.join(os.path.basename(p) for p in prepared_inside)}; pass one, e.g. --data {prepared_inside[0]}")
    try:
        with open(os.path.join(data_dir, "meta.json"), "rb") as f:
            meta_bytes = f.read()
        meta = json.loads(meta_bytes)
    except FileNotFoundError:
        incomplete("meta.json is missing (prepare_data.py writes it last)")
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
        incomplete(f"meta.json cannot be read ({error})")
    problem = meta_problem(meta)
    if problem:
        incomplete(f"meta.json {problem}")
    tokenizer_file = os.path.join(data_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        incomplete("tokenizer.json is missing")
    with open(tokenizer_file, "rb") as f:
        tokenizer_bytes = f.read()
    if hashlib.sha256(tokenizer_bytes).hexdigest() != meta["tokenizer_sha256"]:
        fail(f"{tokenizer_file} is not the tokenizer the data was made with (its sha256 differs from the one in "
             f"meta.json); put the original back, or run prepare_data.py again")
    try:
        tokenizer_size = Tokenizer.from_str(tokenizer_bytes.decode("utf-8")).get_vocab_size()
    except Exception as error:  # not UTF-8, or tokenizers' own exception types
        incomplete(f"tokenizer.json cannot be read ({error.__class__.__name__})")
    if tokenizer_size != meta["vocab_size"]:
        incomplete(f"meta.json has vocab_size {meta['vocab_size']}, its tokenizer.json has {tokenizer_size} tokens")
    splits = {}
    for name in ("train", "val"):
        listed_split, shards = meta["splits"][name], []
        for shard in listed_split["shards"]:
            arrays = {}
            for key in ARRAYS:
                listed = shard[key]
                try:
                    arrays[key] = np.load(os.path.join(data_dir, listed["file"]), mmap_mode="r")
                except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
                    incomplete(f"{listed['file']} cannot be read ({error.__class__.__name__})")
                if list(arrays[key].shape) != listed["shape"] or arrays[key].dtype.name != listed["dtype"]:
                    incomplete(f"{listed['file']} holds {arrays[key].dtype.name} {list(arrays[key].shape)}, "
                               f"meta.json lists {listed['dtype']} {listed['shape']}")
            rows = len(arrays["input_ids"])
            expected = {"input_ids": [rows, meta["seq_len"]],
                        "mask_positions": [listed_split["duplicates"], rows, meta["max_predictions"]]}
            expected["mask_tokens"] = expected["mask_positions"]
            for key in ARRAYS:
                if list(arrays[key].shape) != expected[key] or arrays[key].dtype.kind != "u":
                    incomplete(f"{shard[key]['file']} holds {arrays[key].dtype.name} {list(arrays[key].shape)}, "
                               f"where meta.json's seq_len, max_predictions and duplicates need unsigned {expected[key]}")
            shards.append(arrays)
        sizes = [len(s["input_ids"]) for s in shards]
        if listed_split.get("sequences", sum(sizes)) != sum(sizes):
            incomplete(f"meta.json counts {listed_split['sequences']} {name} sequences, its shards hold {sum(sizes)}")
        splits[name] = {"shards": shards, "offsets": np.cumsum([0] + sizes), "sequences": sum(sizes),
                        "duplicates": listed_split["duplicates"], "vocab_size": meta["vocab_size"]}
    return meta, splits, tokenizer_bytes.decode("utf-8", errors="replace"), hashlib.sha256(meta_bytes).hexdigest()


def meta_problem(meta):
    """What is wrong with the values in a meta.json, in words that follow "meta.json", or None."""
    def integer(value, low, high):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if not isinstance(meta, dict):
        return "does not hold a JSON object"
    if type(meta.get("format_version")) is not int or meta["format_version"] != 1:  # not true, not 1.0
        return f"has format_version {meta.get('format_version')!r}, this script reads 1"
    required = ("seq_len", "vocab_size", "special_token_ids", "max_predictions", "splits", "tokenizer_sha256")
    missing = [key for key in required if key not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not integer(meta["seq_len"], 8, 65535):
        return f"has seq_len {meta['seq_len']!r}, not an integer in [8, 65535]"
    if not integer(meta["vocab_size"], 8, 1 << 24):
        return f"has vocab_size {meta['vocab_size']!r}, not an integer in [8, 16777216]"
    if not integer(meta["max_predictions"], 1, meta["seq_len"] - 2):
        return f"has max_predictions {meta['max_predictions']!r}, not an integer in [1, seq_len - 2]"
    ids = meta["special_token_ids"]
    if not isinstance(ids, dict) or not all(integer(ids.get(k), 0, meta["vocab_size"] - 1) for k in ("cls", "sep", "pad")):
        return f"has special_token_ids {ids!r}, which lack cls, sep or pad ids below vocab_size"
    if not isinstance(meta["tokenizer_sha256"], str):
        return "has a tokenizer_sha256 that is not a string"
    splits = meta["splits"]
    if not isinstance(splits, dict) or not {"train", "val"} <= set(splits):
        return "lacks the train or val split"
    for name in ("train", "val"):
        split = splits[name]
        if not isinstance(split, dict) or not integer(split.get("duplicates"), 1, 1 << 16) \
                or not isinstance(split.get("shards"), list):
            return f"has a {name} split without a duplicates count in [1, 65536] and a list of shards"
        for shard in split["shards"]:
            for key in ARRAYS:
                listed = shard.get(key) if isinstance(shard, dict) else None
                if not (isinstance(listed, dict) and isinstance(listed.get("file"), str)
                        and listed["file"] == os.path.basename(listed["file"]) and isinstance(listed.get("shape"), list)
                        and isinstance(listed.get("dtype"), str)):  # a bare file name: nothing outside the folder
                    return f"lists a {name} shard whose {key} entry lacks a file name, shape or dtype"
    return None


def read_batch(split, rows, duplicate, pad_id):
    """The model inputs of `rows` (indices into the split) under masking number `duplicate`, as numpy:
    input_ids (batch, seq) with the masked tokens in place, mlm_positions and mlm_labels (batch,
    predictions) with label -100 in unused slots, and attention_mask (batch, seq) only if a row is padded."""
    rows = np.asarray(rows)
    first = split["shards"][0]
    seq_len, predictions = first["input_ids"].shape[1], first["mask_positions"].shape[2]
    ids = np.empty((len(rows), seq_len), np.int64)
    positions = np.empty((len(rows), predictions), np.int64)
    tokens = np.empty((len(rows), predictions), np.int64)
    shard_of_row = np.searchsorted(split["offsets"], rows, side="right") - 1
    for s in np.unique(shard_of_row):
        slots = np.nonzero(shard_of_row == s)[0]
        local = rows[slots] - split["offsets"][s]
        order = np.argsort(local)  # memory maps read faster in file order
        slots, local = slots[order], local[order]
        shard = split["shards"][s]
        ids[slots] = shard["input_ids"][local]
        positions[slots] = shard["mask_positions"][duplicate][local]
        tokens[slots] = shard["mask_tokens"][duplicate][local]
        # values are checked as they are read (a pass over all the arrays would take minutes at startup)
        if positions[slots].max() >= seq_len or max(ids[slots].max(), tokens[slots].max()) >= split["vocab_size"]:
            fail(f"{os.path.dirname(shard['input_ids'].filename)} is damaged: a row of its shard "
                 f"{os.path.basename(shard['input_ids'].filename).removesuffix('-input_ids.npy')} holds a masked "
                 f"position beyond seq_len or a token "
                 f"id beyond the vocabulary; run prepare_data.py again")
    used = positions != 0  # position 0 is [CLS], never masked: it marks an unused slot
    labels = np.where(used, np.take_along_axis(ids, positions, axis=1), -100)
    tokens = np.where(used, tokens, ids[:, :1])  # unused slots write [CLS] back onto position 0
    input_ids = ids.copy()
    np.put_along_axis(input_ids, positions, tokens, axis=1)
    batch = {"input_ids": input_ids, "mlm_positions": positions, "mlm_labels": labels}
    padding = ids == pad_id
    if padding.any():  # rare: packing fills almost every row
        batch["attention_mask"] = (~padding).astype(np.int64)
    return batch


def train_batches(split, cfg, pad_id, rank, world_size, epoch, step_in_epoch, pin_memory):
    """Yields (epoch, step_in_epoch, micro-batch) from the given position on, forever: this rank's
    batch // (world_size * micro_batch) micro-batches of each step in turn, each read only when it is
    asked for, so memory does not grow with the global batch (--batch 65536 reads like --batch 64).

    Each epoch shuffles all training sequences; step s takes the global batch order[s*B:(s+1)*B] and
    rank r its r-th equal slice, so ranks read disjoint rows, do the same number of steps, and the
    sequences of a step do not depend on the number of GPUs. Epoch e uses masking e % duplicates."""
    steps_per_epoch = split["sequences"] // cfg.batch
    while True:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(split["sequences"])
        for step in range(step_in_epoch, steps_per_epoch):
            mine = order[step * cfg.batch:(step + 1) * cfg.batch].reshape(world_size, -1)[rank]  # row indices
            for rows in mine.reshape(-1, cfg.micro_batch):  # (micro_batches, micro_batch)
                yield epoch, step, to_tensors(read_batch(split, rows, epoch % split["duplicates"], pad_id), pin_memory)
        epoch, step_in_epoch = epoch + 1, 0


def to_tensors(batch, pin_memory):
    """numpy -> torch; pinned memory lets the copy to the GPU run asynchronously (non_blocking=True)."""
    tensors = {name: torch.from_numpy(array) for name, array in batch.items()}
    return {name: t.pin_memory() for name, t in tensors.items()} if pin_memory else tensors


def prefetch(iterator, depth=2):
    """Runs `iterator` in a background thread, `depth` items ahead, so reading the memory maps
    overlaps with the GPU's work."""
    items = queue.Queue(maxsize=depth)

    def produce():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as error:  # re-raised in the training loop
            items.put(error)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = items.get()
        if isinstance(item, BaseException):
            raise item
        yield item


# -----------------------------------------------------------------------------------------------
# Schedule


def learning_rate(progress, peak_lr, warmup, constant=0.0, degree=1.0):
    """Linear warmup over the first `warmup` of the run, `constant` of it at peak_lr, then polynomial
    decay to 0 at its end. --schedule linear (24hBERT) has constant 0; --schedule lans (GluonNLP's
    LANS recipe: warmup 0.05, constant 0.25) holds the peak. Both decay with degree 1.

    progress: elapsed time / budget (24hBERT's time-based schedule) or step / max_steps, in [0, 1].
    Each piece equals peak_lr where the next one begins, so it is continuous for any budget."""
    if progress < warmup:
        return peak_lr * progress / warmup
    if progress < warmup + constant:
        return peak_lr
    return peak_lr * max(0.0, (1.0 - progress) / (1.0 - warmup - constant)) ** degree


def progress_of(cfg, step, elapsed_s):
    """How far the run is through its schedule, in [0, 1]: step / --max-steps, or else time spent / --hours."""
    return min(step / cfg.max_steps if cfg.max_steps else elapsed_s / (cfg.hours * 3600), 1.0)


def lr_at(cfg, progress):
    constant = cfg.constant if cfg.schedule == "lans" else 0.0
    return learning_rate(progress, cfg.lr, cfg.warmup, constant)


# -----------------------------------------------------------------------------------------------
# Checkpoints, the output folder, resuming and --init-from


def checkpoint_files(path):
    """The step-N.pt files of a run's --out folder (or of its checkpoints/ folder), oldest first."""
    found = glob.glob(os.path.join(path, "checkpoints", "step-*.pt")) + glob.glob(os.path.join(path, "step-*.pt"))
    return sorted((f for f in found if os.path.basename(f)[5:-3].isdigit()), key=step_of)


def step_of(file):
    """The step of a checkpoint file's name, as a number: names sort wrongly past step 99,999,999."""
    return int(os.path.basename(file)[5:-3])


def load_checkpoint(path):
    """(file, checkpoint, unreadable): a checkpoint file, or the newest readable checkpoint of a run's folder.
    unreadable lists the newer files passed over because they cannot be read (cut short by a crash or a
    full disk in a version that wrote in place, or damaged since)."""
    if os.path.isfile(path):
        return path, read_checkpoint(path), []
    found = checkpoint_files(path)
    if not found:
        raise ValueError(f"no checkpoint found at {path}")
    unreadable, reasons = [], []
    for file in reversed(found):
        try:
            return file, read_checkpoint(file), unreadable
        except ValueError as error:
            unreadable.append(file)
            reasons.append(str(error))
    raise ValueError(f"none of the {len(found)} checkpoints in {path} can be read; the newest: {reasons[0]}")


def read_checkpoint(path):
    """A checkpoint of this script with its values checked; ValueError naming the file if it cannot be used."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and IO errors all mean the same to the user
        raise ValueError(f"{path} cannot be read as a train_bert.py checkpoint ({error.__class__.__name__})")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_config"), dict) \
            or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path} is not a train_bert.py checkpoint")
    try:
        problem = model_config_problem(BertConfig(**checkpoint["model_config"]))
    except TypeError:
        problem = "its model_config has unknown or missing fields"
    if problem:
        raise ValueError(f"{path} cannot be used: {problem}")
    if not isinstance(checkpoint.get("tokenizer_json"), str):
        raise ValueError(f"checkpoint {path} carries no tokenizer; it was not written by train_bert.py")
    state = checkpoint.get("state", {})  # only --resume needs it; a checkpoint to fine-tune may lack it
    counters = ("step", "epoch", "step_in_epoch", "sequences_seen", "skipped_steps")
    if state != {} and (not isinstance(state, dict) or not all(type(state.get(k)) is int and state[k] >= 0
                                                               for k in counters)
                        or not isinstance(state.get("elapsed_s"), (int, float)) or not 0 <= state["elapsed_s"] < 1e9):
        raise ValueError(f"{path} cannot be used: its run state (step, data position, time spent) is invalid")
    if not isinstance(checkpoint.get("data_sha256", ""), str):
        raise ValueError(f"{path} cannot be used: its data_sha256 is not a hash")
    for name, tensor in checkpoint["model"].items():
        if not isinstance(tensor, torch.Tensor) or (tensor.is_floating_point() and not torch.isfinite(tensor).all()):
            raise ValueError(f"{path} cannot be used: the weight {name} is missing or holds non-finite values")
    return checkpoint


def save_checkpoint(run, path):
    """Writes `run` atomically: a temporary file, fsync, then a rename, so a crash or a full disk mid-write
    leaves the earlier checkpoints intact and no partial file. Then deletes all but the last
    KEEP_CHECKPOINTS up to this one. Returns None, or why the write failed, in words."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            torch.save(run, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        directory = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as error:  # a full disk: OSError, or a RuntimeError from torch.save's writer
        with contextlib.suppress(OSError):
            os.remove(temporary)
        return f"{error.__class__.__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'write failed'}"
    older = [f for f in checkpoint_files(os.path.dirname(path)) if step_of(f) < step_of(path)]
    for old in older[:max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:  # never `path`, never a newer one
        os.remove(old)
    return None


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


OUTPUT_LOCKS = []  # open lock files: a lock lasts while its file is open, so for the whole process


def lock_output(out):
    """Creates --out and takes an exclusive lock on OUT/.lock, so a second run on the same folder stops at
    once instead of writing over this one. The lock is fcntl's flock: on one machine it always works; on
    NFSv4 Linux turns it into a byte-range lock that other clients see too; a filesystem without locks
    refuses it, and the run stops with one line saying so."""
    try:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        lock_file = open(os.path.join(out, ".lock"), "a+")
    except OSError as error:
        fail(f"cannot write to --out {out} ({error.strerror}); choose another --out")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        refuse_busy_output(out, lock_file.read().strip())
    except OSError as error:
        fail(f"cannot lock {out}/.lock ({error.strerror}): its filesystem has no file locks; use a local --out")
    try:
        lock_file.truncate(0)
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
    except OSError as error:  # a full disk
        fail(f"cannot write to --out {out} ({error.strerror}); free space or choose another --out")
    OUTPUT_LOCKS.append(lock_file)


def refuse_busy_output(out, holder):
    fail(f"another train_bert.py ({holder or 'a process'}) is writing to {out}; wait for it to end, or choose "
         f"another --out")


def check_output_is_free(out):
    """Before anything is read for a resume: a run that holds OUT/.lock is said to, at once. Creates
    nothing (the lock is tried shared, for a moment, on the file if it exists)."""
    try:
        with open(os.path.join(out, ".lock")) as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                refuse_busy_output(out, lock_file.read().strip())
    except OSError:  # no lock file, or a filesystem without locks: lock_output says which, later
        pass


def prepare_output(cfg):
    """Rank 0, before anything is written: locks --out, deletes temporary files that a killed run left
    mid-write, and refuses to start a new run over a folder that already holds checkpoints."""
    lock_output(cfg.out)
    for leftover in glob.glob(os.path.join(cfg.out, "checkpoints", "*.tmp")):
        os.remove(leftover)
        print(f"removed {leftover}, a checkpoint that a killed run left half-written", flush=True)
    if not cfg.resume and checkpoint_files(cfg.out):
        fail(f"{cfg.out} already holds checkpoints; pass --resume {cfg.out} to continue, or choose another --out")


def on_rank0(rank, world_size, work):
    """Runs work() on rank 0 only and hands its (picklable) result to every rank. A user error there
    stops every rank with the same line, instead of leaving the others waiting at the next collective."""
    result = [None, None]
    if rank == 0:
        try:
            result = [work(), None]
        except SystemExit as stop:
            result = [None, str(stop.code)]
    if world_size > 1:
        dist.broadcast_object_list(result)
    if result[1] is not None:
        raise SystemExit(result[1])
    return result[0]


RESUME_MUST_MATCH = {"batch": "the data order and the schedule's steps depend on it",
                     "optimizer": "its state does not carry over to another optimizer",
                     "seed": "it decides the data order"}


def find_resume_checkpoint(cfg):
    """Rank 0: the checkpoint --resume names, and the checkpoints of --out newer than it, which the resumed
    run would otherwise mix with its own. Refuses to continue another run's checkpoint into an --out that
    holds checkpoints of its own. Returns (file, newer files)."""
    check_output_is_free(cfg.out)
    try:
        file, _, unreadable = load_checkpoint(cfg.resume)
    except ValueError as error:
        fail(f"cannot resume: {error}")
    for bad in unreadable:
        print(f"warning: {bad} cannot be read (cut short or damaged); resuming from {file}, the newest readable one",
              flush=True)
    own = checkpoint_files(cfg.out)
    if os.path.realpath(os.path.dirname(file)) != os.path.realpath(os.path.join(cfg.out, "checkpoints")) and own:
        fail(f"cannot resume {file} into {cfg.out}: that folder holds checkpoints of another run; "
             f"choose an empty --out, or --resume {cfg.out}")
    return file, [f for f in own if step_of(f) > step_of(file)]


def set_aside(files, out, step):
    """Moves the checkpoints newer than a resumed older one into their own folder: resuming an older
    checkpoint starts a new branch, the old branch stays on disk, and retention never touches it."""
    folder = os.path.join(out, "checkpoints", f"abandoned-after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(folder)
    for file in files:
        os.replace(file, os.path.join(folder, os.path.basename(file)))
    return folder


def resume(cfg, file, newer, checkpoint, model, optimizer, scaler, rank, world_size, device):
    """Loads a checkpoint that checked_resume_checkpoint passed into the model, optimizer, scaler and RNG,
    and moves the `newer` checkpoints of --out aside (a new branch). States every other flag that differs
    and what that does to the learning rate. Returns the run state to continue from."""
    old = checkpoint.get("train_config") or {}
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, RuntimeError, ValueError) as error:
        fail(f"cannot resume: the weights or optimizer state in {file} do not fit this model ({error.__class__.__name__})")
    if scaler.is_enabled() and checkpoint.get("scaler"):  # absent when the checkpoint was not fp16
        scaler.load_state_dict(checkpoint["scaler"])
    state = checkpoint["state"]
    if len(checkpoint.get("rng") or []) == world_size:  # per-rank dropout streams continue where they were
        try:
            set_rng_state(checkpoint["rng"][rank], device)
        except (KeyError, TypeError, RuntimeError) as error:
            fail(f"cannot resume: the random generator states in {file} are damaged ({error.__class__.__name__})")
    log(f"resumed from {file} at step {state['step']}, {readable(state['elapsed_s'])} of the budget spent", rank)
    record(cfg.out if rank == 0 else None, "resume", step=state["step"], file=file)  # later records replace later steps
    if newer and rank == 0:
        folder = set_aside(newer, cfg.out, state["step"])
        log(f"note: {len(newer)} newer checkpoint(s) moved to {folder}; this run is a new branch from step "
            f"{state['step']}", rank)
    changed = [f"--{name.replace('_', '-')} {getattr(cfg, name)} (was {old[name]})" for name in TRAIN_FLAGS
               if name in old and name not in ("out", "resume", "data") and old[name] != getattr(cfg, name)]
    if changed:
        log(f"note: resuming with other settings: {', '.join(changed)}", rank)
        before = dataclasses.replace(cfg, **{k: old[k] for k in ("lr", "warmup", "schedule", "constant", "hours",
                                                                 "max_steps") if k in old})
        lr_before = lr_at(before, progress_of(before, state["step"], state["elapsed_s"]))
        lr_now = lr_at(cfg, progress_of(cfg, state["step"], state["elapsed_s"]))
        if not math.isclose(lr_before, lr_now, rel_tol=1e-9):
            log(f"note: the learning rate goes from {lr_before:.3e} to {lr_now:.3e} at step {state['step']}: the "
                f"schedule now follows the new flags", rank)
    return state


def checked_resume_checkpoint(cfg, file, model_config, data_sha256, optimizer):
    """The checkpoint `file`, read, after checking that it can continue this run: a run state and optimizer
    moments that can be used, the same model, data (by hash), batch, optimizer and seed. Writes nothing:
    a refused resume leaves no trace, and --plan asks it too."""
    try:
        checkpoint = read_checkpoint(file)
    except ValueError as error:
        fail(f"cannot resume: {error}")
    if not checkpoint.get("state") or not isinstance(checkpoint.get("optimizer"), dict):
        fail(f"cannot resume: {file} holds weights to fine-tune, but no run state or optimizer to continue from")
    problem = optimizer_state_problem(checkpoint["optimizer"], len(optimizer_params(optimizer)), checkpoint["state"])
    if problem:
        fail(f"cannot resume: {file} holds {problem}; resume an earlier checkpoint")
    if checkpoint["model_config"] != dataclasses.asdict(model_config):
        differences = ", ".join(f"{k} {v} (now {getattr(model_config, k)})" for k, v in
                                checkpoint["model_config"].items() if v != getattr(model_config, k, None))
        fail(f"cannot resume: {file} holds a different model ({differences}); pass the same --model and "
             f"model flags, or start a new run in another --out")
    old = checkpoint.get("train_config") or {}
    for name, why in RESUME_MUST_MATCH.items():
        if old.get(name) != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            fail(f"cannot resume: {file} was trained with {flag} {old.get(name)}; pass the same {flag} ({why})")
    if checkpoint.get("data_sha256", data_sha256) != data_sha256:
        fail(f"cannot resume: {file} was trained on other data (its meta.json had sha256 "
             f"{checkpoint['data_sha256'][:12]}..., {cfg.data}/meta.json has {data_sha256[:12]}...); pass the --data "
             f"it was trained on (a copy of that folder is fine)")
    return checkpoint


def optimizer_state_problem(saved, tensors, state):
    """What makes a saved optimizer state unusable, in words, or None: moments for only some of the
    weight tensors (or none, after steps were taken), or numbers that are not finite, which would reach
    the weights at the first step."""
    moments, groups = saved.get("state"), saved.get("param_groups")
    if not isinstance(moments, dict) or not isinstance(groups, list):
        return "no optimizer state"
    if len(moments) != tensors and (moments or state["step"] > state["skipped_steps"]):
        return f"optimizer moments for {len(moments)} of the {tensors} weight tensors"
    if any(isinstance(entry, dict) and torch.is_tensor(entry.get("exp_avg_sq")) and (entry["exp_avg_sq"] < 0).any()
           for entry in moments.values()):
        return "negative second moments"
    numbers = [v for entry in moments.values() if isinstance(entry, dict) for v in entry.values()]
    numbers += [v for group in groups for key, v in group.items() if key != "params"]
    for value in numbers:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if (torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()) or \
                    (isinstance(v, float) and not math.isfinite(v)):
                return "optimizer moments or settings that are not finite"
    return None


def init_from(cfg, model, optimizer, model_config, tokenizer_json, rank):
    """Starts this run from another run's weights (--init-from), for a second phase: new data, length,
    batch, optimizer, precision and schedule; the data position and the clock start afresh. Only the
    positions may differ from the old model (resize_positions). With --init-optimizer the optimizer's
    moments come too (GluonNLP's phase 2 does so), zero for new position rows. Writes nothing."""
    try:
        file, checkpoint, _ = load_checkpoint(cfg.init_from)
    except ValueError as error:
        fail(f"cannot start from --init-from: {error}")
    if checkpoint_tokenizer(checkpoint).to_str() != Tokenizer.from_str(tokenizer_json).to_str():
        fail(f"--init-from {file} was trained with another tokenizer than {cfg.data}'s; prepare the data with "
             f"--tokenizer and the tokenizer.json of the data it was trained on")
    differences = ", ".join(f"{k} {v} (now {getattr(model_config, k)})" for k, v in checkpoint["model_config"].items()
                            if k != "max_positions" and v != getattr(model_config, k, None))
    if differences:
        fail(f"--init-from {file} holds a different model ({differences}); pass its --model and model flags "
             f"(only the sequence length may change)")
    weights = dict(checkpoint["model"])
    name = "encoder.position_embeddings.weight"
    old_rows = len(weights[name])
    weights[name] = resize_positions(weights[name], model_config.max_positions, cfg.seed)
    model.load_state_dict(weights)
    moments = "start from zero"
    if cfg.init_optimizer:
        if (checkpoint.get("train_config") or {}).get("optimizer") != cfg.optimizer or not checkpoint.get("optimizer"):
            fail(f"--init-optimizer needs a checkpoint of the same --optimizer {cfg.optimizer}; {file} has "
                 f"{(checkpoint.get('train_config') or {}).get('optimizer')}")
        state = checkpoint["optimizer"]
        problem = optimizer_state_problem(state, len(optimizer_params(optimizer)), {"step": 1, "skipped_steps": 0})
        if problem:
            fail(f"--init-optimizer: {file} holds {problem}; leave out --init-optimizer, or start from another checkpoint")
        index = [id(p) for group in optimizer.param_groups for p in group["params"]].index(
            id(model.encoder.position_embeddings.weight))
        for key, value in state["state"].get(index, {}).items():
            if torch.is_tensor(value) and value.ndim == 2:  # exp_avg, exp_avg_sq: zero for rows never trained
                state["state"][index][key] = resize_positions(value, model_config.max_positions, None)
        try:
            optimizer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            fail(f"--init-optimizer: the optimizer state in {file} does not fit this model ({error.__class__.__name__})")
        moments = "carried over"
    step = (checkpoint.get("state") or {}).get("step")
    log(f"initialised from {file} (step {step}): {old_rows} -> {model_config.max_positions} positions; optimizer "
        f"moments {moments}", rank)


def resize_positions(table, rows, seed):
    """A position table (positions, hidden) with `rows` rows: the first ones kept, extra rows drawn as BERT
    draws every weight, normal(0, 0.02) from `seed` (zeros when seed is None: for optimizer moments). That
    is where BERT's own phase 2 starts its positions 128-511 from: its phase 1 never reaches them."""
    if rows <= len(table):
        return table[:rows].clone()
    extra = torch.zeros(rows - len(table), table.shape[1], dtype=table.dtype)
    if seed is not None:
        extra.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    return torch.cat([table, extra])


# -----------------------------------------------------------------------------------------------
# Pretrained models: load a checkpoint or a Hugging Face folder; export to Hugging Face


def load_pretrained(path):
    """Loads an encoder to fine-tune: (encoder in eval mode on CPU, tokenizer, pooler state or None, origin).

    path: a checkpoint of this script (a file, or a run's --out folder for its newest readable checkpoint),
    or a Hugging Face folder of a BERT (post-LN) or RoBERTa-PreLayerNorm (pre-LN) model: config.json,
    model.safetensors or pytorch_model.bin, tokenizer.json or vocab.txt. origin says what was loaded,
    whatever its path: {"file", "step" (None for a Hugging Face folder), "weights_sha256"}. Raises
    ValueError with one sentence when the path holds neither, or values that cannot work (missing keys,
    shapes that disagree, non-finite weights, a tokenizer with more tokens than the embedding table)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        encoder, tokenizer, pooler = load_hugging_face(path)
        origin = {"file": os.path.abspath(path), "step": None}
    else:
        file, checkpoint, unreadable = load_checkpoint(path)
        for bad in unreadable:
            print(f"warning: {bad} cannot be read (cut short by a crash or a full disk?); using {file}",
                  file=sys.stderr)
        encoder = BertEncoder(BertConfig(**checkpoint["model_config"]))
        prefix = "encoder."
        try:
            encoder.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)})
            tokenizer = checkpoint_tokenizer(checkpoint)
        except Exception as error:  # torch's and tokenizers' own exception types
            raise ValueError(f"checkpoint {file} holds weights or a tokenizer that cannot be loaded ({error.__class__.__name__})")
        pooler, origin = None, {"file": os.path.abspath(file), "step": checkpoint.get("state", {}).get("step")}
    if tokenizer.get_vocab_size() > encoder.config.vocab_size:
        raise ValueError(f"the tokenizer of {path} has {tokenizer.get_vocab_size()} tokens, more than the "
                         f"{encoder.config.vocab_size} rows of the model's embedding table")
    return encoder.eval(), tokenizer, pooler, {**origin, "weights_sha256": weights_sha256(encoder)}


def checkpoint_tokenizer(checkpoint):
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer_json"])
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def weights_sha256(module):
    """A fingerprint of a model's weights (names, shapes, dtypes and bytes): which model, whatever its path."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# Hugging Face has both our layouts: BERT is the post-LN one; RoBERTa-PreLayerNorm has exactly the pre-LN
# one (a LayerNorm after the embeddings, one before each attention and feed-forward, one at the end).
HF_LAYOUTS = {  # our pre_ln -> the Hugging Face model, the prefix of its encoder's names, its MLM head's names
    False: dict(model_type="bert", architecture="BertForMaskedLM", prefix="bert.",
                head={"head_dense": "cls.predictions.transform.dense",
                      "head_norm": "cls.predictions.transform.LayerNorm", "decoder_bias": "cls.predictions.bias"}),
    True: dict(model_type="roberta-prelayernorm", architecture="RobertaPreLayerNormForMaskedLM",
               prefix="roberta_prelayernorm.",
               head={"head_dense": "lm_head.dense", "head_norm": "lm_head.layer_norm", "decoder_bias": "lm_head.bias"}),
}
HF_MODULES = {  # our module -> its name in BERT, in RoBERTa-PreLayerNorm; layer modules sit in encoder.layer.{i}.
    "word_embeddings": ("embeddings.word_embeddings",) * 2,
    "position_embeddings": ("embeddings.position_embeddings",) * 2,
    "token_type_embeddings": ("embeddings.token_type_embeddings",) * 2,
    "embedding_norm": ("embeddings.LayerNorm",) * 2,
    "attn_out": ("attention.output.dense",) * 2,
    "attn_norm": ("attention.output.LayerNorm", "attention.LayerNorm"),
    "ffn_in": ("intermediate.dense",) * 2,
    "ffn_out": ("output.dense",) * 2,
    "ffn_norm": ("output.LayerNorm", "intermediate.LayerNorm"),
    "final_norm": (None, "LayerNorm"),
}
HF_CONFIG = {  # BertConfig field: (its config.json key, the default when absent; None: required)
    "vocab_size": ("vocab_size", None), "hidden_size": ("hidden_size", None), "num_layers": ("num_hidden_layers", None),
    "num_heads": ("num_attention_heads", None), "intermediate_size": ("intermediate_size", None),
    "max_positions": ("max_position_embeddings", None), "type_vocab_size": ("type_vocab_size", 2),
    "dropout": ("hidden_dropout_prob", 0.1), "attention_dropout": ("attention_probs_dropout_prob", 0.1),
    "layer_norm_eps": ("layer_norm_eps", 1e-12)}


def hugging_face_names(name, pre_ln):
    """One of our encoder's parameter names -> the Hugging Face names it is made of (qkv: three, stacked)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return [f"{HF_MODULES[parts[0]][pre_ln]}.{parts[-1]}"]
    _, layer, module, kind = parts
    if module == "qkv":
        return [f"encoder.layer.{layer}.attention.self.{part}.{kind}" for part in ("query", "key", "value")]
    return [f"encoder.layer.{layer}.{HF_MODULES[module][pre_ln]}.{kind}"]


def position_offset(pre_ln, pad_id):
    """Where our position 0 sits in the Hugging Face table: RoBERTa numbers positions from pad_token_id + 1
    (padding itself takes row pad_token_id); BERT from 0."""
    return pad_id + 1 if pre_ln else 0


def load_hugging_face(folder):
    """A Hugging Face BERT or RoBERTa-PreLayerNorm folder (a base model, or one with an MLM head) as our
    BertEncoder, its tokenizer and its pooler. Every value of config.json and every weight is checked."""
    config_file = os.path.join(folder, "config.json")
    hf = read_json_object(config_file)
    if hf.get("model_type") not in ("bert", "roberta-prelayernorm"):
        raise ValueError(f"{config_file} describes a {hf.get('model_type')!r} model, not a BERT or "
                         f"RoBERTa-PreLayerNorm")
    pre_ln = hf["model_type"] == "roberta-prelayernorm"
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder} is a BERT variant this model does not implement (hidden_act "
                         f"{hf.get('hidden_act')!r}, position_embedding_type {hf.get('position_embedding_type')!r})")
    missing = [key for key, default in HF_CONFIG.values() if default is None and key not in hf]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}")
    pad_id = hf.get("pad_token_id", 1 if pre_ln else 0)  # the two configs' defaults
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < hf["max_position_embeddings"]:
        raise ValueError(f"{config_file}: pad_token_id must be an integer below max_position_embeddings, not {pad_id!r}")
    offset = position_offset(pre_ln, pad_id)
    config = BertConfig(**{ours: hf.get(key, default) for ours, (key, default) in HF_CONFIG.items()}, pre_ln=pre_ln)
    config.max_positions -= offset
    problem = model_config_problem(config, spell=lambda name: HF_CONFIG[name][0])
    if problem:
        raise ValueError(f"{config_file}: {problem}")
    weights_file, hf_state = read_hugging_face_weights(folder)
    # Models with a head prefix the encoder's names; checkpoints converted from TensorFlow say gamma/beta
    prefix = HF_LAYOUTS[pre_ln]["prefix"]
    hf_state = {k.removeprefix(prefix).replace("LayerNorm.gamma", "LayerNorm.weight")
                .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in hf_state.items()}
    encoder = BertEncoder(config)
    state = {}
    for name, expected in encoder.state_dict().items():
        hf_names = hugging_face_names(name, pre_ln)
        absent = [hf_name for hf_name in hf_names if hf_name not in hf_state]
        if absent:
            raise ValueError(f"{weights_file} lacks {absent[0]}, which {config_file} implies")
        tensor = torch.cat([hf_state[hf_name] for hf_name in hf_names])
        if name == "position_embeddings.weight":
            tensor = tensor[offset:]
        if tensor.shape != expected.shape:
            raise ValueError(f"{weights_file}: {' + '.join(hf_names)} has shape {list(tensor.shape)}, "
                             f"{config_file} implies {list(expected.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_file}: {hf_names[0]} holds non-finite values")
        state[name] = tensor
    encoder.load_state_dict(state)
    pooler = None
    if "pooler.dense.weight" in hf_state and "pooler.dense.bias" in hf_state:
        pooler = {"weight": hf_state["pooler.dense.weight"], "bias": hf_state["pooler.dense.bias"]}
        if pooler["weight"].shape != (config.hidden_size, config.hidden_size) or not all(
                torch.isfinite(t).all() for t in pooler.values()):
            raise ValueError(f"{weights_file}: the pooler's weights do not fit hidden_size {config.hidden_size}")
    return encoder, load_hugging_face_tokenizer(folder), pooler


def read_hugging_face_weights(folder):
    """(file, state dict) from model.safetensors, or else pytorch_model.bin."""
    safetensors_file, bin_file = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    try:
        if os.path.isfile(safetensors_file):
            from safetensors.torch import load_file
            return safetensors_file, load_file(safetensors_file)
        if os.path.isfile(bin_file):
            return bin_file, torch.load(bin_file, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError(f"{folder} holds model.safetensors; pip install safetensors to read it")
    except Exception as error:  # safetensors, pickle, zip and IO errors all mean the same to the user
        raise ValueError(f"{safetensors_file if os.path.isfile(safetensors_file) else bin_file} cannot be read "
                         f"({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def load_hugging_face_tokenizer(folder):
    """tokenizer.json when present, otherwise vocab.txt as a lower-cased BERT WordPiece tokenizer."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    try:
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        elif os.path.isfile(os.path.join(folder, "vocab.txt")):
            tokenizer = Tokenizer(models.WordPiece.from_file(os.path.join(folder, "vocab.txt"), unk_token="[UNK]"))
            tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
            tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
            if cls is None or sep is None:
                raise ValueError(f"{folder}/vocab.txt has no [CLS] or [SEP] token")
            tokenizer.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
            tokenizer.decoder = decoders.WordPiece()
        else:
            raise ValueError(f"{folder} has neither tokenizer.json nor vocab.txt")
    except ValueError:
        raise
    except Exception as error:  # tokenizers raises its own exception types
        raise ValueError(f"the tokenizer in {folder} cannot be read ({error})")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def read_json_object(path):
    """A JSON object from a file; ValueError naming the file (and line) when it is not UTF-8 JSON holding one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text")
    except (OSError, json.JSONDecodeError) as error:  # the decode error says line and column
        raise ValueError(f"{path} cannot be read as JSON ({error})")
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def export_hugging_face(source, folder):
    """Writes a checkpoint (a file, or a run's newest) as a folder that stock transformers loads with
    AutoModelForMaskedLM and AutoTokenizer, no custom code: config.json, model.safetensors with the
    Hugging Face names (query, key and value split from our fused projection; the decoder is tied to the
    word embeddings, as in both models) and the checkpoint's own tokenizer. Written as FOLDER.partial,
    renamed when complete. Returns the Hugging Face architecture written."""
    from safetensors.torch import save_file
    if not folder.strip():
        raise ValueError("the folder to export to must be named, not empty")
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json")):
        raise ValueError(f"{source} is a Hugging Face folder already; --export-hf takes a train_bert.py checkpoint")
    file, checkpoint, _ = load_checkpoint(source)
    config = BertConfig(**checkpoint["model_config"])
    layout = HF_LAYOUTS[config.pre_ln]
    tokenizer = checkpoint_tokenizer(checkpoint)
    special = {name: tokenizer.token_to_id(f"[{name.upper()}]") for name in ("cls", "sep", "pad", "mask", "unk")}
    missing = [f"[{name.upper()}]" for name in ("cls", "sep", "pad", "mask") if special[name] is None]
    if missing:  # transformers needs them: RoBERTa numbers positions from [PAD], fine-tuning adds [CLS] and [SEP]
        raise ValueError(f"the tokenizer of {file} has no {' '.join(missing)} token, which a Hugging Face MLM needs")
    offset = position_offset(config.pre_ln, special["pad"])
    state = {}
    for name, tensor in checkpoint["model"].items():
        if name.startswith("encoder."):
            name = name.removeprefix("encoder.")
            if name == "position_embeddings.weight":  # rows before our position 0: padding, never used
                tensor = torch.cat([torch.zeros(offset, config.hidden_size), tensor])
            hf_names = hugging_face_names(name, config.pre_ln)
            state.update({layout["prefix"] + hf_name: part for hf_name, part in
                          zip(hf_names, tensor.chunk(len(hf_names)))})  # qkv: query, key, value
        else:
            module, _, kind = name.partition(".")
            state[layout["head"][module] + ("." + kind if kind else "")] = tensor
    hf_config = {"architectures": [layout["architecture"]], "model_type": layout["model_type"],
                 **{key: getattr(config, ours) for ours, (key, _) in HF_CONFIG.items()},
                 "max_position_embeddings": config.max_positions + offset, "hidden_act": "gelu",
                 "position_embedding_type": "absolute", "pad_token_id": special["pad"], "bos_token_id": special["cls"],
                 "eos_token_id": special["sep"], "tie_word_embeddings": True, "initializer_range": 0.02}
    tokens = {f"{name}_token": f"[{name.upper()}]" for name, token_id in special.items() if token_id is not None}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_positions,
                        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"], **tokens}
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ValueError(f"{folder} already exists; choose a new folder to export to")
    partial = folder.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        os.makedirs(partial)
        save_file({name: t.clone().contiguous() for name, t in state.items()},
                  os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        for name, content in (("config.json", hf_config), ("tokenizer_config.json", tokenizer_config)):
            with open(os.path.join(partial, name), "w") as f:
                json.dump(content, f, indent=1)
        tokenizer.save(os.path.join(partial, "tokenizer.json"))
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.rename(partial, folder)
    except Exception as error:  # a full disk: OSError, or safetensors' and tokenizers' own exception types
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"cannot write {folder} ({error.__class__.__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'write failed'}); is the disk full?")
    return layout["architecture"], file


# -----------------------------------------------------------------------------------------------
# Processes, and the gradients between them


STOP_SIGNALS = []  # the signal handler appends the signal number; the loop checks it every step


def on_stop_signal(signum, frame):
    STOP_SIGNALS.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once


def setup_processes():
    """(rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls in TF32
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


POWERSGD_NOT_YET = 2 ** 62  # PowerSGD's start iteration until the loop sees the end of warmup


def bf16_compress_hook_gloo(process_group, bucket):
    """torch's bf16_compress_hook under another name: DDP refuses that name unless NCCL >= 2.10 runs
    (older NCCL had no bf16), but gloo sums bf16 correctly, so CPU runs and the tests can use it."""
    return default_hooks.bf16_compress_hook(process_group, bucket)


def powersgd_hook_gloo(state, bucket):
    """torch's powerSGD_hook, waited for. It starts its later all-reduces (P, then Q) from callbacks,
    which gloo runs on its own threads: without the wait, two ranks can start this bucket's and the next
    one's in different orders and mismatch. NCCL runs the callbacks in order, so GPUs skip the wait."""
    future = powerSGD_hook.powerSGD_hook(state, bucket)
    future.wait()
    return future


def wrap_ddp(model, cfg, device):
    """(DistributedDataParallel model, PowerSGD's state or None) with --bucket-mb and --comm-hook.

    DDP all-reduces gradients bucket by bucket while backward still runs; a hook compresses each bucket
    on the wire. PowerSGD registers with start iteration POWERSGD_NOT_YET: the loop sets the real one
    when the schedule's warmup ends, in time or in steps, on the same step on every rank."""
    device_ids = [device] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=cfg.bucket_mb)
    if cfg.comm_hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.comm_hook == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook if device.type == "cuda" else
                               bf16_compress_hook_gloo)
    elif cfg.comm_hook == "powersgd":
        # error feedback adds what compression lost to the next step's gradient; warm start reuses Q
        powersgd = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=cfg.powersgd_rank,
                                               start_powerSGD_iter=POWERSGD_NOT_YET, use_error_feedback=True,
                                               warm_start=True, random_seed=cfg.seed)
        ddp.register_comm_hook(powersgd, powerSGD_hook.powerSGD_hook if device.type == "cuda" else powersgd_hook_gloo)
        return ddp, powersgd
    return ddp, None


def start_powersgd(powersgd):
    """Compress from the next step on; returns how many uncompressed steps remain before that. PowerSGD
    counts its own iterations, one per optimizer step (accumulation syncs once), and needs two plain
    ones after (re)starting, while DDP settles its buckets."""
    powersgd.start_powerSGD_iter = max(powersgd.iter, 2)
    return powersgd.start_powerSGD_iter - powersgd.iter


def reset_powersgd(powersgd):
    """Forgets error feedback and the warm-started P and Q after a non-finite step (fp16 overflows),
    which would otherwise carry inf/NaN into every later step. PowerSGD rebuilds them (zeros, random Q)."""
    powersgd.error_dict.clear()
    powersgd.p_memory_dict.clear()
    powersgd.q_memory_dict.clear()


# -----------------------------------------------------------------------------------------------
# Before the loop: flags, the model, what runs


def check_flags(cfg):
    """Every numeric flag finite and in its range, and a model shape that can work, before any work starts."""
    if not cfg.out.strip() or not cfg.data.strip():
        fail("--out and --data must name folders, not be empty")
    if cfg.init_optimizer and not cfg.init_from:
        fail("--init-optimizer carries the moments of --init-from's checkpoint; pass --init-from too")
    if os.path.realpath(cfg.out) == os.path.realpath(cfg.data):
        fail(f"--out {cfg.out} is the data folder; choose another folder for the checkpoints")
    for name, (allowed, words) in FLAG_RANGES.items():
        value = getattr(cfg, name)
        if not allowed(value):
            fail(f"--{name.replace('_', '-')} {value} is out of range: it must be {words}")
    if cfg.schedule == "lans" and cfg.warmup + cfg.constant >= 1:
        fail(f"--warmup {cfg.warmup} and --constant {cfg.constant} must be fractions that leave some of the run for "
             f"the decay (warmup + constant < 1)")
    shape = BertConfig(**{**MODEL_PRESETS[cfg.model], **cfg.model_overrides})  # vocabulary and positions: later
    problem = model_config_problem(shape, spell=lambda name: "--" + name.replace("_", "-"))
    if problem:
        fail(f"the model cannot be built: {problem}")


def check_batch(cfg, train_split, world_size):
    """Micro-batches per optimizer step on each rank, once --batch is known to divide and to fit the data."""
    if cfg.batch % (world_size * cfg.micro_batch):
        fail(f"--batch {cfg.batch} does not divide into {world_size} process(es) x --micro-batch {cfg.micro_batch}; "
             f"pass a --batch that is a multiple of {world_size * cfg.micro_batch}")
    if train_split["sequences"] < cfg.batch:
        fail(f"the training split of {cfg.data} has {train_split['sequences']} sequences, fewer than one "
             f"--batch of {cfg.batch}; lower --batch or prepare more text")
    return cfg.batch // (world_size * cfg.micro_batch)


def make_model_config(cfg, meta):
    """The --model preset with the model flags over it; the vocabulary and positions come from the data."""
    return BertConfig(**{**MODEL_PRESETS[cfg.model], **cfg.model_overrides,
                         "vocab_size": math.ceil(meta["vocab_size"] / 8) * 8, "max_positions": meta["seq_len"]})


def build_model(config, seed, device):
    """BertForMLM on the device, initialised from `seed`: the same weights on every rank. A model whose
    weights, gradients, two optimizer moments and the copy of apply_update (20 bytes per parameter in
    fp32) exceed the device's memory is refused before it is built, rather than paging to swap for hours."""
    needed_bytes = 20 * parameter_count(config)
    memory_bytes = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else
                    os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if needed_bytes > memory_bytes:
        fail(f"the model has {amount(parameter_count(config))} parameters, which need about {needed_bytes / 2**30:,.0f} "
             f"GiB for weights, gradients and optimizer moments, more than the {memory_bytes / 2**30:,.0f} GiB here; "
             f"choose a smaller --model or model flags")
    torch.manual_seed(seed)
    try:
        return BertForMLM(config).to(device)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError too
        if not is_out_of_memory(error):
            raise
        fail(f"the model ({config.num_layers} layers, hidden size {config.hidden_size}) does not fit in memory; "
             f"choose a smaller --model or model flags")


def is_out_of_memory(error):
    """torch.OutOfMemoryError on a GPU; on a CPU, the allocator's RuntimeError or a MemoryError. (Not any
    error that mentions memory: "an illegal memory access" is a CUDA fault, not a size to lower.)"""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "DefaultCPUAllocator" in str(error)


def pick_precision(precision, device):
    """--precision auto: bf16 on GPUs that have it, fp16 with loss scaling on older ones, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def peak_flops(cfg, device):
    """The device's peak FLOP/s for MFU: --peak-tflops, or else a GPU's dense bf16 peak by its name (0: unknown)."""
    if cfg.peak_tflops or device.type != "cuda":
        return cfg.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for gpu, tflops in PEAK_TFLOPS.items() if gpu in name), 0.0)


def describe_setup(cfg, model, optimizer_name, precision, world_size, micro_batches, powersgd, val_split):
    """The lines that say what runs: model, optimizer, precision, batch, and how gradients travel."""
    n_params = sum(p.numel() for p in model.parameters())
    lines = [f"model: {cfg.model} {model.config}, {n_params / 1e6:.1f}M parameters; optimizer: {optimizer_name}; "
             f"precision: {precision}; {world_size} process(es) x {micro_batches} micro-batches of "
             f"{cfg.micro_batch} = batch {cfg.batch}"]
    if world_size > 1:
        lines.append(f"gradients: DDP buckets of {cfg.bucket_mb:g} MB, comm hook {cfg.comm_hook}"
                     + (f" (rank {cfg.powersgd_rank}, from the end of warmup)" if powersgd else ""))
    elif cfg.comm_hook != "none":  # a logged no-op, so one command line serves 1 and N processes
        lines.append(f"note: --comm-hook {cfg.comm_hook} has no effect in a single process (nothing is communicated)")
    if val_split["sequences"] == 0:
        lines.append("note: the validation split is empty; validation is skipped")
    if importlib.util.find_spec("matplotlib") is None:
        lines.append(f"note: pip install matplotlib to get {cfg.out}/metrics.png, the picture of this run (or draw "
                     f"it later: python train_bert.py --plot {cfg.out})")
    return lines


# -----------------------------------------------------------------------------------------------
# One optimizer step, and validation


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def set_learning_rate(optimizer, powersgd, cfg, step, clock_s, rank):
    """Sets this step's learning rate from the schedule, and starts PowerSGD once warmup is over."""
    progress = progress_of(cfg, step, clock_s)
    lr = lr_at(cfg, progress)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if powersgd and powersgd.start_powerSGD_iter == POWERSGD_NOT_YET and progress >= cfg.warmup:
        log(f"PowerSGD compresses the gradients from step {step + 1 + start_powersgd(powersgd)} on", rank)
    return lr


def train_step(train_model, optimizer, scaler, powersgd, batches, micro_batches, device, precision, world_size,
               local_flags, timed):
    """One optimizer step. Each micro-batch runs forward and backward and adds its gradients to the others
    (DDP all-reduces them once, in the last backward); the fp16 loss scale is divided out; then one
    all-reduce of a few numbers makes every rank take the same decisions on this step: skip it if its
    loss, gradients or update are not finite, checkpoint, validate, stop. local_flags() gives this rank's
    wishes at that moment: [out of time, signal number or 0, checkpoint due, validation due, clock].

    Returns (decisions, mean loss, gradient norm, data position after the step, seconds per micro-batch
    when timed). The loss and norm stay on the device; the host waits twice: for the all-reduce, and for
    apply_update's check of the new weights."""
    params = optimizer_params(optimizer)
    loss_sum, micro_batch_s = torch.zeros((), device=device), []
    for i in range(micro_batches):
        started = time.time()
        epoch, step_in_epoch, batch = next(batches)  # streamed: one micro-batch in memory, not the step's
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        last = i == micro_batches - 1  # gradients are all-reduced once per step, in the last backward
        with train_model.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
            with autocast(device, precision):
                logits = train_model(batch["input_ids"], batch["mlm_positions"], batch.get("attention_mask"))
            loss = mlm_loss(logits, batch["mlm_labels"])
            scaler.scale(loss / micro_batches).backward()
        loss_sum += loss.detach()
        if timed:  # wait for the GPU: only the last micro-batch communicates, see the loop
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            micro_batch_s.append(time.time() - started)
    scaler.unscale_(optimizer)  # true gradients for the norm (a no-op unless fp16)
    grad_norm = global_grad_norm(params)
    flags = torch.tensor([0.0, *local_flags()], dtype=torch.float64, device=device)
    flags[0] = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).double()
    if world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, out_of_time, signal_number, checkpoint_due, validation_due, clock_s = flags.tolist()
    if nonfinite:  # never let it reach the weights; fp16's scaler also lowers its scale
        scaler.update()
    skipped = bool(nonfinite) or not apply_update(optimizer, scaler, params)
    if skipped and powersgd:
        reset_powersgd(powersgd)
    optimizer.zero_grad(set_to_none=True)
    decisions = dict(skipped=skipped, out_of_time=bool(out_of_time), signal=int(signal_number),
                     checkpoint_due=bool(checkpoint_due), validation_due=bool(validation_due), clock_s=clock_s)
    return decisions, loss_sum / micro_batches, grad_norm, (epoch, step_in_epoch + 1), micro_batch_s


@torch.no_grad()
def apply_update(optimizer, scaler, params):
    """The optimizer step, with its result checked: if any weight comes out non-finite (an overflow inside
    the optimizer, from a huge learning rate or trust ratio, with a finite loss and gradient), every weight
    is put back as it was, so no non-finite number ever reaches the weights. The optimizer's moments keep
    the step's (finite) gradient. Returns whether the update was kept. Costs one copy of the weights and
    one host sync; no communication, since every rank holds the same weights after the same update."""
    before = [p.detach().clone() for p in params]
    scaler.step(optimizer)
    scaler.update()
    largest = torch.stack(torch._foreach_norm([p.detach() for p in params], ord=math.inf)).max()
    if torch.isfinite(largest).item():
        return True
    torch._foreach_copy_(params, before)
    return False


@torch.no_grad()
def evaluate(model, split, micro_batch, pad_id, rank, world_size, device, precision):
    """(MLM loss, masked-token accuracy) on a split with one fixed masking, summed over all ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, predictions
    rows = np.arange(rank, split["sequences"], world_size)
    for start in range(0, len(rows), micro_batch):
        batch = to_tensors(read_batch(split, rows[start:start + micro_batch], 0, pad_id), False)
        batch = {name: t.to(device) for name, t in batch.items()}
        with autocast(device, precision):
            logits = model(batch["input_ids"], batch["mlm_positions"], batch.get("attention_mask"))
        logits, labels = logits.flatten(0, 1).float(), batch["mlm_labels"].flatten()
        used = labels != -100
        totals += torch.stack([F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"),
                               ((logits.argmax(-1) == labels) & used).sum(), used.sum()]).double()
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)


# -----------------------------------------------------------------------------------------------
# Time, log lines and metrics.jsonl


def agree_on_clock(elapsed_s, world_size, device):
    """The largest of the ranks' clocks: the one time that all ranks schedule by."""
    clock = torch.tensor(elapsed_s, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)
    return clock.item()


def record(out, kind, **values):
    """Appends one record to OUT/metrics.jsonl (rank 0 passes its --out, the other ranks None). Non-finite
    numbers are written as null. A failed write (a full disk) is reported and training goes on: the next
    checkpoint decides whether the run can continue."""
    if out is None:
        return
    values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
    try:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"kind": kind, **values}) + "\n")
    except OSError as error:
        print(f"warning: could not append to {out}/metrics.jsonl ({error.strerror})", file=sys.stderr, flush=True)


def new_window(device):
    """What the next log line averages over: the loss of the steps kept, the steps, sequences and time
    since the last line (and how much of it went to validations and checkpoints), and the communication
    measured on a timed step."""
    return dict(loss=torch.zeros((), device=device), kept_steps=0, steps=0, sequences=0, started=time.time(),
                paused_s=0.0, comm_s=None, compute_s=None)  # paused: validating and checkpointing


def add_to_window(window, loss, skipped, sequences, micro_batch_s):
    if not skipped:
        window["loss"] += loss
        window["kept_steps"] += 1
    window["steps"] += 1
    window["sequences"] += sequences
    if micro_batch_s:  # the last micro-batch's extra time over the others is the communication not hidden
        computing_s = sum(micro_batch_s[:-1]) / (len(micro_batch_s) - 1)
        window["comm_s"] = max(0.0, micro_batch_s[-1] - computing_s)
        window["compute_s"] = computing_s * len(micro_batch_s)


def log_window(window, state, lr, grad_norm, cfg, speed, elapsed_s, rank, world_size):
    """Every --log-every steps: one line on rank 0 and one metrics.jsonl record with the mean loss (over the
    ranks and the steps kept), the learning rate, tokens/s and MFU over the window, time spent and left."""
    loss = window["loss"]
    if world_size > 1:
        dist.all_reduce(loss)
    interval_s = time.time() - window["started"]
    training_s = max(interval_s - window["paused_s"], 1e-9)  # speed: of training alone
    mean_loss = loss.item() / world_size / window["kept_steps"] if window["kept_steps"] else None  # None: all skipped
    tokens_per_s = window["sequences"] * speed["seq_len"] / training_s
    mfu = None
    if speed["peak_flops"]:
        mfu = window["sequences"] / cfg.batch * speed["flops_per_step"] / training_s / speed["peak_flops"]
    left_s = seconds_left(cfg, state["step"], elapsed_s, interval_s / window["steps"])  # pace: with validations
    values = dict(step=state["step"], sequences=state["sequences_seen"], loss=mean_loss, lr=lr,
                  grad_norm=grad_norm.item(), tokens_per_s=tokens_per_s, mfu=mfu, elapsed_h=elapsed_s / 3600,
                  remaining_h=left_s / 3600, skipped_steps=state["skipped_steps"],
                  comm_s=window["comm_s"], compute_s=window["compute_s"])
    loss_text = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
    mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
    comm_text = "" if window["comm_s"] is None else \
        f" | comm {window['comm_s']:.3f} s + compute {window['compute_s']:.3f} s per step"
    steps_text = f"/{cfg.max_steps}" if cfg.max_steps else ""
    log(f"step {state['step']}{steps_text} | seqs {state['sequences_seen']:,} | loss {loss_text} | lr {lr:.3e} | "
        f"grad norm {values['grad_norm']:.3f} | {tokens_per_s:,.0f} tokens/s | MFU {mfu_text}{comm_text} | "
        f"{readable(elapsed_s)} elapsed, {readable(left_s)} left (ETA {clock_time(time.time() + left_s)})", rank)
    record(cfg.out if rank == 0 else None, "train", **values)


def draw(picture, cfg, seconds_to_deadline, rank, final=False):
    """Rank 0 draws OUT/metrics.png anew: after a validation at most once a minute (which matters only for
    runs of minutes), and at the end if the deadline leaves time for it. picture: when it was last drawn
    and how long that took."""
    if rank != 0 or not (final or time.time() - picture["drawn_at"] >= 60) or \
            not os.path.exists(os.path.join(cfg.out, "metrics.jsonl")):  # nothing logged yet
        return
    if seconds_to_deadline < picture["takes_s"]:
        log(f"note: no time left to draw {cfg.out}/metrics.png; python train_bert.py --plot {cfg.out} draws it", rank)
        return
    started = time.time()
    plot_runs([cfg.out], os.path.join(cfg.out, "metrics.png"))
    picture.update(drawn_at=time.time(), takes_s=time.time() - started)


def seconds_left(cfg, step, elapsed_s, step_s):
    """The time the run still takes: to the deadline, or with --max-steps for the steps left at the recent
    pace, if that ends first."""
    to_deadline = max(0.0, cfg.hours * 3600 - elapsed_s)
    return min(to_deadline, (cfg.max_steps - step) * step_s) if cfg.max_steps else to_deadline


def validation_interval_s(cfg, step_s):
    """--val-minutes, or by default about 20 validations over the run (its budget, or its --max-steps at
    the pace so far), at most 30 minutes apart: a 10-minute run validates too."""
    if cfg.val_minutes:
        return cfg.val_minutes * 60
    run_s = cfg.hours * 3600
    if cfg.max_steps and step_s:
        run_s = min(run_s, cfg.max_steps * step_s)
    return min(30 * 60.0, run_s / 20)


def clock_time(timestamp):
    """The local time of day, with the day when it is not today."""
    when = time.localtime(timestamp)
    return time.strftime("%H:%M" if when[:3] == time.localtime()[:3] else "%a %d %b %H:%M", when)


# -----------------------------------------------------------------------------------------------
# The run: setup, the loop, the end


def write_checkpoint(run, out, step, rank, world_size, device):
    """Every rank calls it with the run to save: each adds its RNG state, rank 0 writes
    OUT/checkpoints/step-N.pt, and every rank learns whether that worked. Returns (file, None or why not)."""
    rngs = [rng_state(device)]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_state(device))
    file = os.path.join(out, "checkpoints", f"step-{step:08d}.pt")
    error = [save_checkpoint({**run, "rng": rngs}, file) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(error)
    return file, error[0]


def advance(state, skipped, sequences, position):
    """The run state after one optimizer step, skipped or not: the data moves on either way."""
    state["step"] += 1
    state["sequences_seen"] += sequences
    state["epoch"], state["step_in_epoch"] = position
    state["skipped_steps"] += skipped


def why_stop(decisions, skipped_in_a_row):
    """Why the run stops after this step, or None: too many non-finite steps, a signal, or the deadline."""
    if skipped_in_a_row >= NONFINITE_STEPS_LIMIT:
        return "nonfinite"
    if decisions["signal"]:
        return "signal"
    return "deadline" if decisions["out_of_time"] else None


def finish(stop_reason, signal_number, last_file, write_error, state, cfg, precision, elapsed_s, rank):
    """The last word: where the weights are and how to go on. Ends with an error for a failed write,
    non-finite steps or a lack of memory, and with status 128 + the signal's number after a signal (on
    every rank)."""
    if write_error:
        kept = last_file or (checkpoint_files(cfg.out) or [None])[-1]
        what_now = (f"The newest complete checkpoint is {kept}; free space, then continue with the same command and "
                    f"--resume {cfg.out}") if kept else "No checkpoint was completed; free space, then start again"
        fail(f"could not write a checkpoint to {cfg.out}/checkpoints ({write_error}); is the disk full? {what_now}")
    if stop_reason == "nonfinite":
        fail(f"stopped: {NONFINITE_STEPS_LIMIT} steps in a row had a non-finite loss, gradient or update, none of "
             f"which reached the weights; {last_file} holds the weights before them (if the loss rose first, see "
             f"metrics.jsonl and resume an earlier checkpoint); lower --lr"
             + (" or use --precision bf16" if precision == "fp16" else ""))
    if stop_reason == "out_of_memory":
        fail(f"out of memory at step {state['step'] + 1} with --micro-batch {cfg.micro_batch}; the weights of step "
             f"{state['step']} are in {last_file}; pass a smaller --micro-batch (--plan finds one that fits) and "
             f"--resume {cfg.out}")
    log(f"stopped ({stop_reason}) at step {state['step']} after {readable(elapsed_s)}; checkpoint: {last_file}", rank)
    if stop_reason == "signal":
        log(f"continue with the same command and --resume {cfg.out}", rank)
        sys.exit(128 + signal_number)


def train(cfg):
    check_flags(cfg)
    rank, world_size, device = setup_processes()

    # --- data, model, optimizer
    meta, splits, tokenizer_json, data_sha256 = open_data(cfg.data)
    train_split, val_split = splits["train"], splits["val"]
    micro_batches = check_batch(cfg, train_split, world_size)
    seq_len, pad_id = meta["seq_len"], meta["special_token_ids"]["pad"]
    model_config = make_model_config(cfg, meta)
    model = build_model(model_config, cfg.seed, device)  # the same initial weights on every rank
    optimizer, optimizer_name = make_optimizer(model, cfg, device)
    precision = pick_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs loss scaling
    torch.manual_seed(cfg.seed + rank)  # a different dropout stream on every rank

    train_model = torch.compile(model) if cfg.compile else model
    powersgd = None
    if world_size > 1:  # hand-written data parallelism: DDP all-reduces the gradients in backward
        train_model, powersgd = wrap_ddp(train_model, cfg, device)
    speed = dict(seq_len=seq_len, flops_per_step=flops_per_sequence(model_config, seq_len, meta["max_predictions"])
                 * cfg.batch, peak_flops=peak_flops(cfg, device))
    setup = describe_setup(cfg, model, optimizer_name, precision, world_size, micro_batches, powersgd, val_split)
    # --- where to start: a fresh run, another run's weights, or exactly where a checkpoint left off; all
    # checked before anything is written
    if cfg.init_from and not cfg.resume:  # a second phase resumes its own checkpoints: --init-from only starts it
        init_from(cfg, model, optimizer, model_config, tokenizer_json, rank)
    resumed = None
    if cfg.resume:
        file, newer = on_rank0(rank, world_size, lambda: find_resume_checkpoint(cfg))
        resumed = file, newer, checked_resume_checkpoint(cfg, file, model_config, data_sha256, optimizer)
    if cfg.plan:  # measure, say what the budget buys (with --resume, the rest of it), write nothing
        log("\n".join(setup), rank)
        return plan(cfg, train_model, optimizer, scaler, powersgd, splits, meta, device, precision, rank, world_size,
                    speed, resumed[2]["state"] if resumed else dict(step=0, elapsed_s=0.0))
    on_rank0(rank, world_size, lambda: prepare_output(cfg))  # one writer per --out
    state = dict(step=0, epoch=0, step_in_epoch=0, sequences_seen=0, elapsed_s=0.0, skipped_steps=0)
    if resumed:
        state = resume(cfg, *resumed, model, optimizer, scaler, rank, world_size, device)
        resumed = None  # the checkpoint's tensors can go
    log("\n".join(setup), rank)
    elapsed_before_s = state["elapsed_s"]

    def elapsed_s():  # time spent against the budget, over all resumed runs
        return elapsed_before_s + time.time() - PROCESS_START_S

    if (cfg.max_steps and state["step"] >= cfg.max_steps) or agree_on_clock(elapsed_s(), world_size, device) \
            >= cfg.hours * 3600:  # a finished run, resumed again: no step, no checkpoint
        spent = f"--max-steps {cfg.max_steps} is reached" if cfg.max_steps and state["step"] >= cfg.max_steps else \
            f"the --hours {cfg.hours:g} budget is spent ({readable(elapsed_s())})"
        log(f"nothing to do: the run is at step {state['step']} and {spent}; raise it to go on", rank)
        return

    identity = dict(model_config=dataclasses.asdict(model_config), train_config=dataclasses.asdict(cfg),
                    tokenizer_json=tokenizer_json, tokenizer_sha256=meta["tokenizer_sha256"],
                    special_token_ids=meta["special_token_ids"], data_sha256=data_sha256)

    def checkpoint(stop_reason=None):
        """Every rank calls it; rank 0 writes. Returns (file, why the write failed or None, seconds taken)."""
        started = time.time()
        run = {**identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scaler": scaler.state_dict(), "state": {**state, "elapsed_s": elapsed_s()}, "stop_reason": stop_reason}
        file, error = write_checkpoint(run, cfg.out, state["step"], rank, world_size, device)
        return file, error, time.time() - started

    def validate():
        """The held-out loss and accuracy, logged and recorded."""
        val_loss, val_accuracy = evaluate(model, val_split, cfg.micro_batch, pad_id, rank, world_size, device, precision)
        log(f"validation at step {state['step']}: loss {val_loss:.4f}, masked-token accuracy {val_accuracy:.4f}", rank)
        record(cfg.out if rank == 0 else None, "val", step=state["step"], val_loss=val_loss, val_accuracy=val_accuracy,
               elapsed_h=elapsed_s() / 3600)

    # --- the loop: one optimizer step per iteration
    batches = prefetch(train_batches(train_split, cfg, pad_id, rank, world_size, state["epoch"], state["step_in_epoch"],
                                     pin_memory=device.type == "cuda"))
    # durations that decide when to stop: an optimizer step, a validation (both measured) and a checkpoint
    # (guessed at 100 MB/s for the weights and two moments until the first one is measured)
    step_s, validation_s, checkpoint_s = 0.0, 0.0, 12 * sum(p.numel() for p in model.parameters()) / 100e6
    last_checkpoint = last_validation = time.time()
    validated_step = None
    window, skipped_in_a_row, stop_reason, last_file, write_error = new_window(device), 0, None, None, None
    picture = dict(drawn_at=time.time(), takes_s=2.0)  # OUT/metrics.png; takes_s: guessed until measured
    decisions = dict(signal=0)  # what all ranks agreed on at the last step
    # The schedule reads the clock that all ranks agree on (the largest), so that they use the same lr and
    # start PowerSGD on the same step; each step's agreement all-reduce refreshes it.
    clock_s = agree_on_clock(elapsed_s(), world_size, device)
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    model.train()
    while not (cfg.max_steps and state["step"] >= cfg.max_steps):
        step_started = time.time()
        lr = set_learning_rate(optimizer, powersgd, cfg, state["step"], clock_s, rank)
        # On logged steps, time each micro-batch (waiting for the GPU): only the last one communicates,
        # so its extra time over the others is the communication that backward did not hide.
        timed = world_size > 1 and micro_batches > 1 and (state["step"] + 1) % cfg.log_every == 0

        def local_flags():  # stop unless another step, a checkpoint and the last validation still fit
            # a validation reads the split forward only: about a third of a step per --batch sequences
            guessed_validation_s = val_split["sequences"] / cfg.batch * step_s / 3
            reserve_s = 1.5 * step_s + (validation_s or guessed_validation_s) + checkpoint_s + 1.0
            return [cfg.hours * 3600 - elapsed_s() < reserve_s, STOP_SIGNALS[0] if STOP_SIGNALS else 0,
                    time.time() - last_checkpoint >= cfg.checkpoint_minutes * 60,
                    time.time() - last_validation >= validation_interval_s(cfg, step_s), elapsed_s()]

        try:
            decisions, loss, grad_norm, position, micro_batch_s = train_step(
                train_model, optimizer, scaler, powersgd, batches, micro_batches, device, precision, world_size,
                local_flags, timed)
        except (RuntimeError, MemoryError) as error:  # the weights are still those of the last step
            if not is_out_of_memory(error):
                raise
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            stop_reason = "out_of_memory"
            break
        clock_s = decisions["clock_s"]
        advance(state, decisions["skipped"], cfg.batch, position)
        skipped_in_a_row = skipped_in_a_row + 1 if decisions["skipped"] else 0
        add_to_window(window, loss, decisions["skipped"], cfg.batch, micro_batch_s)
        if state["step"] % cfg.log_every == 0:
            log_window(window, state, lr, grad_norm, cfg, speed, elapsed_s(), rank, world_size)
            window = new_window(device)
        step_s = time.time() - step_started if step_s == 0 else 0.9 * step_s + 0.1 * (time.time() - step_started)

        stop_reason = why_stop(decisions, skipped_in_a_row)
        if stop_reason:
            break
        if decisions["checkpoint_due"]:
            file, write_error, seconds = checkpoint()
            if write_error:
                break
            last_file, checkpoint_s, last_checkpoint = file, max(checkpoint_s, seconds), time.time()
            window["paused_s"] += seconds
        if decisions["validation_due"] and val_split["sequences"] and validated_step != state["step"]:
            validation_started = time.time()
            validate()
            draw(picture, cfg, cfg.hours * 3600 - elapsed_s(), rank)
            last_validation, validated_step = time.time(), state["step"]
            validation_s = last_validation - validation_started
            window["paused_s"] += validation_s

    # --- the end: a checkpoint (unless the disk just refused one), a validation, then a line that says why
    stop_reason = stop_reason or ("write_failed" if write_error else "max_steps")
    if not write_error:
        file, write_error, _ = checkpoint(stop_reason)
        last_file = last_file if write_error else file
    if stop_reason in ("max_steps", "deadline", "signal") and val_split["sequences"] and validated_step != state["step"]:
        validate()
    draw(picture, cfg, cfg.hours * 3600 - elapsed_s(), rank, final=True)
    if world_size > 1:
        # the work is done: torchrun's SIGTERM to the ranks still exiting when the first one ends would
        # only turn their exit status from 128 + signal into a kill
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        dist.barrier()
        dist.destroy_process_group()
    finish(stop_reason, decisions["signal"], last_file, write_error, state, cfg, precision, elapsed_s(), rank)


# -----------------------------------------------------------------------------------------------
# --plan: what a budget buys, measured before it is spent


BERT24H_SEQUENCES = 23_000 * 4096  # 24hBERT's run: about 23k steps of 4,096 sequences of 128 tokens
PLAN_STEPS = 6  # measured optimizer steps, each of up to 4 micro-batches, after one to warm up


def plan(cfg, train_model, optimizer, scaler, powersgd, splits, meta, device, precision, rank, world_size, speed,
         done):
    """--plan: times a few dozen real micro-batches on the real data and device, after a warm-up step,
    then says what the budget buys at that speed; with --resume, what the rest of it buys after `done`
    (the step and elapsed seconds of the checkpoint). A micro-batch that does not fit in memory is halved
    until one does, and the plan says so. Writes nothing: no checkpoint, no --out."""
    left_s = cfg.hours * 3600 - done["elapsed_s"]
    if left_s <= 0 or (cfg.max_steps and done["step"] >= cfg.max_steps):
        log(f"plan: the checkpoint is at step {done['step']} after {readable(done['elapsed_s'])}: the run has reached "
            f"its end (--hours {cfg.hours:g}, --max-steps {cfg.max_steps}); raise them to train on", rank)
        return
    micro_batch = cfg.micro_batch
    while True:
        try:
            step_s, peak_bytes = measure_step(dataclasses.replace(cfg, micro_batch=micro_batch), train_model,
                                              optimizer, scaler, powersgd, splits["train"], meta, device, precision,
                                              rank, world_size)
            break
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if micro_batch == 1 or cfg.batch % (world_size * (micro_batch // 2)):
                where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this machine"
                fail(f"--micro-batch {micro_batch} does not fit in the memory of {where}, and no smaller micro-batch "
                     f"divides --batch {cfg.batch}; choose a smaller --model")
            micro_batch //= 2
    train_sequences, n_params = splits["train"]["sequences"], sum(p.numel() for p in optimizer_params(optimizer))
    # what a run spends besides training: startup (measured), checkpoints (at 100 MB/s for the weights and
    # two moments) and validations (forward only: a third of a step per --batch of held-out sequences)
    startup_s = time.time() - PROCESS_START_S
    checkpoint_s = 12 * n_params / 100e6
    checkpoints = left_s / 60 / cfg.checkpoint_minutes + 1 if cfg.checkpoint_minutes else 1
    validations = left_s / 60 / cfg.val_minutes + 1 if cfg.val_minutes else 21
    overhead_s = checkpoints * checkpoint_s + validations * splits["val"]["sequences"] / cfg.batch * step_s / 3
    # --checkpoint-minutes 0 writes one after every step: part of the step, not of the overhead
    budget_step_s = step_s + (0 if cfg.checkpoint_minutes else checkpoint_s)
    rest = dataclasses.replace(cfg, hours=left_s / 3600, max_steps=cfg.max_steps - done["step"] if cfg.max_steps else 0)
    budget = plan_budget(rest, budget_step_s, startup_s + overhead_s, train_sequences, splits["train"]["duplicates"],
                         meta["seq_len"], n_params, done["step"])
    sequences_per_s = cfg.batch / step_s
    mfu = f", MFU {speed['flops_per_step'] / step_s / speed['peak_flops']:.1%}" if speed["peak_flops"] else ""
    memory = f"{peak_bytes / 2**30:.1f} GiB"
    if device.type == "cuda":
        memory += f" of {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB per GPU"
    lines = []
    if micro_batch != cfg.micro_batch:
        lines.append(f"--micro-batch {cfg.micro_batch} does not fit in memory; {micro_batch} does: pass --micro-batch "
                     f"{micro_batch} (accumulation keeps --batch {cfg.batch}); the figures below are for it")
    lines += [
        f"plan: {PLAN_STEPS} optimizer steps of up to 4 micro-batches of {micro_batch}, timed after a warm-up step, on "
        f"{world_size} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'} ({precision})",
        f"speed: {readable(step_s)} per optimizer step of {cfg.batch:,} sequences ({cfg.batch // (world_size * micro_batch)} "
        f"micro-batches per process) = {sequences_per_s:,.1f} sequences/s, {sequences_per_s * meta['seq_len']:,.0f} "
        f"tokens/s{mfu}; peak memory {memory}",
        f"budget: {readable(cfg.hours * 3600)}" + (f", resumed at step {done['step']:,} after "
        f"{readable(done['elapsed_s'])}: {readable(left_s)} left" if done["step"] else "") + f", of which about "
        f"{readable(startup_s + overhead_s)} go to startup, checkpoints and validations"
        + ("" if cfg.checkpoint_minutes else f"; --checkpoint-minutes 0 adds a checkpoint of about "
           f"{readable(checkpoint_s)} to every step"),
        f"it buys {budget['steps']:,} {'more ' if done['step'] else ''}optimizer steps" + (f" (--max-steps "
        f"{cfg.max_steps} would need {readable(rest.max_steps * budget_step_s)}{' more' if done['step'] else ''}: the deadline stops the run "
        f"first)" if budget["deadline_first"] else
        f" in {readable(budget['time_s'])}") + f"; the whole run: {amount(budget['sequences'])} sequences, "
        f"{amount(budget['tokens'])} tokens",
        f"that is {budget['epochs']:.2f} epochs of the {train_sequences:,} prepared training sequences, so "
        f"{budget['maskings_used']} of the {splits['train']['duplicates']} maskings get used"
        + (" (each several times)" if budget["epochs"] > splits["train"]["duplicates"] else ""),
        f"tokens per parameter: {budget['tokens_per_parameter']:,.1f} ({n_params / 1e6:.1f}M parameters)",
        f"24hBERT trained about 23k steps x 4,096 = 94M sequences of 128 tokens; this run: "
        f"{budget['share_of_24hbert']:.2%} of those sequences",
        "nothing was written; run the same command without --plan to train"]
    for line in lines:
        log(line, rank)


def measure_step(cfg, train_model, optimizer, scaler, powersgd, train_split, meta, device, precision, rank,
                 world_size):
    """(seconds per optimizer step of --batch, peak memory in bytes), from PLAN_STEPS real steps of up to 4
    micro-batches: one micro-batch's forward and backward, times the micro-batches of a step, plus the
    rest of a step (the last micro-batch's all-reduce, unscaling, the agreement, the optimizer)."""
    micro_batches = cfg.batch // (world_size * cfg.micro_batch)
    measured = min(micro_batches, 4)
    batches = prefetch(train_batches(train_split, cfg, meta["special_token_ids"]["pad"], rank, world_size, 0, 0,
                                     pin_memory=device.type == "cuda"))

    def no_wishes():  # no stop, checkpoint or validation; the agreement all-reduce still runs
        return [0, 0, 0, 0, 0.0]

    train_step(train_model, optimizer, scaler, powersgd, batches, measured, device, precision, world_size, no_wishes,
               timed=True)  # warm-up: allocations, kernel choices, torch.compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compute_s, last_s, rest_s = [], [], []
    for _ in range(PLAN_STEPS):
        started = time.time()
        *_, micro_batch_s = train_step(train_model, optimizer, scaler, powersgd, batches, measured, device, precision,
                                       world_size, no_wishes, timed=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s += micro_batch_s[:-1] or micro_batch_s
        last_s.append(micro_batch_s[-1])
        rest_s.append(time.time() - started - sum(micro_batch_s))
    step_s = (micro_batches - 1) * float(np.median(compute_s)) + float(np.median(last_s)) + float(np.median(rest_s))
    if device.type == "cuda":
        return step_s, torch.cuda.max_memory_allocated(device)
    return step_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


def plan_budget(cfg, step_s, overhead_s, train_sequences, duplicates, seq_len, n_params, steps_done=0):
    """What a budget buys at step_s seconds per optimizer step, once overhead_s (startup, checkpoints,
    validations) is spent: steps (--max-steps at most), and for the whole run (steps_done before a resume
    and these) sequences, tokens, epochs over the prepared data, the maskings that get used (epoch e uses
    masking e % duplicates), tokens per parameter, and the share of 24hBERT's sequences."""
    steps_in_time = int(max(0.0, cfg.hours * 3600 - overhead_s) // step_s)
    steps = min(cfg.max_steps, steps_in_time) if cfg.max_steps else steps_in_time
    sequences = (steps_done + steps) * cfg.batch
    epochs = sequences / train_sequences
    return dict(steps=steps, time_s=steps * step_s, deadline_first=bool(cfg.max_steps) and steps_in_time < cfg.max_steps,
                sequences=sequences, tokens=sequences * seq_len, epochs=epochs,
                maskings_used=min(duplicates, math.ceil(epochs)), tokens_per_parameter=sequences * seq_len / n_params,
                share_of_24hbert=sequences / BERT24H_SEQUENCES)


# -----------------------------------------------------------------------------------------------
# The picture of a run


PLOTTED = ("loss", "val_loss", "lr", "tokens_per_s", "mfu", "elapsed_h")  # what the picture reads of a record


def read_metrics(run):
    """(train records, validation records) of a run's metrics.jsonl, as the run now stands: a resume (a
    rollback, or a crash after the last checkpoint) drops the records of the steps it repeats. A line cut
    short by a kill is skipped, and a value that is not a finite number is read as missing. Raises
    ValueError when the run has no metrics.jsonl."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run} has no metrics.jsonl; pass a run's --out folder")
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or type(entry.get("step")) is not int:
                continue
            if entry.get("kind") == "resume":
                kept = [r for r in kept if r["step"] <= entry["step"]]
            elif entry.get("kind") in ("train", "val"):
                kept.append({"kind": entry["kind"], "step": entry["step"],
                             **{key: finite_number(entry.get(key)) for key in PLOTTED}})
    return [r for r in kept if r["kind"] == "train"], [r for r in kept if r["kind"] == "val"]


def finite_number(value):
    """value as a float when it is a finite number (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value) if math.isfinite(float(value)) else None
    except OverflowError:  # an int beyond float
        return None


def plot_runs(runs, png):
    """Draws the training and validation loss, the learning rate, tokens/s and MFU of one or more runs
    against the time they took into one picture (written atomically; its format follows the name's
    extension). Returns None, or why it could not."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    histories = {run: read_metrics(run) for run in runs}
    longest_h = max([r["elapsed_h"] or 0 for train, val in histories.values() for r in train + val] + [0])
    unit, per_hour = ("h", 1) if longest_h >= 2 else ("min", 60)
    figure, ((loss_axis, lr_axis), (speed_axis, mfu_axis)) = plt.subplots(2, 2, figsize=(12, 7.5))
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for color, (run, (train, val)) in zip(colors, histories.items()):
        name = os.path.basename(os.path.normpath(run))
        hours_at_step = {r["step"]: r["elapsed_h"] for r in train}

        def series(records, key):
            points = [(r["elapsed_h"] or hours_at_step.get(r["step"]), r[key]) for r in records]
            points = [(h * per_hour, y) for h, y in points if h is not None and y is not None]
            return [x for x, _ in points], [y for _, y in points]

        dot = "." if len(train) == 1 else ""  # a line through one point would not show
        loss_axis.plot(*series(train, "loss"), dot + "-", color=color, alpha=0.6, label=f"{name} train")
        loss_axis.plot(*series(val, "val_loss"), "o-", color=color, label=f"{name} validation")
        lr_axis.plot(*series(train, "lr"), dot + "-", color=color, label=name)
        speed_axis.plot(*series(train, "tokens_per_s"), dot + "-", color=color, label=name)
        mfu_x, mfu_y = series(train, "mfu")
        mfu_axis.plot(mfu_x, [100 * y for y in mfu_y], dot + "-", color=color, label=name)
    for axis, title in ((loss_axis, "MLM loss"), (lr_axis, "learning rate"), (speed_axis, "tokens/s"),
                        (mfu_axis, "MFU (%)")):
        axis.set_title(title)
        axis.set_xlabel(f"time ({unit})")
        axis.grid(alpha=0.3)
        if axis.lines and any(line.get_xdata().size for line in axis.lines) and len(runs) <= 12:
            axis.legend(fontsize="small")
    if not any(line.get_xdata().size for line in mfu_axis.lines):
        mfu_axis.text(0.5, 0.5, "no MFU: the device's peak is unknown\n(--peak-tflops sets it)", ha="center",
                      va="center", transform=mfu_axis.transAxes)
        mfu_axis.set_xticks([])
        mfu_axis.set_yticks([])
        mfu_axis.set_xlabel("")
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    figure.suptitle(", ".join(names) if len(names) <= 6 else f"{len(names)} runs: {', '.join(names[:5])}, ...")
    figure.tight_layout()
    root, extension = os.path.splitext(png)
    temporary = root + ".tmp" + extension
    try:
        figure.savefig(temporary, format=extension[1:] or "png", dpi=100)
        os.replace(temporary, png)
    except (OSError, ValueError) as error:  # ValueError: an extension matplotlib cannot write
        with contextlib.suppress(OSError):
            os.remove(temporary)
        return str(error).splitlines()[0] if str(error) else error.__class__.__name__
    finally:
        plt.close(figure)
    return None


# -----------------------------------------------------------------------------------------------
# main


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def parse_args(argv=None):
    """The command line, generated from TrainConfig and the overridable BertConfig fields."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: fail(f"{message} (see --help)")  # one line, not the usage block
    for f in fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            shown = f.default if f.default != "" else "none"
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                **{**f.metadata, "help": f"{f.metadata['help']} (default: {shown})"})
    group = parser.add_argument_group("model overrides (default: the --model preset's values)")
    for f in fields(BertConfig):
        if f.name in MODEL_FLAGS:
            group.add_argument("--" + f.name.replace("_", "-"), default=None, help=MODEL_FLAGS[f.name],
                               type=parse_bool if isinstance(f.default, bool) else type(f.default))
    commands = parser.add_argument_group("instead of training")
    commands.add_argument("--export-hf", nargs=2, metavar=("CHECKPOINT_OR_RUN", "DIR"),
                          help="write a checkpoint as a Hugging Face folder (BertForMaskedLM for post-LN models, "
                               "RobertaPreLayerNormForMaskedLM for pre-LN ones) and exit")
    commands.add_argument("--plot", nargs="+", metavar="RUN", help="draw RUN/metrics.png from RUN/metrics.jsonl; "
                          "several runs: one picture that overlays them (see --plot-file) and exit")
    commands.add_argument("--plot-file", metavar="PNG", help="where --plot draws (default: RUN/metrics.png for one run, "
                          "runs-compared.png for several)")
    args = vars(parser.parse_args(argv))
    commands = {name: args.pop(name) for name in ("export_hf", "plot", "plot_file")}
    overrides = {name: args.pop(name) for name in MODEL_FLAGS}
    return TrainConfig(**args, model_overrides={k: v for k, v in overrides.items() if v is not None}), commands


def main(argv=None):
    cfg, commands = parse_args(argv)
    export = commands["export_hf"]
    if commands["plot_file"] is not None and not commands["plot"]:
        fail("--plot-file says where --plot draws; pass --plot RUN too")
    if commands["plot"] and export:
        fail("--plot and --export-hf are two commands; run them one at a time")
    if commands["plot_file"] is not None and not commands["plot_file"].strip():
        fail("--plot-file must name a file (for example runs-compared.png), not be empty")
    if commands["plot"]:
        runs = commands["plot"]
        png = commands["plot_file"] or (os.path.join(runs[0], "metrics.png") if len(runs) == 1 else "runs-compared.png")
        try:
            problem = plot_runs(runs, png)
        except (ValueError, OSError) as error:
            problem = str(error)
        if problem:
            fail(f"cannot draw {png}: {problem}")
        print(f"drew {png}")
        return
    if export:
        try:
            architecture, file = export_hugging_face(*export)
        except (ValueError, OSError) as error:
            fail(f"cannot export: {error}")
        print(f"wrote {export[1]}: {architecture} from {file}; load it with transformers' "
              f"AutoModelForMaskedLM.from_pretrained and AutoTokenizer.from_pretrained")
        return
    try:
        train(cfg)
    except KeyboardInterrupt:  # called from Python, not as a script: Ctrl-C before the loop takes over
        fail("interrupted while starting; no checkpoint was written")
    finally:  # a process lets its locks go when it ends; a caller in the same process needs them let go now
        while OUTPUT_LOCKS:
            OUTPUT_LOCKS.pop().close()


if __name__ == "__main__":
    main()
