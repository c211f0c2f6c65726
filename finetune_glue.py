"""Fine-tune a pretrained BERT on GLUE and report dev scores the way the 24hBERT paper does.

    python finetune_glue.py --checkpoint runs/bert --task all --glue-dir glue_data --out runs/glue

For each task it sweeps learning rate x batch size x epochs (the paper's grid by default) over several
seeds, chooses the configuration with the best median dev score and reports that median. Each finished
run is added to OUT/results.json as soon as it ends, and running the same command again skips it.
OUT/results.md is the table to read. OUT/submission/ holds the chosen runs' test-set predictions in the
GLUE server's format, ready to zip and upload.

Several processes can share one sweep: start the same command more than once on one --out, or once per
GPU with `torchrun --nproc_per_node 8 finetune_glue.py ...`. Each takes the runs that no other has taken.
"""
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from train_bert import load_pretrained


@dataclasses.dataclass(frozen=True)
class Config:
    checkpoint: str                  # a train_bert.py checkpoint or a Hugging Face BERT directory
    tasks: tuple                     # GLUE task names, in the order they run
    out: str                         # results.json, results.md, runs/ and submission/ go here
    glue_dir: str | None = None      # GLUE's TSV files; None downloads the tasks from the hub
    learning_rates: tuple = (1e-5, 3e-5, 5e-5, 8e-5)  # the paper's grid ...
    batch_sizes: tuple = (16, 32)
    epochs: tuple = (3, 5)
    seeds: int = 5                   # ... each configuration run with seeds 0, 1, ..., seeds - 1
    max_train_examples: int | None = None  # train on the first N rows only (quick checks)
    from_mnli: bool = False          # start RTE, MRPC and STS-B from the chosen MNLI run
    # The recipe. Not flags: change them here, and use a new --out when you do.
    max_seq_len: int = 128           # tokens, [CLS] and [SEP]s included
    warmup_fraction: float = 0.1     # of all optimizer steps, then linear decay to zero
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    head_dropout: float = 0.1
    eval_batch_size: int = 128


# What each numeric flag allows, checked before any work: (test, words for the error). The tests are
# False for NaN, and a learning rate above 1 only ever diverges.
FLAG_RANGES = {
    "lr": (lambda value: 0 < value <= 1, "positive numbers up to 1"),
    "batch": (lambda value: 1 <= value <= 8192, "positive numbers up to 8192"),
    "epochs": (lambda value: 1 <= value <= 100, "positive numbers up to 100"),
    "seeds": (lambda value: 1 <= value <= 100, "positive numbers up to 100"),
    "max_train_examples": (lambda value: value >= 1, "positive numbers"),
}
POLL_SECONDS = 2  # how often a process that waits for other processes' MNLI runs looks again
HUB_CONNECT_TIMEOUT_S = 2  # a lost SYN is sent again after 1 s, so one loss still connects in time
# A run's progress bar on a terminal, one line: "rte lr=3e-05 batch=32 epochs=3 seed=0  41%|████    | 3072/7470
# examples, 35.20 examples/s, ETA 02:05". rate_noinv: in examples/s however slow, never in s/example.
PROGRESS_FORMAT = ("{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} examples, {rate_noinv_fmt}, "
                   "ETA {remaining}")


# ---------------------------------------------------------------------------------------------------
# The nine tasks, in GLUE's file layout. `columns` names the (first text, second text, label) columns
# of the train and dev files; CoLA's have no header, so they are positions. Test files have no label
# column. `test_files` maps each test split to the file name the GLUE server expects for it.

TASKS = {
    "cola": dict(folder="CoLA", labels=["0", "1"], metrics=["matthews"], columns=(3, None, 1),
                 test_columns=("sentence", None), hub_columns=("sentence", None),
                 test_files={"test": "CoLA.tsv"}),
    "sst2": dict(folder="SST-2", labels=["0", "1"], metrics=["accuracy"], columns=("sentence", None, "label"),
                 hub_columns=("sentence", None), test_files={"test": "SST-2.tsv"}),
    "mrpc": dict(folder="MRPC", labels=["0", "1"], metrics=["f1", "accuracy"],
                 columns=("#1 String", "#2 String", "Quality"), hub_columns=("sentence1", "sentence2"),
                 test_files={"test": "MRPC.tsv"}),
    "stsb": dict(folder="STS-B", labels=None, metrics=["pearson", "spearman"],
                 columns=("sentence1", "sentence2", "score"), hub_columns=("sentence1", "sentence2"),
                 test_files={"test": "STS-B.tsv"}),
    "qqp": dict(folder="QQP", labels=["0", "1"], metrics=["f1", "accuracy"],
                columns=("question1", "question2", "is_duplicate"), hub_columns=("question1", "question2"),
                test_files={"test": "QQP.tsv"}),
    "mnli": dict(folder="MNLI", labels=["entailment", "neutral", "contradiction"], metrics=["accuracy"],
                 columns=("sentence1", "sentence2", "gold_label"), hub_columns=("premise", "hypothesis"),
                 # AX, GLUE's diagnostic set, is scored with the MNLI model
                 test_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv", "ax": "AX.tsv"}),
    "qnli": dict(folder="QNLI", labels=["entailment", "not_entailment"], metrics=["accuracy"],
                 columns=("question", "sentence", "label"), hub_columns=("question", "sentence"),
                 test_files={"test": "QNLI.tsv"}),
    "rte": dict(folder="RTE", labels=["entailment", "not_entailment"], metrics=["accuracy"],
                columns=("sentence1", "sentence2", "label"), hub_columns=("sentence1", "sentence2"),
                test_files={"test": "RTE.tsv"}),
    "wnli": dict(folder="WNLI", labels=["0", "1"], metrics=["accuracy"], columns=("sentence1", "sentence2", "label"),
                 hub_columns=("sentence1", "sentence2"), test_files={"test": "WNLI.tsv"}),
}
FROM_MNLI_TASKS = ("rte", "mrpc", "stsb")
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test",
              "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched",
              "test_matched": "test_matched", "test_mismatched": "test_mismatched"}

# What the paper compares with: GLUE test-server figures, one metric per task (MRPC and QQP F1,
# STS-B a correlation), 24hBERT (Izsak et al. 2021) and BERT-base (Devlin et al. 2019). Test and dev
# scores differ; these are for orientation, not for a like-for-like comparison.
PAPER_FIGURES = {
    "cola": ("57.1", "52.1"), "sst2": ("93.0", "93.5"), "mrpc": ("87.5", "88.9"), "stsb": ("82.0", "85.8"),
    "qqp": ("70.7", "71.2"), "mnli": ("84.4/83.8", "84.6/83.4"), "qnli": ("90.6", "90.5"),
    "rte": ("57.7", "66.4"), "wnli": ("", ""),
}


