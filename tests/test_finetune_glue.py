"""finetune_glue.py: GLUE's metrics against scipy/scikit-learn, the TSV readers on real and synthetic
GLUE files, the sweep bookkeeping, a tiny end-to-end sweep with its submission files and an interrupted
and resumed sweep, bad input (flags, files, results.json, checkpoints, diverged runs), one sweep shared by
several processes, and real fine-tuning of all-MiniLM-L6-v2 on SST-2."""
import dataclasses
import errno
import fcntl
import functools
import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED_DATA, checked_help_texts, free_port, hub_env, listening_hub, run_script

sys.path.insert(0, REPO)
import finetune_glue  # noqa: E402
import train_bert  # noqa: E402

GLUE_DIR = os.path.join(SHARED_DATA, "glue")
REAL_TASKS = {  # task: (folder, train, dev, test rows), the official GLUE sizes
    "sst2": ("SST-2", 67349, 872, 1821), "cola": ("CoLA", 8551, 1043, 1063), "mrpc": ("MRPC", 3668, 408, 1725),
    "stsb": ("STS-B", 5749, 1500, 1379), "rte": ("RTE", 2490, 277, 3000), "wnli": ("WNLI", 635, 71, 146),
}


@pytest.fixture(scope="session")
def glue_dir():
    if not os.path.isdir(GLUE_DIR):
        pytest.skip(f"real GLUE files not found at {GLUE_DIR} (../shared/data beside the repo)")
    return GLUE_DIR


def config(**overrides):
    return finetune_glue.Config(**{"checkpoint": "unused", "tasks": (), "out": "unused", **overrides})


# ---------------------------------------------------------------------------------------------------
# metrics

def test_metrics_match_scipy_and_sklearn():
    scipy_stats = pytest.importorskip("scipy.stats")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(2, 300))
        labels, predictions = rng.integers(0, 2, n), rng.integers(0, 2, n)
        if trial % 5 == 0:  # mostly right, as a trained model is
            predictions = np.where(rng.random(n) < 0.9, labels, 1 - labels)
        assert finetune_glue.accuracy(predictions, labels) == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
        assert finetune_glue.f1(predictions, labels) == pytest.approx(sklearn_metrics.f1_score(labels, predictions, zero_division=0))
        assert finetune_glue.matthews(predictions, labels) == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, predictions))
        scores, targets = rng.normal(size=n), rng.uniform(0, 5, n)
        if trial % 2:  # STS-B's gold scores repeat (0.0, 0.2, ..., 5.0): ties must share their mean rank
            targets = np.round(targets * 5) / 5
            scores = np.round(scores, 1)
        assert finetune_glue.pearson(scores, targets) == pytest.approx(scipy_stats.pearsonr(scores, targets)[0])
        assert finetune_glue.spearman(scores, targets) == pytest.approx(scipy_stats.spearmanr(scores, targets)[0])
    # degenerate cases: a constant prediction has Matthews correlation 0, no positives has F1 0
    labels = np.array([0, 1, 1, 0])
    assert finetune_glue.matthews(np.ones(4, dtype=int), labels) == sklearn_metrics.matthews_corrcoef(labels, np.ones(4)) == 0
    assert finetune_glue.f1(np.zeros(4, dtype=int), np.zeros(4, dtype=int)) == 0
    # a collapsed STS-B model predicts one value: scipy says NaN, which would break max(); we score it 0
    assert finetune_glue.pearson(np.full(5, 2.5), np.arange(5.0)) == finetune_glue.spearman(np.full(5, 2.5), np.arange(5.0)) == 0


def test_task_scores_and_mnli_metrics():
    data = {"dev_matched": {"labels": [0, 1, 2, 2]}, "dev_mismatched": {"labels": [1, 1, 0, 0]}}
    predictions = {"dev_matched": np.array([0, 1, 2, 0]), "dev_mismatched": np.array([1, 0, 0, 0])}
    metrics = finetune_glue.dev_metrics("mnli", predictions, data)
    assert metrics == {"matched_accuracy": 75.0, "mismatched_accuracy": 75.0}
    predictions["dev_mismatched"] = np.array([1, 1, 0, 0])
    assert finetune_glue.task_score(finetune_glue.dev_metrics("mnli", predictions, data)) == 87.5
    metrics = finetune_glue.dev_metrics("mrpc", {"dev": np.array([1, 1, 0, 0])}, {"dev": {"labels": [1, 0, 0, 0]}})
    assert metrics == {"f1": pytest.approx(100 * 2 / 3), "accuracy": 75.0}
    assert finetune_glue.task_score(metrics) == pytest.approx((200 / 3 + 75) / 2)


# ---------------------------------------------------------------------------------------------------
# readers

@pytest.mark.parametrize("task", REAL_TASKS)
def test_readers_on_real_glue_files(glue_dir, task):
    folder, train_rows, dev_rows, test_rows = REAL_TASKS[task]
    data = finetune_glue.read_task(config(glue_dir=glue_dir), task)
    assert [len(data[split]["text_a"]) for split in ("train", "dev", "test")] == [train_rows, dev_rows, test_rows]
    assert (data["train"]["text_b"] is None) == (task in ("sst2", "cola"))
    assert data["test"]["labels"] is None and data["test"]["index"] == [str(i) for i in range(test_rows)]
    for split in ("train", "dev"):
        labels = data[split]["labels"]
        assert len(labels) == len(data[split]["text_a"])
        if task == "stsb":
            assert min(labels) >= 0 and max(labels) <= 5 and len(set(labels)) > 10
        else:
            assert set(labels) == set(range(len(finetune_glue.TASKS[task]["labels"])))  # every class, nothing else
    assert all(text.strip() for split in data.values() for text in split["text_a"])


def test_reader_quirks_on_real_files(glue_dir):
    cola = finetune_glue.read_task(config(glue_dir=glue_dir), "cola")  # no header row: the first row is data
    assert cola["train"]["text_a"][0] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola["train"]["labels"][0] == 1 and cola["test"]["text_a"][0] == "Bill whistled past the house."
    mrpc = finetune_glue.read_task(config(glue_dir=glue_dir), "mrpc")  # dev.tsv starts with a byte-order mark
    assert mrpc["dev"]["labels"][:2] == [1, 0]
    assert mrpc["dev"]["text_a"][0].startswith("He said the foodservice pie business")
    assert mrpc["dev"]["text_b"][0] == '"The foodservice pie business does not fit our long-term growth strategy.'
    rte = finetune_glue.read_task(config(glue_dir=glue_dir, max_train_examples=10), "rte")
    assert len(rte["train"]["labels"]) == 10 and rte["train"]["labels"][0] == 1  # not_entailment
    assert len(rte["dev"]["labels"]) == 277  # --max-train-examples leaves dev and test alone


def write_tsv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join("\t".join(row) + "\n" for row in rows))


MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
MNLI_LABELS = ["entailment", "neutral", "contradiction"]


