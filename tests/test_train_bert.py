"""train_bert.py: the model against transformers, LAMB against a float64 reference, the schedule, the
data reader, and short real training runs on WikiText-2 prepared by prepare_data.py (the
`prepared_wikitext` fixture of conftest.py)."""
import dataclasses
import glob
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_script

sys.path.insert(0, REPO)
import train_bert  # noqa: E402
from train_bert import BertConfig, BertEncoder, BertForMLM, Lamb, learning_rate, load_pretrained  # noqa: E402

TRAIN = os.path.join(REPO, "train_bert.py")
TINY = ["--model", "tiny", "--log-every", "1"]


def run_train(*args, timeout=300, check=True):
    """train_bert.py as a user runs it. One thread: the tiny model gains nothing from more, and
    OpenMP's spinning threads slow down badly when the CI machine's cores are shared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, TRAIN, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"train_bert.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "checkpoints", "step-*.pt")))


def final_state(out):
    return torch.load(checkpoints(out)[-1], map_location="cpu", weights_only=True)


def assert_user_error(result, *phrases):
    """One clear line on stderr, a non-zero exit, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_bert.py: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# -------------------------------------------------------------------------------------------------
# Model


def test_minilm_matches_transformers(minilm_dir, tmp_path):
    """A real Hugging Face BERT (post-LN) loads exactly: last hidden state within 1e-5 of BertModel's,
    with padding and both segments, from model.safetensors and from a BertForMaskedLM pytorch_model.bin."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    encoder, tokenizer, pooler, origin = load_pretrained(minilm_dir)
    assert not encoder.training and encoder.final_norm is None and encoder.config.pre_ln is False
    pair = tokenizer.encode("The quick brown fox jumps over the lazy dog.", "A second, shorter segment.")
    single = tokenizer.encode("Hello world!")
    assert pair.tokens[0] == "[CLS]" and single.tokens == ["[CLS]", "hello", "world", "!", "[SEP]"]
    length = len(pair.ids)
    input_ids = torch.tensor([pair.ids, single.ids + [0] * (length - len(single.ids))])
    token_type_ids = torch.tensor([pair.type_ids, [0] * length])
    attention_mask = (input_ids != 0).long()
    assert token_type_ids.max() == 1 and attention_mask.min() == 0  # both code paths are exercised
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        ours = encoder(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        unpadded = encoder(input_ids[1:, :len(single.ids)])  # no mask and no segments: the fast path
    real = attention_mask.bool()
    assert (ours - expected)[real].abs().max() <= 1e-5
    assert (unpadded[0] - expected[1, :len(single.ids)]).abs().max() <= 1e-5
    assert torch.equal(pooler["weight"], reference.pooler.dense.weight)
    assert torch.equal(pooler["bias"], reference.pooler.dense.bias)

    # the same weights as a BertForMaskedLM pytorch_model.bin ("bert." prefix), tokenizer from vocab.txt
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(os.path.join(minilm_dir, "config.json"), folder)
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), folder)
    torch.save({"bert." + k: v for k, v in reference.state_dict().items() if not k.startswith("pooler")},
               folder / "pytorch_model.bin")
    encoder_bin, tokenizer_bin, pooler_bin, origin_bin = load_pretrained(str(folder))
    assert pooler_bin is None
    assert tokenizer_bin.encode("Hello world!").ids == single.ids
    assert tokenizer_bin.encode("The quick brown fox jumps over the lazy dog.", "A second, shorter segment.").type_ids \
        == pair.type_ids
    with torch.no_grad():
        assert torch.equal(encoder_bin(input_ids, token_type_ids, attention_mask), ours)


def test_load_pretrained_rejects_what_it_cannot_load(minilm_dir, tmp_path):
    not_bert = tmp_path / "roberta"
    not_bert.mkdir()
    (not_bert / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="not a BERT"):
        load_pretrained(str(not_bert))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(minilm_dir, "config.json"), no_weights)
    with pytest.raises(ValueError, match="has neither model.safetensors nor pytorch_model.bin"):
        load_pretrained(str(no_weights))
    model = BertForMLM(BertConfig(**train_bert.MODEL_PRESETS["tiny"]))
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="carries no tokenizer"):
        load_pretrained(str(tmp_path / "bare.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_pretrained(str(tmp_path / "garbage.pt"))
    with pytest.raises(ValueError, match="no checkpoint found"):
        load_pretrained(str(tmp_path / "empty-run"))


@pytest.mark.parametrize("pre_ln", [True, False])
def test_sparse_head_equals_full_head(pre_ln):
    """Running the head only at the masked positions gives the full head's logits, loss and gradients there."""
    torch.manual_seed(0)
    config = BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=96, pre_ln=pre_ln)
    model = BertForMLM(config).eval()
    assert (model.encoder.final_norm is not None) == pre_ln
    input_ids = torch.randint(0, 96, (3, 128))
    positions = torch.sort(torch.randint(1, 128, (3, 20)), dim=1).values
    positions[2, 15:] = 0  # unused slots
    labels = torch.randint(0, 96, (3, 20)).masked_fill(positions == 0, -100)

    sparse_logits = model(input_ids, positions)
    sparse_loss = train_bert.mlm_loss(sparse_logits, labels)
    sparse_grads = torch.autograd.grad(sparse_loss, list(model.parameters()))
    all_logits = model.predict(model.encoder(input_ids))  # (batch, seq, vocab): the head on every position
    full_logits = torch.stack([all_logits[i, positions[i]] for i in range(3)])
    full_loss = train_bert.mlm_loss(full_logits, labels)
    full_grads = torch.autograd.grad(full_loss, list(model.parameters()))
    assert sparse_logits.shape == (3, 20, 96)
    torch.testing.assert_close(sparse_logits, full_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_loss, full_loss)
    for sparse, full in zip(sparse_grads, full_grads):
        torch.testing.assert_close(sparse, full, rtol=1e-4, atol=1e-6)
    assert sparse_loss.item() > 0 and labels.eq(-100).sum() == 5