def fail(message):
    """A user's mistake: one line that says what to do, exit status 1, no traceback."""
    print(f"finetune_glue.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def splits(task):
    """(split, has labels) for a task; MNLI has matched and mismatched dev and test sets."""
    if task == "mnli":
        return [("train", True), ("dev_matched", True), ("dev_mismatched", True),
                ("test_matched", False), ("test_mismatched", False)]
    return [("train", True), ("dev", True), ("test", False)]


def dev_splits(task):
    return [split for split, has_labels in splits(task) if has_labels and split != "train"]


# ---------------------------------------------------------------------------------------------------
# Reading the data. A split is a dict: text_a, text_b (None for one-sentence tasks), labels (label
# numbers, floats for STS-B, None for test sets) and index (test sets: the id to submit).

def read_tsv(path):
    """(line number, fields) of each non-blank line of a GLUE TSV file. GLUE's files are not CSV: quotes
    are plain text."""
    if not os.path.isfile(path):
        fail(f"{path} is missing; --glue-dir must hold GLUE's task folders (CoLA/, SST-2/, ...) with their TSV files.")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        fail(f"cannot read {path} ({error.strerror}); make it readable, or pass another --glue-dir.")
    try:
        text = raw.decode("utf-8-sig")  # utf-8-sig drops the byte-order mark MRPC's files start with
    except UnicodeDecodeError as error:
        line_number = raw.count(b"\n", 0, error.start) + 1
        fail(f"{path} line {line_number} is not UTF-8 text; convert the file to UTF-8, as GLUE's files are.")
    lines = enumerate(text.split("\n"), start=1)
    return [(line_number, line.rstrip("\r").split("\t")) for line_number, line in lines if line.strip()]


def read_split(task, path, has_labels):
    """One split from its TSV file; a file without the task's columns, or with a value that the task
    cannot have, stops with one line that names the file and the line."""
    spec = TASKS[task]
    lines = read_tsv(path)
    if task == "cola" and has_labels:  # no header row
        positions = spec["columns"]
    else:
        header, lines = lines[0][1] if lines else [], lines[1:]
        names = spec["columns"] if has_labels else spec.get("test_columns", spec["columns"][:2])
        if not has_labels:
            names = (*names, "id" if task == "qqp" else "index")
        missing = [name for name in names if name is not None and name not in header]
        if missing:
            fail(f"{path} has no column {missing[0]!r} in its header; use the files of GLUE's {spec['folder']} task.")
        positions = [header.index(name) if name is not None else None for name in names]
    if not lines:
        fail(f"{path} has no examples; use the files of GLUE's {spec['folder']} task.")
    needed = max(p for p in positions if p is not None) + 1
    for line_number, row in lines:
        if len(row) < needed:
            fail(f"{path} line {line_number} has {len(row)} tab-separated fields, not {needed}; the file is malformed.")
    text_a, text_b, last = positions
    split = dict(text_a=[row[text_a] for _, row in lines],
                 text_b=[row[text_b] for _, row in lines] if text_b is not None else None, labels=None, index=None)
    if has_labels:
        split["labels"] = [read_label(task, path, line_number, row[last]) for line_number, row in lines]
    else:
        split["index"] = [row[last] for _, row in lines]
    return split


def read_label(task, path, line_number, text):
    """A label as its number in TASKS' list, or an STS-B score as a float from 0 to 5."""
    labels = TASKS[task]["labels"]
    if labels is None:
        try:
            score = float(text)
        except ValueError:
            score = math.nan
        if not 0 <= score <= 5:  # False for the "nan" and "inf" that float() accepts, too
            fail(f"{path} has a score that is not a number from 0 to 5 on line {line_number} ({text!r}); "
                 "the file is malformed.")
        return score
    if text not in labels:
        fail(f"{path} has the label {text!r} on line {line_number}, not one of {labels}; the file is malformed.")
    return labels.index(text)


def read_task(cfg, task):
    """All splits of a task from --glue-dir, or from the hub without it."""
    if cfg.glue_dir is None:
        data = read_task_from_hub(task)
    else:
        folder = os.path.join(cfg.glue_dir, TASKS[task]["folder"])
        data = {split: read_split(task, os.path.join(folder, f"{split}.tsv"), has_labels)
                for split, has_labels in splits(task)}
        diagnostic = os.path.join(cfg.glue_dir, "diagnostic", "diagnostic.tsv")
        if task == "mnli" and os.path.isfile(diagnostic):
            data["ax"] = read_split(task, diagnostic, has_labels=False)
    if cfg.max_train_examples is not None:
        data["train"] = {key: None if values is None else values[:cfg.max_train_examples]
                         for key, values in data["train"].items()}
    return data


def data_sha256(data):
    """A fingerprint of a task's data as read (every split's texts, labels and ids): the runs of one
    --out are all made on the same data, wherever it came from."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def hub_offline():
    """HF_HUB_OFFLINE=1 (or ON, YES, TRUE, as huggingface_hub reads it): datasets reads its local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_hub_reachable():
    """Without the hub, datasets retries for about 25 s and prints a line per retry; one TCP connection to the
    host of HF_ENDPOINT, or to the proxy that would carry the request, tells the same in a second or two.
    Nothing to check with HF_HUB_OFFLINE=1, where nothing is fetched."""
    if hub_offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        url = urllib.parse.urlsplit(endpoint)
    except ValueError:  # "http://[::1", say
        url = None
    if not url or not url.hostname:
        fail(f"HF_ENDPOINT must be a URL such as https://huggingface.co, not {endpoint!r}; correct it or unset it.")
    proxy = urllib.request.getproxies().get(url.scheme)
    try:
        if proxy and not urllib.request.proxy_bypass(url.hostname):
            url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as error:  # no such host, refused, timed out; ValueError: a port that is not a number
        fail(f"cannot reach the Hugging Face hub at {endpoint} ({getattr(error, 'strerror', None) or error}) for GLUE; "
             "set HF_HUB_OFFLINE=1 to use GLUE from the local cache, or pass --glue-dir with GLUE's files.")


def read_task_from_hub(task):
    import datasets  # only needed without --glue-dir

    try:
        dataset = datasets.load_dataset("nyu-mll/glue", task)
        if task == "mnli":
            dataset["ax"] = datasets.load_dataset("nyu-mll/glue", "ax")["test"]
    except Exception as error:  # no network, no such dataset, ...: the user's fix is the same
        if hub_offline():
            fail(f"GLUE's {task} is not in the local cache and HF_HUB_OFFLINE=1 keeps the hub out; unset "
                 "HF_HUB_OFFLINE to download it, or pass --glue-dir with GLUE's files.")
        fail(f"could not load GLUE's {task} from the Hugging Face hub ({type(error).__name__}); "
             "download GLUE and pass --glue-dir.")
    column_a, column_b = TASKS[task]["hub_columns"]  # the diagnostic set's are MNLI's: premise, hypothesis
    data = {}
    for split, has_labels in splits(task) + ([("ax", False)] if task == "mnli" else []):
        rows = dataset[HUB_SPLITS.get(split, split)]
        data[split] = dict(text_a=list(rows[column_a]), text_b=list(rows[column_b]) if column_b else None,
                           labels=list(rows["label"]) if has_labels else None,  # same numbering as TASKS' labels
                           index=None if has_labels else [str(i) for i in rows["idx"]])
        problem = hub_split_problem(task, data[split])
        if problem:
            fail(f"GLUE's {task} {split} split from the Hugging Face hub {problem}; delete it from the datasets "
                 "cache (~/.cache/huggingface/datasets) to download it again, or download GLUE and pass --glue-dir.")
    return data


def hub_split_problem(task, split):
    """What is wrong with a split from the hub, in words, or None: texts must be strings and labels valid."""
    for column in ("text_a", "text_b"):
        for row, text in enumerate(split[column] or []):
            if not isinstance(text, str):
                return f"has {text!r} as the text of row {row}"
    for row, label in enumerate(split["labels"] or []):
        if TASKS[task]["labels"] is None:
            valid = isinstance(label, (int, float)) and 0 <= label <= 5
        else:
            valid = isinstance(label, int) and 0 <= label < len(TASKS[task]["labels"])
        if not valid:
            return f"has the label {label!r} in row {row}"
    return None


# ---------------------------------------------------------------------------------------------------
# GLUE's metrics, in plain numpy. Predictions and labels are 1-D arrays.

def accuracy(predictions, labels):
    return float(np.mean(predictions == labels))


def f1(predictions, labels):
    """F1 of the positive class (1), as GLUE scores MRPC and QQP."""
    true_positives = np.sum((predictions == 1) & (labels == 1))
    predicted, actual = np.sum(predictions == 1), np.sum(labels == 1)
    return float(2 * true_positives / (predicted + actual)) if predicted + actual else 0.0


def matthews(predictions, labels):
    """Matthews correlation of two binary labelings; 0 when a row or column of the confusion matrix is empty."""
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    tn = float(np.sum((predictions == 0) & (labels == 0)))
    fp = float(np.sum((predictions == 1) & (labels == 0)))
    fn = float(np.sum((predictions == 0) & (labels == 1)))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions, labels):
    """Pearson correlation; 0 (not NaN, which would break the choice of configuration) for a constant input."""
    x, y = predictions - predictions.mean(), labels - labels.mean()
    denominator = math.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else 0.0


