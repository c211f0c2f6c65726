"""train_bert.py --init-from (a second phase at another length, LANS's and BERT's two-phase recipe) and
--export-hf (a checkpoint as a folder that stock transformers loads), on WikiText-2 prepared at 32 and
64 tokens with the bert-base-uncased vocabulary."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from test_train_bert import TINY, records, run_train, user_error

sys.path.insert(0, REPO)
import train_bert  # noqa: E402

PHASE = [*TINY, "--batch", 32, "--micro-batch", 32, "--log-every", 5]


@pytest.fixture(scope="module")
def text_at(tmp_path_factory, wikitext_raw, minilm_dir):
    """{seq_len: data folder}: the first 300 kB of WikiText-2 at 32 and at 64 tokens, one tokenizer."""
    folder = tmp_path_factory.mktemp("phases")
    with open(wikitext_raw, encoding="utf-8") as f:
        (folder / "text.raw").write_text(f.read(300_000), encoding="utf-8")
    tokenizer = os.path.join(minilm_dir, "tokenizer.json")
    for seq_len in (32, 64):
        run_script("prepare_data.py", "--input", folder / "text.raw", "--tokenizer", tokenizer, "--seq-len", seq_len,
                   "--max-predictions", seq_len // 6, "--dup-factor", 3, "--val-fraction", 0.05, "--workers", 1,
                   "--out", folder / f"len{seq_len}")
        tokenizer = folder / f"len{seq_len}" / "tokenizer.json"  # phase 2 data: phase 1's tokenizer
    return {32: str(folder / "len32"), 64: str(folder / "len64")}


@pytest.fixture(scope="module")
def phase1(text_at, tmp_path_factory):
    """150 steps of the tiny pre-LN model at 32 tokens: the loss falls from 10.3 to about 7.4."""
    out = tmp_path_factory.mktemp("runs") / "phase1"
    run_train("--data", text_at[32], "--out", out, *PHASE, "--max-steps", 150, "--lr", 1e-2, "--warmup", 0.05)
    return str(out)


def losses(out):
    return [r["loss"] for r in records(out, "train")]


def test_phase2_at_64_tokens_starts_where_phase1_ended_and_keeps_learning(text_at, phase1, tmp_path):
    common = ["--data", text_at[64], *PHASE, "--max-steps", 40, "--lr", 5e-3, "--warmup", 0.1]
    result = run_train(*common, "--out", tmp_path / "phase2", "--init-from", phase1)
    assert "initialised from" in result.stdout and "(step 150): 32 -> 64 positions; optimizer moments start from " \
                                                  "zero" in result.stdout
    run_train(*common[:-4], "--max-steps", 5, "--lr", 5e-3, "--out", tmp_path / "fresh")
    phase2, fresh = losses(tmp_path / "phase2"), losses(tmp_path / "fresh")
    assert phase2[0] < fresh[0] - 2.0, (phase2, fresh)  # fresh: ln(30528) = 10.3; phase 2 starts near 7.3
    assert np.mean(phase2[-2:]) < phase2[0] - 0.1, phase2  # and goes on learning at the new length
    final = train_bert.load_checkpoint(str(tmp_path / "phase2"))[1]
    assert final["model_config"]["max_positions"] == 64 and final["train_config"]["init_from"] == phase1


def test_init_from_keeps_the_learned_positions_and_draws_the_new_ones(text_at, phase1):
    """In one process: the first 32 rows and every other weight are phase 1's, the 32 new rows are drawn
    as BERT initialises weights, and --init-optimizer carries the moments, with zeros for the new rows."""
    _, old, _ = train_bert.load_checkpoint(phase1)
    config = train_bert.BertConfig(**{**old["model_config"], "max_positions": 64})
    model = train_bert.BertForMLM(config)
    cfg = train_bert.TrainConfig(data=text_at[64], model="tiny", init_from=phase1, init_optimizer=True, seed=3)
    optimizer, _ = train_bert.make_optimizer(model, cfg, torch.device("cpu"))
    with open(os.path.join(text_at[64], "tokenizer.json")) as f:
        train_bert.init_from(cfg, model, optimizer, config, f.read(), rank=1)  # rank 1: silent
    name = "encoder.position_embeddings.weight"
    positions = model.state_dict()[name]
    assert torch.equal(positions[:32], old["model"][name])
    assert abs(positions[32:].std().item() - 0.02) < 0.002 and abs(positions[32:].mean().item()) < 0.002
    assert not torch.equal(positions[32:], train_bert.resize_positions(old["model"][name], 64, 4)[32:])  # seeded
    for key, value in old["model"].items():
        if key != name:
            assert torch.equal(model.state_dict()[key], value), key
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index = [id(p) for p in params].index(id(model.encoder.position_embeddings.weight))
    moments = optimizer.state_dict()["state"][index]
    assert torch.equal(moments["exp_avg"][:32], old["optimizer"]["state"][index]["exp_avg"])
    assert moments["exp_avg"][32:].abs().max() == 0 and moments["exp_avg_sq"][32:].abs().max() == 0
    assert optimizer.param_groups[0]["step"] == old["optimizer"]["param_groups"][0]["step"] == 150
    assert torch.equal(train_bert.resize_positions(positions, 16, 0), positions[:16])  # shorter data: first rows


def test_init_from_refuses_what_does_not_fit(text_at, phase1, tmp_path):
    common = ["--data", text_at[64], "--out", tmp_path / "out", *PHASE, "--max-steps", 2, "--init-from", phase1]
    message = user_error(*common, "--hidden-size", 32, "--num-heads", 2)
    assert "holds a different model (hidden_size 64 (now 32)); pass its --model and model flags (only the sequence " \
           "length may change)" in message
    message = user_error(*common, "--init-optimizer", "--optimizer", "adamw")
    assert "--init-optimizer needs a checkpoint of the same --optimizer adamw; " in message and message.endswith("lamb")
    message = user_error(*common[:-1], tmp_path / "nothing-here")
    assert "cannot start from --init-from: no checkpoint found at" in message
    assert not os.path.exists(tmp_path / "out" / "checkpoints" / "step-00000002.pt")


# -------------------------------------------------------------------------------------------------
# Export to Hugging Face


@pytest.fixture(scope="module")
def post_ln_run(text_at, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "post_ln"
    run_train("--data", text_at[32], "--out", out, *PHASE, "--max-steps", 30, "--lr", 1e-2, "--pre-ln", "false")
    return str(out)


SENTENCES = [("The tower is 324 metres tall, about the same height as an 81-storey building.",
              "It was the tallest man-made structure in the world for 41 years."),
             ("Robert Boulter is an English film, television and theatre actor.", None),
             ("Hello world!", "A short one.")]


@pytest.mark.parametrize("layout", ["pre-LN", "post-LN"])
def test_export_loads_in_stock_transformers_with_the_same_logits(phase1, post_ln_run, tmp_path, layout):
    transformers = pytest.importorskip("transformers")
    run = phase1 if layout == "pre-LN" else post_ln_run
    folder = tmp_path / "hf"
    result = run_script("train_bert.py", "--export-hf", run, folder)
    expected = "RobertaPreLayerNormForMaskedLM" if layout == "pre-LN" else "BertForMaskedLM"
    assert result.stdout.startswith(f"wrote {folder}: {expected} from ")
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == expected and not any(info.values()), info  # no key missing or left over
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    _, checkpoint, _ = train_bert.load_checkpoint(run)
    ours = train_bert.BertForMLM(train_bert.BertConfig(**checkpoint["model_config"]))
    ours.load_state_dict(checkpoint["model"])
    our_tokenizer = train_bert.checkpoint_tokenizer(checkpoint)
    for a, b in SENTENCES:  # the same ids and segments, for single sentences and pairs
        theirs = tokenizer(a, b) if b else tokenizer(a)
        mine = our_tokenizer.encode(a, b) if b else our_tokenizer.encode(a)
        assert theirs["input_ids"] == mine.ids and theirs["token_type_ids"] == mine.type_ids
    batch = tokenizer([a for a, _ in SENTENCES], [b or "" for _, b in SENTENCES], padding=True, truncation=True,
                      return_tensors="pt")
    real = batch["attention_mask"].bool()
    assert (~real).any()  # padded rows: the comparison covers the mask
    with torch.no_grad():
        their_logits = model.eval()(**batch).logits
        our_logits = ours.eval().predict(ours.encoder(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]))
    assert their_logits.shape == our_logits.shape == (3, 32, 30528)
    assert (their_logits - our_logits)[real].abs().max() <= 1e-4
    if layout == "post-LN":
        assert (their_logits - our_logits).abs().max() <= 1e-4  # padded positions too
    # and back: load_pretrained reads the exported folder as the same encoder and tokenizer
    encoder, tokenizer_back, _, origin = train_bert.load_pretrained(str(folder))
    assert origin["weights_sha256"] == train_bert.load_pretrained(run)[3]["weights_sha256"]
    assert encoder.config.pre_ln == (layout == "pre-LN") and encoder.config.max_positions == 32
    assert tokenizer_back.to_str() == our_tokenizer.to_str()


@pytest.mark.parametrize("layout", ["pre-LN", "post-LN"])
def test_finetune_glue_reads_both_exported_layouts(phase1, post_ln_run, tmp_path, layout, monkeypatch):
    glue = os.path.join(os.path.dirname(REPO), "shared", "data", "glue")
    if not os.path.isdir(glue):
        pytest.skip("real GLUE files not found beside the repo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = tmp_path / "hf"
    run_script("train_bert.py", "--export-hf", phase1 if layout == "pre-LN" else post_ln_run, folder)
    result = run_script("finetune_glue.py", "--checkpoint", folder, "--task", "rte", "--glue-dir", glue, "--lr", 1e-4,
                        "--batch", 32, "--epochs", 1, "--seeds", 1, "--max-train-examples", 64, "--out", tmp_path / "glue")
    results = json.loads((tmp_path / "glue" / "results.json").read_text())
    assert len(results["runs"]) == 1 and 0 <= results["runs"][0]["score"] <= 100, result.stdout


def test_export_refuses_a_used_folder_and_a_non_checkpoint(phase1, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    message = user_error("--export-hf", phase1, tmp_path / "used")
    assert message == f"train_bert.py: error: cannot export: {tmp_path / 'used'} already exists; choose a new folder to export to"
    message = user_error("--export-hf", tmp_path / "nothing", tmp_path / "new")
    assert "cannot export: no checkpoint found at" in message and not (tmp_path / "new").exists()



def test_init_from_checks_everything_before_writing_anything(text_at, phase1, tmp_path):
    out = tmp_path / "out"
    common = ["--data", text_at[64], "--out", out, *PHASE, "--max-steps", 2]
    assert user_error(*common, "--init-optimizer") == ("train_bert.py: error: --init-optimizer carries the moments of "
                                                       "--init-from's checkpoint; pass --init-from too")
    file, checkpoint, _ = train_bert.load_checkpoint(phase1)
    next(iter(checkpoint["optimizer"]["state"].values()))["exp_avg"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan-moments.pt")
    message = user_error(*common, "--init-from", tmp_path / "nan-moments.pt", "--init-optimizer")
    assert message.startswith(f"train_bert.py: error: --init-optimizer: {tmp_path / 'nan-moments.pt'} holds ")
    assert "not finite" in message and message.endswith("leave out --init-optimizer, or start from another checkpoint")
    message = user_error(*common, "--init-from", phase1, "--hidden-size", 32, "--num-heads", 2)
    assert "holds a different model" in message
    assert not out.exists()  # refused before --out was made


def test_export_refuses_what_transformers_could_not_use(phase1, tmp_path):
    message = user_error("--export-hf", phase1, " ")
    assert message == "train_bert.py: error: cannot export: the folder to export to must be named, not empty"
    run_script("train_bert.py", "--export-hf", phase1, tmp_path / "hf")
    message = user_error("--export-hf", tmp_path / "hf", tmp_path / "again")
    assert message == (f"train_bert.py: error: cannot export: {tmp_path / 'hf'} is a Hugging Face folder already; "
                       f"--export-hf takes a train_bert.py checkpoint")
    file, checkpoint, _ = train_bert.load_checkpoint(phase1)
    checkpoint["tokenizer_json"] = checkpoint["tokenizer_json"].replace('"[MASK]"', '"[MSK]"')
    torch.save(checkpoint, tmp_path / "no-mask.pt")
    message = user_error("--export-hf", tmp_path / "no-mask.pt", tmp_path / "new")
    assert message == (f"train_bert.py: error: cannot export: the tokenizer of {tmp_path / 'no-mask.pt'} has no [MASK] "
                       f"token, which a Hugging Face MLM needs")
    assert not (tmp_path / "again").exists() and not (tmp_path / "new").exists()


def test_export_to_a_full_disk_leaves_no_partial_folder(phase1, tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ValueError) as error:
        train_bert.export_hugging_face(phase1, str(tmp_path / "hf"))
    assert str(error.value) == (f"cannot write {tmp_path / 'hf'} (OSError: [Errno 28] No space left on device); "
                                f"is the disk full?")
    assert os.listdir(tmp_path) == []
