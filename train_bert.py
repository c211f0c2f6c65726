"""Pretrain BERT with masked language modelling on a wall-clock budget, as in "How to Train BERT with
an Academic Budget" (Izsak et al. 2021): a pre-LayerNorm BERT-large, a sparse MLM head, LAMB, mixed
precision and a learning rate that follows the clock.

    python prepare_data.py --out data/wiki
    torchrun --nproc_per_node 8 train_bert.py --data data/wiki --out runs/24h --hours 24
    python train_bert.py --data data/demo --out runs/tiny --model tiny --batch 64 --micro-batch 32 --hours 0.1
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB \
        train_bert.py --data /shared/wiki --out /shared/runs/lans --optimizer lans --schedule lans --lr 0.005 \
        --warmup 0.05 --batch 98304 --micro-batch 64 --comm-hook bf16

The file reads top to bottom: config -> model -> optimizer -> data -> schedule -> checkpoint -> the
loop -> main(). finetune_glue.py imports BertEncoder and load_pretrained from here.
"""
import time

PROCESS_START_S = time.time()  # the --hours budget counts from here, before the slow imports below

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import queue
import signal
import sys
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
MODEL_FLAGS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "dropout", "attention_dropout",
               "pre_ln")  # the BertConfig fields the command line can override


def arg(default, help, **argparse_options):
    return field(default=default, metadata=dict(help=help, **argparse_options))


@dataclass
class TrainConfig:
    """One training run. Each field is a command-line flag (--micro-batch for micro_batch)."""
    data: str = arg("data", "folder written by prepare_data.py")
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
    seed: int = arg(0, "seed of the initialisation, the data order and dropout")
    compile: bool = arg(False, "run the model through torch.compile")
    checkpoint_minutes: float = arg(30.0, "minutes between checkpoints (one is always written at the end)")
    val_minutes: float = arg(30.0, "minutes between validations on the held-out split")
    log_every: int = arg(10, "optimizer steps between log lines")
    peak_tflops: float = arg(0.0, "the device's peak TFLOP/s for MFU (0: look up the GPU's name)")
    comm_hook: str = arg("none", "how DDP sends gradients between processes: none (fp32 all-reduce), fp16 or "
                         "bf16 (half the bytes), powersgd (low rank, from the end of warmup on)",
                         choices=["none", "fp16", "bf16", "powersgd"])
    powersgd_rank: int = arg(4, "rank of PowerSGD's approximation of each gradient matrix: higher sends more and "
                             "loses less")
    bucket_mb: float = arg(25.0, "DDP's gradient bucket size in MB (bucket_cap_mb): fewer, larger messages when bigger")
    model_overrides: dict = field(default_factory=dict)  # from --hidden-size etc., applied over the preset


KEEP_CHECKPOINTS = 3  # older checkpoints are deleted
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


def init_weights(module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases; LayerNorm keeps its 1 and 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def mlm_loss(logits, labels):
    """Mean cross-entropy over the used prediction slots; unused slots have label -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def flops_per_sequence(config, seq_len, predictions):
    """Training FLOPs (forward and backward) of one sequence, counted as nanoGPT does: 6 per weight
    per token it multiplies, plus attention's two (seq x seq) matmuls. The head counts only at the
    masked positions, because that is where it runs."""
    hidden, layers = config.hidden_size, config.num_layers
    layer_weights = 4 * hidden * hidden + 2 * hidden * config.intermediate_size
    head_weights = hidden * hidden + hidden * config.vocab_size
    attention = 12 * layers * hidden * seq_len * seq_len
    return 6 * layers * layer_weights * seq_len + attention + 6 * head_weights * predictions


def load_pretrained(path):
    """Loads an encoder to fine-tune: (encoder in eval mode on CPU, tokenizer, pooler state or None).

    path: a checkpoint of this script (a file, or a run's --out folder for its latest checkpoint), or
    a Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin, tokenizer.json or
    vocab.txt). Raises ValueError with one sentence when the path holds neither."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return load_hugging_face_bert(path)
    checkpoint = read_checkpoint(find_checkpoint(path))
    if not checkpoint.get("tokenizer_json"):
        raise ValueError(f"checkpoint {path} carries no tokenizer; it was not written by train_bert.py")
    encoder = BertEncoder(BertConfig(**checkpoint["model_config"]))
    prefix = "encoder."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["model"].items() if k.startswith(prefix)})
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer_json"])
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return encoder.eval(), tokenizer, None


