"""Fine-tune a pretrained BERT on GLUE and report dev scores the way the 24hBERT paper does.

    python finetune_glue.py --checkpoint runs/bert --task all --glue-dir glue_data --out runs/glue

For each task it sweeps learning rate x batch size x epochs (the paper's grid by default) over several
seeds, chooses the configuration with the best median dev score and reports that median. Each finished
run is added to OUT/results.json as soon as it ends, and running the same command again skips it.
OUT/results.md is the table to read. OUT/submission/ holds the chosen runs' test-set predictions in the
GLUE server's format, ready to zip and upload.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """Rows of a GLUE TSV file as lists of fields. GLUE's files are not CSV: quotes are plain text."""
    if not os.path.isfile(path):
        fail(f"{path} is missing; --glue-dir must hold GLUE's task folders (CoLA/, SST-2/, ...) with their TSV files.")
    with open(path, encoding="utf-8-sig") as f:  # utf-8-sig drops the byte-order mark MRPC's files start with
        lines = f.read().split("\n")
    return [line.rstrip("\r").split("\t") for line in lines if line.strip()]


def read_split(task, path, has_labels):
    """One split from its TSV file; a file without the task's columns or labels stops with one line."""
    spec = TASKS[task]
    rows = read_tsv(path)
    if task == "cola" and has_labels:  # no header row
        positions, first_row = spec["columns"], 1
    else:
        header, rows, first_row = rows[0] if rows else [], rows[1:], 2
        names = spec["columns"] if has_labels else spec.get("test_columns", spec["columns"][:2])
        if not has_labels:
            names = (*names, "id" if task == "qqp" else "index")
        missing = [name for name in names if name is not None and name not in header]
        if missing:
            fail(f"{path} has no column {missing[0]!r} in its header; use the files of GLUE's {spec['folder']} task.")
        positions = [header.index(name) if name is not None else None for name in names]
    if not rows:
        fail(f"{path} has no examples; use the files of GLUE's {spec['folder']} task.")
    needed = max(p for p in positions if p is not None) + 1
    for line_number, row in enumerate(rows, start=first_row):
        if len(row) < needed:
            fail(f"{path} line {line_number} has {len(row)} tab-separated fields, not {needed}; the file is malformed.")
    text_a, text_b, last = positions
    split = dict(text_a=[row[text_a] for row in rows],
                 text_b=[row[text_b] for row in rows] if text_b is not None else None, labels=None, index=None)
    if not has_labels:
        split["index"] = [row[last] for row in rows]
        return split
    labels = [row[last] for row in rows]
    if spec["labels"] is None:
        try:
            split["labels"] = [float(label) for label in labels]
        except ValueError:
            fail(f"{path} has a score that is not a number; the file is malformed.")
    else:
        unknown = sorted(set(labels) - set(spec["labels"]))
        if unknown:
            fail(f"{path} has the label {unknown[0]!r}, not one of {spec['labels']}; the file is malformed.")
        split["labels"] = [spec["labels"].index(label) for label in labels]
    return split


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


def read_task_from_hub(task):
    import datasets  # only needed without --glue-dir

    try:
        dataset = datasets.load_dataset("nyu-mll/glue", task)
        if task == "mnli":
            dataset["ax"] = datasets.load_dataset("nyu-mll/glue", "ax")["test"]
    except Exception as error:  # no network, no such dataset, ...: the user's fix is the same
        fail(f"could not load GLUE's {task} from the Hugging Face hub ({type(error).__name__}); "
             "download GLUE and pass --glue-dir.")
    column_a, column_b = TASKS[task]["hub_columns"]  # the diagnostic set's are MNLI's: premise, hypothesis
    data = {}
    for split, has_labels in splits(task) + ([("ax", False)] if task == "mnli" else []):
        rows = dataset[HUB_SPLITS.get(split, split)]
        data[split] = dict(text_a=list(rows[column_a]), text_b=list(rows[column_b]) if column_b else None,
                           labels=list(rows["label"]) if has_labels else None,  # same numbering as TASKS' labels
                           index=None if has_labels else [str(i) for i in rows["idx"]])
    return data


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


