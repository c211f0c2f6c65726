"""train_bert.py against a hostile user (issue 9), one section per class of mistake: numbers out of range,
values read from files, checkpoints that must never be lost, identity rather than names, one writer per
--out, and signals under torchrun. Runs are real (subprocesses on WikiText-2, as a user runs them)."""
import glob
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from test_train_bert import (TINY, TRAIN, assert_user_error, checkpoints, final_state, records, run_train,  # noqa: F401
                             small_wikitext, user_error)
from test_train_multinode import DIST_ENV

sys.path.insert(0, REPO)
import train_bert  # noqa: E402
from train_bert import BertConfig, BertForMLM, load_pretrained  # noqa: E402

QUICK = [*TINY, "--batch", 16, "--micro-batch", 16]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start_train(*args):
    """train_bert.py in the background, as a user starts it in another terminal."""
    return subprocess.Popen([sys.executable, TRAIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env=ENV)


def wait_for_records(out, count, process, timeout_s=120):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout_s
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= count):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the run never logged"
        time.sleep(0.05)


# -------------------------------------------------------------------------------------------------
# 1. Numbers that make no sense: refused before any work, naming the flag and its range


BAD_NUMBERS = [  # (flags, what the one error line must say)
    (["--hours", "nan"], "--hours nan is out of range: it must be in (0, 10000]"),
    (["--hours", "inf"], "--hours inf is out of range"),
    (["--hours", "0"], "--hours 0.0 is out of range"),
    (["--lr", "nan"], "--lr nan is out of range: it must be positive and finite"),
    (["--lr", "inf"], "--lr inf is out of range"),
    (["--lr=-1e-3"], "--lr -0.001 is out of range"),
    (["--batch", "0"], "--batch 0 is out of range: it must be an integer in [1, 16777216]"),
    (["--micro-batch", "0"], "--micro-batch 0 is out of range"),
    (["--warmup", "1"], "--warmup 1.0 is out of range: it must be a fraction in [0, 1)"),
    (["--warmup", "nan"], "--warmup nan is out of range"),
    (["--schedule", "lans", "--constant", "nan"], "--constant nan is out of range"),
    (["--max-steps", "-1"], "--max-steps -1 is out of range: it must be an integer >= 0"),
    (["--seed", "-1"], "--seed -1 is out of range: it must be an integer in [0, 2**62)"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes nan is out of range: it must be a number of minutes >= 0"),
    (["--val-minutes", "-1"], "--val-minutes -1.0 is out of range"),
    (["--log-every", "0"], "--log-every 0 is out of range: it must be an integer >= 1"),
    (["--peak-tflops", "inf"], "--peak-tflops inf is out of range"),
    (["--powersgd-rank", "0"], "--powersgd-rank 0 is out of range"),
    (["--bucket-mb", "nan"], "--bucket-mb nan is out of range"),
    (["--num-heads", "3"], "the model cannot be built: --hidden-size 64 is not divisible by --num-heads 3"),
    (["--hidden-size", "0"], "the model cannot be built: --hidden-size must be an integer in [1, 16777216], not 0"),
    (["--num-layers", "-2"], "--num-layers must be an integer in [1, 16777216], not -2"),
    (["--dropout", "1"], "--dropout must be a probability in [0, 1), not 1.0"),
    (["--attention-dropout", "nan"], "--attention-dropout must be a probability in [0, 1), not nan"),
]


@pytest.mark.parametrize("flags, phrase", BAD_NUMBERS, ids=[" ".join(flags) for flags, _ in BAD_NUMBERS])
def test_numeric_flags_are_checked_before_any_work(small_wikitext, tmp_path, flags, phrase):
    out = tmp_path / "out"
    message = user_error("--data", small_wikitext, "--out", out, *QUICK, *flags)
    assert message.startswith("train_bert.py: error: ") and phrase in message, message
    assert not out.exists()  # nothing was written


def test_a_bad_number_is_one_line_for_the_user(small_wikitext, tmp_path):
    result = run_train("--data", small_wikitext, "--out", tmp_path / "out", *QUICK, "--hours", "nan", check=False)
    assert_user_error(result, "--hours nan is out of range")


def test_no_non_finite_update_reaches_the_weights(small_wikitext, tmp_path):
    """lr 3.4e38 is finite and the loss and gradients are too, but AdamW's step overflows float32: every update
    is put back, so after ten such steps the checkpoint holds exactly the initial weights."""
    out = tmp_path / "overflow"
    result = run_train("--data", small_wikitext, "--out", out, *QUICK, "--optimizer", "adamw", "--lr", 3.4e38,
                       "--warmup", 0, "--max-steps", 1000, check=False)
    assert_user_error(result, "10 steps in a row had a non-finite loss, gradient or update")
    checkpoint = final_state(out)
    assert checkpoint["state"]["step"] == 10 and checkpoint["state"]["skipped_steps"] == 10
    initial = train_bert.build_model(BertConfig(**checkpoint["model_config"]), 0, torch.device("cpu"))
    for name, value in initial.state_dict().items():
        assert torch.equal(checkpoint["model"][name], value), name
    assert all(r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) for r in records(out, "train"))