def test_init_and_tied_decoder():
    model = BertForMLM(BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=30528))
    assert model.encoder.word_embeddings.weight.shape == (30528, 64)
    assert abs(model.encoder.word_embeddings.weight.std().item() - 0.02) < 1e-3
    assert abs(model.encoder.layers[0].ffn_in.weight.std().item() - 0.02) < 1e-3
    assert model.encoder.layers[0].ffn_in.bias.abs().sum() == 0 and model.decoder_bias.abs().sum() == 0
    assert torch.equal(model.head_norm.weight, torch.ones(64)) and torch.equal(model.head_norm.bias, torch.zeros(64))
    hidden = torch.randn(2, 64)
    logits = model.predict(hidden)
    with torch.no_grad():
        model.encoder.word_embeddings.weight[7] += 1.0  # the decoder is the embedding matrix itself
    assert not torch.allclose(model.predict(hidden)[:, 7], logits[:, 7])


def test_flops_per_sequence_counts_the_sparse_head():
    large = BertConfig()
    flops = train_bert.flops_per_sequence(large, 128, 20)
    # 24 layers x 12.6M weights x 6 x 128 tokens, attention, and the head at 20 positions only
    assert flops == 6 * 24 * (4 * 1024 ** 2 + 2 * 1024 * 4096) * 128 + 12 * 24 * 1024 * 128 ** 2 \
        + 6 * (1024 ** 2 + 1024 * 30528) * 20
    assert 2.3e11 < flops < 2.5e11  # about 6 x 302M x 128 tokens


# -------------------------------------------------------------------------------------------------
# Optimizer


def reference_lamb(groups, grad_steps, lr, betas, eps, max_grad_norm, bias_correction, adam_w_mode,
                   grad_averaging, use_nvlamb):
    """FusedLAMB's math, one tensor at a time, in float64. groups: [(params, weight_decay)]."""
    params = [[p.double().clone() for p in ps] for ps, _ in groups]
    m = [[torch.zeros_like(p) for p in ps] for ps in params]
    v = [[torch.zeros_like(p) for p in ps] for ps in params]
    beta1, beta2 = betas
    for step, grads in enumerate(grad_steps, start=1):
        grads = [[g.double() for g in gs] for gs in grads]
        global_norm = math.sqrt(sum(float((g * g).sum()) for gs in grads for g in gs))
        divisor = global_norm / max_grad_norm if global_norm > max_grad_norm else 1.0
        for gi, (_, decay) in enumerate(groups):
            for i, p in enumerate(params[gi]):
                g = grads[gi][i] / divisor
                if not adam_w_mode:
                    g = g + decay * p
                m[gi][i] = beta1 * m[gi][i] + ((1 - beta1) if grad_averaging else 1.0) * g
                v[gi][i] = beta2 * v[gi][i] + (1 - beta2) * g * g
                c1 = 1 - beta1 ** step if bias_correction else 1.0
                c2 = 1 - beta2 ** step if bias_correction else 1.0
                update = (m[gi][i] / c1) / ((v[gi][i] / c2).sqrt() + eps)
                if adam_w_mode:
                    update = update + decay * p
                ratio = 1.0
                if use_nvlamb or decay != 0:
                    p_norm, u_norm = float(p.norm()), float(update.norm())
                    ratio = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
                params[gi][i] = p - lr * ratio * update
    return params


