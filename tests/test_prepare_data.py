"""prepare_data.py on real WikiText-2 text and on small synthetic edge cases."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import REPO, run_script

sys.path.insert(0, REPO)
import prepare_data  # noqa: E402


def load_split(folder, split):
    """All shards of one split as (meta, input_ids, mask_positions, mask_tokens) in memory."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    shards = meta["splits"][split]["shards"]
    arrays = {}
    for name, axis in (("input_ids", 0), ("mask_positions", 1), ("mask_tokens", 1)):
        parts = []
        for shard in shards:
            array = np.load(os.path.join(folder, shard[name]["file"]), mmap_mode="r")
            assert list(array.shape) == shard[name]["shape"] and str(array.dtype) == shard[name]["dtype"]
            parts.append(np.asarray(array))
        arrays[name] = np.concatenate(parts, axis=axis)
    return meta, arrays["input_ids"], arrays["mask_positions"], arrays["mask_tokens"]


def text_stream(input_ids, special):
    """The non-special ids of all rows, in order: what the corpus becomes once [CLS]/[SEP]/[PAD] go."""
    flat = input_ids.reshape(-1).astype(np.int64)
    return flat[~np.isin(flat, special)]


def assign_to_streams(doc_ids, streams):
    """Which stream ("train" or "val") each document continues, found by depth-first search (a
    repeated heading can continue both); None if the documents cannot be laid out that way."""
    choice = []  # (split, other split still to try)
    pointer = {"train": 0, "val": 0}
    i = 0
    while i < len(doc_ids):
        options = [s for s in ("val", "train") if streams[s][pointer[s]:pointer[s] + len(doc_ids[i])] == doc_ids[i]]
        while not options:  # dead end: undo to the last document that could go either way
            if not choice:
                return None
            i -= 1
            split, alternatives = choice.pop()
            pointer[split] -= len(doc_ids[i])
            options = alternatives
        pointer[options[0]] += len(doc_ids[i])
        choice.append((options[0], options[1:]))
        i += 1
    return [split for split, _ in choice]


# ----------------------------------------------------------------------------- real text

def test_real_text_counts_and_format(prepared_wikitext):
    meta, input_ids, positions, tokens = load_split(prepared_wikitext, "train")
    assert meta["format_version"] == 1 and meta["seq_len"] == 128 and meta["vocab_size"] == 30522
    assert input_ids.dtype == np.uint16 and positions.dtype == np.uint8 and tokens.dtype == np.uint16
    assert positions.shape == (10, len(input_ids), 20) == tokens.shape
    assert meta["splits"]["train"]["sequences"] == len(input_ids) > 2000
    assert meta["splits"]["val"]["duplicates"] == 1 and meta["splits"]["val"]["sequences"] > 20
    ids = meta["special_token_ids"]
    assert (input_ids[:, 0] == ids["cls"]).all()
    # every row ends with [SEP] followed only by padding, and padding is rare
    padding = input_ids == ids["pad"]
    assert padding.mean() < 0.005
    last_real = 127 - np.argmax(~padding[:, ::-1], axis=1)
    assert (input_ids[np.arange(len(input_ids)), last_real] == ids["sep"]).all()
    assert meta["bytes_per_sequence_per_duplicate"] <= 90


def test_masking_statistics_on_real_text(prepared_wikitext):
    meta, input_ids, positions, tokens = load_split(prepared_wikitext, "train")
    ids = meta["special_token_ids"]
    special = list(ids.values())
    used = positions != 0
    rows = np.broadcast_to(np.arange(len(input_ids))[None, :, None], positions.shape)
    original = input_ids[rows, positions]  # the labels: the original ids at the masked positions
    maskable = (~np.isin(input_ids, special)).sum()
    masked_fraction = used.sum() / (maskable * 10)
    assert 0.14 <= masked_fraction <= 0.16, masked_fraction
    assert used.sum(axis=-1).max() <= 20
    assert not np.isin(original[used], special).any(), "a special or padding token was masked"
    assert not np.isin(tokens[used], [ids["cls"], ids["sep"], ids["pad"]]).any()
    assert (tokens[~used] == 0).all()
    kinds = {"mask": (tokens[used] == ids["mask"]).mean(), "kept": (tokens[used] == original[used]).mean()}
    kinds["random"] = 1 - kinds["mask"] - kinds["kept"]
    assert abs(kinds["mask"] - 0.8) < 0.02 and abs(kinds["kept"] - 0.1) < 0.02 and abs(kinds["random"] - 0.1) < 0.02, kinds
    # positions ascending and distinct within a row; the duplicates mask differently
    p = positions.astype(int)
    assert ((np.diff(p, axis=-1) > 0) | ~used[..., 1:]).all()
    assert (positions[0] != positions[1]).any(axis=-1).mean() > 0.99