def ranks(values):
    """0-based ranks; tied values share the mean of their ranks (what Spearman needs)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2)[inverse]


def spearman(predictions, labels):
    return pearson(ranks(predictions), ranks(labels))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def dev_metrics(task, predictions, data):
    """GLUE's metrics for a task, in percent; MNLI's are prefixed matched_ / mismatched_."""
    metrics = {}
    for split in dev_splits(task):
        prefix = split.removeprefix("dev").lstrip("_") + "_" if task == "mnli" else ""
        labels = np.array(data[split]["labels"])
        for name in TASKS[task]["metrics"]:
            metrics[prefix + name] = 100 * METRICS[name](predictions[split], labels)
    return metrics


def task_score(metrics):
    """A task's GLUE score: the mean of its metrics (MNLI: of matched and mismatched accuracy)."""
    return sum(metrics.values()) / len(metrics)


# ---------------------------------------------------------------------------------------------------
# Tokens and batches. Each split is tokenized once per task; batches pad only to their longest row.

def tokenize(tokenizer, split, chunk_rows=4096):
    """Token ids of a split: input_ids and token_type_ids (examples, longest) padded with 0, and lengths
    (examples,). Encoded in chunks so that a large task's Encoding objects never all live at once."""
    texts = split["text_a"] if split["text_b"] is None else list(zip(split["text_a"], split["text_b"]))
    ids, type_ids = [], []  # per row, as small arrays: far less memory than lists of Python ints
    for start in range(0, len(texts), chunk_rows):
        for encoding in tokenizer.encode_batch(texts[start:start + chunk_rows]):
            ids.append(np.array(encoding.ids, dtype=np.int32))
            type_ids.append(np.array(encoding.type_ids, dtype=np.int8))
    lengths = np.array([len(row) for row in ids])
    input_ids = np.zeros((len(ids), lengths.max()), dtype=np.int32)
    token_type_ids = np.zeros((len(ids), lengths.max()), dtype=np.int8)
    for row, (row_ids, row_type_ids) in enumerate(zip(ids, type_ids)):
        input_ids[row, :len(row_ids)] = row_ids
        token_type_ids[row, :len(row_ids)] = row_type_ids
    labels = None if split["labels"] is None else np.array(split["labels"])
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, lengths=lengths, labels=labels)


def length_grouped_batches(lengths, batch_size, rng, window_batches=50):
    """Row numbers of one epoch's batches. Shuffle, sort each window of `window_batches` batches by length
    so that a batch holds rows of similar length (little padding), then shuffle the batches."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * window_batches):
        window = order[start:start + batch_size * window_batches]
        window = window[np.argsort(lengths[window], kind="stable")]
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def make_batch(tokens, rows, device):
    """The rows of a tokenized split as a dict of tensors, padded to the longest of them."""
    lengths = tokens["lengths"][rows]
    longest = int(lengths.max())
    batch = dict(input_ids=torch.from_numpy(tokens["input_ids"][rows, :longest]).long(),
                 token_type_ids=torch.from_numpy(tokens["token_type_ids"][rows, :longest]).long())
    if lengths.min() < longest:  # no mask when nothing is padded: attention then takes its fastest path
        batch["attention_mask"] = torch.arange(longest)[None, :] < torch.from_numpy(lengths)[:, None]  # (batch, longest)
    if tokens["labels"] is not None:
        batch["labels"] = torch.from_numpy(tokens["labels"][rows])
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


# ---------------------------------------------------------------------------------------------------
# The model: the pretrained encoder, BERT's pooler and a linear head.

class GlueModel(nn.Module):
    def __init__(self, encoder, pooler_state, num_outputs, dropout):
        super().__init__()
        hidden_size = encoder.config.hidden_size
        self.encoder = encoder
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_outputs)  # 1 output for STS-B's regression
        for layer in (self.pooler, self.head):  # BERT's initialization
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if pooler_state is not None:  # a Hugging Face checkpoint's pretrained pooler
            self.pooler.load_state_dict(pooler_state)

    def forward(self, input_ids, token_type_ids, attention_mask):
        hidden = self.encoder(input_ids, token_type_ids, attention_mask)  # (batch, seq, hidden)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))                     # (batch, hidden), from [CLS]
        return self.head(self.dropout(pooled))                              # (batch, num_outputs)


def make_optimizer(model, lr, weight_decay):
    """AdamW without weight decay on biases and LayerNorm weights (the 1-D parameters). The fused
    kernel (torch >= 2.4 on CPU) steps MiniLM in a fifth of the time of the default one on a CPU."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([dict(params=matrices, weight_decay=weight_decay), dict(params=vectors, weight_decay=0.0)],
                             lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=True)


