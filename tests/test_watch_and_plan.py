"""What a person sees of train_bert.py (issue 11): --plan's arithmetic and a real plan on the CPU, log lines
with readable times and an ETA, the validation interval, the picture of a run and the --plot command,
--help, and a data folder that only holds prepared folders."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_train_bert import TINY, TRAIN, records, run_train, small_wikitext, user_error  # noqa: F401

sys.path.insert(0, REPO)
import train_bert  # noqa: E402
from train_bert import TrainConfig  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plan_arithmetic_against_a_hand_computation():
    """2 hours at 1.5 s per step of 4,096 sequences, 10 minutes of overhead, 1M prepared sequences with 10
    maskings, 335M parameters: (7200 - 600) / 1.5 = 4,400 steps."""
    budget = train_bert.plan_budget(TrainConfig(hours=2, batch=4096), 1.5, 600, 1_000_000, 10, 128, 335_000_000)
    assert budget["steps"] == 4400 and budget["time_s"] == 6600 and not budget["deadline_first"]
    assert budget["sequences"] == 4400 * 4096 == 18_022_400 and budget["tokens"] == 18_022_400 * 128
    assert budget["epochs"] == pytest.approx(18.0224) and budget["maskings_used"] == 10
    assert budget["tokens_per_parameter"] == pytest.approx(2_306_867_200 / 335e6)
    assert budget["share_of_24hbert"] == pytest.approx(18_022_400 / (23_000 * 4096))
    few = train_bert.plan_budget(TrainConfig(hours=2, batch=4096, max_steps=1000), 1.5, 600, 1_000_000, 10, 128, 1)
    assert few["steps"] == 1000 and few["time_s"] == 1500 and few["maskings_used"] == 5  # 4.1 epochs: 5 maskings
    many = train_bert.plan_budget(TrainConfig(hours=2, batch=4096, max_steps=9999), 1.5, 600, 1_000_000, 10, 128, 1)
    assert many["steps"] == 4400 and many["deadline_first"]  # the deadline stops it first


def test_plan_on_the_cpu_writes_nothing_and_says_what_the_budget_buys(small_wikitext, tmp_path):
    out = tmp_path / "planned"
    started = time.time()
    result = run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 32, "--micro-batch", 8, "--hours", 2,
                       "--plan")
    assert time.time() - started < 45 and not out.exists()
    lines = result.stdout.splitlines()
    assert "plan: 6 optimizer steps of up to 4 micro-batches of 8, timed after a warm-up step, on 1 x CPU (fp32)" in lines
    speed = next(line for line in lines if line.startswith("speed: "))
    assert re.search(r"per optimizer step of 32 sequences \(4 micro-batches per process\) = [\d,.]+ sequences/s, "
                     r"[\d,]+ tokens/s; peak memory [\d.]+ GiB$", speed), speed
    bought = next(line for line in lines if line.startswith("it buys "))
    steps = int(bought.split()[2].replace(",", ""))
    assert steps > 1000 and f": {train_bert.amount(steps * 32)} sequences" in bought
    assert any(line.startswith("that is ") and "of the 110 prepared training sequences, so 3 of the 3 maskings get "
               "used (each several times)" in line for line in lines)
    assert any(line.startswith("24hBERT trained about 23k steps x 4,096 = 94M sequences") for line in lines)
    assert lines[-1] == "nothing was written; run the same command without --plan to train"


def test_log_lines_show_readable_times_and_the_steps_left(small_wikitext, tmp_path):
    out = tmp_path / "watched"
    result = run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16,
                       "--max-steps", 20, "--log-every", 10)
    line = next(line for line in result.stdout.splitlines() if line.startswith("step 10/20 | "))
    assert re.search(r"\| [\d.]+ (s|min) elapsed, [\d.]+ (s|min) left \(ETA \d\d:\d\d\)$", line), line
    first, last = records(out, "train")
    assert first["remaining_h"] * 3600 < 60 and last["remaining_h"] == 0  # the steps left, not the unused 24 h


def test_the_validation_interval_adapts_to_the_budget():
    assert train_bert.validation_interval_s(TrainConfig(hours=24), 0) == 1800  # at most every 30 minutes
    assert train_bert.validation_interval_s(TrainConfig(hours=10 / 60), 0) == 30  # a 10-minute run: 20 validations
    assert train_bert.validation_interval_s(TrainConfig(max_steps=300), 0.2) == 3  # 300 steps of 0.2 s
    assert train_bert.validation_interval_s(TrainConfig(val_minutes=5), 0.2) == 300  # as asked


def test_every_run_draws_its_picture_and_plot_overlays_runs(small_wikitext, tmp_path):
    pytest.importorskip("matplotlib")
    for name, lr in (("slow", 1e-3), ("fast", 1e-2)):
        run_train("--data", small_wikitext, "--out", tmp_path / name, *TINY, "--batch", 16, "--micro-batch", 16,
                  "--max-steps", 12, "--log-every", 2, "--lr", lr)
        picture = tmp_path / name / "metrics.png"
        assert picture.read_bytes()[:8] == PNG_SIGNATURE and picture.stat().st_size > 20_000
    (tmp_path / "slow" / "metrics.png").unlink()
    result = run_train("--plot", tmp_path / "slow")
    assert result.stdout == f"drew {tmp_path / 'slow' / 'metrics.png'}\n"
    assert (tmp_path / "slow" / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
    result = run_train("--plot", tmp_path / "slow", tmp_path / "fast", "--plot-file", tmp_path / "both.png")
    assert result.stdout == f"drew {tmp_path / 'both.png'}\n" and (tmp_path / "both.png").stat().st_size > 20_000
    message = user_error("--plot", tmp_path / "nothing")
    assert message == f"train_bert.py: error: cannot draw {tmp_path / 'nothing' / 'metrics.png'}: {tmp_path / 'nothing'} " \
                      f"has no metrics.jsonl; pass a run's --out folder"


def test_read_metrics_follows_resumes_and_skips_a_cut_line(tmp_path):
    """A resume from step 2 (a rollback, or a crash after the checkpoint of step 2) replaces what was
    logged after step 2; a line cut short by a kill is skipped."""
    lines = [{"kind": "train", "step": s, "loss": 10 - s} for s in (1, 2, 3, 4)] + [{"kind": "val", "step": 4}]
    lines += [{"kind": "resume", "step": 2, "file": "x"}] + [{"kind": "train", "step": s, "loss": 5} for s in (3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + '\n{"kind": "tr')
    train, val = train_bert.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in train] == [(1, 9), (2, 8), (3, 5), (4, 5)] and val == []


def test_without_matplotlib_one_line_says_how_to_get_the_picture(monkeypatch, tmp_path):
    monkeypatch.setattr(train_bert.importlib.util, "find_spec", lambda name: None)
    cfg = TrainConfig(out=str(tmp_path / "run"), model="tiny")
    model = train_bert.BertForMLM(train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"]))
    lines = train_bert.describe_setup(cfg, model, "Lamb", "fp32", 1, 1, None, {"sequences": 5})
    assert lines[-1] == (f"note: pip install matplotlib to get {tmp_path / 'run'}/metrics.png, the picture of this run "
                         f"(or draw it later: python train_bert.py --plot {tmp_path / 'run'})")


def test_help_shows_every_default_and_keeps_the_examples(tmp_path):
    result = subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    options = result.stdout.split("\noptions:\n")[1]
    blocks = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n(?=  -)", options)}
    for flag, default in (("--hours", "24.0"), ("--batch", "4096"), ("--micro-batch", "32"), ("--lr", "0.001"),
                          ("--data", "data/prepared"), ("--warmup", "0.06"), ("--optimizer", "lamb"),
                          ("--val-minutes", "0.0"), ("--checkpoint-minutes", "30.0"), ("--model", "large")):
        assert blocks[flag].endswith(f"(default: {default})"), blocks[flag]
    assert len(blocks) > 30
    for flag, block in blocks.items():  # every flag explains itself: more than its name and metavar
        assert len(block.split()) > 4, block
    # the example commands keep their line breaks and continuation backslashes
    assert "--max-steps 300 \\\n        --lr 1e-2" in result.stdout


def test_a_folder_of_prepared_folders_is_named_as_such(small_wikitext, tmp_path):
    parent = os.path.dirname(small_wikitext)
    message = user_error("--data", parent, "--out", tmp_path / "out", *TINY)
    assert message == (f"train_bert.py: error: {parent} is not a prepared data folder but holds 1: "
                       f"{os.path.basename(small_wikitext)}; pass one, e.g. --data {small_wikitext}")


def test_plan_budget_counts_the_steps_done_before_a_resume():
    """Resumed at step 1,000 with 1 of 2 hours left: 3,600 s less 600 s of overhead at 1.5 s = 2,000 more
    steps; the whole run has 3,000 steps of 4,096 sequences."""
    rest = TrainConfig(hours=1, batch=4096)
    budget = train_bert.plan_budget(rest, 1.5, 600, 1_000_000, 10, 128, 335_000_000, steps_done=1000)
    assert budget["steps"] == 2000 and budget["sequences"] == 3000 * 4096 and budget["epochs"] == pytest.approx(12.288)


def test_plan_of_a_resumed_run_plans_the_rest_of_it(small_wikitext, tmp_path):
    out = tmp_path / "run"
    common = ["--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16]
    run_train(*common, "--max-steps", 10)
    before = sorted(os.listdir(out))
    lines = run_train(*common, "--max-steps", 1000, "--resume", out, "--plan").stdout.splitlines()
    assert sorted(os.listdir(out)) == before  # writes nothing, there either
    budget = next(line for line in lines if line.startswith("budget: "))
    assert re.match(r"budget: 24\.0 h, resumed at step 10 after [\d.]+ s: 24\.0 h left, of which", budget), budget
    assert any(re.match(r"it buys 990 more optimizer steps in [\d.]+ (s|min); the whole run: 16k sequences", line)
               for line in lines), lines
    finished = run_train(*common, "--max-steps", 10, "--resume", out, "--plan").stdout.splitlines()
    assert finished[-1].startswith("plan: the checkpoint is at step 10 after ") and "has reached its end" in finished[-1]
    message = user_error(*common, "--resume", tmp_path / "nothing", "--plan")
    assert message.startswith("train_bert.py: error: cannot resume: no checkpoint found at")


def test_plan_counts_a_checkpoint_after_every_step(small_wikitext, tmp_path):
    lines = run_train("--data", small_wikitext, "--out", tmp_path / "out", *TINY, "--batch", 16, "--micro-batch", 16,
                      "--checkpoint-minutes", 0, "--plan").stdout.splitlines()
    budget = next(line for line in lines if line.startswith("budget: "))
    assert "; --checkpoint-minutes 0 adds a checkpoint of about " in budget and budget.endswith(" to every step")


def test_values_that_are_not_finite_numbers_are_read_as_missing(tmp_path):
    lines = ['{"kind": "train", "step": 1, "loss": NaN, "lr": 0.1}', '{"kind": "train", "step": 2, "loss": "7.5"}',
             '{"kind": "train", "step": 3, "loss": true, "mfu": 1e999}', '{"kind": "train", "step": 4, "loss": 7}',
             '{"kind": "train", "step": 5.0, "loss": 6}', '{"kind": "train", "step": 6, "loss": ' + "9" * 400 + '}',
             '["not", "a", "record"]', '{"kind": "val", "step": true, "val_loss": 7}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train, val = train_bert.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"], r["lr"], r["mfu"]) for r in train] == [
        (1, None, 0.1, None), (2, None, None, None), (3, None, None, None), (4, 7.0, None, None), (6, None, None, None)]
    assert val == []
    pytest.importorskip("matplotlib")
    assert train_bert.plot_runs([str(tmp_path)], str(tmp_path / "odd.png")) is None  # drawn, not a traceback


def test_the_picture_follows_its_name_and_a_failed_draw_leaves_nothing(small_wikitext, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run_train("--data", small_wikitext, "--out", run, *TINY, "--batch", 16, "--micro-batch", 16, "--max-steps", 4,
              "--log-every", 1)
    assert run_train("--plot", run, "--plot-file", tmp_path / "run.svg").stdout == f"drew {tmp_path / 'run.svg'}\n"
    assert (tmp_path / "run.svg").read_text().lstrip().startswith("<?xml")
    message = user_error("--plot", run, "--plot-file", tmp_path / "run.unknown")
    assert message.startswith(f"train_bert.py: error: cannot draw {tmp_path / 'run.unknown'}: ") and "unknown" in message
    message = user_error("--plot", run, "--plot-file", tmp_path / "no-such-folder" / "run.png")
    assert message.startswith(f"train_bert.py: error: cannot draw {tmp_path / 'no-such-folder' / 'run.png'}: ")
    assert sorted(os.listdir(tmp_path)) == ["run", "run.svg"]  # no temporary file left behind
    many = [run] * 14  # a crowded picture: no legend, a short title
    assert run_train("--plot", *many, "--plot-file", tmp_path / "many.png").returncode == 0


@pytest.mark.parametrize("flags, phrase", [
    (["--plot-file", "x.png"], "--plot-file says where --plot draws; pass --plot RUN too"),
    (["--plot", "run", "--export-hf", "a", "b"], "--plot and --export-hf are two commands; run them one at a time"),
    (["--plot", "run", "--plot-file", " "], "--plot-file must name a file (for example runs-compared.png), not be empty"),
])
def test_the_commands_are_used_one_at_a_time(flags, phrase):
    assert user_error(*flags) == f"train_bert.py: error: {phrase}"


def test_a_picture_file_without_an_extension_is_a_png(small_wikitext, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run_train("--data", small_wikitext, "--out", run, *TINY, "--batch", 16, "--micro-batch", 16, "--max-steps", 2)
    assert run_train("--plot", run, "--plot-file", tmp_path / "picture").returncode == 0
    assert (tmp_path / "picture").read_bytes()[:8] == PNG_SIGNATURE