def test_apply_update_puts_back_a_non_finite_update():
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2, 2), 2.0))]
    for p in weights:
        p.grad = torch.ones_like(p)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert not train_bert.apply_update(torch.optim.SGD(weights, lr=math.inf), scaler, weights)
    assert torch.equal(weights[0].data, torch.ones(3)) and torch.equal(weights[1].data, torch.full((2, 2), 2.0))
    assert train_bert.apply_update(torch.optim.SGD(weights, lr=0.5), scaler, weights)
    assert torch.equal(weights[0].data, torch.full((3,), 0.5))


# -------------------------------------------------------------------------------------------------
# 2. Values and encodings read from files: one line naming the file


def edit_meta(folder, change):
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def swap_tokenizer(folder):
    """Another valid tokenizer (one more token) where the data's was."""
    tokenizer = train_bert.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_tokens(["zzzunseen"])
    tokenizer.save(str(folder / "tokenizer.json"))


BAD_DATA = [
    (lambda f: edit_meta(f, lambda m: m.update(seq_len="128")), "is incomplete: meta.json has seq_len '128', not an integer"),
    (lambda f: edit_meta(f, lambda m: m.update(vocab_size=-5)), "meta.json has vocab_size -5"),
    (lambda f: edit_meta(f, lambda m: m["special_token_ids"].update(pad=10 ** 9)), "meta.json has special_token_ids"),
    (lambda f: edit_meta(f, lambda m: m.update(max_predictions=500)), "meta.json has max_predictions 500"),
    (lambda f: edit_meta(f, lambda m: m["splits"]["train"]["shards"][0]["input_ids"].update(
        file="../../etc/passwd")), "lists a train shard whose input_ids entry lacks a file name"),
    (lambda f: edit_meta(f, lambda m: m["splits"]["train"].update(sequences=999)),
     "meta.json counts 999 train sequences, its shards hold 110"),
    (lambda f: edit_meta(f, lambda m: m["splits"]["train"].update(duplicates=2)),
     "train-00000-mask_positions.npy holds uint8 [3, 110, 20], where meta.json's seq_len, max_predictions and "
     "duplicates need unsigned [2, 110, 20]"),
    (lambda f: edit_meta(f, lambda m: m.update(seq_len=64)), "train-00000-input_ids.npy holds uint16 [110, 128]"),
    (lambda f: (f / "meta.json").write_bytes(b'{"format_version": 1, "seq_len": "\xff"}'), "meta.json cannot be read"),
    (lambda f: (f / "meta.json").write_text("[1, 2]"), "meta.json does not hold a JSON object"),
    (swap_tokenizer, "is not the tokenizer the data was made with (its sha256 differs from the one in meta.json)"),
]