def test_rows_decode_back_to_the_source_and_splits_are_disjoint(prepared_wikitext, wikitext_raw):
    tokenizer = Tokenizer.from_file(os.path.join(prepared_wikitext, "tokenizer.json"))
    meta, train_ids, _, _ = load_split(prepared_wikitext, "train")
    _, val_ids, _, _ = load_split(prepared_wikitext, "val")
    ids_of = meta["special_token_ids"]
    special = [ids_of["cls"], ids_of["sep"], ids_of["pad"]]  # structure; [UNK] is text the tokenizer could not spell
    streams = {"train": text_stream(train_ids, special).tolist(), "val": text_stream(val_ids, special).tolist()}

    # Walk the source documents in order: each must continue exactly one of the two streams, so
    # every document is in exactly one split, whole, in order, and nothing else is in either.
    with open(wikitext_raw, encoding="utf-8") as f:
        documents = [line.strip() for line in f if line.strip()]
    doc_ids = [tokenizer.encode(doc, add_special_tokens=False).ids for doc in documents]
    splits = assign_to_streams(doc_ids, streams)
    assert splits is not None, "the splits are not the source documents, whole and in order"
    seen = {s: [d for d, split in zip(documents, splits) if split == s] for s in ("train", "val")}
    pointer = {s: sum(len(i) for i, split in zip(doc_ids, splits) if split == s) for s in ("train", "val")}
    assert pointer == {"train": len(streams["train"]), "val": len(streams["val"])}, "tokens that are in no document"
    assert len(seen["val"]) == meta["splits"]["val"]["documents"] and len(seen["train"]) == meta["splits"]["train"]["documents"]
    # headings such as " = = Reception = = " repeat across articles; any other text is in one split only
    repeated = {d for d in documents if documents.count(d) > 1} if len(seen["val"]) < 500 else set()
    assert not (set(seen["val"]) - repeated) & set(seen["train"])

    # The unmasked rows decode to the source text, lower-cased and accent-stripped as the tokenizer
    # does (documents with an [UNK] cannot decode to their source and are left out).
    start, checked = 0, 0
    for doc, ids, split in zip(documents, doc_ids, splits):
        if split == "train":
            from_rows = streams["train"][start:start + len(ids)]
            start += len(ids)
            if ids_of["unk"] not in from_rows:
                decoded = tokenizer.decode(from_rows)
                assert "".join(decoded.split()) == "".join(tokenizer.normalizer.normalize_str(doc).split())
                checked += 1
    assert checked > 0.9 * len(seen["train"])


def test_worker_count_never_changes_a_byte(prepared_wikitext, wikitext_raw, minilm_dir, tmp_path):
    run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
               "--val-fraction", "0.05", "--workers", "1", "--out", tmp_path / "one")
    names = sorted(os.listdir(prepared_wikitext))
    assert names == sorted(os.listdir(tmp_path / "one"))
    match, mismatch, errors = filecmp.cmpfiles(prepared_wikitext, tmp_path / "one", names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) >= 8


def test_rerun_is_a_no_op_and_other_settings_are_refused(prepared_wikitext, wikitext_raw, minilm_dir):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    before = os.path.getmtime(os.path.join(prepared_wikitext, "meta.json"))
    same = run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", vocab, "--val-fraction", "0.05",
                      "--out", prepared_wikitext)
    assert "nothing to do" in same.stdout
    assert os.path.getmtime(os.path.join(prepared_wikitext, "meta.json")) == before
    other = run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", vocab, "--val-fraction", "0.05",
                       "--seq-len", "64", "--out", prepared_wikitext, check=False)
    assert other.returncode != 0 and "seq_len" in other.stderr and "Traceback" not in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- sources and tokenizers

DOCS = ["The quick brown fox jumps over the lazy dog.", "A second document, with a comma and more words in it.",
        "Short one.", "The last document of this small corpus talks about masking tokens for BERT."] * 30