LAMB_CASES = {  # name: (options, gradient scale, an option that must change the result)
    # max_grad_norm 1e-5 with gradients ~1e-4 clips every step; the default 1.0 never does
    "defaults": (dict(), 1e-3, dict(use_nvlamb=True)),
    "clipped": (dict(max_grad_norm=1e-5), 1e-4, dict(max_grad_norm=1e9)),
    "L2 decay, clipped, no averaging": (dict(adam_w_mode=False, grad_averaging=False, max_grad_norm=1e-5), 1e-4,
                                        dict(max_grad_norm=1e9)),
    "nvlamb, no bias correction": (dict(use_nvlamb=True, bias_correction=False, betas=(0.8, 0.99)), 1e-3,
                                   dict(use_nvlamb=False)),
}


@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_matches_float64_reference(case):
    options, scale, change = LAMB_CASES[case]
    generator = torch.Generator().manual_seed(0)
    decayed = [torch.randn(8, 5, generator=generator), torch.zeros(4, 3)]  # a zero tensor: ||p|| = 0
    not_decayed = [torch.randn(5, generator=generator), torch.randn(3, generator=generator)]
    grad_steps = [[[torch.randn(p.shape, generator=generator) * scale for p in decayed],
                   [torch.randn(p.shape, generator=generator) * scale for p in not_decayed]] for _ in range(6)]
    for step in grad_steps:
        step[1][1].zero_()  # a zero gradient: ||update|| = 0 in a group without decay
    lr = 0.05
    expected = reference_lamb([(decayed, 0.01), (not_decayed, 0.0)], grad_steps, lr=lr,
                              **{**dict(betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0, bias_correction=True,
                                        adam_w_mode=True, grad_averaging=True, use_nvlamb=False), **options})
    params = [p.clone().requires_grad_() for p in decayed + not_decayed]
    optimizer = Lamb([{"params": params[:2], "weight_decay": 0.01}, {"params": params[2:], "weight_decay": 0.0}],
                     lr=lr, **options)
    for grads in grad_steps:
        for p, g in zip(params, grads[0] + grads[1]):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in params)  # set_grad_none
    for p, e in zip(params, expected[0] + expected[1]):
        torch.testing.assert_close(p.detach().double(), e, rtol=2e-5, atol=1e-6)
    assert not torch.equal(params[1].detach(), torch.zeros(4, 3))  # a zero weight still moves (trust ratio 1)
    assert optimizer.param_groups[0]["step"] == 6

    # the test can tell clipping and the trust-ratio rules apart: change one and the result differs
    altered = {**options, **change}
    other = reference_lamb([(decayed, 0.01), (not_decayed, 0.0)], grad_steps, lr=lr,
                           **{**dict(betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0, bias_correction=True,
                                     adam_w_mode=True, grad_averaging=True, use_nvlamb=False), **altered})
    assert max((a - b).abs().max() for a, b in zip(other[0] + other[1], expected[0] + expected[1])) > 1e-3


def test_lamb_has_fused_lambs_signature():
    defaults = {name: p.default for name, p in inspect.signature(Lamb.__init__).parameters.items() if name != "self"}
    assert defaults == dict(params=inspect.Parameter.empty, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                            weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True,
                            set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False)
    with pytest.raises(RuntimeError):
        Lamb([torch.zeros(2, requires_grad=True)], amsgrad=True)