@pytest.mark.parametrize("breakage, phrase", BAD_DATA)
def test_every_value_of_the_data_folder_is_checked(small_wikitext, tmp_path, breakage, phrase):
    folder = tmp_path / "data"
    shutil.copytree(small_wikitext, folder)
    breakage(folder)
    message = user_error("--data", folder, "--out", tmp_path / "out", *QUICK)
    assert message.startswith("train_bert.py: error: ") and str(folder) in message and phrase in message, message


def hugging_face_copy(minilm_dir, folder, config_change=None, weights_change=None):
    """all-MiniLM-L6-v2 copied, with its config.json and weights edited."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(minilm_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    if config_change:
        config_change(config)
    (folder / "config.json").write_text(json.dumps(config))
    if weights_change:
        weights = load_file(folder / "model.safetensors")
        weights_change(weights)
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    return str(folder)


def small_vocabulary(config, weights):
    config["vocab_size"] = 1000
    weights["embeddings.word_embeddings.weight"] = weights["embeddings.word_embeddings.weight"][:1000]


BAD_HUGGING_FACE = [
    (dict(config_change=lambda c: c.pop("num_attention_heads")), "config.json lacks num_attention_heads"),
    (dict(config_change=lambda c: c.update(num_attention_heads=5)), "hidden_size 384 is not divisible by num_attention_heads 5"),
    (dict(config_change=lambda c: c.update(hidden_size="384")), "hidden_size must be an integer in [1, 16777216], not '384'"),
    (dict(config_change=lambda c: c.update(hidden_dropout_prob=None)), "hidden_dropout_prob must be a probability"),
    (dict(config_change=lambda c: c.update(intermediate_size=1000)),
     "encoder.layer.0.intermediate.dense.weight has shape [1536, 384], "),
    (dict(weights_change=lambda w: w.pop("encoder.layer.3.attention.self.key.bias")),
     "model.safetensors lacks encoder.layer.3.attention.self.key.bias"),
    (dict(weights_change=lambda w: w["encoder.layer.1.output.dense.weight"].__setitem__((0, 0), math.nan)),
     "encoder.layer.1.output.dense.weight holds non-finite values"),
    (dict(config_change=lambda c: c.update(vocab_size=1000),
          weights_change=lambda w: w.update({"embeddings.word_embeddings.weight":
                                             w["embeddings.word_embeddings.weight"][:1000]})),
     "has 30522 tokens, more than the 1000 rows of the model's embedding table"),
]


@pytest.mark.parametrize("edits, phrase", BAD_HUGGING_FACE)
def test_hugging_face_folders_are_checked(minilm_dir, tmp_path, edits, phrase):
    folder = hugging_face_copy(minilm_dir, tmp_path / "model", **edits)
    with pytest.raises(ValueError) as error:
        load_pretrained(folder)
    assert phrase in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_unreadable_config_json(minilm_dir, tmp_path):
    folder = hugging_face_copy(minilm_dir, tmp_path / "model")
    (tmp_path / "model" / "config.json").write_bytes(b'{"model_type": "bert", "name": "\xe9"}')
    with pytest.raises(ValueError, match="config.json is not UTF-8 text"):
        load_pretrained(folder)
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert",\n "vocab_size": }')
    with pytest.raises(ValueError, match=r"config.json cannot be read as JSON \(Expecting value: line 2"):
        load_pretrained(folder)


# -------------------------------------------------------------------------------------------------
# 3. Checkpoints are never lost


def test_resuming_an_older_checkpoint_starts_a_branch_and_keeps_the_old_one(small_wikitext, tmp_path):
    """Resuming step 4 of a run that reached step 6: the new run's step-5 is not deleted by retention, the old
    step-5 and step-6 move aside, and a later --resume continues the new branch, not the old one."""
    out = tmp_path / "run"
    common = ["--data", small_wikitext, "--out", out, *QUICK]
    run_train(*common, "--max-steps", 6, "--checkpoint-minutes", 0)
    old_branch = {os.path.basename(p): torch.load(p, weights_only=True)["state"]["step"] for p in checkpoints(out)}
    assert sorted(old_branch) == ["step-00000004.pt", "step-00000005.pt", "step-00000006.pt"]
    result = run_train(*common, "--max-steps", 5, "--resume", out / "checkpoints" / "step-00000004.pt")
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert "note: 2 newer checkpoint(s) moved to" in result.stdout
    assert [os.path.basename(p) for p in checkpoints(out)] == ["step-00000004.pt", "step-00000005.pt"]
    (aside,) = glob.glob(str(out / "checkpoints" / "abandoned-after-step-4-*"))
    assert sorted(os.listdir(aside)) == ["step-00000005.pt", "step-00000006.pt"]
    resumed = run_train(*common, "--max-steps", 7, "--resume", out)
    assert "step-00000005.pt at step 5" in resumed.stdout  # the new branch's newest, not the old step 6
    assert final_state(out)["state"]["step"] == 7


def test_a_truncated_latest_checkpoint_is_passed_over_saying_so(small_wikitext, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", small_wikitext, "--out", out, *QUICK]
    run_train(*common, "--max-steps", 5, "--checkpoint-minutes", 0)
    latest = checkpoints(out)[-1]
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)
    encoder, _, _, origin = load_pretrained(str(out))  # fine-tuning from the folder: the previous one
    assert origin["step"] == 4 and origin["file"].endswith("step-00000004.pt")
    assert f"warning: {latest} cannot be read" in capsys.readouterr().err
    (out / "checkpoints" / "step-00000009.pt.tmp").write_bytes(b"half a checkpoint")  # as left by kill -9
    result = run_train(*common, "--max-steps", 6, "--resume", out)
    assert f"warning: {latest} cannot be read (cut short or damaged); resuming from" in result.stdout
    assert f"removed {out / 'checkpoints' / 'step-00000009.pt.tmp'}" in result.stdout
    assert "at step 4" in result.stdout and final_state(out)["state"]["step"] == 6
    assert not glob.glob(str(out / "checkpoints" / "*.tmp"))
    assert glob.glob(str(out / "checkpoints" / "abandoned-after-step-4-*" / "step-00000005.pt"))  # kept, aside


def limit_file_size():
    """In the child: files cannot grow past 1 MB, and writing more fails with EFBIG as a full disk would."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_a_checkpoint_that_cannot_be_written_stops_the_run_cleanly(small_wikitext, tmp_path):
    """The tiny model's checkpoint is about 25 MB; with files limited to 1 MB, torch.save fails mid-write
    (RuntimeError), as on a full disk: one line, no partial file, exit 1."""
    out = tmp_path / "full"
    result = subprocess.run([sys.executable, TRAIN, "--data", small_wikitext, "--out", str(out), *map(str, QUICK),
                             "--max-steps", "3", "--checkpoint-minutes", "0"], capture_output=True, text=True, cwd=REPO,
                            env=ENV, preexec_fn=limit_file_size, timeout=120)
    assert_user_error(result, f"could not write a checkpoint to {out}/checkpoints (", "is the disk full?",
                      "No checkpoint was completed; free space, then start again")
    assert os.listdir(out / "checkpoints") == []  # no partial file
    assert [r["step"] for r in records(out, "train")] == [1]  # the first checkpoint failed: the run stopped there


