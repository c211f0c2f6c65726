"""train_bert.py past one server (issue 5): LANS against a float64 reference, the LANS schedule,
micro-batches streamed for huge global batches, and DDP on localhost with gloo: two torchrun "nodes"
of two processes against one process, and each --comm-hook (fp16, bf16, powersgd) still learning."""
import glob
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, free_port
from test_train_bert import TINY, TRAIN, final_state, records, run_train, small_wikitext, user_error  # noqa: F401

sys.path.insert(0, REPO)
import train_bert  # noqa: E402
from train_bert import Lans, learning_rate  # noqa: E402

# gloo on the loopback interface only; one OpenMP thread per process (the cores are shared)
DIST_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
NO_DROPOUT = ["--dropout", 0, "--attention-dropout", 0]


# -------------------------------------------------------------------------------------------------
# LANS


def reference_lans(groups, grad_steps, lr, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None):
    """The issue's LANS math, one tensor at a time, in float64. groups: [(params, weight_decay)]."""
    params = [[p.double().clone() for p in ps] for ps, _ in groups]
    m = [[torch.zeros_like(p) for p in ps] for ps in params]
    v = [[torch.zeros_like(p) for p in ps] for ps in params]
    beta1, beta2 = betas

    def ratio(a, b):
        a, b = float(a.norm()), float(b.norm())
        return a / b if a > 0 and b > 0 else 1.0

    for step, grads in enumerate(grad_steps, start=1):
        grads = [[g.double() for g in gs] for gs in grads]
        divisor = 1.0
        if max_grad_norm is not None:
            global_norm = math.sqrt(sum(float((g * g).sum()) for gs in grads for g in gs))
            divisor = max(global_norm / max_grad_norm, 1.0)
        for gi, (_, decay) in enumerate(groups):
            for i, x in enumerate(params[gi]):
                g = grads[gi][i] / divisor
                g_norm = float(g.norm())
                g = g / g_norm if g_norm > 0 else torch.zeros_like(g)
                m[gi][i] = beta1 * m[gi][i] + (1 - beta1) * g
                v[gi][i] = beta2 * v[gi][i] + (1 - beta2) * g * g
                m_hat, v_hat = m[gi][i] / (1 - beta1 ** step), v[gi][i] / (1 - beta2 ** step)
                d = v_hat.sqrt() + eps
                r = m_hat / d + decay * x
                c = g / d + decay * x
                params[gi][i] = x - lr * beta1 * ratio(x, r) * r - lr * (1 - beta1) * ratio(x, c) * c
    return params


def lans_problem(scale):
    """A decayed group with a zero tensor (||x|| = 0), a group without decay where one gradient is zero
    on every other step (||g|| = 0 while m is not), and 6 steps of gradients of the given scale."""
    generator = torch.Generator().manual_seed(0)
    decayed = [torch.randn(8, 5, generator=generator), torch.zeros(4, 3)]
    not_decayed = [torch.randn(5, generator=generator), torch.randn(3, generator=generator)]
    grad_steps = [[[torch.randn(p.shape, generator=generator) * scale for p in decayed],
                   [torch.randn(p.shape, generator=generator) * scale for p in not_decayed]] for _ in range(6)]
    for step in grad_steps[1::2]:
        step[1][1].zero_()
    return decayed, not_decayed, grad_steps


def run_lans(decayed, not_decayed, grad_steps, lr, weight_decay=0.01, **options):
    params = [p.clone().requires_grad_() for p in decayed + not_decayed]
    optimizer = Lans([{"params": params[:2], "weight_decay": weight_decay},
                      {"params": params[2:], "weight_decay": 0.0}], lr=lr, **options)
    for grads in grad_steps:
        for p, g in zip(params, grads[0] + grads[1]):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad()
    return params, optimizer


@pytest.mark.parametrize("options", [dict(), dict(betas=(0.8, 0.99), eps=1e-4), dict(max_grad_norm=1e-5)],
                         ids=["defaults", "other betas and eps", "clipped"])