def test_no_weight_decay_on_biases_and_layernorms():
    model = BertForMLM(BertConfig(**train_bert.MODEL_PRESETS["tiny"], vocab_size=64))
    cfg = train_bert.TrainConfig()
    optimizer, name = train_bert.make_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, Lamb) and "built-in Lamb" in name
    decayed, not_decayed = (set(map(id, g["params"])) for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    for name, p in model.named_parameters():
        expected_decay = name.endswith("weight") and "norm" not in name
        assert (id(p) in decayed) == expected_decay and (id(p) in not_decayed) != expected_decay, name
    adamw, name = train_bert.make_optimizer(model, dataclasses.replace(cfg, optimizer="adamw"), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.98) and adamw.defaults["fused"]
    assert adamw.defaults["eps"] == 1e-6 and "AdamW" in name


# -------------------------------------------------------------------------------------------------
# Schedule


def test_schedule_values():
    peak = 1e-3
    assert learning_rate(0.0, peak, 0.06) == 0.0
    assert learning_rate(0.03, peak, 0.06) == pytest.approx(0.5e-3)
    assert learning_rate(0.06, peak, 0.06) == pytest.approx(peak)
    assert learning_rate(0.53, peak, 0.06) == pytest.approx(0.5e-3)
    assert learning_rate(1.0, peak, 0.06) == 0.0
    assert learning_rate(0.5, peak, 0.0) == pytest.approx(0.5e-3)  # no warmup
    # time-based: progress = elapsed seconds / budget seconds, for budgets of 36 s, 15 min and a day
    for hours in (0.01, 0.25, 24):
        budget_s = hours * 3600
        warmup_s = 0.06 * budget_s
        assert learning_rate(warmup_s / 2 / budget_s, peak, 0.06) == pytest.approx(peak / 2)
        assert learning_rate(warmup_s / budget_s, peak, 0.06) == pytest.approx(peak)
        assert learning_rate((warmup_s + budget_s) / 2 / budget_s, peak, 0.06) == pytest.approx(peak / 2)
        assert learning_rate((budget_s - 1) / budget_s, peak, 0.06) == pytest.approx(peak / 0.94 / budget_s)
    # continuous: no jump anywhere, in particular not at the end of warmup
    grid = np.linspace(0, 1, 20001)
    values = np.array([learning_rate(p, peak, 0.06) for p in grid])
    assert np.abs(np.diff(values)).max() <= peak / 0.06 / 20000 * 1.001
    assert values.max() <= peak


# -------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def sharded_wikitext(tmp_path_factory, wikitext_raw, minilm_dir):
    """WikiText-2 in shards of at most 500 rows with 3 maskings: reads that cross shard files."""
    out = tmp_path_factory.mktemp("prepared") / "sharded"
    run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", os.path.join(minilm_dir, "tokenizer.json"),
               "--shard-size", 500, "--dup-factor", 3, "--workers", 1, "--out", out)
    return str(out)