def test_save_checkpoint_failure_and_retention(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (1, 2, 3, 9):
        (folder / f"step-{step:08d}.pt").write_bytes(b"x")
    assert train_bert.save_checkpoint({"a": torch.zeros(1)}, str(folder / "step-00000004.pt")) is None
    # the new one and the two before it stay; step 9 (a newer branch) is never deleted by retention
    assert sorted(os.listdir(folder)) == ["step-00000002.pt", "step-00000003.pt", "step-00000004.pt",
                                          "step-00000009.pt"]

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    error = train_bert.save_checkpoint({"a": torch.zeros(1)}, str(folder / "step-00000005.pt"))
    assert error.startswith("RuntimeError: [enforce fail")
    assert sorted(os.listdir(folder)) == ["step-00000002.pt", "step-00000003.pt", "step-00000004.pt",
                                          "step-00000009.pt"]


# -------------------------------------------------------------------------------------------------
# 4. Identity, not names


@pytest.fixture(scope="module")
def stopped_run(small_wikitext, tmp_path_factory):
    """Three steps of a run, to resume with other settings."""
    out = tmp_path_factory.mktemp("runs") / "three"
    run_train("--data", small_wikitext, "--out", out, *QUICK, "--max-steps", 3)
    return out


@pytest.fixture(scope="module")
def other_masking(small_wikitext, tmp_path_factory, minilm_dir):
    """The same text and shapes as small_wikitext, masked with another seed: other data."""
    folder = tmp_path_factory.mktemp("prepared")
    run_script("prepare_data.py", "--input", json.loads(open(os.path.join(small_wikitext, "meta.json")).read())
               ["sources"][0]["path"], "--tokenizer", os.path.join(minilm_dir, "tokenizer.json"), "--dup-factor", 3,
               "--val-fraction", 0.1, "--workers", 1, "--seed", 1, "--out", folder / "other")
    return str(folder / "other")


def test_resume_refuses_another_data_optimizer_or_seed(small_wikitext, other_masking, stopped_run, tmp_path):
    common = ["--out", tmp_path / "next", *QUICK, "--max-steps", 5, "--resume", stopped_run]
    checkpoint = checkpoints(stopped_run)[-1]
    message = user_error("--data", other_masking, *common)
    assert f"cannot resume: {checkpoint} was trained on other data (its meta.json had sha256" in message
    assert "pass the --data it was trained on (a copy of that folder is fine)" in message
    message = user_error("--data", small_wikitext, *common, "--optimizer", "adamw")
    assert message.endswith(f"cannot resume: {checkpoint} was trained with --optimizer lamb; pass the same "
                            f"--optimizer (its state does not carry over to another optimizer)")
    message = user_error("--data", small_wikitext, *common, "--seed", 1)
    assert "was trained with --seed 0; pass the same --seed (it decides the data order)" in message
    # a copy of the data folder is the same data: identity is the content, not the path
    copy = tmp_path / "copy"
    shutil.copytree(small_wikitext, copy)
    result = run_train("--data", copy, *common)
    assert "at step 3" in result.stdout and final_state(tmp_path / "next")["state"]["step"] == 5


def test_resume_says_what_changes(small_wikitext, stopped_run, tmp_path):
    """Resuming with another --lr and --max-steps is allowed and said, with the learning rate's jump."""
    out = tmp_path / "changed"
    result = run_train("--data", small_wikitext, "--out", out, *QUICK, "--max-steps", 30, "--lr", 2e-3,
                       "--resume", stopped_run)
    old = train_bert.TrainConfig(max_steps=3)
    new = train_bert.TrainConfig(max_steps=30, lr=2e-3)
    lr_before, lr_now = train_bert.lr_at(old, 1.0), train_bert.lr_at(new, 0.1)
    assert lr_before == 0.0 and lr_now == pytest.approx(2e-3 * (1 - 0.1) / 0.94)
    assert "note: resuming with other settings: --lr 0.002 (was 0.001), --max-steps 30 (was 3)" in result.stdout
    assert f"note: the learning rate goes from {lr_before:.3e} to {lr_now:.3e} at step 3" in result.stdout


# -------------------------------------------------------------------------------------------------
# 5. One writer per --out


def test_a_second_run_on_the_same_out_stops_at_once(small_wikitext, tmp_path):
    out = tmp_path / "shared"
    first = start_train("--data", small_wikitext, "--out", out, *QUICK, "--hours", 1)
    try:
        wait_for_records(out, 2, first)
        second = run_train("--data", small_wikitext, "--out", out, *QUICK, "--hours", 1, "--resume", out, check=False)
        assert_user_error(second, f"another train_bert.py (pid {first.pid} on ", f"is writing to {out}; wait for it")
        assert first.poll() is None  # untouched
    finally:
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM and "stopped (signal)" in stdout, stdout + stderr
    assert final_state(out)["stop_reason"] == "signal"


# -------------------------------------------------------------------------------------------------
# 6. Signals under torchrun


def test_sigterm_to_one_worker_stops_every_rank_with_a_checkpoint(small_wikitext, tmp_path):
    """A scheduler preempting one process: the signal is agreed at the next step, rank 0 writes the
    checkpoint, and every rank exits with 128 + SIGTERM (torchrun reports them as failed)."""
    out = tmp_path / "preempted"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 TRAIN, "--data", small_wikitext, "--out", str(out), *map(str, TINY), "--batch", "16",
                                 "--micro-batch", "8", "--hours", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, env=DIST_ENV)
    try:
        wait_for_records(out, 3, launcher)
        workers = {}
        for pid in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{pid}/stat").read()
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except (OSError, ValueError):
                continue
            if pid.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == launcher.pid:
                rank = next(v for v in environ if v.startswith(b"RANK="))
                workers[int(rank[5:])] = int(pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)  # rank 1 only
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert "IndexError" not in stderr and "stopped (signal) at step" in stdout, stdout + stderr
    assert stderr.count("exitcode  : 143") == 2, stderr  # both ranks: 128 + SIGTERM
    checkpoint = final_state(out)
    assert checkpoint["stop_reason"] == "signal" and len(checkpoint["rng"]) == 2