def lr_at(step, peak_lr, warmup_steps, total_steps):
    """Linear warmup to peak_lr, then linear decay to zero after the last step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (total_steps - step) / (total_steps - warmup_steps)


def autocast(device):
    """bf16 autocast on a GPU that has bf16 (Ampere and later); fp32 elsewhere. fp16 would need loss
    scaling, and bf16 matmuls are slow on most CPUs."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.inference_mode()
def predict(model, tokens, batch_size, device):
    """Model outputs for every row of a tokenized split, in file order: (examples, num_outputs)."""
    model.eval()
    order = np.argsort(tokens["lengths"], kind="stable")  # similar lengths together: little padding
    outputs = np.empty((len(order), model.head.out_features), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = make_batch(tokens, rows, device)
        with autocast(device):
            logits = model(batch["input_ids"], batch["token_type_ids"], batch.get("attention_mask"))
        outputs[rows] = logits.float().cpu().numpy()
    return outputs


def fine_tune(cfg, task, train, encoder, pooler_state, lr, batch_size, epochs, seed, device, label):
    """Fine-tune a copy of the encoder on a tokenized training split with one configuration and seed.
    Returns the model, the training time in seconds and the number of optimizer steps skipped because
    their loss or gradient was not finite."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_outputs = 1 if TASKS[task]["labels"] is None else len(TASKS[task]["labels"])
    model = GlueModel(copy.deepcopy(encoder), pooler_state, num_outputs, cfg.head_dropout).to(device)
    optimizer = make_optimizer(model, lr, cfg.weight_decay)
    total_steps = epochs * math.ceil(len(train["lengths"]) / batch_size)
    warmup_steps = int(cfg.warmup_fraction * total_steps)
    step, skipped_steps = 0, 0
    started = time.time()
    model.train()
    # A bar on a terminal only (disable=None: none in a log). leave=False: the line the sweep prints for
    # the finished run takes its place.
    with tqdm(total=epochs * len(train["lengths"]), desc=label, unit=" examples", file=sys.stderr, disable=None,
              leave=False, bar_format=PROGRESS_FORMAT) as progress:
        for _ in range(epochs):
            for rows in length_grouped_batches(train["lengths"], batch_size, rng):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, lr, warmup_steps, total_steps)
                batch = make_batch(train, rows, device)
                with autocast(device):
                    outputs = model(batch["input_ids"], batch["token_type_ids"], batch.get("attention_mask"))
                if num_outputs == 1:
                    loss = F.mse_loss(outputs.float().squeeze(-1), batch["labels"].float())
                else:
                    loss = F.cross_entropy(outputs.float(), batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                # One NaN or inf in a step would make every weight NaN: skip such a step instead. (Asking
                # costs one wait for the GPU each step.)
                if (torch.isfinite(loss) & torch.isfinite(grad_norm)).item():
                    optimizer.step()
                else:
                    skipped_steps += 1
                step += 1
                progress.update(len(rows))  # cheap: it redraws at most every 0.1 s
    if device.type == "cuda":
        torch.cuda.synchronize()  # the GPU may still be working through the last steps
    train_seconds = time.time() - started
    return model, train_seconds, skipped_steps


# ---------------------------------------------------------------------------------------------------
# The sweep: results.json holds every finished run; the choice of configuration and the reports are
# recomputed from it after every run, so an interrupted sweep loses only the runs in progress.
#
# Several processes can share one sweep. A process claims each run before it starts it, with a
# non-blocking flock on OUT/runs/<task>/<run>/.claim, and skips the runs that are recorded or claimed by
# another process. The kernel drops a flock when its process ends, however it ends (crash, kill -9,
# Ctrl-C), so the run of a dead process is free again: there are no stale claims to clean up.
# results.json, results.md and submission/ change only under an exclusive flock on
# OUT/.results.lock, by read-merge-write: read results.json again, add the finished run unless it is
# there already (replacing a stale run of the same place in the grid), replace the file. On a shared filesystem: Linux turns flock on NFSv4 into byte-range
# locks that every client sees, so processes on several machines can share a sweep; a filesystem
# without locks refuses flock, and the process stops with one line.
#
# What one --out holds is one comparison: runs of one checkpoint (by its weights' hash), one recipe
# (settings) and, per task, one data (by the hash of what was read). With --from-mnli, RTE, MRPC and
# STS-B wait for MNLI runs in progress, then start from the best recorded MNLI run; should MNLI runs
# recorded later change that choice, their earlier runs are stale: left out of the reports and run again.

def settings(cfg, origin):
    """What makes runs comparable: one output folder holds runs made with one set of these. The
    checkpoint is known by its step and weights, not by its path, which may hold other weights later."""
    return dict(checkpoint=origin["file"], checkpoint_step=origin["step"], checkpoint_sha256=origin["weights_sha256"],
                max_train_examples=cfg.max_train_examples, from_mnli=cfg.from_mnli, max_seq_len=cfg.max_seq_len,
                warmup_fraction=cfg.warmup_fraction, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                head_dropout=cfg.head_dropout, data_sha256={})  # {task: data_sha256 of its data}, as runs are recorded


def checkpoint_identity(settings):
    """The checkpoint of a settings dict in words a person can compare: step and start of the weights' hash."""
    step = "" if settings.get("checkpoint_step") is None else f"step {settings['checkpoint_step']}, "
    return f"{step}weights sha256 {str(settings.get('checkpoint_sha256') or 'unknown')[:12]}"


# The fields of a run record that the sweep reads back, and their types.
RUN_FIELDS = {"task": str, "lr": (int, float), "batch_size": int, "epochs": int, "seed": int, "init": str,
              "metrics": dict, "score": (int, float), "run_dir": str}


def results_problem(results):
    """What makes the contents of a results.json unusable, in words, or None."""
    if not isinstance(results, dict) or not isinstance(results.get("settings"), dict) \
            or not isinstance(results["settings"].get("checkpoint"), str) or not isinstance(results.get("runs"), list):
        return "does not hold the settings and runs of a finetune_glue.py sweep"
    hashes = results["settings"].setdefault("data_sha256", {})  # absent in a sweep of an earlier version
    if not isinstance(hashes, dict) or not all(isinstance(value, str) for value in hashes.values()):
        return "has settings whose data_sha256 is not a {task: hash} table"
    for number, run in enumerate(results["runs"], start=1):
        invalid = [key for key, kind in RUN_FIELDS.items()
                   if not isinstance(run, dict) or not isinstance(run.get(key), kind)]
        if invalid:
            return f"has a run (number {number}) without a valid {invalid[0]!r}"
        if run["task"] not in TASKS or not all(isinstance(value, (int, float)) and math.isfinite(value)
                                               for value in (run["lr"], run["score"], *run["metrics"].values())):
            return f"has a run (number {number}) with an unknown task, or a score that is not a finite number"
    return None


def read_results(cfg, origin):
    """OUT/results.json, or an empty sweep when there is none. A file that is not one, or that holds runs
    of another checkpoint or other settings, stops the sweep with one line. Reading needs no lock: the
    file is only ever replaced whole."""
    path = os.path.join(cfg.out, "results.json")
    ours = settings(cfg, origin)
    if not os.path.exists(path):
        return dict(settings=ours, runs=[])
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        fail(f"{path} is not valid JSON; move it away to start over, or pass a new --out.")
    problem = results_problem(results)
    if problem:
        fail(f"{path} {problem}; move it away to start over, or pass a new --out.")
    theirs = results["settings"]
    identity = ("checkpoint_step", "checkpoint_sha256")
    if [theirs.get(name) for name in identity] != [ours[name] for name in identity]:
        fail(f"{cfg.out} holds runs made from another checkpoint ({checkpoint_identity(theirs)}) than {cfg.checkpoint} "
             f"({checkpoint_identity(ours)}); use a new --out for this one.")
    differing = [name for name, value in ours.items() if name not in ("checkpoint", "data_sha256")
                 and theirs.get(name) != value]
    if differing:
        fail(f"{cfg.out} holds runs made with another {differing[0].replace('_', ' ')}; pass a new --out.")
    return results


def save_results(cfg, results):
    """Replaces results.json at once. allow_nan=False: the last guard against a non-finite score."""
    replace_file(os.path.join(cfg.out, "results.json"), lambda f: json.dump(results, f, indent=1, allow_nan=False))


def replace_file(path, write):
    """Writes a file beside its place (PATH.tmp) with write(f), then renames it into place, so that no
    reader and no crash ever sees half a file. A full disk stops the sweep with one line, no .tmp left."""
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            write(f)
        os.replace(path + ".tmp", path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        write_failed(path, error)


def write_failed(path, error):
    fail(f"cannot write {path} ({getattr(error, 'strerror', None) or error}); free some disk space (or make it "
         "writable) and run the same command again: every run recorded so far is kept.")


def remove_path(path):
    """Removes a file or a folder, whichever is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def run_slot(run):
    """The place of a run in its task's grid."""
    return run["task"], run["lr"], run["batch_size"], run["epochs"], run["seed"]


def run_key(run):
    """A run, by its place in the grid and its start: with --from-mnli, a run of RTE, MRPC or STS-B that
    started from an MNLI run other than the one chosen now is another run (stale: it runs again)."""
    return (*run_slot(run), run["init"])


def lock_failed(path, error):
    fail(f"cannot lock {path} ({error.strerror}); use an --out that you can write to, on a filesystem with "
         "file locks (a local disk, or NFSv4).")


@contextlib.contextmanager
def results_lock(cfg):
    """Holds the exclusive flock on OUT/.results.lock while the block runs; other processes wait for it,
    which takes the time of a read-merge-write: milliseconds. (Hidden: deleting a lock file that a
    process holds would let a second writer in.)"""
    path = os.path.join(cfg.out, ".results.lock")
    if os.path.isdir(path):
        fail(f"{path} is a folder, where the sweep's lock file belongs; remove it and run again.")
    try:
        lock_file = open(path, "a")
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    except OSError as error:
        lock_failed(path, error)
    with lock_file:  # closing the file releases the lock
        yield


def claim(path):
    """The open claim file of a run, holding a non-blocking exclusive flock, or None when another live
    process holds it. The claim lasts until the file is closed or this process ends."""
    if os.path.isdir(path):
        fail(f"{path} is a folder, where a run's claim file belongs; remove it and run again.")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        claim_file = open(path, "a+")
    except OSError as error:
        lock_failed(path, error)
    try:
        fcntl.flock(claim_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        claim_file.close()
        return None
    except OSError as error:
        lock_failed(path, error)
    try:
        claim_file.truncate(0)
        claim_file.write(worker() + "\n")  # who holds it, for the messages of processes that wait for it
        claim_file.flush()
    except OSError as error:
        write_failed(path, error)
    return claim_file


def claim_is_held(path):
    """Whether a live process holds the claim file at path (it is taken for a moment to find out)."""
    try:
        with open(path) as claim_file:
            fcntl.flock(claim_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no such file: nobody holds it
        return False
    return False


def claim_holder(path):
    """Who holds a claim, as its holder wrote it into the claim file (for messages only)."""
    try:
        with open(path) as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


def record_run(cfg, origin, record, staging_dir, digest):
    """Under the results lock: adds a finished run to results.json, unless a process that ran it too has
    recorded it already: moves its files from staging_dir into its run folder, adds it (replacing a stale
    run of its place in the grid), and rebuilds results.md and submission/. Returns whether it was added."""
    try:
        with results_lock(cfg):
            results = read_results(cfg, origin)
            check_data(cfg, record["task"], results, digest)  # another process may have recorded other data
            added = run_key(record) not in {run_key(run) for run in results["runs"]}
            if added:
                results["settings"]["data_sha256"][record["task"]] = digest
                results["runs"] = [run for run in results["runs"] if run_slot(run) != run_slot(record)] + [record]
                moved = []
                try:  # the files first: a recorded run always has them
                    for name in os.listdir(staging_dir):
                        moved.append(os.path.join(cfg.out, record["run_dir"], name))
                        os.replace(os.path.join(staging_dir, name), moved[-1])
                    save_results(cfg, results)
                except BaseException as error:  # a full disk, Ctrl-C: no files of an unrecorded run stay behind
                    for file in moved:
                        with contextlib.suppress(OSError):
                            os.remove(file)
                    if isinstance(error, OSError):
                        write_failed(os.path.join(cfg.out, record["run_dir"]), error)
                    raise
                write_reports(cfg, results)
    finally:  # also when the sweep stops here: no half-written files left behind
        shutil.rmtree(staging_dir, ignore_errors=True)
    return added


def check_data(cfg, task, results, digest):
    """Stops the sweep when --out holds runs of this task made on other data than the data read now."""
    recorded = results["settings"]["data_sha256"].get(task)
    if recorded not in (None, digest):
        fail(f"{cfg.out} holds {task} runs made on other data (sha256 {recorded[:12]}..., the data read now has "
             f"{digest[:12]}...): GLUE's files changed, or another --glue-dir; pass the data of those runs, or a "
             "new --out.")


def current_runs(results, task):
    """A task's recorded runs that count. With --from-mnli, those of RTE, MRPC and STS-B that started from
    the MNLI run chosen now: MNLI runs recorded since may have changed the choice, and the runs from an
    earlier choice are stale (the next sweep runs them again)."""
    runs = [run for run in results["runs"] if run["task"] == task]
    if results["settings"].get("from_mnli") and task in FROM_MNLI_TASKS:
        runs = [run for run in runs if run["init"] == chosen_mnli_start(results)]
    return runs


def chosen_mnli_start(results):
    """"mnli:RUN_DIR" of the MNLI run that --from-mnli tasks start from now, or None before any MNLI run."""
    mnli_runs = [run for run in results["runs"] if run["task"] == "mnli"]
    return f"mnli:{choose(mnli_runs)[0]['run_dir']}" if mnli_runs else None


# ---------------------------------------------------------------------------------------------------
# Choosing and reporting: the paper's protocol (the best configuration by its median over seeds), then
# results.md and submission/ from every recorded run.

def median_run(runs):
    """The run with the median score (with an even number of runs, the lower of the middle two)."""
    return sorted(runs, key=lambda run: (run["score"], run["seed"]))[(len(runs) - 1) // 2]


def choose(runs):
    """The paper's protocol: each configuration's median run over seeds; the best of those medians.
    Returns (that run, number of seeds of its configuration). Ties go to the lower seed and the smaller
    configuration, whatever order the runs were recorded in: processes that share a sweep record them
    in any order, and must all choose the same MNLI run to start from."""
    by_config = {}
    for run in runs:
        by_config.setdefault((run["lr"], run["batch_size"], run["epochs"]), []).append(run)
    best = max(sorted(by_config.items()), key=lambda item: median_run(item[1])["score"])[1]
    return median_run(best), len(best)


def seed_spread(runs, chosen):
    """(min, median, max) of the scores over seeds of the chosen run's configuration; the median is
    the chosen run's score. One lucky seed can lift a small task's max by points: GLUE's known trap."""
    scores = [run["score"] for run in runs
              if (run["lr"], run["batch_size"], run["epochs"]) == (chosen["lr"], chosen["batch_size"], chosen["epochs"])]
    return min(scores), chosen["score"], max(scores)


def format_metrics(metrics):
    return ", ".join(f"{name} {value:.1f}" for name, value in metrics.items())


def write_reports(cfg, results):
    """OUT/results.md and OUT/submission/ from every run recorded so far. Each file is written beside its
    place and renamed into it, so that none is ever left half-written."""
    submission_dir = os.path.join(cfg.out, "submission")
    try:
        os.makedirs(submission_dir, exist_ok=True)
    except OSError as error:
        write_failed(submission_dir, error)
    lines = ["# GLUE dev results", "",
             f"Checkpoint `{results['settings']['checkpoint']}` ({checkpoint_identity(results['settings'])}). "
             "Per task: the configuration whose median dev score over seeds is best, and the metrics of its "
             "median run (the run in `submission/`).", "",
             "| task | metrics | chosen lr, batch, epochs | seeds | dev (median run) | score "
             "| score over seeds (min / median / max) | 24hBERT (paper, test) | BERT-base (paper, test) |",
             "|---|---|---|---|---|---|---|---|---|"]
    scores = []
    for task in TASKS:
        runs = current_runs(results, task)
        if not runs:
            continue
        run, seeds = choose(runs)
        scores.append(run["score"])
        for file_name in TASKS[task]["test_files"].values():
            source, target = os.path.join(cfg.out, run["run_dir"], file_name), os.path.join(submission_dir, file_name)
            if os.path.exists(source):
                with open(source, encoding="utf-8") as predictions:
                    replace_file(target, lambda f: shutil.copyfileobj(predictions, f))
        init = " (from MNLI)" if run["init"] != "pretrained" else ""
        spread = " / ".join(f"{score:.1f}" for score in seed_spread(runs, run))
        lines.append(f"| {TASKS[task]['folder']} | {' / '.join(run['metrics'])} "
                     f"| {run['lr']:g}, {run['batch_size']}, {run['epochs']}{init} | {seeds} "
                     f"| {' / '.join(f'{value:.1f}' for value in run['metrics'].values())} | {run['score']:.1f} "
                     f"| {spread} | {PAPER_FIGURES[task][0]} | {PAPER_FIGURES[task][1]} |")
    if scores:
        lines.append(f"| **GLUE average** ({len(scores)} of 9 tasks) | mean of task scores | | | "
                     f"| **{sum(scores) / len(scores):.1f}** | | | |")
    lines += ["", "A task's score is the mean of its metrics; MNLI's is the mean of matched and mismatched accuracy. "
              "Score over seeds: the lowest, the median and the highest score of the chosen configuration's seeds "
              "(of an even number, the lower middle one is the median); a wide spread means a single run's score "
              "says little. "
              "The reference figures are GLUE test-server scores (MRPC and QQP F1, STS-B Pearson): BERT-base "
              "from Devlin et al. (2019) Table 1, 24hBERT as Papers with Code lists the paper's results; "
              "they are for orientation only, dev and test sets differ.", ""]
    replace_file(os.path.join(cfg.out, "results.md"), lambda f: f.write("\n".join(lines)))


def write_predictions(path, task, index, outputs):
    """One test split's predictions in GLUE's submission format: index<TAB>prediction, with a header."""
    labels = TASKS[task]["labels"]
    with open(path, "w") as f:
        f.write("index\tprediction\n")
        for row_index, row_outputs in zip(index, outputs):
            prediction = f"{row_outputs[0]:.3f}" if labels is None else labels[int(row_outputs.argmax())]
            f.write(f"{row_index}\t{prediction}\n")


# ---------------------------------------------------------------------------------------------------
# Running the sweep: where each task starts, one run, one task's grid

def start_of(cfg, task, origin):
    """What a task's runs start from: "pretrained", or with --from-mnli for RTE, MRPC and STS-B
    "mnli:RUN_DIR", the MNLI run chosen over every recorded one, once no other process runs one."""
    if not (cfg.from_mnli and task in FROM_MNLI_TASKS):
        return "pretrained"
    # It waits on claims, not on a grid: this process may not know the MNLI grid of the processes that run
    # it. Should one of them be between two runs, the choice may change later; its runs then go stale.
    waiting_for = None
    while True:
        results = read_results(cfg, origin)
        recorded = {run["run_dir"] for run in results["runs"]}
        running = sorted(claim_holder(os.path.join(folder, ".claim"))
                         for folder in glob.glob(os.path.join(cfg.out, "runs", "mnli", "*"))
                         if os.path.relpath(folder, cfg.out) not in recorded
                         and claim_is_held(os.path.join(folder, ".claim")))
        if not running:
            break
        if running != waiting_for:
            print(f"{task}: waiting for {len(running)} MNLI runs of {', '.join(sorted(set(running)))}: {task} starts "
                  "from the best run of the complete MNLI grid", flush=True)
            waiting_for = running
        time.sleep(POLL_SECONDS)
    start = chosen_mnli_start(results)
    if start is None:
        fail(f"--from-mnli needs finished MNLI runs in {cfg.out} before {task}; add mnli to --task.")
    return start


def start_model(cfg, init, encoder, pooler_state):
    """(encoder, pooler weights) of a start (see start_of): the pretrained ones, or the MNLI run's."""
    if init == "pretrained":
        return encoder, pooler_state
    run_dir = init.removeprefix("mnli:")
    path = os.path.join(cfg.out, run_dir, "model.pt")
    redo = (f"delete {os.path.join(cfg.out, 'runs', 'mnli')} and its runs in results.json, "
            "then run mnli again with --from-mnli.")
    if not os.path.isfile(path):
        fail(f"{path} is missing; {redo}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        encoder = copy.deepcopy(encoder)
        encoder.load_state_dict(state["encoder"])
        hidden_size = encoder.config.hidden_size
        nn.Linear(hidden_size, hidden_size).load_state_dict(state["pooler"])  # the shapes GlueModel needs
    except Exception as error:  # pickle, zip, IO, missing keys, wrong shapes: the user's fix is the same
        fail(f"{path} cannot be read or does not fit the encoder of {cfg.checkpoint} ({type(error).__name__}); {redo}")
    return encoder, state["pooler"]


def run_folder(task, lr, batch_size, epochs, seed):
    """A run's folder in OUT: its claim, its test-set predictions and (MNLI, with --from-mnli) its model.
    repr: the shortest text that is this learning rate, so that two learning rates never share a folder."""
    return os.path.join("runs", task, f"lr{lr!r}-batch{batch_size}-epochs{epochs}-seed{seed}")


def run_one(cfg, task, run, data, digest, tokens, start, origin, device):
    """Claims one run of the grid, fine-tunes and scores it, and records it. Returns whether this process
    trained it: False, having done nothing, when another process holds its claim or recorded it first."""
    lr, batch_size, epochs, seed = run
    run_dir = run_folder(task, *run)
    claim_file = claim(os.path.join(cfg.out, run_dir, ".claim"))
    if claim_file is None:
        return False
    encoder, pooler_state, init = start
    with claim_file:  # closing it frees the claim, after the run is recorded
        if (task, *run, init) in {run_key(other) for other in read_results(cfg, origin)["runs"]}:
            return False  # recorded by its previous holder since this process looked
        label = f"{task} lr={lr:g} batch={batch_size} epochs={epochs} seed={seed}"
        model, train_seconds, skipped_steps = fine_tune(cfg, task, tokens["train"], encoder, pooler_state,
                                                        lr, batch_size, epochs, seed, device, label)
        outputs = {split: predict(model, tokens[split], cfg.eval_batch_size, device) for split in tokens if split != "train"}
        steps = epochs * math.ceil(len(tokens["train"]["lengths"]) / batch_size)
        # A diverged run is no result: its scores would look like a model that learned nothing.
        if skipped_steps == steps:
            fail(f"{label} diverged: all {steps} of its optimizer steps had a non-finite loss or gradient; "
                 f"leave out --lr {lr:g}, or use lower learning rates.")
        if not all(np.isfinite(split_outputs).all() for split_outputs in outputs.values()):
            fail(f"{label} diverged: its model outputs non-finite numbers; leave out --lr {lr:g}, or use lower "
                 "learning rates.")
        predictions = {split: outputs[split].argmax(-1) if TASKS[task]["labels"] else outputs[split][:, 0]
                       for split in dev_splits(task)}
        metrics = dev_metrics(task, predictions, data)
        # The run's files go to a staging folder first: the run folder only ever holds a recorded run's files.
        staging_dir = os.path.join(cfg.out, run_dir, ".staging")
        try:
            remove_path(staging_dir)  # a dead holder's, if any
            os.makedirs(staging_dir)
            for split, file_name in TASKS[task]["test_files"].items():
                if split in data:
                    write_predictions(os.path.join(staging_dir, file_name), task, data[split]["index"], outputs[split])
            if cfg.from_mnli and task == "mnli":  # the start of RTE, MRPC and STS-B, should this run be chosen
                torch.save(dict(encoder=model.encoder.state_dict(), pooler=model.pooler.state_dict()),
                           os.path.join(staging_dir, "model.pt"))
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            shutil.rmtree(staging_dir, ignore_errors=True)
            write_failed(staging_dir, error)
        examples_per_s = epochs * len(tokens["train"]["lengths"]) / train_seconds
        record = dict(task=task, lr=lr, batch_size=batch_size, epochs=epochs, seed=seed, init=init, metrics=metrics,
                      score=task_score(metrics), skipped_steps=skipped_steps, train_seconds=round(train_seconds, 3),
                      examples_per_s=round(examples_per_s, 1), run_dir=run_dir, checkpoint_step=origin["step"],
                      checkpoint_sha256=origin["weights_sha256"], worker=worker(),
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if not record_run(cfg, origin, record, staging_dir, digest):
            print(f"{label}: recorded meanwhile by another process; this process's result is dropped", flush=True)
            return True
    skipped = f", {skipped_steps} non-finite steps skipped" if skipped_steps else ""
    print(f"{label}: {format_metrics(metrics)} ({train_seconds / 60:.1f} min, {examples_per_s:.0f} examples/s"
          f"{skipped}, by {worker()})", flush=True)
    return True


def sweep_task(cfg, task, data, tokenizer, encoder, pooler_state, origin, device):
    """Every run of the grid that is neither recorded nor claimed by another process, one after another.
    With --from-mnli and RTE, MRPC or STS-B in --task, the MNLI sweep then waits for the MNLI runs of
    other processes (and takes over any whose process dies), so that they start from the complete grid."""
    grid = [(lr, batch_size, epochs, seed) for lr in cfg.learning_rates for batch_size in cfg.batch_sizes
            for epochs in cfg.epochs for seed in range(cfg.seeds)]

    digest = data_sha256(data)
    check_data(cfg, task, read_results(cfg, origin), digest)
    init = start_of(cfg, task, origin)

    def unrecorded():
        recorded = {run_key(run) for run in read_results(cfg, origin)["runs"]}
        return [run for run in grid if (task, *run, init) not in recorded]

    todo = unrecorded()
    stale = [run for run in read_results(cfg, origin)["runs"]
             if run["task"] == task and run_slot(run)[1:] in set(todo) and run["init"] != init]
    print(f"{task}: {len(grid) - len(todo)} of {len(grid)} runs already recorded, {len(todo)} to go"
          + (f" ({len(stale)} of them started from another MNLI run than the one chosen now, "
             f"{init.removeprefix('mnli:')}: they run again)" if stale else ""), flush=True)
    if not todo:
        return
    start = (*start_model(cfg, init, encoder, pooler_state), init)
    tokens = {split: tokenize(tokenizer, split_data) for split, split_data in data.items()}
    wait_for_all = cfg.from_mnli and task == "mnli" and any(other in cfg.tasks for other in FROM_MNLI_TASKS)
    waiting_for = None
    while todo:
        ran_any = False
        for run in todo:
            ran_any = run_one(cfg, task, run, data, digest, tokens, start, origin, device) or ran_any
        todo = unrecorded()
        if ran_any or not todo:
            continue  # look again: a run that another process held may be free now
        holders = sorted({claim_holder(os.path.join(cfg.out, run_folder(task, *run), ".claim")) for run in todo})
        if not wait_for_all:
            print(f"{task}: {len(todo)} of {len(grid)} runs are left to the processes that hold them: "
                  f"{', '.join(holders)}", flush=True)
            return
        if holders != waiting_for:
            print(f"{task}: waiting for {len(todo)} of {len(grid)} runs, held by {', '.join(holders)}: RTE, MRPC and "
                  "STS-B start from the best run of the complete MNLI grid", flush=True)
            waiting_for = holders
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------------------------------
# The command line

def spaced(values):
    """A default list as it is typed on the command line: 1e-05 3e-05 5e-05 8e-05."""
    return " ".join(str(value) for value in values)


def parse_args(argv):
    defaults = Config(checkpoint="", tasks=(), out="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="train_bert.py checkpoint or Hugging Face BERT directory")
    parser.add_argument("--task", nargs="+", required=True, help=f"one or more of {' '.join(TASKS)}, or all")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, runs/ and submission/")
    parser.add_argument("--glue-dir", help="GLUE's data folder, with CoLA/, SST-2/, ... (default: GLUE from the "
                                           "Hugging Face hub, or from its local cache with HF_HUB_OFFLINE=1)")
    parser.add_argument("--lr", type=float, nargs="+", default=defaults.learning_rates,
                        help=f"peak learning rates (default: {spaced(defaults.learning_rates)})")
    parser.add_argument("--batch", type=int, nargs="+", default=defaults.batch_sizes,
                        help=f"batch sizes (default: {spaced(defaults.batch_sizes)})")
    parser.add_argument("--epochs", type=int, nargs="+", default=defaults.epochs,
                        help=f"numbers of epochs (default: {spaced(defaults.epochs)})")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help=f"seeds per configuration: 0, 1, ..., SEEDS - 1 (default: {defaults.seeds})")
    parser.add_argument("--max-train-examples", type=int, metavar="N",
                        help="train on the first N training rows only, for quick checks (default: all rows)")
    parser.add_argument("--from-mnli", action="store_true",
                        help="start RTE, MRPC and STS-B from the chosen MNLI run (runs mnli first)")
    parser.error = lambda message: fail(f"{message}; see --help.")  # one line, exit status 1, as for every mistake
    args = parser.parse_args(argv)
    for name, (allowed, words) in FLAG_RANGES.items():
        values = getattr(args, name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and not allowed(value):
                fail(f"--{name.replace('_', '-')} {value} is out of range; pass {words}.")
    tasks = []
    for name in args.task:
        for task in TASKS if name.lower() == "all" else [name.lower()]:
            if task not in TASKS:
                fail(f"unknown task {name!r}; choose from {', '.join(TASKS)} or all.")
            if task not in tasks:
                tasks.append(task)
    if args.from_mnli and "mnli" in tasks:  # the other tasks start from its result
        tasks.remove("mnli")
        tasks.insert(0, "mnli")
    return Config(checkpoint=args.checkpoint, tasks=tuple(tasks), out=args.out, glue_dir=args.glue_dir,
                  learning_rates=tuple(dict.fromkeys(args.lr)), batch_sizes=tuple(dict.fromkeys(args.batch)),
                  epochs=tuple(dict.fromkeys(args.epochs)), seeds=args.seeds,  # dict.fromkeys: each value once
                  max_train_examples=args.max_train_examples, from_mnli=args.from_mnli)


def worker():
    """Who runs a run, for its record and the log: host:pid, and torchrun's LOCAL_RANK when it is set."""
    local_rank = os.environ.get("LOCAL_RANK")
    return f"{socket.gethostname()}:{os.getpid()}" + (f" LOCAL_RANK={local_rank}" if local_rank is not None else "")


def pick_device():
    """cuda:LOCAL_RANK when there are GPUs (torchrun starts one process per GPU and sets LOCAL_RANK;
    alone, a process takes GPU 0), the CPU otherwise. The processes share nothing but files in --out."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, gpus = os.environ.get("LOCAL_RANK", "0"), torch.cuda.device_count()
    if not local_rank.isdigit() or int(local_rank) >= gpus:
        fail(f"LOCAL_RANK={local_rank} names none of this machine's {gpus} GPUs; start at most {gpus} processes "
             f"(torchrun --nproc_per_node {gpus}).")
    device = torch.device("cuda", int(local_rank))
    torch.cuda.set_device(device)  # what autocast's bf16 check and synchronize() ask about
    return device


def sweep(cfg):
    """Checks every input, then sweeps each task in turn; prints results.md at the end."""
    device = pick_device()
    if not os.path.exists(cfg.checkpoint):
        fail(f"checkpoint {cfg.checkpoint} does not exist; pass a train_bert.py checkpoint or a Hugging Face BERT directory.")
    if cfg.glue_dir is None:
        check_hub_reachable()
    data = {task: read_task(cfg, task) for task in cfg.tasks}  # all first: a bad file stops us before hours of training
    try:
        encoder, tokenizer, pooler_state, origin = load_pretrained(cfg.checkpoint)
    except ValueError as error:
        fail(str(error))
    encoding = tokenizer.encode("a", "b")  # GLUE's inputs are [CLS] a [SEP] b [SEP], segments 0 then 1
    if encoding.ids[0] != tokenizer.token_to_id("[CLS]") or 1 not in encoding.type_ids:
        fail(f"the tokenizer of {cfg.checkpoint} does not add [CLS], [SEP] and segment ids to sentence pairs; "
             "give it BERT's post-processor (as prepare_data.py's tokenizers have).")
    # a checkpoint pretrained on shorter sequences has no position embeddings beyond them
    tokenizer.enable_truncation(max_length=min(cfg.max_seq_len, encoder.config.max_positions))
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as error:
        fail(f"cannot create --out {cfg.out} ({error.strerror}); choose another --out.")
    results = read_results(cfg, origin)
    needs_mnli = cfg.from_mnli and set(cfg.tasks) & set(FROM_MNLI_TASKS)
    if needs_mnli and "mnli" not in cfg.tasks and not any(run["task"] == "mnli" for run in results["runs"]):
        fail("--from-mnli needs MNLI runs first; add mnli to --task.")
    for task in cfg.tasks:
        sweep_task(cfg, task, data[task], tokenizer, encoder, pooler_state, origin, device)
    with results_lock(cfg):
        write_reports(cfg, read_results(cfg, origin))
    with open(os.path.join(cfg.out, "results.md")) as f:
        print(f.read())


def main(argv=None):
    cfg = parse_args(argv)
    try:
        sweep(cfg)
    except KeyboardInterrupt:
        results = os.path.join(cfg.out, "results.json")
        if not os.path.isfile(results):
            fail("interrupted before any run was recorded; run the same command to start again.")
        fail(f"interrupted; the finished runs are in {results}; run the same command to go on.")


if __name__ == "__main__":
    main()