def test_text_jsonl_parquet_folder_and_glob_inputs_agree(tmp_path, minilm_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab = os.path.join(minilm_dir, "vocab.txt")
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "a.txt").write_text("\n".join(DOCS[:60]) + "\n")
    (tmp_path / "lines" / "b.txt").write_text("\n\n".join(DOCS[60:]) + "\n")
    (tmp_path / "blank.txt").write_text("\n\n".join(d.replace(", ", ",\n") for d in DOCS) + "\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    common = ["--tokenizer", vocab, "--seq-len", "32", "--dup-factor", "2", "--val-fraction", "0", "--workers", "1"]
    run_script("prepare_data.py", "--input", tmp_path / "lines", *common, "--out", tmp_path / "o_folder")
    run_script("prepare_data.py", "--input", tmp_path / "lines" / "*.txt", *common, "--out", tmp_path / "o_glob")
    run_script("prepare_data.py", "--input", tmp_path / "blank.txt", "--doc-sep", "blank", *common, "--out", tmp_path / "o_blank")
    run_script("prepare_data.py", "--input", tmp_path / "c.jsonl", *common, "--out", tmp_path / "o_jsonl")
    run_script("prepare_data.py", "--input", tmp_path / "d.parquet", *common, "--out", tmp_path / "o_parquet")
    reference = np.load(tmp_path / "o_jsonl" / "train-00000-input_ids.npy")
    for name in ("o_folder", "o_glob", "o_blank", "o_parquet"):
        assert np.array_equal(np.load(tmp_path / name / "train-00000-input_ids.npy"), reference), name
    meta = json.load(open(tmp_path / "o_jsonl" / "meta.json"))
    assert meta["splits"]["train"]["documents"] == len(DOCS)
    # one [SEP] between consecutive documents, no token dropped: the rows hold every document in order
    tokenizer = Tokenizer.from_file(str(tmp_path / "o_jsonl" / "tokenizer.json"))
    body = reference[:, 1:].reshape(-1)
    expected = []
    for d in DOCS:
        expected += tokenizer.encode(d, add_special_tokens=False).ids + [102]
    kept = body[body != 0].tolist()
    kept = [t for i, t in enumerate(kept) if not (t == 102 and (i + 1) % 31 == 0)]  # drop each row's closing [SEP]
    assert [t for t in kept if t != 102] == [t for t in expected if t != 102]


def test_shards_split_a_large_output(tmp_path, minilm_dir, wikitext_raw):
    run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
               "--dup-factor", "3", "--shard-size", "500", "--out", tmp_path / "o")
    meta, input_ids, positions, _ = load_split(tmp_path / "o", "train")
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) >= 3 and sum(s["sequences"] for s in shards) == len(input_ids) == positions.shape[1]
    assert all(s["sequences"] >= 500 for s in shards[:-1])


def test_long_sequences_use_wide_positions(tmp_path, minilm_dir, wikitext_raw):
    run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", os.path.join(minilm_dir, "tokenizer.json"),
               "--seq-len", "512", "--max-predictions", "80", "--dup-factor", "1", "--out", tmp_path / "o")
    meta, input_ids, positions, tokens = load_split(tmp_path / "o", "train")
    assert positions.dtype == np.uint16 and positions.max() > 255 and input_ids.shape[1] == 512
    assert 0.14 <= (positions != 0).sum() / (~np.isin(input_ids, list(meta["special_token_ids"].values()))).sum() <= 0.16