def test_lans_matches_float64_reference(options):
    decayed, not_decayed, grad_steps = lans_problem(scale=1e-4)  # max_grad_norm 1e-5 clips every step
    lr = 0.05
    expected = reference_lans([(decayed, 0.01), (not_decayed, 0.0)], grad_steps, lr, **options)
    params, optimizer = run_lans(decayed, not_decayed, grad_steps, lr, **options)
    for p, e in zip(params, expected[0] + expected[1]):
        torch.testing.assert_close(p.detach().double(), e, rtol=2e-5, atol=1e-6)
    assert all(p.grad is None for p in params) and optimizer.param_groups[0]["step"] == 6
    assert not torch.equal(params[1].detach(), torch.zeros(4, 3))  # a zero weight still moves (ratio 1)
    # the test can tell the rules apart: weight decay, and the Nesterov term's weight (1 - b1), matter
    beta2 = options.get("betas", (0.9, 0.999))[1]
    for changed in (reference_lans([(decayed, 0.1), (not_decayed, 0.0)], grad_steps, lr, **options),
                    reference_lans([(decayed, 0.01), (not_decayed, 0.0)], grad_steps, lr,
                                   **{**options, "betas": (0.5, beta2)})):
        assert max((a - b).abs().max() for a, b in zip(changed[0] + changed[1], expected[0] + expected[1])) > 1e-3


def test_lans_normalisation_makes_the_global_clip_a_no_op():
    """g / ||g|| per tensor divides out the clip's common factor: clipping on and off agree to rounding."""
    decayed, not_decayed, grad_steps = lans_problem(scale=1e-4)
    clipped, _ = run_lans(decayed, not_decayed, grad_steps, 0.05, max_grad_norm=1e-5)
    unclipped, _ = run_lans(decayed, not_decayed, grad_steps, 0.05)
    for a, b in zip(clipped, unclipped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_lans_defaults_and_make_optimizer():
    _, optimizer = run_lans(*lans_problem(scale=1.0), lr=1e-3)
    assert optimizer.defaults == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    assert optimizer.max_grad_norm is None
    model = train_bert.BertForMLM(train_bert.BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=64))
    lans, name = train_bert.make_optimizer(model, train_bert.TrainConfig(optimizer="lans", lr=5e-3),
                                           torch.device("cpu"))
    assert isinstance(lans, Lans) and name == "built-in Lans" and lans.defaults["lr"] == 5e-3
    assert [g["weight_decay"] for g in lans.param_groups] == [0.01, 0.0]  # no decay on biases and LayerNorms


# -------------------------------------------------------------------------------------------------
# The LANS schedule


def test_lans_schedule_values_and_continuity():
    peak, w, c = 5e-3, 0.05, 0.25  # GluonNLP's recipe
    assert learning_rate(0.0, peak, w, c) == 0.0
    assert learning_rate(0.025, peak, w, c) == pytest.approx(peak / 2)
    for progress in (0.05, 0.1, 0.2999):
        assert learning_rate(progress, peak, w, c) == peak  # held at the peak
    assert learning_rate(0.65, peak, w, c) == pytest.approx(peak / 2)  # halfway through the decay
    assert learning_rate(1.0, peak, w, c) == 0.0
    assert learning_rate(0.65, peak, w, c, degree=2) == pytest.approx(peak / 4)
    assert learning_rate(0.5, peak, 0.0, 0.0) == pytest.approx(peak / 2)  # no warmup, no constant
    assert learning_rate(0.2, peak, 0.0, 0.5) == peak  # no warmup: starts at the peak
    # time-based: seconds over the budget, for budgets of 36 s, 15 min and a day
    for hours in (0.01, 0.25, 24):
        budget_s = hours * 3600
        assert learning_rate(0.3 * budget_s / budget_s, peak, w, c) == pytest.approx(peak)
        assert learning_rate((budget_s - 1) / budget_s, peak, w, c) == pytest.approx(peak / 0.7 / budget_s)
    for degree in (1.0, 2.0):  # continuous: no jump at the end of warmup or of the constant phase
        grid = np.linspace(0, 1, 20001)
        values = np.array([learning_rate(p, peak, w, c, degree) for p in grid])
        assert np.abs(np.diff(values)).max() <= max(peak / w, degree * peak / 0.7) / 20000 * 1.001
        assert values.max() == peak and values[-1] == 0.0