def test_read_batch_applies_the_masking_contract(sharded_wikitext):
    meta, splits, _, _ = train_bert.open_data(sharded_wikitext)
    train = splits["train"]
    pad, cls = meta["special_token_ids"]["pad"], meta["special_token_ids"]["cls"]
    n = train["sequences"]
    rows = np.array([n - 1, 0, 5, n // 2])  # the last row is padded; rows from different shards
    assert len(train["shards"]) > 1 and train["duplicates"] == 3
    batch = train_bert.read_batch(train, rows, 2, pad)
    assert set(batch) == {"input_ids", "mlm_positions", "mlm_labels", "attention_mask"}
    for slot, row in enumerate(rows):
        shard = np.searchsorted(train["offsets"], row, side="right") - 1
        local = row - train["offsets"][shard]
        ids = np.asarray(train["shards"][shard]["input_ids"][local]).astype(np.int64)
        pos = np.asarray(train["shards"][shard]["mask_positions"][2, local]).astype(np.int64)
        tok = np.asarray(train["shards"][shard]["mask_tokens"][2, local]).astype(np.int64)
        used = pos != 0
        x = ids.copy()
        x[pos[used]] = tok[used]
        assert np.array_equal(batch["input_ids"][slot], x) and batch["input_ids"][slot, 0] == cls
        assert np.array_equal(batch["mlm_labels"][slot][used], ids[pos[used]])
        assert np.all(batch["mlm_labels"][slot][~used] == -100)
        assert np.array_equal(batch["attention_mask"][slot], (ids != pad).astype(np.int64))
    assert batch["attention_mask"][0].min() == 0  # the last row really is padded
    assert "attention_mask" not in train_bert.read_batch(train, rows[1:], 2, pad)  # full rows: no mask


def test_ranks_read_disjoint_slices_of_each_epoch(sharded_wikitext):
    meta, splits, _, _ = train_bert.open_data(sharded_wikitext)
    train = splits["train"]
    cfg = train_bert.TrainConfig(batch=512, micro_batch=64)
    steps_per_epoch = train["sequences"] // 512

    def first_rows(rank, world_size, epoch=0, step=0, count=None):
        """(epoch, step, [micro-batches]) per step; train_batches streams the micro-batches one by one."""
        batches = train_bert.train_batches(train, cfg, 0, rank, world_size, epoch, step, pin_memory=False)
        per_step = cfg.batch // (cfg.micro_batch * world_size)
        items = [next(batches) for _ in range((count or steps_per_epoch) * per_step)]
        return [(items[i][0], items[i][1], [batch for _, _, batch in items[i:i + per_step]])
                for i in range(0, len(items), per_step)]

    one = first_rows(0, 1)
    two = [first_rows(0, 2), first_rows(1, 2)]
    for step in range(steps_per_epoch):
        whole = [mb["input_ids"] for mb in one[step][2]]
        halves = [mb["input_ids"] for mb in two[0][step][2] + two[1][step][2]]
        assert len(whole) == 8 and len(halves) == 8  # micro-batches per rank: 4 each with two ranks
        assert all(torch.equal(a, b) for a, b in zip(whole, halves))  # the same rows, split between ranks
    seen = torch.cat([mb["input_ids"] for item in one for mb in item[2]])
    assert len(torch.unique(seen, dim=0)) == steps_per_epoch * 512  # no row twice in an epoch
    # the next epoch: a new order and the next masking; starting mid-epoch gives the same batches
    epoch1 = first_rows(0, 1, epoch=1, count=2)
    assert epoch1[0][:2] == (1, 0) and not torch.equal(epoch1[0][2][0]["input_ids"], one[0][2][0]["input_ids"])
    assert torch.equal(first_rows(0, 1, epoch=1, step=1, count=1)[0][2][3]["mlm_positions"],
                       epoch1[1][2][3]["mlm_positions"])


# -------------------------------------------------------------------------------------------------
# Training runs (subprocesses, as a user runs them)


@pytest.fixture(scope="module")
def small_wikitext(tmp_path_factory, wikitext_raw, minilm_dir):
    """The first 70 kB of WikiText-2: 110 training rows (6 steps of 16 per epoch), 16 validation rows,
    3 maskings. Small enough that short runs cross epochs."""
    folder = tmp_path_factory.mktemp("prepared")
    with open(wikitext_raw, encoding="utf-8") as f:
        (folder / "small.raw").write_text(f.read(70_000), encoding="utf-8")
    run_script("prepare_data.py", "--input", folder / "small.raw", "--tokenizer",
               os.path.join(minilm_dir, "tokenizer.json"), "--dup-factor", 3, "--val-fraction", 0.1, "--workers", 1,
               "--out", folder / "small")
    meta = json.loads((folder / "small" / "meta.json").read_text())
    assert meta["splits"]["train"]["sequences"] // 16 == 6 and meta["splits"]["val"]["sequences"] > 0
    return str(folder / "small")


@pytest.fixture(scope="module")
def trained_tiny(prepared_wikitext, tmp_path_factory):
    """160 steps of the tiny model on WikiText-2 (2,000 rows): the run several tests inspect."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_train("--data", prepared_wikitext, "--out", out, *TINY, "--batch", 32, "--micro-batch", 32,
                       "--max-steps", 160, "--lr", 1e-2, "--warmup", 0.05, "--log-every", 10, "--peak-tflops", 0.1,
                       "--val-minutes", 100)  # validates at its end only, as it did when 30 minutes was the default
    return str(out), result


def test_loss_falls_on_real_text(trained_tiny):
    out, result = trained_tiny
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(10, 161, 10))
    first, last = np.mean([r["loss"] for r in train[:1]]), np.mean([r["loss"] for r in train[-3:]])
    assert first > 9.5 and last < 7.6, (first, last)  # from ln(30528) = 10.3 to clearly below
    val = records(out, "val")
    assert val and val[-1]["step"] == 160 and val[-1]["val_loss"] < 7.6 and val[-1]["val_accuracy"] > 0.04
    assert all(0 < r["mfu"] < 1 for r in train)  # --peak-tflops makes the MFU appear on CPU
    assert "built-in Lamb" in result.stdout and "precision: fp32" in result.stdout
    assert "stopped (max_steps) at step 160" in result.stdout


def test_checkpoint_loads_for_finetuning(trained_tiny, prepared_wikitext):
    out, _ = trained_tiny
    encoder, tokenizer, pooler, origin = load_pretrained(out)  # the run folder: its latest checkpoint
    assert pooler is None and not encoder.training and isinstance(encoder, BertEncoder)
    with open(os.path.join(prepared_wikitext, "tokenizer.json")) as f:
        assert tokenizer.to_str() == train_bert.Tokenizer.from_str(f.read()).to_str()
    assert tokenizer.encode("hello world").ids == [101, 7592, 2088, 102]
    checkpoint = final_state(out)
    model = BertForMLM(BertConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    input_ids = torch.tensor([tokenizer.encode("the cat sat on the mat").ids])
    with torch.no_grad():
        assert torch.equal(encoder(input_ids), model.encoder(input_ids))
    assert checkpoint["state"]["step"] == 160 and checkpoint["stop_reason"] == "max_steps"
    assert checkpoint["model_config"]["vocab_size"] == 30528  # 30522 padded to a multiple of 8


def test_stops_before_the_deadline_with_a_loadable_checkpoint(small_wikitext, tmp_path):
    budget_s = 10.0
    out = tmp_path / "deadline"
    started = time.time()
    result = run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16,
                       "--hours", budget_s / 3600, "--val-minutes", 0.03)
    wall_s = time.time() - started
    checkpoint = final_state(out)
    assert checkpoint["stop_reason"] == "deadline" and "stopped (deadline)" in result.stdout
    assert checkpoint["state"]["elapsed_s"] < budget_s  # written inside the budget
    assert os.path.getmtime(checkpoints(out)[-1]) < started + budget_s
    assert wall_s < budget_s + 5  # interpreter shutdown only
    train = records(out, "train")
    assert len(train) > 5 and train[-1]["remaining_h"] > 0
    lrs = [r["lr"] for r in train]  # the clock's schedule: the run starts after warmup (0.6 s) has passed
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 2 * lrs[-1] and lrs[-1] < 0.3e-3
    assert records(out, "val")  # --val-minutes 0.03: validated every 2 s
    assert records(out, "val")[-1]["step"] == checkpoint["state"]["step"]  # and at the end, inside the budget
    load_pretrained(str(out))


def test_resume_after_sigterm_equals_uninterrupted_run(small_wikitext, tmp_path):
    """Stopped by SIGTERM anywhere, then resumed: the same parameters as one uninterrupted run, with
    dropout on, across epochs and maskings (6 steps per epoch)."""
    common = ["--data", small_wikitext, *TINY, "--batch", 16, "--micro-batch", 8, "--max-steps", 20]
    run_train("--out", tmp_path / "straight", *common)

    stopped = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, TRAIN, "--out", str(stopped), *map(str, common)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    metrics = stopped / "metrics.jsonl"
    while process.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "stopped (signal)" in stdout and f"--resume {stopped}" in stdout
    interrupted = final_state(stopped)
    assert 3 <= interrupted["state"]["step"] < 20 and interrupted["stop_reason"] == "signal"

    result = run_train("--out", stopped, *common, "--resume", stopped)
    assert f"at step {interrupted['state']['step']}" in result.stdout.splitlines()[0]
    straight, resumed = final_state(tmp_path / "straight"), final_state(stopped)
    assert resumed["state"]["step"] == 20 and resumed["state"]["epoch"] == 3
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    steps = [r["step"] for r in records(stopped, "train")]
    assert steps == list(range(1, 21))  # the log continues, no step twice
    assert [r["loss"] for r in records(stopped, "train")] == [r["loss"] for r in records(tmp_path / "straight", "train")]


def test_ctrl_c_stops_with_a_checkpoint(small_wikitext, tmp_path):
    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, TRAIN, "--data", small_wikitext, "--out", str(out), *TINY,
                                "--batch", "16", "--micro-batch", "16", "--hours", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    while process.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stdout + stderr
    assert "stopped (signal)" in stdout and final_state(out)["stop_reason"] == "signal"
    assert records(out, "val")[-1]["step"] == final_state(out)["state"]["step"]  # validated at the end too


def test_torchrun_two_processes_equal_one_with_accumulation(small_wikitext, tmp_path):
    common = ["--data", small_wikitext, *TINY, "--batch", 32, "--micro-batch", 16, "--max-steps", 4,
              "--dropout", 0, "--attention-dropout", 0]
    single = run_train("--out", tmp_path / "one", *common)
    assert "1 process(es) x 2 micro-batches of 16" in single.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             TRAIN, "--out", str(tmp_path / "two"), *map(str, common)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) x 1 micro-batches of 16" in result.stdout
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert len(two["rng"]) == 2
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    losses_one = [r["loss"] for r in records(tmp_path / "one", "train")]
    losses_two = [r["loss"] for r in records(tmp_path / "two", "train")]
    assert len(losses_one) == 4 and losses_one == pytest.approx(losses_two, rel=1e-5)
    val_one, val_two = records(tmp_path / "one", "val")[-1], records(tmp_path / "two", "val")[-1]
    assert val_one["val_loss"] == pytest.approx(val_two["val_loss"], rel=1e-5)  # reduced over both ranks


def test_checkpoints_are_kept_atomically(small_wikitext, tmp_path):
    """--checkpoint-minutes 0 writes one every step; the last three stay, no temporary file is left."""
    out = tmp_path / "often"
    run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16, "--max-steps", 5,
              "--checkpoint-minutes", 0)
    assert [os.path.basename(p) for p in checkpoints(out)] == ["step-00000003.pt", "step-00000004.pt", "step-00000005.pt"]
    assert not glob.glob(os.path.join(out, "checkpoints", "*.tmp"))


def test_seed_and_model_flags(small_wikitext, tmp_path):
    common = ["--data", small_wikitext, *TINY, "--batch", 16, "--micro-batch", 16, "--max-steps", 2,
              "--num-heads", 4, "--intermediate-size", 128]
    for seed in (0, 1):
        run_train("--out", tmp_path / f"seed{seed}", "--seed", seed, *common)
    zero, one = final_state(tmp_path / "seed0"), final_state(tmp_path / "seed1")
    assert zero["model_config"]["num_heads"] == 4 and zero["model_config"]["intermediate_size"] == 128
    assert zero["model"]["encoder.layers.0.ffn_in.weight"].shape == (128, 64)
    assert not torch.equal(zero["model"]["encoder.word_embeddings.weight"], one["model"]["encoder.word_embeddings.weight"])
    assert records(tmp_path / "seed0", "train")[0]["loss"] != records(tmp_path / "seed1", "train")[0]["loss"]


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "fp16"], ["--pre-ln", "false"],
                                   ["--optimizer", "adamw"]])
def test_other_settings_train(small_wikitext, tmp_path, flags):
    out = tmp_path / "run"
    result = run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16,
                       "--max-steps", 8, "--lr", 1e-2 if "--optimizer" not in flags else 1e-3, "--warmup", 0, *flags)
    losses = [r["loss"] for r in records(out, "train")]
    assert len(losses) == 8 and all(np.isfinite(losses)) and np.mean(losses[-2:]) < losses[0] - 0.1, losses
    checkpoint = final_state(out)
    assert checkpoint["state"]["skipped_steps"] == 0
    if "--pre-ln" in flags:
        assert checkpoint["model_config"]["pre_ln"] is False
        assert load_pretrained(str(out))[0].final_norm is None
    if "--precision" in flags:
        assert f"precision: {flags[1]}" in result.stdout
        assert all(v.dtype == torch.float32 for v in checkpoint["model"].values())  # fp32 master weights
    if flags == ["--precision", "fp16"]:
        assert checkpoint["scaler"]["scale"] > 0  # the GradScaler's state is checkpointed
    if "--optimizer" in flags:
        assert "torch AdamW (fused)" in result.stdout


def test_compile(small_wikitext, tmp_path):
    out = tmp_path / "compiled"
    run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16, "--max-steps", 2,
              "--num-layers", 1, "--compile")
    losses = [r["loss"] for r in records(out, "train")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert not any(k.startswith("_orig_mod") for k in final_state(out)["model"])


def test_nonfinite_steps_are_skipped_then_stop_the_run(small_wikitext, tmp_path):
    """An absurd learning rate blows the weights up: the non-finite steps never reach the weights,
    and after ten in a row the run stops with a checkpoint and a clear message."""
    out = tmp_path / "nan"
    result = run_train("--data", small_wikitext, "--out", out, *TINY, "--batch", 16, "--micro-batch", 16,
                       "--max-steps", 100, "--optimizer", "adamw", "--lr", 1e30, "--warmup", 0, check=False)
    assert_user_error(result, "10 steps in a row had a non-finite loss, gradient or update", "lower --lr")
    checkpoint = final_state(out)
    assert checkpoint["stop_reason"] == "nonfinite" and checkpoint["state"]["skipped_steps"] >= 10
    assert checkpoint["state"]["step"] < 100
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


# -------------------------------------------------------------------------------------------------
# Bad input: one clear line on stderr, a non-zero exit, no traceback


def user_error(*args):
    """The message train_bert.py exits with, run in this process (each case fails before training)."""
    with pytest.raises(SystemExit) as exit_info:
        train_bert.main([*map(str, args)])
    return str(exit_info.value.code)


def set_format_version(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["format_version"] = 2
    (folder / "meta.json").write_text(json.dumps(meta))


def truncate_a_shard(folder):
    np.save(folder / "train-00000-mask_tokens.npy", np.load(folder / "train-00000-mask_tokens.npy")[:, :10])


@pytest.mark.parametrize("breakage, phrase", [
    (lambda folder: (folder / "meta.json").unlink(), "meta.json is missing"),
    (lambda folder: (folder / "meta.json").write_text("{"), "meta.json cannot be read"),
    (set_format_version, "meta.json has format_version 2, this script reads 1"),
    (lambda folder: (folder / "meta.json").write_text('{"format_version": 1, "seq_len": 128}'),
     "meta.json lacks vocab_size, special_token_ids, max_predictions, splits"),
    (lambda folder: (folder / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda folder: (folder / "val-00000-input_ids.npy").unlink(), "val-00000-input_ids.npy cannot be read"),
    (truncate_a_shard, "train-00000-mask_tokens.npy holds uint16 [3, 10, 20], meta.json lists uint16 [3, 110, 20]"),
])
def test_incomplete_data_directory(small_wikitext, tmp_path, breakage, phrase):
    folder = tmp_path / "data"
    shutil.copytree(small_wikitext, folder)
    breakage(folder)
    message = user_error("--data", folder, "--out", tmp_path / "out", *TINY)
    assert message.startswith(f"train_bert.py: error: data directory {folder} is incomplete: {phrase}")
    assert message.endswith("; run prepare_data.py again")


def test_bad_command_lines(small_wikitext, tmp_path):
    data = ["--data", small_wikitext, *TINY]
    run = tmp_path / "run"
    run_train(*data, "--out", run, "--batch", 16, "--micro-batch", 16, "--max-steps", 1)
    cases = [
        (["--data", tmp_path / "nowhere", "--out", tmp_path / "a"], "does not exist; create it with prepare_data.py"),
        ([*data, "--out", tmp_path / "b", "--batch", 100, "--micro-batch", 32],
         "--batch 100 does not divide into 1 process(es) x --micro-batch 32; pass a --batch that is a multiple of 32"),
        ([*data, "--out", tmp_path / "c", "--batch", 128, "--micro-batch", 32], "fewer than one --batch of 128"),
        ([*data, "--out", tmp_path / "d", "--batch", 16, "--micro-batch", 16, "--resume", run, "--hidden-size", 32],
         "holds a different model (hidden_size 64 (now 32))"),
        ([*data, "--out", tmp_path / "e", "--batch", 32, "--micro-batch", 16, "--resume", run],
         "was trained with --batch 16"),
        ([*data, "--out", tmp_path / "f", "--batch", 16, "--micro-batch", 16, "--resume", tmp_path / "f"],
         "cannot resume: no checkpoint found"),
        ([*data, "--out", run, "--batch", 16, "--micro-batch", 16], f"already holds checkpoints; pass --resume {run}"),
    ]
    (tmp_path / "half.partial").mkdir()
    cases.append((["--data", tmp_path / "half", "--out", tmp_path / "g"],
                  f"is incomplete: only {tmp_path / 'half'}.partial exists, so prepare_data.py is still running"))
    for args, phrase in cases:
        message = user_error(*args)
        assert message.startswith("train_bert.py: error: ") and phrase in message, message
    # as a user sees it: one line on stderr, exit status 1, no traceback
    for args, phrase in cases[:2]:
        result = run_train(*args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [user_error(*args)]