def load_hugging_face_bert(folder):
    """A Hugging Face BertModel/BertForMaskedLM folder as a post-LN BertEncoder, its tokenizer and pooler."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "bert":
        raise ValueError(f"{folder}/config.json describes a {hf.get('model_type')!r} model, not a BERT")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder} is a BERT variant this model does not implement (hidden_act "
                         f"{hf.get('hidden_act')!r}, position_embedding_type {hf.get('position_embedding_type')!r})")
    config = BertConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
                        intermediate_size=hf["intermediate_size"], max_positions=hf["max_position_embeddings"],
                        type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.1),
                        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pre_ln=False)
    safetensors_file, bin_file = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    try:
        from safetensors.torch import load_file
    except ImportError:  # optional: only needed for model.safetensors
        load_file = None
    if os.path.isfile(safetensors_file) and load_file:
        hf_state = load_file(safetensors_file)
    elif os.path.isfile(bin_file):
        hf_state = torch.load(bin_file, map_location="cpu", weights_only=True)
    elif os.path.isfile(safetensors_file):
        raise ValueError(f"{folder} holds model.safetensors; pip install safetensors to read it")
    else:
        raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    # BertForMaskedLM prefixes "bert."; checkpoints converted from TensorFlow name LayerNorm gamma/beta
    hf_state = {k.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
                .replace("LayerNorm.beta", "LayerNorm.bias"): v for k, v in hf_state.items()}
    names = {"embeddings.word_embeddings": "word_embeddings", "embeddings.position_embeddings": "position_embeddings",
             "embeddings.token_type_embeddings": "token_type_embeddings", "embeddings.LayerNorm": "embedding_norm"}
    for i in range(config.num_layers):
        hf_layer = f"encoder.layer.{i}."
        names.update({hf_layer + "attention.output.dense": f"layers.{i}.attn_out",
                      hf_layer + "attention.output.LayerNorm": f"layers.{i}.attn_norm",
                      hf_layer + "intermediate.dense": f"layers.{i}.ffn_in",
                      hf_layer + "output.dense": f"layers.{i}.ffn_out",
                      hf_layer + "output.LayerNorm": f"layers.{i}.ffn_norm"})
    state = {}
    for hf_name, name in names.items():
        for kind in ("weight", "bias"):
            if f"{hf_name}.{kind}" in hf_state:
                state[f"{name}.{kind}"] = hf_state[f"{hf_name}.{kind}"]
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):  # query, key and value stacked into one (3 * hidden) projection
            state[f"layers.{i}.qkv.{kind}"] = torch.cat(
                [hf_state[f"encoder.layer.{i}.attention.self.{part}.{kind}"] for part in ("query", "key", "value")])
    encoder = BertEncoder(config)
    encoder.load_state_dict(state)
    pooler = None
    if "pooler.dense.weight" in hf_state:
        pooler = {"weight": hf_state["pooler.dense.weight"], "bias": hf_state["pooler.dense.bias"]}
    return encoder.eval(), load_hugging_face_tokenizer(folder), pooler


def load_hugging_face_tokenizer(folder):
    """tokenizer.json when present, otherwise vocab.txt as a lower-cased BERT WordPiece tokenizer."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif os.path.isfile(os.path.join(folder, "vocab.txt")):
        tokenizer = Tokenizer(models.WordPiece.from_file(os.path.join(folder, "vocab.txt"), unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tokenizer.decoder = decoders.WordPiece()
    else:
        raise ValueError(f"{folder} has neither tokenizer.json nor vocab.txt")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


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


# -----------------------------------------------------------------------------------------------
# Data: the memory-mapped arrays of prepare_data.py (the contract is meta.json, see its docstring)


def fail(message):
    """Ends the program with one line for the user, without a traceback."""
    raise SystemExit(f"train_bert.py: error: {message}")


def open_data(data_dir):
    """Reads DATA/meta.json and memory-maps every shard after checking it is there with its shape."""
    def incomplete(reason):
        fail(f"data directory {data_dir} is incomplete: {reason}; run prepare_data.py again")

    if not os.path.isdir(data_dir) and os.path.isdir(data_dir.rstrip("/") + ".partial"):
        incomplete(f"only {data_dir.rstrip('/')}.partial exists, so prepare_data.py is still running or was stopped")
    if not os.path.isdir(data_dir):
        fail(f"data directory {data_dir} does not exist; create it with prepare_data.py --out {data_dir}")
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        incomplete("meta.json is missing (prepare_data.py writes it last)")
    except (OSError, ValueError) as error:
        incomplete(f"meta.json cannot be read ({error})")
    if meta.get("format_version") != 1:
        incomplete(f"meta.json has format_version {meta.get('format_version')!r}, this script reads 1")
    required = ("seq_len", "vocab_size", "special_token_ids", "max_predictions", "splits")
    missing = [key for key in required if key not in meta]
    if missing or not {"train", "val"} <= set(meta["splits"]):
        incomplete(f"meta.json lacks {', '.join(missing) or 'the train or val split'}")
    if not os.path.isfile(os.path.join(data_dir, meta.get("tokenizer_file", "tokenizer.json"))):
        incomplete("tokenizer.json is missing")
    splits = {}
    for name in ("train", "val"):
        shards = []
        for shard in meta["splits"][name]["shards"]:
            arrays = {}
            for key in ("input_ids", "mask_positions", "mask_tokens"):
                listed = shard[key]
                path = os.path.join(data_dir, listed["file"])
                try:
                    arrays[key] = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as error:
                    incomplete(f"{listed['file']} cannot be read ({error.__class__.__name__})")
                if list(arrays[key].shape) != listed["shape"] or arrays[key].dtype.name != listed["dtype"]:
                    incomplete(f"{listed['file']} holds {arrays[key].dtype.name} {list(arrays[key].shape)}, "
                               f"meta.json lists {listed['dtype']} {listed['shape']}")
            shards.append(arrays)
        sizes = [len(s["input_ids"]) for s in shards]
        splits[name] = {"shards": shards, "offsets": np.cumsum([0] + sizes), "sequences": sum(sizes),
                        "duplicates": meta["splits"][name]["duplicates"]}
    return meta, splits


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


# -----------------------------------------------------------------------------------------------
# Checkpoints


def find_checkpoint(path):
    """A checkpoint file, or the latest one in a run's --out folder (or its checkpoints/ folder)."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "checkpoints", "step-*.pt")) + glob.glob(os.path.join(path, "step-*.pt"))
    if not found:
        raise ValueError(f"no checkpoint found at {path}")
    return max(found, key=os.path.basename)


def read_checkpoint(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and IO errors all mean the same to the user
        raise ValueError(f"{path} cannot be read as a train_bert.py checkpoint ({error.__class__.__name__})")
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path} is not a train_bert.py checkpoint")
    return checkpoint


def save_checkpoint(run, path):
    """Writes `run` atomically: a crash mid-write leaves the previous checkpoint intact. Keeps the last few."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        torch.save(run, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(directory)  # make the rename itself durable
    os.close(directory)
    for old in sorted(glob.glob(os.path.join(os.path.dirname(path), "step-*.pt")))[:-KEEP_CHECKPOINTS]:
        os.remove(old)


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# -----------------------------------------------------------------------------------------------
# The training loop

stop_signal = []  # the signal handler appends the signal number; the loop checks it every step


def on_stop_signal(signum, frame):
    stop_signal.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C ends the process at once


def log(message, rank):
    if rank == 0:
        print(message, flush=True)


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


def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


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


def train(cfg):
    rank, world_size, device = setup_processes()
    if cfg.hours <= 0:
        fail(f"--hours must be positive, not {cfg.hours}")
    constant = cfg.constant if cfg.schedule == "lans" else 0.0
    if cfg.warmup < 0 or constant < 0 or cfg.warmup + constant >= 1:
        fail(f"--warmup {cfg.warmup} and --constant {constant} must be fractions that leave some of the run for "
             f"the decay (warmup + constant < 1)")
    if cfg.powersgd_rank < 1 or cfg.bucket_mb <= 0:
        fail(f"--powersgd-rank ({cfg.powersgd_rank}) and --bucket-mb ({cfg.bucket_mb}) must be positive")

    # --- data and model
    meta, splits = open_data(cfg.data)
    train_split, val_split = splits["train"], splits["val"]
    if cfg.micro_batch <= 0 or cfg.batch % (world_size * cfg.micro_batch) != 0:
        fail(f"--batch {cfg.batch} does not divide into {world_size} process(es) x --micro-batch {cfg.micro_batch}; "
             f"pass a --batch that is a multiple of {world_size * max(cfg.micro_batch, 1)}")
    micro_batches_per_step = cfg.batch // (world_size * cfg.micro_batch)
    if train_split["sequences"] < cfg.batch:
        fail(f"the training split of {cfg.data} has {train_split['sequences']} sequences, fewer than one "
             f"--batch of {cfg.batch}; lower --batch or prepare more text")
    seq_len, predictions = meta["seq_len"], meta["max_predictions"]
    pad_id = meta["special_token_ids"]["pad"]
    budget_s = cfg.hours * 3600
    model_config = BertConfig(**{**MODEL_PRESETS[cfg.model], **cfg.model_overrides,
                                 "vocab_size": math.ceil(meta["vocab_size"] / 8) * 8, "max_positions": seq_len})
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = BertForMLM(model_config).to(device)
    optimizer, optimizer_name = make_optimizer(model, cfg, device)
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs loss scaling
    with open(os.path.join(cfg.data, meta.get("tokenizer_file", "tokenizer.json"))) as f:
        tokenizer_json = f.read()
    torch.manual_seed(cfg.seed + rank)  # a different dropout stream on every rank

    # --- where to start: a fresh run, or exactly where a checkpoint left off
    state = dict(step=0, epoch=0, step_in_epoch=0, sequences_seen=0, elapsed_s=0.0, skipped_steps=0)
    checkpoint_dir = os.path.join(cfg.out, "checkpoints")
    if cfg.resume:
        try:
            path = find_checkpoint(cfg.resume)
            checkpoint = read_checkpoint(path)
        except ValueError as error:
            fail(f"cannot resume: {error}")
        if checkpoint["model_config"] != dataclasses.asdict(model_config):
            differences = ", ".join(f"{k} {v} (now {getattr(model_config, k)})" for k, v in
                                    checkpoint["model_config"].items() if v != getattr(model_config, k, None))
            fail(f"cannot resume: {path} holds a different model ({differences}); pass the same --model and "
                 f"model flags, or start a new run in another --out")
        if checkpoint["train_config"]["batch"] != cfg.batch:
            fail(f"cannot resume: {path} was trained with --batch {checkpoint['train_config']['batch']}; "
                 f"pass the same --batch")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = checkpoint["state"]
        if len(checkpoint["rng"]) == world_size:  # per-rank dropout streams continue where they were
            set_rng_state(checkpoint["rng"][rank], device)
        log(f"resumed from {path} at step {state['step']}, {state['elapsed_s'] / 3600:.3f} h of the budget spent", rank)
    elif glob.glob(os.path.join(checkpoint_dir, "step-*.pt")):
        fail(f"{cfg.out} already holds checkpoints; pass --resume {cfg.out} to continue, or choose another --out")
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
    elapsed_before_s = state["elapsed_s"]

    def elapsed_s():  # time spent against the budget, over all resumed runs
        return elapsed_before_s + time.time() - PROCESS_START_S

    train_model = torch.compile(model) if cfg.compile else model
    powersgd = None
    if world_size > 1:  # hand-written data parallelism: DDP all-reduces the gradients in backward
        train_model, powersgd = wrap_ddp(train_model, cfg, device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    log(f"model: {cfg.model} {model_config}, {n_params / 1e6:.1f}M parameters; optimizer: {optimizer_name}; "
        f"precision: {precision}; {world_size} process(es) x {micro_batches_per_step} micro-batches of "
        f"{cfg.micro_batch} = batch {cfg.batch}", rank)
    if world_size > 1:
        log(f"gradients: DDP buckets of {cfg.bucket_mb:g} MB, comm hook {cfg.comm_hook}"
            + (f" (rank {cfg.powersgd_rank}, from the end of warmup)" if powersgd else ""), rank)
    elif cfg.comm_hook != "none":  # a logged no-op, so one command line serves 1 and N processes
        log(f"note: --comm-hook {cfg.comm_hook} has no effect in a single process (nothing is communicated)", rank)
    peak_flops = cfg.peak_tflops * 1e12
    if not peak_flops and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_flops = next((tf * 1e12 for gpu, tf in PEAK_TFLOPS.items() if gpu in name), 0.0)
    flops_per_step = flops_per_sequence(model_config, seq_len, predictions) * cfg.batch
    if val_split["sequences"] == 0:
        log("note: the validation split is empty; validation is skipped", rank)
    metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None

    def record(kind, **values):
        if metrics:
            metrics.write(json.dumps({"kind": kind, **values}) + "\n")
            metrics.flush()

    def write_checkpoint(stop_reason=None):
        """All ranks call it (each contributes its RNG state); rank 0 writes. Returns the seconds it took."""
        started = time.time()
        rngs = [rng_state(device)]
        if world_size > 1:
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_state(device))
        if rank == 0:
            run = {"model_config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(cfg),
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                   "state": {**state, "elapsed_s": elapsed_s()}, "rng": rngs, "stop_reason": stop_reason,
                   "tokenizer_json": tokenizer_json,
                   "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                   "special_token_ids": meta["special_token_ids"]}
            save_checkpoint(run, os.path.join(checkpoint_dir, f"step-{state['step']:08d}.pt"))
        return time.time() - started

    def validate():
        val_loss, val_accuracy = evaluate(model, val_split, cfg.micro_batch, pad_id, rank, world_size, device, precision)
        log(f"validation at step {state['step']}: loss {val_loss:.4f}, masked-token accuracy {val_accuracy:.4f}", rank)
        record("val", step=state["step"], val_loss=val_loss, val_accuracy=val_accuracy)

    # --- the loop: one optimizer step per iteration
    batches = prefetch(train_batches(train_split, cfg, pad_id, rank, world_size, state["epoch"], state["step_in_epoch"],
                                     pin_memory=device.type == "cuda"))
    # durations that decide when to stop: an optimizer step, a validation (both measured) and a
    # checkpoint (guessed at 100 MB/s for weights and two moments until the first one is measured)
    step_s, validation_s, checkpoint_s = 0.0, 0.0, 12 * n_params / 100e6
    last_checkpoint = last_validation = last_log = time.time()
    log_loss, log_steps, log_sequences, nonfinite_in_a_row = torch.zeros((), device=device), 0, 0, 0
    comm_s = compute_s = None  # measured on logged steps, see below
    # The schedule reads the clock that all ranks agree on (the largest), so that they use the same lr
    # and start PowerSGD on the same step; it is refreshed with the all-reduce at the end of each step.
    clock = torch.tensor(elapsed_s(), dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)
    clock_s = clock.item()
    stop_reason = None
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    model.train()
    while stop_reason is None:
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            stop_reason = "max_steps"
            break
        step_started = time.time()
        progress = state["step"] / cfg.max_steps if cfg.max_steps else clock_s / budget_s
        lr = learning_rate(min(progress, 1.0), cfg.lr, cfg.warmup, constant)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if powersgd and powersgd.start_powerSGD_iter == POWERSGD_NOT_YET and progress >= cfg.warmup:
            log(f"PowerSGD compresses the gradients from step {state['step'] + 1 + start_powersgd(powersgd)} on", rank)
        # On logged steps, time each micro-batch (waiting for the GPU): only the last one communicates,
        # so its extra time over the others is the communication that backward did not hide.
        timed = world_size > 1 and micro_batches_per_step > 1 and (state["step"] + 1) % cfg.log_every == 0
        micro_batch_s = []
        loss_sum = torch.zeros((), device=device)
        for i in range(micro_batches_per_step):
            micro_batch_started = time.time()
            epoch, step_in_epoch, batch = next(batches)  # streamed: one micro-batch in memory, not the step's
            batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
            last = i == micro_batches_per_step - 1
            # gradients are all-reduced once per step, in the backward of the last micro-batch
            no_sync = train_model.no_sync() if world_size > 1 and not last else contextlib.nullcontext()
            with no_sync:
                with autocast(device, precision):
                    logits = train_model(batch["input_ids"], batch["mlm_positions"], batch.get("attention_mask"))
                loss = mlm_loss(logits, batch["mlm_labels"])
                scaler.scale(loss / micro_batches_per_step).backward()
            loss_sum += loss.detach()
            if timed:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                micro_batch_s.append(time.time() - micro_batch_started)
        if timed:
            computing_s = sum(micro_batch_s[:-1]) / (micro_batches_per_step - 1)  # one micro-batch, no sync
            comm_s, compute_s = max(0.0, micro_batch_s[-1] - computing_s), computing_s * micro_batches_per_step
        scaler.unscale_(optimizer)  # true gradients for the norm (a no-op unless fp16)
        grad_norm = global_grad_norm(params)

        # One all-reduce per step makes every rank take the same decisions: skip a non-finite step,
        # checkpoint, validate, stop. Stop unless another step, a validation and a checkpoint fit.
        seconds_left = budget_s - elapsed_s()
        reserve_s = 1.5 * step_s + validation_s + checkpoint_s + 1.0
        flags = torch.tensor([0.0, seconds_left < reserve_s, bool(stop_signal),
                              time.time() - last_checkpoint >= cfg.checkpoint_minutes * 60,
                              time.time() - last_validation >= cfg.val_minutes * 60, elapsed_s()],
                             dtype=torch.float64, device=device)
        flags[0] = (~torch.isfinite(grad_norm) | ~torch.isfinite(loss_sum)).double()
        if world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        *flags, clock_s = flags.tolist()
        nonfinite, out_of_time, signalled, checkpoint_due, validation_due = (bool(f) for f in flags)
        if nonfinite:  # never let it reach the weights; fp16's scaler also lowers its scale
            if scaler.is_enabled():
                scaler.update()
            if powersgd:
                reset_powersgd(powersgd)
            state["skipped_steps"] += 1
            nonfinite_in_a_row += 1
        else:
            scaler.step(optimizer)
            scaler.update()
            nonfinite_in_a_row = 0
            log_loss += loss_sum / micro_batches_per_step
            log_steps += 1
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["sequences_seen"] += cfg.batch
        state["epoch"], state["step_in_epoch"] = epoch, step_in_epoch + 1
        log_sequences += cfg.batch

        if state["step"] % cfg.log_every == 0:
            if world_size > 1:
                dist.all_reduce(log_loss)
            interval_s = time.time() - last_log
            mean_loss = log_loss.item() / world_size / log_steps if log_steps else None  # None: all skipped
            tokens_per_s = log_sequences * seq_len / interval_s
            mfu = log_sequences / cfg.batch * flops_per_step / interval_s / peak_flops if peak_flops else None
            values = dict(step=state["step"], sequences=state["sequences_seen"], loss=mean_loss, lr=lr,
                          grad_norm=grad_norm.item(), tokens_per_s=tokens_per_s, mfu=mfu,
                          elapsed_h=elapsed_s() / 3600, remaining_h=(budget_s - elapsed_s()) / 3600,
                          skipped_steps=state["skipped_steps"], comm_s=comm_s, compute_s=compute_s)
            loss_text = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
            mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
            comm_text = "" if comm_s is None else f" | comm {comm_s:.3f} s + compute {compute_s:.3f} s per step"
            log(f"step {state['step']} | seqs {state['sequences_seen']} | loss {loss_text} | lr {lr:.3e} | "
                f"grad norm {values['grad_norm']:.3f} | {tokens_per_s:,.0f} tokens/s | MFU {mfu_text}{comm_text} | "
                f"elapsed {values['elapsed_h']:.3f} h | left {values['remaining_h']:.3f} h", rank)
            record("train", **values)
            log_loss.zero_()
            log_steps = log_sequences = 0
            last_log = time.time()
        step_s = time.time() - step_started if step_s == 0 else 0.9 * step_s + 0.1 * (time.time() - step_started)

        if nonfinite_in_a_row >= NONFINITE_STEPS_LIMIT:
            stop_reason = "nonfinite"
        elif signalled:
            stop_reason = "signal"
        elif out_of_time:
            stop_reason = "deadline"
        elif checkpoint_due:
            checkpoint_s = max(checkpoint_s, write_checkpoint())
            last_checkpoint = time.time()
        if validation_due and stop_reason is None and val_split["sequences"]:
            validation_started = time.time()
            validate()
            last_validation = time.time()
            validation_s = last_validation - validation_started

    # --- the end: always a checkpoint, then a line that says why
    write_checkpoint(stop_reason)
    checkpoint = os.path.join(checkpoint_dir, f"step-{state['step']:08d}.pt")
    if stop_reason == "max_steps" and val_split["sequences"]:
        validate()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if metrics:
        metrics.close()
    if stop_reason == "nonfinite":
        fail(f"stopped: {NONFINITE_STEPS_LIMIT} steps in a row had a non-finite loss or gradient; the weights "
             f"before them are in {checkpoint}; lower --lr or use --precision bf16/fp32")
    log(f"stopped ({stop_reason}) at step {state['step']} after {elapsed_s() / 3600:.3f} h; checkpoint: {checkpoint}", rank)
    if stop_reason == "signal":
        log(f"continue with the same command and --resume {cfg.out}", rank)
        sys.exit(128 + stop_signal[0])


# -----------------------------------------------------------------------------------------------
# main


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def parse_args(argv=None):
    """The command line, generated from TrainConfig and the overridable BertConfig fields."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        if f.name == "model_overrides":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, **f.metadata)
    group = parser.add_argument_group("model overrides (default: the --model preset)")
    for f in fields(BertConfig):
        if f.name in MODEL_FLAGS:
            group.add_argument("--" + f.name.replace("_", "-"), default=None,
                               type=parse_bool if isinstance(f.default, bool) else type(f.default))
    args = vars(parser.parse_args(argv))
    overrides = {name: args.pop(name) for name in MODEL_FLAGS}
    return TrainConfig(**args, model_overrides={k: v for k, v in overrides.items() if v is not None})


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