def write_synthetic_glue(root, rows=60):
    """MNLI, QQP and QNLI (and AX) files in GLUE's layout: the column orders of the real files."""
    rng = np.random.default_rng(0)

    def mnli_row(i, labelled, dev):
        sentence1, sentence2 = f"a {i} man sleeps on the \"red\" sofa {i % 7}", f"someone {'sleeps' if i % 3 else 'runs'}"
        row = [str(i), str(1000 + i), f"{1000 + i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", sentence1, sentence2]
        if not labelled:
            return row
        label = MNLI_LABELS[i % 3]
        return row + ([label] * 5 + [label] if dev else [label, label])  # label1..5 on dev, label1 on train

    write_tsv(f"{root}/MNLI/train.tsv", [MNLI_HEADER + ["label1", "gold_label"]] + [mnli_row(i, True, False) for i in range(rows)])
    for kind in ("matched", "mismatched"):
        write_tsv(f"{root}/MNLI/dev_{kind}.tsv", [MNLI_HEADER + [f"label{k}" for k in range(1, 6)] + ["gold_label"]]
                  + [mnli_row(i, True, True) for i in range(rows // 2)])
        write_tsv(f"{root}/MNLI/test_{kind}.tsv", [MNLI_HEADER] + [mnli_row(i, False, False) for i in range(rows // 3)])
    write_tsv(f"{root}/diagnostic/diagnostic.tsv", [["index", "sentence1", "sentence2"]]
              + [[str(i), f"the cat {i}", "a cat"] for i in range(7)])
    qqp = [[str(i), str(2 * i), str(2 * i + 1), f"how do I {i}?", f"how can I {i % 5}?", str(int(rng.integers(2)))]
           for i in range(rows)]
    write_tsv(f"{root}/QQP/train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]] + qqp)
    write_tsv(f"{root}/QQP/dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]] + qqp[:20])
    write_tsv(f"{root}/QQP/test.tsv", [["id", "question1", "question2"]] + [[str(i), f"why {i}?", "why?"] for i in range(9)])
    qnli = [[str(i), f"what is {i}?", f"{i} is a number.", ["entailment", "not_entailment"][i % 2]] for i in range(rows)]
    write_tsv(f"{root}/QNLI/train.tsv", [["index", "question", "sentence", "label"]] + qnli)
    write_tsv(f"{root}/QNLI/dev.tsv", [["index", "question", "sentence", "label"]] + qnli[:10])
    write_tsv(f"{root}/QNLI/test.tsv", [["index", "question", "sentence"]] + [[str(i), "who?", "me."] for i in range(5)])


def test_readers_on_mnli_qqp_qnli_layout(tmp_path):
    write_synthetic_glue(tmp_path)
    mnli = finetune_glue.read_task(config(glue_dir=str(tmp_path)), "mnli")
    assert sorted(mnli) == ["ax", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched", "train"]
    assert mnli["train"]["labels"][:4] == [0, 1, 2, 0] and len(mnli["dev_mismatched"]["labels"]) == 30
    assert mnli["train"]["text_a"][1] == 'a 1 man sleeps on the "red" sofa 1'  # quotes are text, not CSV quoting
    assert mnli["test_matched"]["index"] == [str(i) for i in range(20)] and mnli["test_matched"]["labels"] is None
    assert mnli["ax"]["text_b"][3] == "a cat" and len(mnli["ax"]["index"]) == 7
    qqp = finetune_glue.read_task(config(glue_dir=str(tmp_path)), "qqp")
    assert qqp["train"]["text_a"][3] == "how do I 3?" and qqp["train"]["text_b"][3] == "how can I 3?"
    assert qqp["test"]["index"] == [str(i) for i in range(9)] and qqp["test"]["text_b"][0] == "why?"  # "id", not "index"
    assert len(qqp["dev"]["labels"]) == 20 and set(qqp["train"]["labels"]) == {0, 1}
    qnli = finetune_glue.read_task(config(glue_dir=str(tmp_path)), "qnli")
    assert qnli["train"]["labels"][:3] == [0, 1, 0] and qnli["test"]["text_a"] == ["who?"] * 5


def test_hub_path_maps_columns_and_splits(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        def split(n, labels=True):
            return datasets.Dataset.from_dict({"premise": [f"p{i}" for i in range(n)], "hypothesis": ["h"] * n,
                                               "label": [i % 3 for i in range(n)] if labels else [-1] * n,
                                               "idx": list(range(n))})
        if name == "ax":
            return {"test": split(4, labels=False)}
        return {"train": split(9), "validation_matched": split(5), "validation_mismatched": split(6),
                "test_matched": split(3, False), "test_mismatched": split(2, False)}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    mnli = finetune_glue.read_task(config(max_train_examples=7), "mnli")
    assert calls == [("nyu-mll/glue", "mnli"), ("nyu-mll/glue", "ax")]
    assert len(mnli["train"]["labels"]) == 7 and mnli["train"]["labels"][:4] == [0, 1, 2, 0]
    assert len(mnli["dev_mismatched"]["text_a"]) == 6 and mnli["dev_matched"]["text_a"][4] == "p4"
    assert mnli["test_mismatched"]["labels"] is None and mnli["test_mismatched"]["index"] == ["0", "1"]
    assert mnli["ax"]["index"] == ["0", "1", "2", "3"]


# ---------------------------------------------------------------------------------------------------
# batching, schedule, sweep bookkeeping

def test_length_grouped_batches_cover_every_row_and_pad_little():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 128, 1000)
    batches = finetune_glue.length_grouped_batches(lengths, 32, np.random.default_rng(1))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))  # every row exactly once per epoch
    assert sorted(len(b) for b in batches)[1:] == [32] * 31 and len(batches) == 32  # one short batch at most
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_padded = sum(len(b) * lengths[b].max() for b in np.array_split(rng.permutation(1000), 32))
    assert padded < 0.7 * random_padded
    again = finetune_glue.length_grouped_batches(lengths, 32, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # the seed decides the order
    other = finetune_glue.length_grouped_batches(lengths, 32, np.random.default_rng(2))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_make_batch_pads_to_the_longest_row_and_masks_padding():
    tokens = dict(input_ids=np.array([[101, 5, 6, 102], [101, 7, 102, 0], [101, 8, 9, 102]], dtype=np.int32),
                  token_type_ids=np.array([[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=np.int8),
                  lengths=np.array([4, 3, 4]), labels=np.array([1, 0, 2]))
    batch = finetune_glue.make_batch(tokens, np.array([1, 0]), torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[101, 7, 102, 0], [101, 5, 6, 102]]
    assert batch["attention_mask"].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert batch["labels"].tolist() == [0, 1] and batch["token_type_ids"].dtype == torch.long
    batch = finetune_glue.make_batch(tokens, np.array([1]), torch.device("cpu"))
    assert batch["input_ids"].shape == (1, 3) and "attention_mask" not in batch  # nothing padded, no mask


def test_progress_bar_on_a_terminal_only(monkeypatch):
    """tqdm's disable=None: a bar with examples/s and an ETA on a terminal, cleared when the run ends (its
    summary line takes its place); nothing at all in a log."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    torch.manual_seed(0)
    encoder = train_bert.BertEncoder(train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=64))
    rng = np.random.default_rng(0)
    train = dict(input_ids=rng.integers(5, 64, (8, 6)).astype(np.int32), token_type_ids=np.zeros((8, 6), dtype=np.int8),
                 lengths=np.full(8, 6), labels=np.array([0, 1] * 4))
    # every step redraws here (the tiny steps take less than the 0.1 s between redraws otherwise)
    monkeypatch.setattr(finetune_glue, "tqdm", functools.partial(finetune_glue.tqdm, mininterval=0, miniters=1))
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        monkeypatch.setattr(sys, "stderr", stream)
        finetune_glue.fine_tune(config(), "rte", train, encoder, None, 1e-3, 2, 2, 0, torch.device("cpu"), "rte seed=0")
    frames = terminal.getvalue().split("\r")
    assert frames[0] == "" and frames[1] == "rte seed=0   0%|          | 0/16 examples, ? examples/s, ETA ?"
    assert len(frames) == 1 + 9 + 2  # the empty bar, one per step (2 epochs of 4 batches of 2), the clearing
    assert re.fullmatch(r"rte seed=0  50%\|.{10}\| 8/16 examples, \d+\.\d\d examples/s, ETA 00:00", frames[5])
    assert frames[-2].strip() == "" and frames[-1] == ""  # cleared
    assert log.getvalue() == ""


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [finetune_glue.lr_at(step, 1e-4, 10, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4) == max(lrs)
    assert lrs[10] == pytest.approx(1e-4) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4 / 90) and all(a < b for a, b in zip(lrs[:9], lrs[1:10]))


def test_optimizer_skips_weight_decay_on_biases_and_layer_norms():
    encoder = train_bert.BertEncoder(train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=64))
    model = finetune_glue.GlueModel(encoder, None, 3, 0.1)
    optimizer = finetune_glue.make_optimizer(model, 1e-4, 0.01)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, parameter in model.named_parameters():
        no_decay = name.endswith("bias") or "norm" in name
        assert (id(parameter) in decayed) != no_decay, name
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def run(lr, seed, score, batch_size=16, epochs=3):
    return dict(lr=lr, batch_size=batch_size, epochs=epochs, seed=seed, score=score)


def test_choose_takes_the_best_median_over_seeds():
    runs = [run(1e-5, 0, 50), run(1e-5, 1, 90), run(1e-5, 2, 51),  # one lucky seed: median 51
            run(3e-5, 0, 60), run(3e-5, 1, 62), run(3e-5, 2, 70),  # steady: median 62
            run(5e-5, 0, 61), run(5e-5, 1, 61.5), run(5e-5, 2, 80)]
    chosen, seeds = finetune_glue.choose(runs)
    assert (chosen["lr"], chosen["seed"], chosen["score"], seeds) == (3e-5, 1, 62, 3)
    assert finetune_glue.median_run([run(1, 0, 3), run(1, 1, 1), run(1, 2, 9), run(1, 3, 5)])["score"] == 3
    assert finetune_glue.choose([run(1e-5, 0, 5, batch_size=32), run(1e-5, 0, 4, epochs=5)])[0]["score"] == 5


def test_choice_does_not_depend_on_the_order_runs_were_recorded_in():
    """Processes that share a sweep record runs in any order; all must choose the same run, ties included."""
    runs = [run(lr, seed, score) for lr, seed, score in [(3e-5, 1, 60), (1e-5, 1, 60), (3e-5, 0, 60), (1e-5, 0, 60),
                                                         (1e-5, 2, 70), (3e-5, 2, 70)]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        shuffled = [runs[i] for i in rng.permutation(len(runs))]
        chosen, seeds = finetune_glue.choose(shuffled)
        assert (chosen["lr"], chosen["seed"], seeds) == (1e-5, 1, 3)  # the smaller lr, the lower of the tied seeds


def test_results_md_reports_chosen_configs_and_glue_average(tmp_path):
    cfg = config(out=str(tmp_path))
    runs = [dict(run(lr, seed, score), task=task, init="pretrained", metrics=metrics, run_dir=f"runs/{task}/x{lr}-{seed}")
            for task, lr, seed, score, metrics in [
                ("rte", 1e-5, 0, 60.0, {"accuracy": 60.0}), ("rte", 3e-5, 0, 70.0, {"accuracy": 70.0}),
                ("mrpc", 1e-5, 0, 85.0, {"f1": 90.0, "accuracy": 80.0}),
                ("mnli", 1e-5, 0, 80.5, {"matched_accuracy": 80.0, "mismatched_accuracy": 81.0})]]
    for record in runs:
        for file_name in finetune_glue.TASKS[record["task"]]["test_files"].values():
            write_tsv(os.path.join(tmp_path, record["run_dir"], file_name), [["index", "prediction"], ["0", record["run_dir"]]])
    settings = {"checkpoint": "ckpt", "checkpoint_step": 1200, "checkpoint_sha256": "0123456789abcdef" * 4}
    finetune_glue.write_reports(cfg, {"settings": settings, "runs": runs})
    table = (tmp_path / "results.md").read_text()
    assert "Checkpoint `ckpt` (step 1200, weights sha256 0123456789ab). Per task:" in table
    assert "| RTE | accuracy | 3e-05, 16, 3 | 1 | 70.0 | 70.0 |" in table
    assert "| MRPC | f1 / accuracy | 1e-05, 16, 3 | 1 | 90.0 / 80.0 | 85.0 |" in table
    assert "| MNLI | matched_accuracy / mismatched_accuracy | 1e-05, 16, 3 | 1 | 80.0 / 81.0 | 80.5 |" in table
    assert f"| **GLUE average** (3 of 9 tasks) | mean of task scores | | | | **{(70 + 85 + 80.5) / 3:.1f}** |" in table
    assert (tmp_path / "submission" / "RTE.tsv").read_text() == "index\tprediction\n0\truns/rte/x3e-05-0\n"
    assert sorted(os.listdir(tmp_path / "submission")) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "MRPC.tsv", "RTE.tsv"]


def test_results_md_shows_the_spread_over_seeds_of_the_chosen_configuration(tmp_path):
    def record(task, lr, seed, score):
        metrics = {"accuracy": score} if task == "rte" else {"f1": score + 2, "accuracy": score - 2}
        return dict(run(lr, seed, score), task=task, init="pretrained", metrics=metrics, run_dir=f"runs/{task}/{lr}-{seed}")

    runs = [record("rte", 1e-5, seed, score) for seed, score in enumerate([60, 71, 65, 58, 69])]   # median 65
    runs += [record("rte", 3e-5, seed, score) for seed, score in enumerate([66, 64, 80, 50, 67])]  # median 66: chosen
    runs += [record("mrpc", 2e-5, seed, score) for seed, score in enumerate([85, 88, 82, 90])]     # even: the lower middle
    assert finetune_glue.seed_spread(runs[:10], finetune_glue.choose(runs[:10])[0]) == (50, 66, 80)
    finetune_glue.write_reports(config(out=str(tmp_path)), {"settings": {"checkpoint": "ckpt"}, "runs": runs})
    lines = (tmp_path / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| task |"))
    assert "| score | score over seeds (min / median / max) | 24hBERT (paper, test) |" in header
    assert "| RTE | accuracy | 3e-05, 16, 3 | 5 | 66.0 | 66.0 | 50.0 / 66.0 / 80.0 | 57.7 | 66.4 |" in lines
    assert "| MRPC | f1 / accuracy | 2e-05, 16, 3 | 4 | 87.0 / 83.0 | 85.0 | 82.0 / 85.0 / 90.0 | 87.5 | 88.9 |" in lines
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 5 and {line.count("|") for line in table} == {header.count("|")}  # GLUE average row too


def test_submission_files_spell_labels_as_glue_does(tmp_path):
    outputs = np.array([[0.1, 0.9, 0.0], [2.0, 0.1, 0.3], [0.0, 0.1, 0.3]])
    finetune_glue.write_predictions(tmp_path / "MNLI-m.tsv", "mnli", ["0", "1", "2"], outputs)
    assert (tmp_path / "MNLI-m.tsv").read_text() == "index\tprediction\n0\tneutral\n1\tentailment\n2\tcontradiction\n"
    finetune_glue.write_predictions(tmp_path / "RTE.tsv", "rte", ["0", "1"], outputs[:2, :2])
    assert (tmp_path / "RTE.tsv").read_text() == "index\tprediction\n0\tnot_entailment\n1\tentailment\n"
    finetune_glue.write_predictions(tmp_path / "CoLA.tsv", "cola", ["7"], outputs[:1, :2])
    assert (tmp_path / "CoLA.tsv").read_text() == "index\tprediction\n7\t1\n"
    finetune_glue.write_predictions(tmp_path / "STS-B.tsv", "stsb", ["0", "1"], np.array([[3.14159], [-0.5]]))
    assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n0\t3.142\n1\t-0.500\n"


# ---------------------------------------------------------------------------------------------------
# end to end with a tiny train_bert.py checkpoint

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, minilm_dir):
    """A 2-layer, 64-wide checkpoint saved with the fields train_bert.py writes and reads back,
    carrying the bert-base-uncased tokenizer (MiniLM's)."""
    model_config = train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=30528, max_positions=128)
    torch.manual_seed(0)
    model = train_bert.BertForMLM(model_config)
    with open(os.path.join(minilm_dir, "tokenizer.json")) as f:
        tokenizer_json = f.read()
    path = tmp_path_factory.mktemp("tiny") / "step-00000010.pt"
    state = dict(step=10, epoch=0, step_in_epoch=10, sequences_seen=640, elapsed_s=1.0, skipped_steps=0)
    torch.save({"model_config": dataclasses.asdict(model_config), "model": model.state_dict(),
                "tokenizer_json": tokenizer_json, "state": state}, path)
    return str(path)


@pytest.fixture
def small_glue(tmp_path, glue_dir, monkeypatch):
    """Real RTE, STS-B and CoLA with synthetic MNLI and AX beside them, in GLUE's layout."""
    # The tiny model's ops are too small to share between threads; on a CPU busy with other work,
    # threads waiting for each other make them many times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "glue"
    write_synthetic_glue(root, rows=90)
    for folder in ("RTE", "STS-B", "CoLA"):
        os.symlink(os.path.join(glue_dir, folder), root / folder)
    return str(root)


@pytest.fixture
def tiny_glue(tmp_path, glue_dir, monkeypatch):
    """Synthetic MNLI and AX, and the first 100 rows of each of real RTE's files: a sweep in seconds."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in small_glue
    root = tmp_path / "tiny_glue"
    write_synthetic_glue(root, rows=90)
    (root / "RTE").mkdir()
    for split in ("train", "dev", "test"):
        with open(os.path.join(glue_dir, "RTE", f"{split}.tsv"), encoding="utf-8") as f:
            (root / "RTE" / f"{split}.tsv").write_text("".join(f.readlines()[:101]), encoding="utf-8")
    return str(root)


def test_tiny_sweep_end_to_end_with_mnli_start_and_submission(tmp_path, tiny_checkpoint, small_glue):
    out = tmp_path / "out"
    grid = ["--lr", "1e-4", "3e-4", "--batch", "16", "--epochs", "1", "--seeds", "2", "--max-train-examples", "64"]
    result = run_script("finetune_glue.py", "--checkpoint", tiny_checkpoint, "--glue-dir", small_glue, "--out", out,
                        "--task", "rte", "stsb", "mnli", "--from-mnli", *grid)
    assert "mnli: 0 of 4 runs already recorded, 4 to go" in result.stdout.splitlines()[0]  # MNLI runs first
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["max_train_examples"] == 64 and results["settings"]["from_mnli"]
    assert [r["task"] for r in results["runs"]] == ["mnli"] * 4 + ["rte"] * 4 + ["stsb"] * 4
    assert {(r["lr"], r["seed"]) for r in results["runs"] if r["task"] == "rte"} == {(1e-4, 0), (1e-4, 1), (3e-4, 0), (3e-4, 1)}
    assert sum(line.startswith(("mnli lr=", "rte lr=", "stsb lr=")) for line in result.stdout.splitlines()) == 12
    for record in results["runs"]:
        assert record["score"] == pytest.approx(np.mean(list(record["metrics"].values())))
        assert record["train_seconds"] > 0 and record["examples_per_s"] > 0 and record["skipped_steps"] == 0
    assert set(results["runs"][0]["metrics"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert set(results["runs"][-1]["metrics"]) == {"pearson", "spearman"}
    chosen_mnli = finetune_glue.choose([r for r in results["runs"] if r["task"] == "mnli"])[0]
    assert all(r["init"] == "mnli:" + chosen_mnli["run_dir"] for r in results["runs"] if r["task"] in ("rte", "stsb"))
    assert (out / chosen_mnli["run_dir"] / "model.pt").is_file()

    # the submission: the chosen run's predictions of every test split, as GLUE spells them
    submission = out / "submission"
    assert sorted(os.listdir(submission)) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "RTE.tsv", "STS-B.tsv"]
    rte_lines = (submission / "RTE.tsv").read_text().splitlines()
    assert rte_lines[0] == "index\tprediction" and len(rte_lines) == 3001
    assert [line.split("\t")[0] for line in rte_lines[1:]] == [str(i) for i in range(3000)]
    assert {line.split("\t")[1] for line in rte_lines[1:]} <= {"entailment", "not_entailment"}
    stsb_values = [float(line.split("\t")[1]) for line in (submission / "STS-B.tsv").read_text().splitlines()[1:]]
    assert len(stsb_values) == 1379 and len(set(stsb_values)) > 1
    mnli_lines = (submission / "MNLI-mm.tsv").read_text().splitlines()
    assert len(mnli_lines) == 31 and {line.split("\t")[1] for line in mnli_lines[1:]} <= set(MNLI_LABELS)
    assert len((submission / "AX.tsv").read_text().splitlines()) == 8
    for task, file_name in (("rte", "RTE.tsv"), ("stsb", "STS-B.tsv"), ("mnli", "MNLI-m.tsv")):
        chosen = finetune_glue.choose([r for r in results["runs"] if r["task"] == task])[0]
        assert (submission / file_name).read_text() == (out / chosen["run_dir"] / file_name).read_text()

    # the table a person reads
    table = (out / "results.md").read_text()
    chosen_rte = finetune_glue.choose([r for r in results["runs"] if r["task"] == "rte"])[0]
    assert f"| RTE | accuracy | {chosen_rte['lr']:g}, 16, 1 (from MNLI) | 2 | {chosen_rte['score']:.1f} |" in table
    scores = [finetune_glue.choose([r for r in results["runs"] if r["task"] == t])[0]["score"] for t in ("mnli", "rte", "stsb")]
    assert f"**{np.mean(scores):.1f}**" in table and "(3 of 9 tasks)" in table
    assert result.stdout.rstrip().endswith(table.rstrip())  # printed at the end, too

    # the same command again finds everything done and changes nothing
    again = run_script("finetune_glue.py", "--checkpoint", tiny_checkpoint, "--glue-dir", small_glue, "--out", out,
                       "--task", "rte", "stsb", "mnli", "--from-mnli", *grid)
    assert "rte: 4 of 4 runs already recorded, 0 to go" in again.stdout
    assert json.loads((out / "results.json").read_text()) == results


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, tiny_checkpoint, small_glue):
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(REPO, "finetune_glue.py"), "--checkpoint", tiny_checkpoint,
               "--glue-dir", small_glue, "--out", str(out), "--task", "cola", "--lr", "1e-4", "--batch", "32",
               "--epochs", "1", "--seeds", "40", "--max-train-examples", "128"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results_path = out / "results.json"
    deadline = time.time() + 300
    while not results_path.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the sweep ended before it could be interrupted: " + process.stderr.read()
    process.send_signal(signal.SIGINT)  # Ctrl-C, in the middle of the second run or later
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert stderr.strip().splitlines() == [f"finetune_glue.py: error: interrupted; the finished runs are in "
                                           f"{results_path}; run the same command to go on."]
    finished = json.loads(results_path.read_text())["runs"]
    assert 1 <= len(finished) < 40 and [r["seed"] for r in finished] == list(range(len(finished)))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"cola: {len(finished)} of 40 runs already recorded, {40 - len(finished)} to go" in result.stdout
    runs = json.loads(results_path.read_text())["runs"]
    assert runs[:len(finished)] == finished  # the recorded runs are kept as they were, not redone
    assert sorted(r["seed"] for r in runs) == list(range(40))
    assert len((out / "submission" / "CoLA.tsv").read_text().splitlines()) == 1064


# ---------------------------------------------------------------------------------------------------
# bad input: one line saying what to do, exit status 1, no traceback

def error_line(capsys, function, *args):
    """The one line that function(*args) stops with, having checked that it is one line and exit status 1."""
    with pytest.raises(SystemExit) as exit_info:
        function(*args)
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(message.splitlines()) == 1 and message.startswith("finetune_glue.py: error: ")
    return message


def main_error(capsys, *argv):
    return error_line(capsys, finetune_glue.main, [str(arg) for arg in argv])


def test_bad_input_gives_one_line(tmp_path, capsys, tiny_checkpoint, minilm_dir):
    glue = tmp_path / "glue"
    write_synthetic_glue(glue, rows=10)
    base = ["--checkpoint", tiny_checkpoint, "--glue-dir", glue, "--out", tmp_path / "out"]
    assert "unknown task 'sst3'" in main_error(capsys, *base, "--task", "sst3")
    assert "positive numbers" in main_error(capsys, *base, "--task", "qqp", "--lr", "0")
    assert f"{glue}/RTE/train.tsv is missing" in main_error(capsys, *base, "--task", "qnli", "rte")
    assert "checkpoint nowhere does not exist" in main_error(capsys, "--checkpoint", "nowhere", "--task", "qqp", "--out", tmp_path)

    write_tsv(glue / "QQP" / "dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "label"], ["0", "1", "2", "a", "b", "1"]])
    assert "QQP/dev.tsv has no column 'is_duplicate'" in main_error(capsys, *base, "--task", "qqp")
    write_tsv(glue / "QQP" / "dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]])
    assert "QQP/dev.tsv has no examples" in main_error(capsys, *base, "--task", "qqp")
    (glue / "QQP" / "dev.tsv").write_text("")
    assert "QQP/dev.tsv has no column 'question1'" in main_error(capsys, *base, "--task", "qqp")
    write_tsv(glue / "QNLI" / "dev.tsv", [["index", "question", "sentence", "label"], ["0", "q", "s", "entailment"], ["1", "q"]])
    assert "QNLI/dev.tsv line 3 has 2 tab-separated fields, not 4" in main_error(capsys, *base, "--task", "qnli")
    write_tsv(glue / "QNLI" / "dev.tsv", [["index", "question", "sentence", "label"], ["0", "q", "s", "maybe"]])
    assert "QNLI/dev.tsv has the label 'maybe'" in main_error(capsys, *base, "--task", "qnli")

    no_tokenizer = tmp_path / "no_tokenizer.pt"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != "tokenizer_json"}, no_tokenizer)
    assert "tokenizer" in main_error(capsys, "--checkpoint", no_tokenizer, "--glue-dir", glue, "--task", "mnli", "--out", tmp_path)
    no_template = tmp_path / "no_template.pt"
    tokenizer = json.loads(checkpoint["tokenizer_json"])
    torch.save({**checkpoint, "tokenizer_json": json.dumps({**tokenizer, "post_processor": None})}, no_template)
    assert "does not add [CLS], [SEP] and segment ids" in main_error(capsys, "--checkpoint", no_template, "--glue-dir", glue,
                                                                     "--task", "mnli", "--out", tmp_path)
    not_bert = tmp_path / "roberta"
    shutil.copytree(minilm_dir, not_bert)
    hf_config = json.loads((not_bert / "config.json").read_text())
    (not_bert / "config.json").write_text(json.dumps({**hf_config, "model_type": "roberta"}))
    assert "BERT" in main_error(capsys, "--checkpoint", not_bert, "--glue-dir", glue, "--task", "mnli", "--out", tmp_path)

    write_synthetic_glue(glue, rows=10)  # well-formed again
    stsb_header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
    write_tsv(glue / "STS-B" / "train.tsv", [stsb_header + ["score"], ["0", "g", "f", "y", "0", "n", "n", "a", "b", "4.2"]])
    write_tsv(glue / "STS-B" / "dev.tsv", [stsb_header + ["score"], ["0", "g", "f", "y", "0", "n", "n", "a", "b", "four"]])
    write_tsv(glue / "STS-B" / "test.tsv", [stsb_header, ["0", "g", "f", "y", "0", "n", "n", "a", "b"]])
    assert "STS-B/dev.tsv has a score that is not a number" in main_error(capsys, *base, "--task", "stsb")
    write_tsv(glue / "STS-B" / "dev.tsv", [stsb_header + ["score"], ["0", "g", "f", "y", "0", "n", "n", "a", "b", "1.5"]])
    out = tmp_path / "out"
    assert "add mnli to --task" in main_error(capsys, *base, "--task", "qnli", "stsb", "--from-mnli")
    out.mkdir(exist_ok=True)
    origin = train_bert.load_pretrained(tiny_checkpoint)[3]
    (out / "results.json").write_text(json.dumps({"settings": {**finetune_glue.settings(config(checkpoint=tiny_checkpoint), origin),
                                                               "max_train_examples": 500}, "runs": []}))
    assert "holds runs made with another max train examples; pass a new --out" in main_error(capsys, *base, "--task", "qnli")


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = run_script("finetune_glue.py", "--checkpoint", tmp_path, "--task", "all", "--glue-dir", tmp_path / "none",
                        "--out", tmp_path / "out", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"finetune_glue.py: error: {tmp_path}/none/CoLA/train.tsv is missing; --glue-dir "
                                          "must hold GLUE's task folders (CoLA/, SST-2/, ...) with their TSV files."]


# ---------------------------------------------------------------------------------------------------
# nothing silently wrong: every number and every file is checked where it comes in

@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "--lr inf is out of range; pass positive numbers up to 1."),
    (["--lr", "nan"], "--lr nan is out of range; pass positive numbers up to 1."),
    (["--lr", "3e-5", "-0.00003"], "--lr -3e-05 is out of range"),
    (["--lr", "1.5"], "--lr 1.5 is out of range"),
    (["--batch", "0"], "--batch 0 is out of range; pass positive numbers up to 8192."),
    (["--batch", "16", "100000"], "--batch 100000 is out of range"),
    (["--epochs", "0"], "--epochs 0 is out of range; pass positive numbers up to 100."),
    (["--epochs", "1000"], "--epochs 1000 is out of range"),
    (["--seeds", "0"], "--seeds 0 is out of range; pass positive numbers up to 100."),
    (["--seeds", "500"], "--seeds 500 is out of range"),
    (["--max-train-examples", "0"], "--max-train-examples 0 is out of range; pass positive numbers."),
    (["--batch", "16.5"], "argument --batch: invalid int value: '16.5'; see --help."),
])
def test_numeric_flags_are_checked_before_any_work(tmp_path, capsys, flags, message):
    # the checkpoint does not exist: a flag that passed its check would stop there instead
    assert message in main_error(capsys, "--checkpoint", tmp_path / "none", "--task", "rte", "--out", tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_command_line_mistakes_are_one_line_too(capsys):
    assert main_error(capsys, "--checkpoint", "x", "--task", "rte").endswith(
        "the following arguments are required: --out; see --help.")


def test_help_shows_a_text_and_the_default_of_every_flag(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    help_output, texts = checked_help_texts("finetune_glue.py", 10)
    assert texts["--lr"].endswith("(default: 1e-05 3e-05 5e-05 8e-05)")
    assert texts["--batch"].endswith("(default: 16 32)") and texts["--epochs"].endswith("(default: 3 5)")
    assert texts["--seeds"].endswith("(default: 5)") and texts["--max-train-examples"].endswith("(default: all rows)")
    assert "(default: GLUE from the Hugging Face hub, or from its local cache with HF_HUB_OFFLINE=1)" in texts["--glue-dir"]
    # the docstring's example keeps its line
    assert "    python finetune_glue.py --checkpoint runs/bert --task all --glue-dir glue_data --out runs/glue" \
        in help_output.splitlines()


def stsb_dev_tsv(score):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    return (header + "0\tg\tf\ty\t0\tn\tn\ta\tb\t2.4\n" + f"1\tg\tf\ty\t1\tn\tn\ta\tb\t{score}\n").encode()


@pytest.mark.parametrize("task, contents, message", [
    ("qnli", b"index\tquestion\tsentence\tlabel\n0\tq\ts\tentailment\n1\tcaf\xe9?\ts\tentailment\n",
     "QNLI/dev.tsv line 3 is not UTF-8 text; convert the file to UTF-8, as GLUE's files are."),
    ("qnli", b"index\tquestion\tsentence\tlabel\n0\tq\ts\tentailment\n\n1\tq\ts\tmaybe\n",  # blank lines count too
     "QNLI/dev.tsv has the label 'maybe' on line 4, not one of ['entailment', 'not_entailment']; the file is malformed."),
    ("qnli", b"index\tquestion\tsentence\tlabel\n\n\n1\tq\n", "QNLI/dev.tsv line 4 has 2 tab-separated fields, not 4"),
    *[("stsb", stsb_dev_tsv(score), f"STS-B/dev.tsv has a score that is not a number from 0 to 5 on line 3 ({score!r})")
      for score in ("nan", "inf", "-inf", "5.2", "-0.5", "four", "")],
])
def test_bad_values_in_glue_files_name_the_file_and_line(tmp_path, capsys, task, contents, message):
    path = tmp_path / finetune_glue.TASKS[task]["folder"] / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(contents)
    assert message in error_line(capsys, finetune_glue.read_split, task, str(path), True)


@pytest.mark.parametrize("bad_row, message", [
    ({"hypothesis": None}, "GLUE's mnli train split from the Hugging Face hub has None as the text of row 2; delete"),
    ({"label": 3}, "GLUE's mnli train split from the Hugging Face hub has the label 3 in row 2; delete"),
])
def test_bad_rows_from_the_hub_name_the_task_and_split(monkeypatch, capsys, bad_row, message):
    datasets = pytest.importorskip("datasets")

    def split(n, labelled=True, bad=False):
        rows = [{"premise": f"p{i}", "hypothesis": "h", "label": i % 3 if labelled else -1, "idx": i} for i in range(n)]
        if bad:
            rows[2].update(bad_row)
        return datasets.Dataset.from_list(rows)

    def fake_load_dataset(path, name):
        if name == "ax":
            return {"test": split(3, labelled=False)}
        return {"train": split(5, bad=True), "validation_matched": split(3), "validation_mismatched": split(3),
                "test_matched": split(3, False), "test_mismatched": split(3, False)}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert message in error_line(capsys, finetune_glue.read_task, config(), "mnli")


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    """Not datasets' ~25 s of retries, a line each: one line in the time it takes to start."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    result = subprocess.run([sys.executable, os.path.join(REPO, "finetune_glue.py"), "--checkpoint", str(tmp_path),
                             "--task", "rte", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                            env=hub_env(tmp_path, HF_ENDPOINT=endpoint), timeout=60)
    seconds = time.time() - started
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"finetune_glue.py: error: cannot reach the Hugging Face hub at {endpoint} (Connection refused) for GLUE; set "
        "HF_HUB_OFFLINE=1 to use GLUE from the local cache, or pass --glue-dir with GLUE's files."], result.stderr
    assert seconds < 5, f"{seconds:.1f} s to the error"
    assert not (tmp_path / "out").exists()
    # the check goes where the request would: through a proxy when one is set, straight to the hub otherwise
    with listening_hub(monkeypatch):
        finetune_glue.check_hub_reachable()
        monkeypatch.setenv("http_proxy", endpoint)
        assert "(Connection refused)" in error_line(capsys, finetune_glue.check_hub_reachable)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is fetched: nothing to check
        finetune_glue.check_hub_reachable()
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert error_line(capsys, finetune_glue.check_hub_reachable).endswith(
        "HF_ENDPOINT must be a URL such as https://huggingface.co, not 'huggingface.co'; correct it or unset it.")


def test_offline_with_an_empty_cache_gets_one_line(tmp_path):
    pytest.importorskip("datasets")
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # were it asked, it refuses
    result = subprocess.run([sys.executable, os.path.join(REPO, "finetune_glue.py"), "--checkpoint", str(tmp_path),
                             "--task", "rte", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=120)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "finetune_glue.py: error: GLUE's rte is not in the local cache and HF_HUB_OFFLINE=1 keeps the hub out; unset "
        "HF_HUB_OFFLINE to download it, or pass --glue-dir with GLUE's files."], result.stderr


def test_bad_results_json_names_the_file(tmp_path, capsys, tiny_checkpoint):
    glue, out = tmp_path / "glue", tmp_path / "out"
    write_synthetic_glue(glue, rows=10)
    out.mkdir()
    settings = finetune_glue.settings(config(checkpoint=tiny_checkpoint), train_bert.load_pretrained(tiny_checkpoint)[3])
    good = dict(run(1e-4, 0, 50.0), task="qnli", init="pretrained", metrics={"accuracy": 50.0}, run_dir="runs/qnli/x")
    path = out / "results.json"
    for contents, problem in [
        (b"{", "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        (b"[]", "does not hold the settings and runs of a finetune_glue.py sweep"),
        (json.dumps({"settings": settings}).encode(), "does not hold the settings and runs of a finetune_glue.py sweep"),
        (json.dumps({"settings": {k: v for k, v in settings.items() if k != "checkpoint"}, "runs": []}).encode(),
         "does not hold the settings and runs of a finetune_glue.py sweep"),
        (json.dumps({"settings": settings, "runs": [good, {k: v for k, v in good.items() if k != "score"}]}).encode(),
         "has a run (number 2) without a valid 'score'"),
        (json.dumps({"settings": settings, "runs": [{**good, "batch_size": "16"}]}).encode(),
         "has a run (number 1) without a valid 'batch_size'"),
        (json.dumps({"settings": settings, "runs": ["qnli"]}).encode(), "has a run (number 1) without a valid 'task'"),
        (json.dumps({"settings": settings, "runs": [{**good, "score": float("nan")}]}).encode(),
         "has a run (number 1) with an unknown task, or a score that is not a finite number"),
        (json.dumps({"settings": settings, "runs": [{**good, "metrics": {"accuracy": float("inf")}}]}).encode(),
         "has a run (number 1) with an unknown task, or a score that is not a finite number"),
        (json.dumps({"settings": settings, "runs": [{**good, "task": "sst3"}]}).encode(),
         "has a run (number 1) with an unknown task, or a score that is not a finite number"),
    ]:
        path.write_bytes(contents)
        message = main_error(capsys, "--checkpoint", tiny_checkpoint, "--glue-dir", glue, "--out", out, "--task", "qnli")
        assert message.endswith(f"{path} {problem}; move it away to start over, or pass a new --out."), contents


def test_unusable_mnli_model_gives_one_line(tmp_path, capsys, tiny_checkpoint, small_glue):
    """--from-mnli starts RTE from the chosen MNLI run's model.pt: one that cannot be read or does not fit stops."""
    out = tmp_path / "out"
    encoder, _, _, origin = train_bert.load_pretrained(tiny_checkpoint)
    settings = finetune_glue.settings(config(checkpoint=tiny_checkpoint, from_mnli=True, max_train_examples=16), origin)
    chosen = dict(run(1e-4, 0, 50.0), task="mnli", init="pretrained", run_dir="runs/mnli/chosen",
                  metrics={"matched_accuracy": 50.0, "mismatched_accuracy": 50.0})
    (out / "runs" / "mnli" / "chosen").mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"settings": settings, "runs": [chosen]}))
    model_file = out / "runs" / "mnli" / "chosen" / "model.pt"
    other = train_bert.BertEncoder(train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=64))
    pooler = {"weight": torch.zeros(64, 64), "bias": torch.zeros(64)}
    for contents in [b"cut short", {"pooler": pooler}, {"encoder": other.state_dict(), "pooler": pooler},
                     {"encoder": encoder.state_dict(), "pooler": {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}}]:
        if isinstance(contents, bytes):
            model_file.write_bytes(contents)
        else:
            torch.save(contents, model_file)
        message = main_error(capsys, "--checkpoint", tiny_checkpoint, "--glue-dir", small_glue, "--out", out,
                             "--task", "rte", "--from-mnli", "--max-train-examples", "16")
        assert f"{model_file} cannot be read or does not fit the encoder of {tiny_checkpoint}" in message
        assert message.endswith("then run mnli again with --from-mnli.")


def test_non_finite_steps_are_skipped_not_applied():
    """A batch whose loss is NaN (here from a NaN label) skips its optimizer step; the weights stay finite."""
    torch.manual_seed(0)
    encoder = train_bert.BertEncoder(train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=64))
    rng = np.random.default_rng(0)
    train = dict(input_ids=rng.integers(5, 64, (8, 6)).astype(np.int32), token_type_ids=np.zeros((8, 6), dtype=np.int8),
                 lengths=np.full(8, 6), labels=np.array([1.0, 2.0, np.nan, 3.0, 0.5, 4.0, 2.5, 1.5]))
    model, _, skipped_steps = finetune_glue.fine_tune(config(), "stsb", train, encoder, None, 1e-3, 1, 2, 0,
                                                      torch.device("cpu"), "stsb")
    assert skipped_steps == 2  # batches of one row: the NaN row's step, once per epoch
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert not torch.equal(model.encoder.word_embeddings.weight, encoder.word_embeddings.weight)  # the rest trained


def test_a_diverged_run_stops_the_sweep_and_records_nothing(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    for name in ("encoder.word_embeddings.weight", "encoder.position_embeddings.weight"):
        checkpoint["model"][name] = torch.full_like(checkpoint["model"][name], 3e38)  # finite, but their sum is not
    torch.save(checkpoint, tmp_path / "overflows.pt")
    out = tmp_path / "out"
    args = ["--glue-dir", tmp_path / "glue", "--out", out, "--task", "mnli", "--lr", "1e-4", "--batch", "8", "--epochs", "1",
            "--seeds", "1"]
    assert main_error(capsys, "--checkpoint", tmp_path / "overflows.pt", *args).endswith(
        "mnli lr=0.0001 batch=8 epochs=1 seed=0 diverged: all 4 of its optimizer steps had a non-finite loss or "
        "gradient; leave out --lr 0.0001, or use lower learning rates.")
    assert not (out / "results.json").exists()
    assert os.listdir(out / finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0)) == [".claim"]
    # outputs that are not finite after a run that trained: no score either
    monkeypatch.setattr(finetune_glue, "predict", lambda model, tokens, *args: np.full((len(tokens["lengths"]), 3), np.nan))
    assert "seed=0 diverged: its model outputs non-finite numbers; leave out --lr 0.0001" in main_error(
        capsys, "--checkpoint", tiny_checkpoint, *args)
    assert not (out / "results.json").exists()


def test_runs_are_tied_to_the_checkpoint_weights_not_its_path(tmp_path, capsys, tiny_checkpoint):
    """A run folder that gets a newer checkpoint between two sweeps must not mix runs of both in one median."""
    write_synthetic_glue(tmp_path / "glue", rows=30)
    bert = tmp_path / "bert"  # a train_bert.py --out folder: --checkpoint takes its newest checkpoint
    (bert / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, bert / "checkpoints" / "step-00000010.pt")
    out = tmp_path / "out"
    args = ["--glue-dir", tmp_path / "glue", "--out", out, "--task", "mnli", "--lr", "1e-4", "--batch", "8", "--epochs", "1",
            "--seeds", "1"]
    finetune_glue.main([str(arg) for arg in ["--checkpoint", bert, *args]])
    results = json.loads((out / "results.json").read_text())
    sha256 = train_bert.load_pretrained(tiny_checkpoint)[3]["weights_sha256"]
    assert results["settings"]["checkpoint"] == str(bert / "checkpoints" / "step-00000010.pt")
    assert (results["settings"]["checkpoint_step"], results["settings"]["checkpoint_sha256"]) == (10, sha256)
    assert (results["runs"][0]["checkpoint_step"], results["runs"][0]["checkpoint_sha256"]) == (10, sha256)
    assert f"(step 10, weights sha256 {sha256[:12]})" in (out / "results.md").read_text()

    shutil.copy(tiny_checkpoint, tmp_path / "renamed.pt")  # the same weights under another name: the same checkpoint
    capsys.readouterr()
    finetune_glue.main([str(arg) for arg in ["--checkpoint", tmp_path / "renamed.pt", *args]])
    assert "mnli: 1 of 1 runs already recorded, 0 to go" in capsys.readouterr().out

    checkpoint = torch.load(tiny_checkpoint, weights_only=True)  # training went on: a newer checkpoint
    torch.manual_seed(1)
    newer = train_bert.BertForMLM(train_bert.BertConfig(**checkpoint["model_config"])).state_dict()
    torch.save({**checkpoint, "model": newer, "state": {**checkpoint["state"], "step": 20}},
               bert / "checkpoints" / "step-00000020.pt")
    newer_sha256 = train_bert.load_pretrained(str(bert))[3]["weights_sha256"]
    assert main_error(capsys, "--checkpoint", bert, *args).endswith(
        f"{out} holds runs made from another checkpoint (step 10, weights sha256 {sha256[:12]}) than {bert} "
        f"(step 20, weights sha256 {newer_sha256[:12]}); use a new --out for this one.")
    assert json.loads((out / "results.json").read_text()) == results


# ---------------------------------------------------------------------------------------------------
# one sweep shared by several processes

SHARED_GRID = ["--task", "mnli", "rte", "--from-mnli", "--lr", "1e-4", "3e-4", "--batch", "16", "--epochs", "1",
               "--seeds", "2", "--max-train-examples", "32"]


def start_sweep(*args):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "finetune_glue.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recorded_runs(out):
    """results.json's runs by (task, lr, batch size, epochs, seed), after checking that none is there twice."""
    runs = json.loads((out / "results.json").read_text())["runs"]
    keys = [finetune_glue.run_slot(record) for record in runs]
    assert len(keys) == len(set(keys)), keys
    return dict(zip(keys, runs))


def hold_claim(out, task, lr, batch_size, epochs, seed):
    """Claims a run from this test process, as another finetune_glue.py would; closing the file lets it go."""
    path = os.path.join(out, finetune_glue.run_folder(task, lr, batch_size, epochs, seed), ".claim")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    claim_file = open(path, "w")
    fcntl.flock(claim_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    claim_file.write("elsewhere:4242\n")
    claim_file.flush()
    return claim_file


def test_two_processes_share_one_sweep_as_one_process_would_run_it(tmp_path, tiny_checkpoint, tiny_glue):
    """Two processes on one --out, as torchrun starts one per GPU: every run is made and recorded once,
    RTE starts from the same MNLI run in both, and the scores are those of the same sweep in one process."""
    shared, serial = tmp_path / "shared", tmp_path / "serial"
    # The test holds the results lock until each process has claimed a run and waits to record it: both
    # take part, however long either takes to start (a tiny run lasts less than importing torch).
    shared.mkdir()
    results_lock = open(shared / ".results.lock", "a")
    fcntl.flock(results_lock, fcntl.LOCK_EX)
    processes = [start_sweep("--checkpoint", tiny_checkpoint, "--glue-dir", tiny_glue, "--out", shared, *SHARED_GRID)
                 for _ in range(2)]
    deadline = time.time() + 300
    while sum(map(finetune_glue.claim_is_held, glob.glob(str(shared / "runs" / "mnli" / "*" / ".claim")))) < 2:
        assert time.time() < deadline and all(process.poll() is None for process in processes)
        time.sleep(0.05)
    results_lock.close()
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0 and stderr == "", stdout + stderr
    run_script("finetune_glue.py", "--checkpoint", tiny_checkpoint, "--glue-dir", tiny_glue, "--out", serial, *SHARED_GRID)
    shared_runs, serial_runs = recorded_runs(shared), recorded_runs(serial)
    grid = {(task, lr, 16, 1, seed) for task in ("mnli", "rte") for lr in (1e-4, 3e-4) for seed in (0, 1)}
    assert set(shared_runs) == set(serial_runs) == grid
    for key in grid:
        assert [shared_runs[key][name] for name in ("metrics", "score", "init", "run_dir")] == \
               [serial_runs[key][name] for name in ("metrics", "score", "init", "run_dir")], key
    # each run was made once, both processes took part, and each says which runs it made
    assert sum(line.startswith(("mnli lr=", "rte lr=")) for stdout, _ in outputs for line in stdout.splitlines()) == 8
    workers = [f"{socket.gethostname()}:{process.pid}" for process in processes]
    assert {record["worker"] for record in shared_runs.values()} == set(workers)
    for worker, (stdout, _) in zip(workers, outputs):
        made = sum(record["worker"] == worker for record in shared_runs.values())
        assert sum(line.endswith(f"by {worker})") for line in stdout.splitlines()) == made
    assert (shared / "results.md").read_text() == (serial / "results.md").read_text()
    assert sorted(os.listdir(shared / "submission")) == sorted(os.listdir(serial / "submission")) == ["AX.tsv", "MNLI-m.tsv",
                                                                                                     "MNLI-mm.tsv", "RTE.tsv"]
    for file_name in os.listdir(serial / "submission"):
        assert (shared / "submission" / file_name).read_text() == (serial / "submission" / file_name).read_text()


def test_a_claimed_run_is_left_to_its_holder_until_it_dies(tmp_path, capsys, tiny_checkpoint):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    out = tmp_path / "out"
    args = ["--checkpoint", tiny_checkpoint, "--glue-dir", tmp_path / "glue", "--out", out, "--task", "mnli",
            "--lr", "1e-4", "--batch", "8", "--epochs", "1", "--seeds", "2"]
    claim = os.path.join(out, finetune_glue.run_folder("mnli", 1e-4, 8, 1, 1), ".claim")
    os.makedirs(os.path.dirname(claim))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write('elsewhere:4242'); f.flush(); print('held', flush=True); "
                               "time.sleep(600)", claim], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        finetune_glue.main([str(arg) for arg in args])
        assert "mnli: 1 of 2 runs are left to the processes that hold them: elsewhere:4242" in capsys.readouterr().out
        assert [key[-1] for key in recorded_runs(out)] == [0]
    finally:
        holder.kill()  # kill -9: no chance to clean up; the kernel drops its flock all the same
        holder.wait()
    finetune_glue.main([str(arg) for arg in args])
    assert "mnli: 1 of 2 runs already recorded, 1 to go" in capsys.readouterr().out
    assert [key[-1] for key in recorded_runs(out)] == [0, 1]


def test_a_run_recorded_meanwhile_is_not_recorded_twice(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    """Should another process record a run between this one's claim and its record (possible only if the
    claim was lost, say with its folder deleted), the first record stays and this process's files are dropped."""
    write_synthetic_glue(tmp_path / "glue", rows=30)
    out = tmp_path / "out"
    args = ["--checkpoint", tiny_checkpoint, "--glue-dir", tmp_path / "glue", "--out", out, "--task", "mnli",
            "--lr", "1e-4", "--batch", "8", "--epochs", "1", "--seeds", "1"]
    origin = train_bert.load_pretrained(tiny_checkpoint)[3]
    theirs = dict(run(1e-4, 0, 42.0, batch_size=8, epochs=1), task="mnli", init="pretrained", worker="elsewhere:4242",
                  metrics={"matched_accuracy": 42.0, "mismatched_accuracy": 42.0}, run_dir=finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0))
    real_fine_tune = finetune_glue.fine_tune

    def fine_tune_while_another_records(cfg, *rest):
        (out / "results.json").write_text(json.dumps({"settings": finetune_glue.settings(cfg, origin), "runs": [theirs]}))
        return real_fine_tune(cfg, *rest)

    monkeypatch.setattr(finetune_glue, "fine_tune", fine_tune_while_another_records)
    finetune_glue.main([str(arg) for arg in args])
    assert "mnli lr=0.0001 batch=8 epochs=1 seed=0: recorded meanwhile by another process" in capsys.readouterr().out
    assert list(recorded_runs(out).values()) == [theirs]
    assert os.listdir(out / theirs["run_dir"]) == [".claim"]  # none of this process's files


def test_from_mnli_waits_for_the_mnli_runs_of_other_processes(tmp_path, tiny_checkpoint, tiny_glue):
    """RTE must start from the best run of the whole MNLI grid: a process waits for MNLI runs that another
    holds, and takes over any whose holder lets go (or dies)."""
    out = tmp_path / "out"
    claim_file = hold_claim(out, "mnli", 3e-4, 16, 1, 1)
    process = start_sweep("--checkpoint", tiny_checkpoint, "--glue-dir", tiny_glue, "--out", out, *SHARED_GRID)
    lines = []

    def read_lines():
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not any("waiting" in line for line in lines) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "".join(lines) + process.stderr.read()
    assert {key[0] for key in recorded_runs(out)} == {"mnli"} and len(recorded_runs(out)) == 3  # no RTE run yet
    claim_file.close()  # the holder lets go: the waiting process takes the run over
    stderr = process.communicate(timeout=300)[1]
    reader.join()
    assert process.returncode == 0, "".join(lines) + stderr
    assert "mnli: waiting for 1 of 4 runs, held by elsewhere:4242: RTE, MRPC and STS-B start from the best run of the " \
           "complete MNLI grid\n" in lines
    runs = recorded_runs(out)
    assert runs[("mnli", 3e-4, 16, 1, 1)]["worker"] == f"{socket.gethostname()}:{process.pid}"
    chosen = finetune_glue.choose([record for key, record in runs.items() if key[0] == "mnli"])[0]
    assert [record["init"] for key, record in runs.items() if key[0] == "rte"] == ["mnli:" + chosen["run_dir"]] * 4

def test_a_filesystem_without_locks_gives_one_line(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    def no_locks(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    write_synthetic_glue(tmp_path / "glue", rows=10)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    claim = out / finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0) / ".claim"
    assert main_error(capsys, "--checkpoint", tiny_checkpoint, "--glue-dir", tmp_path / "glue", "--out", out, "--task", "mnli",
                      "--lr", "1e-4", "--batch", "8", "--epochs", "1", "--seeds", "1").endswith(
        f"cannot lock {claim} (No locks available); use an --out that you can write to, on a filesystem with file "
        "locks (a local disk, or NFSv4).")


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert finetune_glue.worker() == f"{socket.gethostname()}:{os.getpid()}"
    monkeypatch.setenv("LOCAL_RANK", "3")  # as torchrun sets it
    assert finetune_glue.worker() == f"{socket.gethostname()}:{os.getpid()} LOCAL_RANK=3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finetune_glue.pick_device() == torch.device("cpu")  # processes without GPUs share the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert "LOCAL_RANK=3 names none of this machine's 2 GPUs; start at most 2 processes (torchrun --nproc_per_node 2)." \
        in error_line(capsys, finetune_glue.pick_device)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert finetune_glue.pick_device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert finetune_glue.pick_device() == torch.device("cuda", 0)

# ---------------------------------------------------------------------------------------------------
# the real thing: all-MiniLM-L6-v2 on SST-2

def test_minilm_learns_sst2(tmp_path, minilm_dir, glue_dir):
    """The first 2,000 SST-2 training sentences, 1 epoch, lr 5e-5, batch 32: transformers reaches 74.1%,
    77.4% and 78.0% dev accuracy over three seeds with these settings."""
    out = tmp_path / "out"
    result = run_script("finetune_glue.py", "--checkpoint", minilm_dir, "--glue-dir", glue_dir, "--out", out, "--task", "sst2",
                        "--lr", "5e-5", "--batch", "32", "--epochs", "1", "--seeds", "1", "--max-train-examples", "2000")
    record = json.loads((out / "results.json").read_text())["runs"][0]
    assert record["metrics"]["accuracy"] >= 72.0, result.stdout
    predictions = (out / "submission" / "SST-2.tsv").read_text().splitlines()[1:]
    assert len(predictions) == 1821 and 0.3 < np.mean([p.endswith("\t1") for p in predictions]) < 0.7


def test_checkpoint_with_short_positions_truncates_to_them(tmp_path, tiny_checkpoint):
    """A model pretrained on 8-token sequences has 8 position embeddings: longer pairs are cut to fit."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    model_config = train_bert.BertConfig(**{**checkpoint["model_config"], "max_positions": 8})
    torch.save({**checkpoint, "model_config": dataclasses.asdict(model_config),
                "model": train_bert.BertForMLM(model_config).state_dict()}, tmp_path / "short.pt")
    write_synthetic_glue(tmp_path / "glue", rows=30)
    finetune_glue.main(["--checkpoint", str(tmp_path / "short.pt"), "--glue-dir", str(tmp_path / "glue"), "--task", "mnli",
                        "--out", str(tmp_path / "out"), "--lr", "1e-4", "--batch", "8", "--epochs", "1", "--seeds", "1"])
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert len(runs) == 1 and set(runs[0]["metrics"]) == {"matched_accuracy", "mismatched_accuracy"}


# ---------------------------------------------------------------------------------------------------
# sweeps that must not go silently wrong: other data, a changed MNLI choice, a full disk, odd leftovers

def quick_mnli(glue, out, *more):
    return ["--checkpoint", None, "--glue-dir", glue, "--out", out, "--task", "mnli", "--lr", "1e-4", "--batch", "8",
            "--epochs", "1", "--seeds", "1", *more]


def sweep_args(tiny_checkpoint, *args):
    return [str(tiny_checkpoint if arg is None else arg) for arg in args]


def test_runs_made_on_other_data_are_refused(tmp_path, capsys, tiny_checkpoint):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    write_synthetic_glue(tmp_path / "other", rows=31)  # one row more: other data, the same file names
    out = tmp_path / "out"
    finetune_glue.main(sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out)))
    digest = json.loads((out / "results.json").read_text())["settings"]["data_sha256"]["mnli"]
    assert re.fullmatch("[0-9a-f]{64}", digest)
    message = main_error(capsys, *sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "other", out, "--seeds", "2")))
    assert message == (f"finetune_glue.py: error: {out} holds mnli runs made on other data (sha256 {digest[:12]}..., "
                       f"the data read now has {message.split('now has ')[1][:12]}...): GLUE's files changed, or another "
                       "--glue-dir; pass the data of those runs, or a new --out.")
    assert len(recorded_runs(out)) == 1
    finetune_glue.main(sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out, "--seeds", "2")))
    assert "mnli: 1 of 2 runs already recorded, 1 to go" in capsys.readouterr().out  # the same data goes on


def test_runs_from_an_mnli_run_no_longer_chosen_run_again(tmp_path, capsys, tiny_checkpoint, tiny_glue):
    """MNLI runs recorded later can change which MNLI run is best: the RTE runs that started from the old
    choice are stale, left out of results.md, and the next sweep runs them again from the new choice."""
    out = tmp_path / "out"
    args = sweep_args(tiny_checkpoint, "--checkpoint", None, "--glue-dir", tiny_glue, "--out", out, *SHARED_GRID[:-4],
                      "--seeds", "1", "--max-train-examples", "32")
    finetune_glue.main(args)
    results = json.loads((out / "results.json").read_text())
    mnli = [r for r in results["runs"] if r["task"] == "mnli"]
    old, other = finetune_glue.choose(mnli)[0], next(r for r in mnli if r != finetune_glue.choose(mnli)[0])
    assert {r["init"] for r in results["runs"] if r["task"] == "rte"} == {"mnli:" + old["run_dir"]}
    other["metrics"] = {name: 99.0 for name in other["metrics"]}  # as if a better MNLI run had been recorded since
    other["score"] = 99.0
    (out / "results.json").write_text(json.dumps(results))
    finetune_glue.write_reports(finetune_glue.Config(checkpoint="", tasks=(), out=str(out)), results)
    assert "| RTE |" not in (out / "results.md").read_text()  # stale runs are no result
    capsys.readouterr()
    finetune_glue.main(args)
    output = capsys.readouterr().out
    assert f"rte: 0 of 2 runs already recorded, 2 to go (2 of them started from another MNLI run than the one chosen " \
           f"now, {other['run_dir']}: they run again)" in output
    rte = [r for r in json.loads((out / "results.json").read_text())["runs"] if r["task"] == "rte"]
    assert len(rte) == 2 and {r["init"] for r in rte} == {"mnli:" + other["run_dir"]}  # replaced, not added
    assert "| RTE |" in (out / "results.md").read_text()


def test_rte_waits_for_an_mnli_run_in_progress_before_choosing(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    out = tmp_path / "out"
    finetune_glue.main(sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out, "--from-mnli")))
    cfg = finetune_glue.parse_args(sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out, "--from-mnli")))
    origin = train_bert.load_pretrained(tiny_checkpoint)[3]
    monkeypatch.setattr(finetune_glue, "POLL_SECONDS", 0.05)
    claim_file = hold_claim(out, "mnli", 3e-4, 8, 1, 0)  # another process is running a second MNLI run
    threading.Timer(1.0, claim_file.close).start()
    capsys.readouterr()
    started = time.time()
    assert finetune_glue.start_of(cfg, "rte", origin) == "mnli:" + finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0)
    assert time.time() - started >= 0.9
    assert capsys.readouterr().out == ("rte: waiting for 1 MNLI runs of elsewhere:4242: rte starts from the best run of "
                                       "the complete MNLI grid\n")


def test_a_full_disk_stops_the_sweep_with_one_line_and_no_partial_files(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    out = tmp_path / "out"
    args = sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    run_dir = out / finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0)
    with monkeypatch.context() as patch:
        patch.setattr(finetune_glue, "write_predictions", full_disk)
        assert main_error(capsys, *args) == (f"finetune_glue.py: error: cannot write {run_dir / '.staging'} (No space left "
                                             "on device); free some disk space (or make it writable) and run the same "
                                             "command again: every run recorded so far is kept.")
    assert os.listdir(run_dir) == [".claim"] and not (out / "results.json").exists()
    with monkeypatch.context() as patch:
        patch.setattr(json, "dump", full_disk)  # results.json itself cannot be written
        assert f"cannot write {out / 'results.json'} (No space left on device)" in main_error(capsys, *args)
    leftovers = [os.path.join(folder, name) for folder, folders, files in os.walk(out) for name in files + folders
                 if name.endswith(".tmp") or name == ".staging"]
    assert leftovers == [] and os.listdir(run_dir) == [".claim"] and not (out / "results.json").exists()
    finetune_glue.main(args)  # with space again, the same command records the run
    assert len(recorded_runs(out)) == 1 and sorted(os.listdir(run_dir)) == [".claim", "AX.tsv", "MNLI-m.tsv",
                                                                         "MNLI-mm.tsv"]


def test_files_and_folders_in_odd_places(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    out = tmp_path / "out"
    args = sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out))
    run_dir = out / finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0)
    (run_dir / ".claim").mkdir(parents=True)
    assert main_error(capsys, *args) == (f"finetune_glue.py: error: {run_dir / '.claim'} is a folder, where a run's "
                                         "claim file belongs; remove it and run again.")
    (run_dir / ".claim").rmdir()
    (run_dir / ".staging").write_text("left by something else")  # a file where the staging folder goes
    (out / ".results.lock").mkdir()
    assert main_error(capsys, *args).endswith(f"{out / '.results.lock'} is a folder, where the sweep's lock file "
                                              "belongs; remove it and run again.")
    (out / ".results.lock").rmdir()
    finetune_glue.main(args)
    assert len(recorded_runs(out)) == 1 and not (run_dir / ".staging").exists()
    # two learning rates that print alike get folders of their own
    assert finetune_glue.run_folder("rte", 1e-5, 16, 3, 0) == os.path.join("runs", "rte", "lr1e-05-batch16-epochs3-seed0")
    assert finetune_glue.run_folder("rte", 1.0000001e-5, 16, 3, 0) != finetune_glue.run_folder("rte", 1e-5, 16, 3, 0)
    # Ctrl-C before any run is recorded says so
    monkeypatch.setattr(finetune_glue, "sweep", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main_error(capsys, *sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", tmp_path / "new"))) == \
        "finetune_glue.py: error: interrupted before any run was recorded; run the same command to start again."


def test_a_failed_move_into_the_run_folder_records_nothing(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    write_synthetic_glue(tmp_path / "glue", rows=30)
    out = tmp_path / "out"
    args = sweep_args(tiny_checkpoint, *quick_mnli(tmp_path / "glue", out))
    run_dir = out / finetune_glue.run_folder("mnli", 1e-4, 8, 1, 0)
    real_replace, moves = os.replace, []

    def replace_fails_on_the_second_file(source, target):
        if ".staging" in str(source):
            moves.append(target)
            if len(moves) == 2:
                raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, target)

    monkeypatch.setattr(finetune_glue.os, "replace", replace_fails_on_the_second_file)
    assert main_error(capsys, *args) == (f"finetune_glue.py: error: cannot write {run_dir} (Input/output error); free "
                                         "some disk space (or make it writable) and run the same command again: every "
                                         "run recorded so far is kept.")
    assert os.listdir(run_dir) == [".claim"] and not (out / "results.json").exists()


@pytest.mark.parametrize("endpoint", ["http://[::1", "huggingface.co"])
def test_a_malformed_hub_address_is_one_line(capsys, monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert error_line(capsys, finetune_glue.check_hub_reachable).endswith(
        f"HF_ENDPOINT must be a URL such as https://huggingface.co, not {endpoint!r}; correct it or unset it.")