def test_bad_schedule_and_communication_flags(small_wikitext, tmp_path):
    data = ["--data", small_wikitext, "--out", tmp_path / "out", *TINY, "--batch", 16, "--micro-batch", 16]
    message = user_error(*data, "--schedule", "lans", "--warmup", 0.8)
    assert message == ("train_bert.py: error: --warmup 0.8 and --constant 0.25 must be fractions that leave some of "
                       "the run for the decay (warmup + constant < 1)")
    assert "--powersgd-rank 0 is out of range: it must be an integer in [1, 65536]" in user_error(*data, "--powersgd-rank", 0)
    assert "--bucket-mb 0.0 is out of range: it must be in (0, 1048576]" in user_error(*data, "--bucket-mb", 0)
    result = run_train(*data, "--schedule", "lans", "--warmup", 0.8, check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [message]


# -------------------------------------------------------------------------------------------------
# Huge global batches: micro-batches are read one at a time


def test_train_batches_read_one_micro_batch_at_a_time(small_wikitext, monkeypatch):
    """Memory does not grow with the global batch: asking for a micro-batch reads only its rows."""
    meta, splits, _, _ = train_bert.open_data(small_wikitext)
    rows_read = []
    read_batch = train_bert.read_batch
    monkeypatch.setattr(train_bert, "read_batch", lambda split, rows, *rest: (rows_read.append(len(rows)),
                                                                               read_batch(split, rows, *rest))[1])
    cfg = train_bert.TrainConfig(batch=96, micro_batch=2)
    batches = train_bert.train_batches(splits["train"], cfg, 0, 0, 1, 0, 0, pin_memory=False)
    epoch, step, batch = next(batches)
    assert (epoch, step) == (0, 0) and batch["input_ids"].shape == (2, 128) and rows_read == [2]
    steps = [next(batches)[:2] for _ in range(48)]  # the other 47 of step 0, then step 1 (epoch 1)
    assert steps[:47] == [(0, 0)] * 47 and steps[47] == (1, 0) and rows_read == [2] * 49


@pytest.fixture(scope="module")
def equal_predictions_wikitext(small_wikitext, tmp_path_factory):
    """small_wikitext with the same number of masked positions in every training row. The loss is a
    mean per micro-batch, so only then do micro-batches of 1 and of 96 weigh each prediction alike."""
    folder = tmp_path_factory.mktemp("prepared") / "equal"
    shutil.copytree(small_wikitext, folder)
    for path in glob.glob(str(folder / "train-*-mask_positions.npy")):
        positions = np.load(path)  # (maskings, rows, predictions); position 0 marks an unused slot
        used = positions != 0
        keep = used.sum(axis=2).min()
        np.save(path, np.where(used & (np.cumsum(used, axis=2) <= keep), positions, 0).astype(positions.dtype))
    return str(folder)


def test_96_micro_batches_equal_one(equal_predictions_wikitext, tmp_path):
    """--batch 96 as 96 accumulated micro-batches of 1 gives the weights of one micro-batch of 96."""
    common = ["--data", equal_predictions_wikitext, *TINY, "--batch", 96, "--max-steps", 2, *NO_DROPOUT, "--lr", 1e-2,
              "--comm-hook", "powersgd"]
    many = run_train("--out", tmp_path / "many", *common, "--micro-batch", 1)
    run_train("--out", tmp_path / "one", *common, "--micro-batch", 96)
    assert "1 process(es) x 96 micro-batches of 1 = batch 96" in many.stdout
    assert "--comm-hook powersgd has no effect in a single process" in many.stdout  # a logged no-op
    one, accumulated = final_state(tmp_path / "one"), final_state(tmp_path / "many")
    for name, value in one["model"].items():
        torch.testing.assert_close(accumulated["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    losses = [r["loss"] for r in records(tmp_path / "many", "train")]
    assert losses == pytest.approx([r["loss"] for r in records(tmp_path / "one", "train")], rel=1e-5)


# -------------------------------------------------------------------------------------------------
# Many processes with gloo on localhost


def torchrun(launcher_args, args):
    """`python -m torch.distributed.run LAUNCHER_ARGS train_bert.py ARGS`, as a Popen."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, TRAIN, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=DIST_ENV)


def finish(process, timeout=240):
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun passes SIGTERM on to its workers
        process.wait(timeout=30)
        raise
    assert process.returncode == 0, stdout + stderr
    return stdout


def test_two_nodes_of_two_processes_equal_one_process(small_wikitext, tmp_path):
    """Two torchrun launchers ("nodes") meet through the c10d rendezvous; 4 processes x 1 micro-batch
    reach the weights of 1 process x 4 accumulated micro-batches, with LANS and its schedule."""
    common = ["--data", small_wikitext, *TINY, "--batch", 32, "--micro-batch", 8, "--max-steps", 4, *NO_DROPOUT,
              "--optimizer", "lans", "--schedule", "lans", "--lr", 5e-3, "--warmup", 0.25, "--constant", 0.25]
    port = free_port()
    launcher = ["--nnodes", 2, "--nproc_per_node", 2, "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{port}", "--rdzv-id", "test-two-nodes", "--local-addr", "127.0.0.1"]
    nodes = [torchrun(map(str, launcher), ["--out", tmp_path / "four", *common, "--bucket-mb", 1]) for _ in range(2)]
    run_train("--out", tmp_path / "one", *common)
    stdout = "".join(finish(node) for node in nodes)  # rank 0's lines come from whichever node holds it
    assert "4 process(es) x 1 micro-batches of 8 = batch 32" in stdout
    assert "gradients: DDP buckets of 1 MB, comm hook none" in stdout
    one, four = final_state(tmp_path / "one"), final_state(tmp_path / "four")
    assert len(four["rng"]) == 4
    for name, value in one["model"].items():
        torch.testing.assert_close(four["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    lrs = [r["lr"] for r in records(tmp_path / "four", "train")]
    assert lrs == pytest.approx([learning_rate(step / 4, 5e-3, 0.25, 0.25) for step in range(4)])
    assert lrs == [0.0, 5e-3, 5e-3, 2.5e-3]


HOOK_RUN = ["--batch", 32, "--micro-batch", 8, "--lr", 1e-2, "--warmup", 0.25, *NO_DROPOUT]
HOOK_BUCKETS = ["--bucket-mb", 0.5]  # several buckets, where PowerSGD's all-reduces could interleave on gloo


@pytest.fixture(scope="module")
def reference_run(small_wikitext, tmp_path_factory):
    """The run the hook tests compare with, in one process: no communication, nothing compressed."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    run_train("--out", out, "--data", small_wikitext, *TINY, *HOOK_RUN, "--max-steps", 6)
    return final_state(out)


@pytest.mark.parametrize("hook", ["fp16", "bf16", "powersgd"])
def test_comm_hooks_still_train(small_wikitext, tmp_path, hook, reference_run):
    """2 processes x 2 micro-batches: the loss falls, the hook really changes what arrives (weights
    differ from an uncompressed run by more than float32 sums do), the log shows comm vs compute time.
    PowerSGD starts after warmup, and again after a resume, which starts its error feedback afresh."""
    out = tmp_path / hook
    common = ["--data", small_wikitext, "--out", out, *TINY, *HOOK_RUN, *HOOK_BUCKETS, "--comm-hook", hook,
              "--powersgd-rank", 2]
    stdout = finish(torchrun(["--standalone", "--nproc_per_node", "2"], [*common, "--max-steps", 6]))
    assert f"comm hook {hook}" in stdout and "comm " in stdout and "compute" in stdout
    if hook == "powersgd":  # warmup 0.25 of 6 steps ends at step 2; PowerSGD needs 2 plain steps first
        assert "comm hook powersgd (rank 2, from the end of warmup)" in stdout
        assert "PowerSGD compresses the gradients from step 3 on" in stdout
    differences = [(final_state(out)["model"][name] - value).abs().max() for name, value in
                   reference_run["model"].items()]
    assert max(differences) > 1e-5, max(differences)  # uncompressed: about 1e-7
    if hook == "powersgd":  # and after a resume: two plain steps, then compressed again
        resumed = finish(torchrun(["--standalone", "--nproc_per_node", "2"], [*common, "--max-steps", 10,
                                                                            "--resume", out]))
        assert "resumed from" in resumed and "PowerSGD compresses the gradients from step 9 on" in resumed
    train = records(out, "train")
    losses = [r["loss"] for r in train]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < losses[0] - 0.1, losses
    assert all(r["comm_s"] >= 0 and r["compute_s"] > 0 for r in train)


def test_powersgd_start_and_reset_rules():
    """PowerSGD starts at once when it has counted 2 iterations, else after the missing ones; a
    non-finite step clears its error feedback and warm-start matrices, which then start afresh."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
    state = PowerSGDState(None, start_powerSGD_iter=train_bert.POWERSGD_NOT_YET)
    assert train_bert.start_powersgd(state) == 2 and state.start_powerSGD_iter == 2  # fresh, or just resumed
    state.iter, state.start_powerSGD_iter = 7, train_bert.POWERSGD_NOT_YET
    assert train_bert.start_powersgd(state) == 0 and state.start_powerSGD_iter == 7  # warmup ended at step 8
    state.error_dict[0], state.p_memory_dict[0], state.q_memory_dict[0] = (torch.full((3,), float("nan")),) * 3
    train_bert.reset_powersgd(state)
    assert not state.error_dict and not state.p_memory_dict and not state.q_memory_dict