def show_progress(label, examples_done, examples_total, seconds):
    """A one-line progress bar on a terminal; nothing in logs."""
    if not sys.stderr.isatty():
        return
    examples_per_s = examples_done / max(seconds, 1e-9)
    eta_s = (examples_total - examples_done) / max(examples_per_s, 1e-9)
    bar = "#" * (20 * examples_done // examples_total)
    print(f"\r{label} [{bar:<20}] {examples_done}/{examples_total} examples {examples_per_s:.0f} ex/s "
          f"ETA {int(eta_s // 60)}:{int(eta_s % 60):02d} ", end="", file=sys.stderr, flush=True)


def fine_tune(cfg, task, train, encoder, pooler_state, lr, batch_size, epochs, seed, device, label):
    """Fine-tune a copy of the encoder on a tokenized training split with one configuration and seed.
    Returns the model and the training time in seconds."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    num_outputs = 1 if TASKS[task]["labels"] is None else len(TASKS[task]["labels"])
    model = GlueModel(copy.deepcopy(encoder), pooler_state, num_outputs, cfg.head_dropout).to(device)
    optimizer = make_optimizer(model, lr, cfg.weight_decay)
    total_steps = epochs * math.ceil(len(train["lengths"]) / batch_size)
    warmup_steps = int(cfg.warmup_fraction * total_steps)
    examples_total, examples_done, step = epochs * len(train["lengths"]), 0, 0
    started = time.time()
    model.train()
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
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            step += 1
            examples_done += len(rows)
            show_progress(label, examples_done, examples_total, time.time() - started)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the GPU may still be working through the last steps
    train_seconds = time.time() - started
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return model, train_seconds


# ---------------------------------------------------------------------------------------------------
# The sweep: results.json holds every finished run; the choice of configuration and the reports are
# recomputed from it after every run, so an interrupted sweep loses only the run in progress.

def settings(cfg):
    """What makes runs comparable: one output folder holds runs made with one set of these."""
    return dict(checkpoint=os.path.abspath(cfg.checkpoint), max_train_examples=cfg.max_train_examples,
                from_mnli=cfg.from_mnli, max_seq_len=cfg.max_seq_len, warmup_fraction=cfg.warmup_fraction,
                weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, head_dropout=cfg.head_dropout)


def load_results(cfg):
    path = os.path.join(cfg.out, "results.json")
    if not os.path.exists(path):
        return dict(settings=settings(cfg), runs=[])
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        fail(f"{path} is not valid JSON; move it away to start over, or pass a new --out.")
    differing = [name for name, value in settings(cfg).items() if results.get("settings", {}).get(name) != value]
    if differing:
        fail(f"{cfg.out} holds runs made with another {differing[0].replace('_', ' ')}; pass a new --out.")
    return results


def save_results(cfg, results):
    path = os.path.join(cfg.out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)  # atomic: a crash while writing never loses the finished runs


def median_run(runs):
    """The run with the median score (with an even number of runs, the lower of the middle two)."""
    return sorted(runs, key=lambda run: run["score"])[(len(runs) - 1) // 2]


def choose(runs):
    """The paper's protocol: each configuration's median run over seeds; the best of those medians.
    Returns (that run, number of seeds of its configuration)."""
    by_config = {}
    for run in runs:
        by_config.setdefault((run["lr"], run["batch_size"], run["epochs"]), []).append(run)
    best = max(by_config.values(), key=lambda group: median_run(group)["score"])
    return median_run(best), len(best)


def format_metrics(metrics):
    return ", ".join(f"{name} {value:.1f}" for name, value in metrics.items())


def write_reports(cfg, results):
    """OUT/results.md and OUT/submission/ from every run recorded so far."""
    submission_dir = os.path.join(cfg.out, "submission")
    os.makedirs(submission_dir, exist_ok=True)
    lines = ["# GLUE dev results", "",
             f"Checkpoint `{results['settings']['checkpoint']}`. Per task: the configuration whose median dev "
             "score over seeds is best, and the metrics of its median run (the run in `submission/`).", "",
             "| task | metrics | chosen lr, batch, epochs | seeds | dev (median run) | score "
             "| 24hBERT (paper, test) | BERT-base (paper, test) |",
             "|---|---|---|---|---|---|---|---|"]
    scores = []
    for task in TASKS:
        runs = [run for run in results["runs"] if run["task"] == task]
        if not runs:
            continue
        run, seeds = choose(runs)
        scores.append(run["score"])
        for file_name in TASKS[task]["test_files"].values():
            source = os.path.join(cfg.out, run["run_dir"], file_name)
            if os.path.exists(source):
                shutil.copyfile(source, os.path.join(submission_dir, file_name))
        init = " (from MNLI)" if run["init"] != "pretrained" else ""
        lines.append(f"| {TASKS[task]['folder']} | {' / '.join(run['metrics'])} "
                     f"| {run['lr']:g}, {run['batch_size']}, {run['epochs']}{init} | {seeds} "
                     f"| {' / '.join(f'{value:.1f}' for value in run['metrics'].values())} | {run['score']:.1f} "
                     f"| {PAPER_FIGURES[task][0]} | {PAPER_FIGURES[task][1]} |")
    if scores:
        lines.append(f"| **GLUE average** ({len(scores)} of 9 tasks) | mean of task scores | | | "
                     f"| **{sum(scores) / len(scores):.1f}** | | |")
    lines += ["", "A task's score is the mean of its metrics; MNLI's is the mean of matched and mismatched accuracy. "
              "The reference figures are GLUE test-server scores (MRPC and QQP F1, STS-B Pearson): BERT-base "
              "from Devlin et al. (2019) Table 1, 24hBERT as Papers with Code lists the paper's results; "
              "they are for orientation only, dev and test sets differ.", ""]
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write("\n".join(lines))


def write_predictions(path, task, index, outputs):
    """One test split's predictions in GLUE's submission format: index<TAB>prediction, with a header."""
    labels = TASKS[task]["labels"]
    with open(path, "w") as f:
        f.write("index\tprediction\n")
        for row_index, row_outputs in zip(index, outputs):
            prediction = f"{row_outputs[0]:.3f}" if labels is None else labels[int(row_outputs.argmax())]
            f.write(f"{row_index}\t{prediction}\n")


def start_model(cfg, task, results, encoder, pooler_state):
    """(encoder, pooler weights, name) a task starts from: the pretrained ones, or with --from-mnli
    for RTE, MRPC and STS-B, those of the chosen MNLI run."""
    if not (cfg.from_mnli and task in FROM_MNLI_TASKS):
        return encoder, pooler_state, "pretrained"
    mnli_runs = [run for run in results["runs"] if run["task"] == "mnli"]
    if not mnli_runs:
        fail(f"--from-mnli needs finished MNLI runs in {cfg.out} before {task}; add mnli to --task.")
    run_dir = choose(mnli_runs)[0]["run_dir"]
    path = os.path.join(cfg.out, run_dir, "model.pt")
    if not os.path.isfile(path):
        fail(f"{path} is missing; delete {os.path.join(cfg.out, 'runs', 'mnli')} and its runs in results.json, "
             "then run mnli again with --from-mnli.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    encoder = copy.deepcopy(encoder)
    encoder.load_state_dict(state["encoder"])
    return encoder, state["pooler"], f"mnli:{run_dir}"


def sweep_task(cfg, task, data, tokenizer, encoder, pooler_state, results, device):
    """Every configuration and seed of the grid not yet recorded, one after another."""
    done = {(run["lr"], run["batch_size"], run["epochs"], run["seed"]) for run in results["runs"] if run["task"] == task}
    grid = [(lr, batch_size, epochs, seed) for lr in cfg.learning_rates for batch_size in cfg.batch_sizes
            for epochs in cfg.epochs for seed in range(cfg.seeds)]
    todo = [run for run in grid if run not in done]
    print(f"{task}: {len(grid) - len(todo)} of {len(grid)} runs already recorded, {len(todo)} to go")
    if not todo:
        return
    tokens = {split: tokenize(tokenizer, split_data) for split, split_data in data.items()}
    encoder, pooler_state, init = start_model(cfg, task, results, encoder, pooler_state)
    for lr, batch_size, epochs, seed in todo:
        label = f"{task} lr={lr:g} batch={batch_size} epochs={epochs} seed={seed}"
        model, train_seconds = fine_tune(cfg, task, tokens["train"], encoder, pooler_state,
                                         lr, batch_size, epochs, seed, device, label)
        outputs = {split: predict(model, tokens[split], cfg.eval_batch_size, device) for split in tokens if split != "train"}
        predictions = {split: outputs[split].argmax(-1) if TASKS[task]["labels"] else outputs[split][:, 0]
                       for split in dev_splits(task)}
        metrics = dev_metrics(task, predictions, data)
        run_dir = os.path.join("runs", task, f"lr{lr:g}-batch{batch_size}-epochs{epochs}-seed{seed}")
        os.makedirs(os.path.join(cfg.out, run_dir), exist_ok=True)
        for split, file_name in TASKS[task]["test_files"].items():
            if split in data:
                write_predictions(os.path.join(cfg.out, run_dir, file_name), task, data[split]["index"], outputs[split])
        if cfg.from_mnli and task == "mnli":  # the start of RTE, MRPC and STS-B, should this run be chosen
            torch.save(dict(encoder=model.encoder.state_dict(), pooler=model.pooler.state_dict()),
                       os.path.join(cfg.out, run_dir, "model.pt"))
        examples_per_s = epochs * len(tokens["train"]["lengths"]) / train_seconds
        results["runs"].append(dict(task=task, lr=lr, batch_size=batch_size, epochs=epochs, seed=seed, init=init,
                                    metrics=metrics, score=task_score(metrics), train_seconds=round(train_seconds, 3),
                                    examples_per_s=round(examples_per_s, 1), run_dir=run_dir,
                                    finished_at=time.strftime("%Y-%m-%dT%H:%M:%S")))
        save_results(cfg, results)
        write_reports(cfg, results)
        print(f"{label}: {format_metrics(metrics)} ({train_seconds / 60:.1f} min, {examples_per_s:.0f} examples/s)")


# ---------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    defaults = Config(checkpoint="", tasks=(), out="")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="train_bert.py checkpoint or Hugging Face BERT directory")
    parser.add_argument("--task", nargs="+", required=True, help=f"one or more of {' '.join(TASKS)}, or all")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, runs/ and submission/")
    parser.add_argument("--glue-dir", help="GLUE's data folder (CoLA/, SST-2/, ...); without it, the hub")
    parser.add_argument("--lr", type=float, nargs="+", default=defaults.learning_rates, help="peak learning rates")
    parser.add_argument("--batch", type=int, nargs="+", default=defaults.batch_sizes, help="batch sizes")
    parser.add_argument("--epochs", type=int, nargs="+", default=defaults.epochs, help="numbers of epochs")
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="seeds per configuration")
    parser.add_argument("--max-train-examples", type=int, help="train on the first N training rows only")
    parser.add_argument("--from-mnli", action="store_true",
                        help="start RTE, MRPC and STS-B from the chosen MNLI run (runs mnli first)")
    args = parser.parse_args(argv)
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
    numbers = [*args.lr, *args.batch, *args.epochs, args.seeds, args.max_train_examples or 1]
    if min(numbers) <= 0:
        fail("--lr, --batch, --epochs, --seeds and --max-train-examples take positive numbers.")
    return Config(checkpoint=args.checkpoint, tasks=tuple(tasks), out=args.out, glue_dir=args.glue_dir,
                  learning_rates=tuple(args.lr), batch_sizes=tuple(args.batch), epochs=tuple(args.epochs),
                  seeds=args.seeds, max_train_examples=args.max_train_examples, from_mnli=args.from_mnli)


def main(argv=None):
    cfg = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not os.path.exists(cfg.checkpoint):
        fail(f"checkpoint {cfg.checkpoint} does not exist; pass a train_bert.py checkpoint or a Hugging Face BERT directory.")
    data = {task: read_task(cfg, task) for task in cfg.tasks}  # all first: a bad file stops us before hours of training
    try:
        encoder, tokenizer, pooler_state, _ = load_pretrained(cfg.checkpoint)
    except ValueError as error:
        fail(str(error))
    encoding = tokenizer.encode("a", "b")  # GLUE's inputs are [CLS] a [SEP] b [SEP], segments 0 then 1
    if encoding.ids[0] != tokenizer.token_to_id("[CLS]") or 1 not in encoding.type_ids:
        fail(f"the tokenizer of {cfg.checkpoint} does not add [CLS], [SEP] and segment ids to sentence pairs; "
             "give it BERT's post-processor (as prepare_data.py's tokenizers have).")
    # a checkpoint pretrained on shorter sequences has no position embeddings beyond them
    tokenizer.enable_truncation(max_length=min(cfg.max_seq_len, encoder.config.max_positions))
    os.makedirs(cfg.out, exist_ok=True)
    results = load_results(cfg)
    needs_mnli = cfg.from_mnli and set(cfg.tasks) & set(FROM_MNLI_TASKS)
    if needs_mnli and "mnli" not in cfg.tasks and not any(run["task"] == "mnli" for run in results["runs"]):
        fail("--from-mnli needs MNLI runs first; add mnli to --task.")
    try:
        for task in cfg.tasks:
            sweep_task(cfg, task, data[task], tokenizer, encoder, pooler_state, results, device)
    except KeyboardInterrupt:
        fail(f"interrupted; the finished runs are in {os.path.join(cfg.out, 'results.json')}; "
             "run the same command to go on.")
    write_reports(cfg, results)
    with open(os.path.join(cfg.out, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