# -------------------------------------------------------------------------------------------------
# Found by a hostile pass over the scripts


def test_a_micro_batch_without_a_masked_token_counts_zero_not_nan(tmp_path, minilm_dir, wikitext_raw):
    """Rows of [UNK] (600 emoji) have nothing to mask. A micro-batch of such rows once made the loss NaN
    and threw its whole step away; it now adds nothing, and no step is skipped."""
    logits = torch.randn(2, 3, 11, requires_grad=True)
    assert train_bert.mlm_loss(logits, torch.full((2, 3), -100)).item() == 0
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    torch.testing.assert_close(train_bert.mlm_loss(logits, labels),
                               torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    with open(wikitext_raw, encoding="utf-8") as f:
        text = f.read(35_000)
    (tmp_path / "emoji.txt").write_text(text[:17_000] + "\n" + " ".join(["\U0001F642"] * 600) + "\n" + text[17_000:])
    run_script("prepare_data.py", "--input", tmp_path / "emoji.txt", "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
               "--out", tmp_path / "data", "--workers", 1, "--val-fraction", 0)
    out = tmp_path / "run"
    run_train("--data", tmp_path / "data", "--out", out, *TINY, "--batch", 16, "--micro-batch", 1, "--max-steps", 8)
    assert final_state(out)["state"]["skipped_steps"] == 0
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in records(out, "train"))