def test_demo_corpus_with_a_trained_tokenizer(tmp_path):
    args = ["--demo", "--dup-factor", "2", "--workers", "2"]
    first = run_script("prepare_data.py", *args, "--train-tokenizer", "--vocab-size", "2000", "--out", tmp_path / "a")
    meta = json.load(open(tmp_path / "a" / "meta.json"))
    assert meta["vocab_size"] == 2000 and meta["sources"][0]["kind"] == "python-stdlib-docstrings"
    assert meta["splits"]["train"]["tokens"] > 200_000, "the demo corpus should be a few hundred thousand tokens"
    assert meta["splits"]["val"]["documents"] > 20
    assert "done in" in first.stdout
    tokenizer = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    assert [tokenizer.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.encode("Return the value of the attribute.").tokens[:4] == ["[CLS]", "return", "the", "value"]
    # the same corpus, tokenizer and seed give the same bytes (the trained tokenizer is reused as a file)
    run_script("prepare_data.py", *args, "--tokenizer", tmp_path / "a" / "tokenizer.json", "--out", tmp_path / "b")
    arrays = sorted(n for n in os.listdir(tmp_path / "a") if n.endswith(".npy"))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", arrays, shallow=False)
    assert len(match) == 6 and mismatch == [] and errors == []


def test_mask_sequences_edge_cases():
    """Short rows, rows of specials only, and a row with fewer maskable tokens than max_predictions."""
    is_special = np.zeros(50, dtype=bool)
    is_special[[0, 1, 2, 3, 4]] = True  # pad unk cls sep mask
    rows = np.array([[2, 10, 11, 3, 0, 0, 0, 0],   # 2 maskable tokens -> 1 masked (at least one)
                     [2, 3, 0, 0, 0, 0, 0, 0],     # nothing maskable -> nothing masked
                     [2, 10, 11, 12, 13, 14, 15, 3]])
    rng = np.random.default_rng(0)
    positions, tokens = prepare_data.mask_sequences(rows, 200, rng, is_special, 4, np.arange(5, 50), 0.15, 3)
    used = positions != 0
    assert (used[:, 0].sum(-1) == 1).all() and not used[:, 1].any() and (used[:, 2].sum(-1) == 1).all()
    assert set(positions[:, 0][used[:, 0]]) == {1, 2} and set(positions[:, 2][used[:, 2]]) == set(range(1, 7))
    with_many = prepare_data.mask_sequences(np.full((4, 200), 20), 3, rng, is_special, 4, np.arange(5, 50), 0.5, 10)[0]
    assert ((with_many != 0).sum(-1) == 10).all()  # capped at max_predictions


# ----------------------------------------------------------------------------- bad input

def assert_clean_failure(result, out, *words):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial"), "something was left half-written"


def test_bad_input_gets_one_clear_error_line(tmp_path, minilm_dir):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    out = tmp_path / "out"
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    no_mask = tmp_path / "no_mask_vocab.txt"
    no_mask.write_text("\n".join(t for t in open(vocab).read().splitlines() if t != "[MASK]") + "\n")
    assert_clean_failure(run_script("prepare_data.py", "--input", tmp_path / "missing.txt", "--tokenizer", vocab,
                                    "--out", out, check=False), out, "missing.txt")
    assert_clean_failure(run_script("prepare_data.py", "--input", empty, "--tokenizer", vocab, "--out", out, check=False),
                         out, "empty")
    assert_clean_failure(run_script("prepare_data.py", "--input", text, "--tokenizer", no_mask, "--out", out, check=False),
                         out, "[MASK]")
    assert_clean_failure(run_script("prepare_data.py", "--input", text, "--tokenizer", tmp_path / "nope.json",
                                    "--out", out, check=False), out, "nope.json")
    assert_clean_failure(run_script("prepare_data.py", "--input", text, "--tokenizer", vocab, "--seq-len", "7",
                                    "--out", out, check=False), out, "--seq-len")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"body": "no text field"}\n')
    assert_clean_failure(run_script("prepare_data.py", "--input", bad_json, "--tokenizer", vocab, "--out", out, check=False),
                         out, "text")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    assert_clean_failure(run_script("prepare_data.py", "--input", binary, "--tokenizer", vocab, "--out", out, check=False),
                         out, "UTF-8")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    result = run_script("prepare_data.py", "--input", text, "--tokenizer", vocab, "--out", occupied, check=False)
    assert result.returncode != 0 and "not a prepare_data.py output" in result.stderr
    assert os.listdir(occupied) == ["notes.txt"]


def test_interrupted_run_leaves_nothing_and_reruns_cleanly(tmp_path, minilm_dir, wikitext_raw):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    out = tmp_path / "out"
    args = [sys.executable, os.path.join(REPO, "prepare_data.py"), "--input", wikitext_raw, "--input", wikitext_raw,
            "--input", wikitext_raw, "--tokenizer", vocab, "--workers", "1", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(str(out) + ".partial", "tokenizer.json")) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")

    # a crash that could not clean up (kill -9) leaves OUT.partial: the next run starts over and finishes
    os.makedirs(str(out) + ".partial")
    open(os.path.join(str(out) + ".partial", "train-00000-input_ids.npy"), "w").write("half a file")
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "removing" in result.stderr
    assert os.path.isfile(out / "meta.json") and not os.path.exists(str(out) + ".partial")
    load_split(out, "train")


def test_full_disk_gets_a_clear_error_and_leaves_nothing(tmp_path, minilm_dir, monkeypatch, capsys):
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"

    def full_disk(path, array, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(prepare_data.np, "save", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main(["--input", str(text), "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
                           "--workers", "1", "--out", str(out)])
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "disk is full" in error and "Traceback" not in error
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_hub_datasets_are_streamed_by_name_and_config(tmp_path, minilm_dir, monkeypatch, capsys):
    """No hub here: datasets.load_dataset is replaced by a stand-in that records how it was called."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": d, "title": "t"} for d in DOCS[:60]] if path == "wiki/en" else [{"body": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    vocab = os.path.join(minilm_dir, "vocab.txt")
    prepare_data.main(["--dataset", "wiki/en:20231101.en", "--tokenizer", vocab, "--seq-len", "32",
                       "--workers", "1", "--out", str(tmp_path / "hub")])
    assert calls == [("wiki/en", "20231101.en", "train", True)]
    meta = json.load(open(tmp_path / "hub" / "meta.json"))
    assert meta["sources"] == [{"kind": "hub", "name": "wiki/en:20231101.en"}]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    with pytest.raises(SystemExit):
        prepare_data.main(["--dataset", "other", "--tokenizer", vocab, "--workers", "1", "--out", str(tmp_path / "bad")])
    assert "dataset other has no column 'text'; set --text-column" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    assert prepare_data.describe_sources(prepare_data.PrepareConfig()) == [
        {"kind": "hub", "name": name} for name in prepare_data.DEFAULT_DATASETS]