def test_checkpoints_are_ordered_by_step_past_99999999(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (99_999_998, 99_999_999, 100_000_000):
        (folder / f"step-{step:08d}.pt").write_bytes(b"x")
    names = [os.path.basename(f) for f in train_bert.checkpoint_files(str(tmp_path))]
    assert names == ["step-99999998.pt", "step-99999999.pt", "step-100000000.pt"]
    assert train_bert.save_checkpoint({"a": torch.zeros(1)}, str(folder / "step-100000001.pt")) is None
    assert sorted(os.listdir(folder)) == ["step-100000000.pt", "step-100000001.pt", "step-99999999.pt"]  # the 3 newest


def test_a_finished_run_resumed_again_does_nothing(stopped_run, small_wikitext):
    before = {f: os.path.getmtime(f) for f in checkpoints(stopped_run)}
    result = run_train("--data", small_wikitext, "--out", stopped_run, *QUICK, "--max-steps", 3, "--resume", stopped_run)
    assert "nothing to do: the run is at step 3 and --max-steps 3 is reached; raise it to go on" in result.stdout
    assert {f: os.path.getmtime(f) for f in checkpoints(stopped_run)} == before  # no step, no new checkpoint


def damage_checkpoint(change):
    def damage(path):
        checkpoint = torch.load(path, weights_only=True)
        change(checkpoint)
        torch.save(checkpoint, path)
    return damage


DAMAGED_CHECKPOINTS = [
    (lambda c: next(iter(c["optimizer"]["state"].values()))["exp_avg"].fill_(math.nan),
     "holds optimizer moments or settings that are not finite; resume an earlier checkpoint"),
    (lambda c: next(iter(c["optimizer"]["state"].values()))["exp_avg_sq"].fill_(-1), "holds negative second moments"),
    (lambda c: c["optimizer"].update(state={}), "holds optimizer moments for 0 of the 36 weight tensors"),
    (lambda c: c["optimizer"]["param_groups"][0].update(betas=(math.nan, 0.999)), "settings that are not finite"),
    (lambda c: c.update(rng=[{"cpu": "x"}]), "the random generator states in"),
    (lambda c: c.update(data_sha256=None), "its data_sha256 is not a hash"),
    (lambda c: c["state"].update(elapsed_s=1e300), "its run state (step, data position, time spent) is invalid"),
]


@pytest.mark.parametrize("change, phrase", DAMAGED_CHECKPOINTS)
def test_a_damaged_checkpoint_is_refused_with_one_line(stopped_run, small_wikitext, tmp_path, change, phrase):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    for path in checkpoints(run)[:-1]:
        os.remove(path)  # only the damaged newest is left
    damage_checkpoint(change)(checkpoints(run)[-1])
    message = user_error("--data", small_wikitext, "--out", run, *QUICK, "--max-steps", 6, "--resume", run)
    assert message.startswith("train_bert.py: error: cannot resume: ") and phrase in message, message


def write_into(array_file, change):
    def damage(folder):
        array = np.load(folder / array_file, mmap_mode="r+")
        change(array)
        array.flush()
    return damage


DAMAGED_VALUES = [
    (write_into("train-00000-mask_positions.npy", lambda a: a.__setitem__((slice(None), slice(None), 2), 200)),
     "is damaged: a row of its shard train-00000 holds a masked position beyond seq_len or a token id beyond the "
     "vocabulary; run prepare_data.py again"),
    (write_into("train-00000-input_ids.npy", lambda a: a.__setitem__((slice(None), 5), 65000)), "is damaged: a row"),
    (lambda f: edit_meta(f, lambda m: m.update(vocab_size=30000)),
     "meta.json has vocab_size 30000, its tokenizer.json has 30522 tokens"),
    (lambda f: (f / "val-00000-input_ids.npy").write_bytes(b""), "val-00000-input_ids.npy cannot be read (EOFError)"),
    (lambda f: edit_meta(f, lambda m: m.update(format_version=True)), "meta.json has format_version True"),
]


@pytest.mark.parametrize("breakage, phrase", DAMAGED_VALUES)
def test_values_the_model_cannot_take_are_refused(small_wikitext, tmp_path, breakage, phrase):
    """Positions beyond the sequence and token ids beyond the vocabulary would end deep inside torch
    (IndexError, or a device-side assert on a GPU); they are caught as the batches are read."""
    folder = tmp_path / "data"
    shutil.copytree(small_wikitext, folder)
    breakage(folder)
    result = run_train("--data", folder, "--out", tmp_path / "out", *QUICK, "--max-steps", 3, check=False)
    assert_user_error(result, phrase)


def test_paths_and_sizes_that_cannot_work(small_wikitext, tmp_path):
    cases = [(["--data", os.path.join(small_wikitext, "meta.json"), "--out", tmp_path / "a"],
              "meta.json is a file; pass the folder that prepare_data.py wrote"),
             (["--data", small_wikitext, "--out", ""], "--out and --data must name folders, not be empty"),
             (["--data", small_wikitext, "--out", small_wikitext], "is the data folder; choose another folder"),
             (["--data", small_wikitext, "--out", tmp_path / "b", "--num-layers", 16_777_216],
              "parameters, which need about 15,6"),
             (["--data", small_wikitext, "--out", tmp_path / "c", "--lr", "1e39"], "at most 3.4e38, the largest float32")]
    for args, phrase in cases:
        message = user_error(*args, *TINY, "--batch", 16, "--micro-batch", 16)
        assert phrase in message, message


def test_parameter_count_matches_the_built_model():
    for pre_ln in (True, False):
        config = BertConfig(**train_bert.MODEL_PRESETS["tiny"], pre_ln=pre_ln)
        assert train_bert.parameter_count(config) == sum(p.numel() for p in BertForMLM(config).parameters())


def test_ctrl_c_while_starting_is_one_line(small_wikitext, tmp_path):
    process = start_train("--data", small_wikitext, "--out", tmp_path / "early", *QUICK, "--max-steps", 50)
    time.sleep(0.5)  # still importing torch
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stderr.strip() == \
        "train_bert.py: interrupted while starting; no checkpoint was written", stderr


def test_running_out_of_memory_stops_with_the_last_weights(small_wikitext, tmp_path):
    """The base model with a micro-batch of 96 cannot allocate its attention under a 4 GB address-space
    limit: the run writes the weights it has (step 0) and says what to do, instead of a traceback."""
    out = tmp_path / "oom"

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    result = subprocess.run([sys.executable, TRAIN, "--data", small_wikitext, "--out", str(out), "--model", "base",
                             "--batch", "96", "--micro-batch", "96", "--max-steps", "2"], capture_output=True, text=True,
                            cwd=REPO, env=ENV, preexec_fn=limit_memory, timeout=300)
    assert_user_error(result, "out of memory at step 1 with --micro-batch 96; the weights of step 0 are in",
                      "pass a smaller --micro-batch (--plan finds one that fits)")
    assert final_state(out)["stop_reason"] == "out_of_memory"


def test_an_empty_validation_split_is_never_validated(tmp_path, wikitext_raw, minilm_dir):
    with open(wikitext_raw, encoding="utf-8") as f:
        (tmp_path / "text.raw").write_text(f.read(40_000), encoding="utf-8")
    run_script("prepare_data.py", "--input", tmp_path / "text.raw", "--tokenizer", os.path.join(minilm_dir, "tokenizer.json"),
               "--dup-factor", 2, "--val-fraction", 0, "--workers", 1, "--out", tmp_path / "data")
    result = run_train("--data", tmp_path / "data", "--out", tmp_path / "out", *QUICK, "--max-steps", 6)
    assert "note: the validation split is empty; validation is skipped" in result.stdout
    assert "validation at step" not in result.stdout and records(tmp_path / "out", "val") == []


def test_a_refused_resume_leaves_no_trace(stopped_run, small_wikitext, tmp_path):
    for flags in (["--resume", tmp_path / "nothing"], ["--resume", stopped_run, "--seed", 3]):
        message = user_error("--data", small_wikitext, "--out", tmp_path / "new", *QUICK, *flags)
        assert message.startswith("train_bert.py: error: cannot resume") and not (tmp_path / "new").exists(), message


def test_only_a_lack_of_memory_counts_as_one():
    assert train_bert.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert train_bert.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                    "not enough memory: you tried to allocate 1073741824 bytes."))
    assert train_bert.is_out_of_memory(MemoryError())
    assert not train_bert.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
