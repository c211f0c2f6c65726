"""prepare_data.py on real WikiText-2 text and on small synthetic edge cases."""
import dataclasses
import errno
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import REPO, checked_help_texts, free_port, hub_env, listening_hub, run_script

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
    assert meta["splits"]["train"]["rows_without_predictions"] == 0


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


def test_doc_sep_file_makes_each_file_one_document(tmp_path, minilm_dir):
    """The original BookCorpus has one book per file: --doc-sep file reads each as one document, as a .jsonl
    row holding the whole book would be (one [SEP] between books, none inside one)."""
    books = {"a.txt": "Chapter one.\n\nIt was a dark night,\r\nand the rain fell.\n" * 20,
             "b.txt": "\ufeffA second book begins here.\nIt ends soon after.\n" * 30,
             "c.txt": "The third book is a single line of text about masking tokens." * 40,
             "empty.txt": "\n \n"}
    (tmp_path / "books").mkdir()
    for name, text in books.items():
        (tmp_path / "books" / name).write_bytes(text.encode())
    whole = [text.replace("\ufeff", "").replace("\r\n", "\n").strip() for name, text in sorted(books.items())]
    (tmp_path / "books.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in whole))
    common = ["--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--seq-len", "32", "--dup-factor", "2",
              "--val-fraction", "0", "--workers", "1"]
    prepare_data.main(["--input", str(tmp_path / "books"), "--doc-sep", "file", *common, "--out", str(tmp_path / "o_file")])
    prepare_data.main(["--input", str(tmp_path / "books.jsonl"), *common, "--out", str(tmp_path / "o_jsonl")])
    meta = json.load(open(tmp_path / "o_file" / "meta.json"))
    assert meta["splits"]["train"]["documents"] == 3 and meta["settings"]["doc_sep"] == "file"
    for name in ("input_ids", "mask_positions", "mask_tokens"):
        assert np.array_equal(np.load(tmp_path / "o_file" / f"train-00000-{name}.npy"),
                              np.load(tmp_path / "o_jsonl" / f"train-00000-{name}.npy")), name


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


def test_rows_with_nothing_to_mask_are_counted_and_noted(tmp_path, minilm_dir, capsys):
    """600 emoji are 600 [UNK]s to a BERT vocabulary: their rows have no position to mask, so they teach nothing."""
    (tmp_path / "emoji.txt").write_text("\n".join(DOCS[:8] + [" ".join(["\U0001F600"] * 600)] + DOCS[8:16]) + "\n",
                                        encoding="utf-8")
    out = tmp_path / "out"
    prepare_data.main(["--input", str(tmp_path / "emoji.txt"), "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
                       "--seq-len", "32", "--dup-factor", "2", "--val-fraction", "0", "--workers", "1", "--out", str(out)])
    meta, input_ids, positions, _ = load_split(out, "train")
    special = list(meta["special_token_ids"].values())
    nothing_to_mask = np.isin(input_ids, special).all(axis=1)
    count, rows = int(nothing_to_mask.sum()), len(input_ids)
    assert count >= 15 and meta["splits"]["train"]["rows_without_predictions"] == count
    assert ((positions != 0).any(axis=-1) == ~nothing_to_mask).all(), "a row with text went unmasked, or the reverse"
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {count} of {rows} training rows have nothing to mask (only [UNK], [CLS], [SEP] or padding): "
                     f"they teach nothing; check the text or the tokenizer"]


# ----------------------------------------------------------------------------- bad input

def assert_clean_failure(result, out, *words):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("prepare_data.py: error:")]
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


def live_processes_with(word):
    """Processes (not zombies) whose command line has `word` among its arguments."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            arguments = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            state = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # ended meanwhile
            continue
        if word.encode() in arguments and state not in (b"Z", b"X"):
            pids.append(int(pid))
    return pids


def workers_of(process, count, seconds=60):
    """The pids of the first `count` children of a running process, once it has them."""
    children = f"/proc/{process.pid}/task/{process.pid}/children"
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not os.path.exists(children):
            pytest.skip("this kernel does not list a process's children in /proc")
        workers = [int(pid) for pid in open(children).read().split()]
        if len(workers) >= count:
            return workers
        time.sleep(0.01)
    raise AssertionError(f"no {count} workers after {seconds} s")


@pytest.mark.parametrize("signal_number, to_the_group", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["ctrl-c twice", "sigterm twice to the group"])
def test_a_second_signal_still_ends_the_run_at_once(signal_number, to_the_group, tmp_path, minilm_dir, wikitext_raw):
    """Ctrl-C pressed twice once hung the run for good, and SIGTERM twice left its workers running."""
    out = tmp_path / "out"
    args = [sys.executable, PREPARE, *["--input", wikitext_raw] * 6, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
            "--workers", "2", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               start_new_session=to_the_group)
    try:
        workers_of(process, 2)
        time.sleep(0.3)  # the workers are busy with chunks
        assert os.path.isdir(str(out) + ".partial")
        for _ in range(2):
            os.killpg(process.pid, signal_number) if to_the_group else process.send_signal(signal_number)
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=10)
    finally:
        for pid in live_processes_with(str(out)):
            os.kill(pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("tokenizing and masking")]
    assert process.returncode == 130, stderr
    assert lines == ["prepare_data.py: error: interrupted; nothing was kept, run the same command again to start over"], stderr
    assert live_processes_with(str(out)) == [], "a worker outlived the run"
    for leftover in (out, str(out) + ".partial", str(out) + ".lock"):
        assert not os.path.exists(leftover), leftover


def test_a_killed_worker_ends_the_run_with_one_line(tmp_path, minilm_dir, wikitext_raw):
    """kill -9 of a worker, as the out-of-memory killer sends, ends the run with one line: no traceback, no hang."""
    out = tmp_path / "out"
    args = [sys.executable, PREPARE, *["--input", wikitext_raw] * 6, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
            "--workers", "2", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        worker = workers_of(process, 2)[0]
        time.sleep(0.3)
        os.kill(worker, signal.SIGKILL)
        _, stderr = process.communicate(timeout=20)
    finally:
        for pid in live_processes_with(str(out)):
            os.kill(pid, signal.SIGKILL)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("tokenizing and masking")]
    assert process.returncode == 1 and len(lines) == 1 and "a worker process died" in lines[0], stderr
    assert live_processes_with(str(out)) == []
    for leftover in (out, str(out) + ".partial", str(out) + ".lock"):
        assert not os.path.exists(leftover), leftover


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


def test_a_file_size_limit_reads_like_a_full_disk(tmp_path, minilm_dir):
    """ulimit -f (or FAT32's 4 GiB) makes a write fail with EFBIG, "File too large", once SIGXFSZ is ignored."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # tokenizer.json alone is about 700 KB

    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, PREPARE, "--input", str(text), "--tokenizer",
                             os.path.join(minilm_dir, "vocab.txt"), "--workers", "1", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=120, preexec_fn=limit_file_size)
    assert result.returncode == 1
    assert_clean_failure(result, out, "the disk is full or refuses a file this large", "run the same command again")
    assert not os.path.exists(str(out) + ".lock")


@pytest.fixture
def stand_in_hub(monkeypatch):
    """For tests that replace datasets.load_dataset: there is no hub to check for, the stand-in plays it."""
    monkeypatch.setattr(prepare_data, "check_hub_reachable", lambda needs: None)


def test_hub_datasets_are_streamed_by_name_and_config(tmp_path, minilm_dir, monkeypatch, capsys, stand_in_hub):
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


# ----------------------------------------------------------------------------- hostile input: one line, nothing left

PREPARE = os.path.join(REPO, "prepare_data.py")


def main_error_lines(args, capsys):
    """Runs prepare_data.main in this process (no traceback means no exception got out); returns its exit
    status and the lines of its stderr that start with "prepare_data.py: error:"."""
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main([str(a) for a in args])
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare_data.py: error:")]


def assert_refused(code, lines, out, *words):
    assert code == 2 and len(lines) == 1, (code, lines)
    for word in words:
        assert word in lines[0], lines[0]
    for leftover in (out, str(out) + ".partial", str(out) + ".lock"):
        assert not os.path.exists(leftover), f"{leftover} was left behind"


@pytest.mark.parametrize("flags, words", [
    (["--seed", "-1"], ["prepare_data.py: error: --seed must be an integer in [0, 2**63), not -1"]),
    (["--seed", str(2**63)], ["--seed", "[0, 2**63)"]),
    (["--workers", "-1"], ["--workers", "[0, 256]"]),
    (["--workers", "100000"], ["--workers"]),
    (["--vocab-size", "99"], ["--vocab-size", "[100, 16777216]"]),
    (["--vocab-size", str(2**32)], ["--vocab-size"]),
    (["--seq-len", "7"], ["--seq-len", "[8, 65535]"]),
    (["--seq-len", "65536"], ["--seq-len"]),
    (["--dup-factor", "0"], ["--dup-factor", "[1, 100]"]),
    (["--dup-factor", "1000000"], ["--dup-factor"]),
    (["--max-predictions", "0"], ["--max-predictions", "[1, 126]"]),
    (["--max-predictions", "127"], ["--max-predictions"]),
    (["--max-val-docs", "-1"], ["--max-val-docs"]),
    (["--shard-size", "0"], ["--shard-size", "[1, 1048576]"]),
    (["--shard-size", str(2**40)], ["--shard-size"]),
    (["--mask-prob", "nan"], ["--mask-prob", "(0, 1)", "nan"]),
    (["--mask-prob", "inf"], ["--mask-prob"]),
    (["--mask-prob", "0"], ["--mask-prob"]),
    (["--mask-prob", "1"], ["--mask-prob"]),
    (["--val-fraction", "nan"], ["--val-fraction", "[0, 1)", "nan"]),
    (["--val-fraction", "-inf"], ["--val-fraction"]),
    (["--val-fraction", "1"], ["--val-fraction"]),
    (["--text-column", ""], ["--text-column"]),
    (["--seed", "1e3"], ["--seed", "invalid int"]),  # argparse's own complaints are one line too
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--doc-sep", "para"], ["--doc-sep"]),
    (["--demo"], ["--demo"]),
])
def test_every_number_and_flag_is_checked_before_any_work(flags, words, tmp_path, capsys):
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    code, lines = main_error_lines(["--input", text, "--tokenizer", tmp_path / "not-read.txt", *flags, "--out", out], capsys)
    assert_refused(code, lines, out, *words)


def test_help_shows_a_text_and_the_default_of_every_flag(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    help_output, texts = checked_help_texts("prepare_data.py", 18)
    # every setting with a default shows it, as the config holds it
    for name, value in dataclasses.asdict(prepare_data.PrepareConfig()).items():
        if value not in ("", [], False):
            assert texts["--" + name.replace("_", "-")].endswith(f"(default: {value})"), name
    for flag, default in (("--out", "data/prepared"), ("--seq-len", "128"), ("--dup-factor", "10"),
                          ("--mask-prob", "0.15"), ("--max-predictions", "20"),
                          ("--tokenizer", "bert-large-uncased, from the hub"),
                          ("--dataset", "wikimedia/wikipedia:20231101.en + bookcorpus/bookcorpus, when no --input is given")):
        assert texts[flag].endswith(f"(default: {default})"), flag
    # the docstring's examples keep their lines
    lines = help_output.splitlines()
    assert "    python prepare_data.py --input corpus/ --tokenizer vocab.txt --out data/mine" in lines
    assert any(line.startswith("    python prepare_data.py --demo --train-tokenizer --vocab-size 8192") for line in lines)


def write_vocab_with_a_bad_line(path, vocab):
    tokens = open(vocab, encoding="utf-8").read().splitlines()
    path.write_bytes("\n".join(tokens[:1000]).encode() + b"\ncaf\xe9\n" + "\n".join(tokens[1000:]).encode() + b"\n")


def write_parquet(path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)


BAD_FILES = [  # (what, file name, its bytes or a function that writes it, extra flags, words the error line has)
    ("text not UTF-8", "latin1.txt", b"fine\nstill fine\ncaf\xe9 au lait\nmore\n", [], ["latin1.txt:3", "UTF-8"]),
    ("jsonl not UTF-8", "rows.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', [], ["rows.jsonl:2", "UTF-8"]),
    ("jsonl number", "rows.jsonl", b'{"text": "ok"}\n{"text": 3}\n', [], ["rows.jsonl:2", "'text': 3, which is not a string"]),
    ("jsonl list", "rows.jsonl", b'{"text": "ok"}\n\n{"text": ["a", "b"]}\n', [], ["rows.jsonl:3", '["a", "b"]']),
    ("jsonl dict", "rows.jsonl", b'{"text": {"en": "a"}}\n', [], ["rows.jsonl:1", '{"en": "a"}']),
    ("jsonl bool", "rows.jsonl", b'{"text": "ok"}\n{"text": true}\n', [], ["rows.jsonl:2", "true"]),
    ("jsonl surrogate", "rows.jsonl", b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', [], ["rows.jsonl:2", "surrogate"]),
    ("json array", "rows.json", b'[{"text": "a"},\n {"text": "b"}]\n', [], ["rows.json:1", "one JSON object per line"]),
    ("parquet garbage", "table.parquet", b"PAR1 these bytes are not a Parquet file", [], ["table.parquet", "Parquet"]),
    ("parquet empty", "table.parquet", b"", [], ["table.parquet", "Parquet"]),
    ("parquet numbers", "table.parquet", lambda path: write_parquet(path, [1, 2, 3]), [], ["table.parquet", "int64", "--text-column"]),
    ("parquet bytes", "table.parquet", lambda path: write_parquet(path, [b"a", b"b"]), [], ["table.parquet", "binary"]),
    ("vocab not UTF-8", "vocab.txt", None, ["--tokenizer", "{file}"], ["vocab.txt:1001", "UTF-8"]),
    ("tokenizer.json broken", "tokenizer.json", b'{"version": "1.0", "model": ', ["--tokenizer", "{file}"],
     ["tokenizer.json", "not a tokenizers JSON file"]),
    ("vocab of specials only", "specials.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", ["--tokenizer", "{file}"],
     ["specials.txt", "only special tokens"]),
    ("vocab without [UNK]", "no_unk.txt", b"[PAD]\n[CLS]\n[SEP]\n[MASK]\nthe\nquick\n", ["--tokenizer", "{file}"],
     ["no_unk.txt has no [UNK] token", "WordPiece"]),
    ("jsonl nested too deep", "rows.jsonl", b'{"text": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", [],
     ["rows.jsonl:2", "nested too deeply"]),
]


@pytest.mark.parametrize("what, name, content, flags, words", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_get_one_error_line_naming_file_and_line(what, name, content, flags, words, tmp_path, minilm_dir, capsys):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    good = tmp_path / "good.txt"
    good.write_text("\n".join(DOCS) + "\n")
    bad = tmp_path / name
    if content is None:
        write_vocab_with_a_bad_line(bad, vocab)
    elif callable(content):
        content(bad)
    else:
        bad.write_bytes(content)
    flags = [f.format(file=bad) for f in flags]
    inputs = ["--input", good] if "--tokenizer" in flags else ["--input", good, "--input", bad, "--tokenizer", vocab]
    out = tmp_path / "out"
    code, lines = main_error_lines([*inputs, *flags, "--workers", "1", "--out", out], capsys)
    assert_refused(code, lines, out, *words)


def test_nulls_are_empty_documents_in_jsonl_and_parquet(tmp_path, minilm_dir):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    with_nulls = [d for doc in DOCS for d in (doc, None)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in with_nulls))
    write_parquet(tmp_path / "table.parquet", with_nulls)
    (tmp_path / "plain.txt").write_text("\n".join(DOCS) + "\n")
    common = ["--tokenizer", vocab, "--seq-len", "32", "--dup-factor", "2", "--val-fraction", "0", "--workers", "1"]
    for name in ("rows.jsonl", "table.parquet", "plain.txt"):
        prepare_data.main(["--input", str(tmp_path / name), *common, "--out", str(tmp_path / f"o-{name}")])
    reference = np.load(tmp_path / "o-plain.txt" / "train-00000-input_ids.npy")
    for name in ("rows.jsonl", "table.parquet"):
        assert np.array_equal(np.load(tmp_path / f"o-{name}" / "train-00000-input_ids.npy"), reference), name
        assert json.load(open(tmp_path / f"o-{name}" / "meta.json"))["splits"]["train"]["documents"] == len(DOCS)


def test_hub_row_that_is_not_text_gets_one_line(tmp_path, minilm_dir, monkeypatch, capsys, stand_in_hub):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: iter([{"text": "fine"}, {"text": None}, {"text": 7}]))
    out = tmp_path / "out"
    code, lines = main_error_lines(["--dataset", "some/set", "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
                                    "--workers", "1", "--out", out], capsys)
    assert_refused(code, lines, out, "dataset some/set row 3 has 'text': 7, which is not a string", "--text-column")


def test_damaged_meta_json_in_out_gets_one_line_and_is_left_alone(tmp_path, minilm_dir, capsys):
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    for damage in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"settings": 3}', b'{"settings": {"sources": 5}}'):
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        (out / "meta.json").write_bytes(damage)
        code, lines = main_error_lines(["--input", text, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
                                        "--workers", "1", "--out", out], capsys)
        assert code == 2 and len(lines) == 1 and "meta.json is damaged" in lines[0], (damage, lines)
        assert os.listdir(out) == ["meta.json"] and (out / "meta.json").read_bytes() == damage
        assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".lock")


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGES = [  # (what, how OUT is damaged, words the error line has)
    ("an array cut short", lambda out: truncate(out / "train-00000-mask_tokens.npy"),
     ["train-00000-mask_tokens.npy is cut short"]),
    ("an array deleted", lambda out: os.remove(out / "val-00000-input_ids.npy"), ["val-00000-input_ids.npy is missing"]),
    ("an array swapped", lambda out: shutil.copy(out / "train-00000-mask_positions.npy", out / "train-00000-mask_tokens.npy"),
     ["train-00000-mask_tokens.npy holds uint8", "meta.json lists uint16"]),
    ("tokenizer.json deleted", lambda out: os.remove(out / "tokenizer.json"), ["tokenizer.json is missing"]),
    ("tokenizer.json changed", lambda out: open(out / "tokenizer.json", "a").write(" "), ["tokenizer.json is not the one"]),
    ("meta.json without shards", lambda out: rewrite_meta(out, splits={"train": {"shards": 3}}),
     ["meta.json does not list its files"]),
    ("meta.json naming a file elsewhere", lambda out: rewrite_meta(out, splits={"train": {"shards": [
        {name: {"file": "../x.npy", "shape": [1], "dtype": "uint8"} for name in prepare_data.ARRAY_ROLES}]}}),
     ["meta.json names ../x.npy"]),
]


def rewrite_meta(out, **changes):
    meta = json.load(open(out / "meta.json"))
    (out / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("what, damage, words", DAMAGES, ids=[case[0] for case in DAMAGES])
def test_a_damaged_out_is_not_found_complete(what, damage, words, tmp_path, minilm_dir, capsys):
    """train_bert.py calls such an OUT incomplete and says to run prepare_data.py again: it must not be "complete"."""
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    args = ["--input", text, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--val-fraction", "0.1",
            "--workers", "1", "--out", out]
    prepare_data.main([str(a) for a in args])
    damage(out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    code, lines = main_error_lines(args, capsys)
    assert code == 2 and len(lines) == 1, lines
    for word in [f"prepare_data.py: error: {out}", *words, "delete it and run the same command again"]:
        assert word in lines[0], lines[0]
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before, "the damaged OUT was changed"
    assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".lock")


def test_an_input_changed_since_out_was_made_is_noticed(tmp_path, minilm_dir, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(DOCS) + "\n")
    out = tmp_path / "out"
    args = ["--input", text, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--workers", "1", "--out", out]
    prepare_data.main([str(a) for a in args])
    meta_before = (out / "meta.json").read_bytes()
    prepare_data.main([str(a) for a in args])
    assert "nothing to do" in capsys.readouterr().out
    # same size, other words, and (to be certain on coarse clocks) a later modification time
    text.write_text("\n".join(DOCS).replace("quick", "QUICK") + "\n")
    os.utime(text, ns=(time.time_ns(), os.stat(text).st_mtime_ns + 10**10))
    code, lines = main_error_lines(args, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"input {text} changed since {out} was made" in lines[0] and "delete" in lines[0] and "--out" in lines[0]
    assert (out / "meta.json").read_bytes() == meta_before


def test_a_read_only_out_is_still_found_complete(tmp_path, minilm_dir, monkeypatch, capsys):
    """Where OUT.lock cannot be created (a read-only share of prepared data), a complete OUT is still found."""
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    args = ["--input", str(text), "--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--workers", "1"]
    prepare_data.main([*args, "--out", str(tmp_path / "out")])

    def read_only_open(path, mode="r", *rest, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, mode, *rest, **kwargs)

    monkeypatch.setattr(prepare_data, "open", read_only_open, raising=False)
    capsys.readouterr()
    prepare_data.main([*args, "--out", str(tmp_path / "out")])
    assert "nothing to do" in capsys.readouterr().out
    code, lines = main_error_lines([*args, "--out", tmp_path / "new"], capsys)
    assert_refused(code, lines, tmp_path / "new", f"cannot write in {tmp_path}", "--out")


def test_one_writer_per_output_folder(tmp_path, minilm_dir, wikitext_raw):
    out = tmp_path / "out"
    args = ["--input", wikitext_raw, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--workers", "2"]
    first = subprocess.Popen([sys.executable, PREPARE, *args, "--out", str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 60
        while not os.path.exists(str(out) + ".partial") and time.time() < deadline:
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # it holds the lock while the second run starts, however fast it is
        second = run_script("prepare_data.py", *args, "--out", out, check=False)
        lines = [line for line in second.stderr.splitlines() if line.startswith("prepare_data.py: error:")]
        assert second.returncode == 2 and "Traceback" not in second.stderr and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"prepare_data.py: error: another prepare_data.py (pid {first.pid} on ")
        assert f"is writing {out}; wait for it to finish or choose another --out" in lines[0]
        assert os.path.isdir(str(out) + ".partial"), "the refused run removed the first run's OUT.partial"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".lock")
    # the first run's output is whole and is what a run alone makes
    run_script("prepare_data.py", *args, "--out", tmp_path / "alone")
    names = sorted(n for n in os.listdir(out) if n != "meta.json")
    match, mismatch, errors = filecmp.cmpfiles(out, tmp_path / "alone", names, shallow=False)
    assert len(match) == len(names) >= 7 and mismatch == errors == []


def test_a_killed_run_leaves_no_lock_held(tmp_path, minilm_dir, wikitext_raw):
    """kill -9 of the main process takes its workers with it (Linux), and nothing keeps OUT.lock locked."""
    out = tmp_path / "out"
    args = [sys.executable, PREPARE, "--input", wikitext_raw, "--input", wikitext_raw, "--input", wikitext_raw,
            "--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--workers", "2", "--out", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    children = f"/proc/{first.pid}/task/{first.pid}/children"
    workers = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline:
            if not os.path.exists(children):
                pytest.skip("this kernel does not list a process's children in /proc")
            workers = [int(pid) for pid in open(children).read().split()]
            time.sleep(0.01)
        first.kill()
        first.wait()
        deadline = time.time() + 5
        while live_processes_with(str(out)) and time.time() < deadline:
            time.sleep(0.05)
        assert live_processes_with(str(out)) == [], "workers outlived their killed main process"
        assert os.path.exists(str(out) + ".lock")  # left behind, but no longer locked
        result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 0 and "removing" in result.stderr, result.stderr
        assert not os.path.exists(str(out) + ".lock")
        load_split(out, "train")
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_full_disk_in_any_form_leaves_nothing(tmp_path, minilm_dir, monkeypatch, capsys):
    """np.save's short write has no errno; ENOSPC and EDQUOT have one. A half-written shard is removed too."""
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    for error in (OSError("8192 requested and 0 written"), OSError(errno.ENOSPC, "No space left on device"),
                  OSError(errno.EDQUOT, "Disk quota exceeded"), OSError(errno.EFBIG, "File too large")):
        def full_disk(path, array, *args, **kwargs):
            open(path, "wb").write(b"\x93NUMPY half a header")
            raise error

        monkeypatch.setattr(prepare_data.np, "save", full_disk)
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            prepare_data.main(["--input", str(text), "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
                               "--workers", "1", "--out", str(out)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare_data.py: error:")]
        assert exit_info.value.code == 1 and len(lines) == 1 and "the disk is full" in lines[0], (error, lines)
        for leftover in (out, str(out) + ".partial", str(out) + ".lock"):
            assert not os.path.exists(leftover), leftover


def test_output_inside_the_inputs_is_never_read_and_link_loops_end(tmp_path, minilm_dir, capsys):
    common = ["--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--val-fraction", "0", "--workers", "1"]
    # OUT, OUT.partial and OUT.lock sit inside the input folder or match the glob: none is read as input, so
    # the rerun is a no-op. The link loop is followed once, so each file is read once.
    for name, pattern in (("folder", ""), ("glob", "**")):
        corpus = tmp_path / name
        (corpus / "sub").mkdir(parents=True)
        (corpus / "a.txt").write_text("\n".join(DOCS[:60]) + "\n")
        (corpus / "sub" / "b.txt").write_text("\n".join(DOCS[60:]) + "\n")
        os.symlink("..", corpus / "sub" / "up")  # a link loop: corpus/sub/up/sub/up/...
        os.symlink("self", corpus / "self")  # a link to itself
        for _ in range(2):
            prepare_data.main(["--input", str(corpus / pattern), *common, "--out", str(corpus / "prepared")])
        assert "nothing to do" in capsys.readouterr().out
        meta = json.load(open(corpus / "prepared" / "meta.json"))
        assert meta["splits"]["train"]["documents"] == len(DOCS)
        assert [s["path"] for s in meta["sources"]] == [str(corpus / "a.txt"), str(corpus / "sub" / "b.txt")]


def test_hostile_paths_get_one_line_and_touch_nothing(tmp_path, minilm_dir, capsys):
    text = tmp_path / "ok.txt"
    text.write_text("\n".join(DOCS) + "\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    (tmp_path / "mine.lock").write_text("a file of the user's")
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".secret.txt").write_text("not read")
    for flags, words in [
        (["--input", text, "--out", a_file], ["notes.txt exists and is not a prepare_data.py output folder"]),
        (["--input", text, "--out", a_file / "inside"], ["notes.txt", "which is a file, not a folder"]),
        (["--input", text, "--out", a_file / "inside" / "deeper"], [f"inside {a_file}, which is a file"]),
        (["--input", text, "--out", text], ["is the output folder itself"]),
        (["--input", tmp_path, "--out", tmp_path], ["is the output folder itself"]),
        (["--input", text, "--out", tmp_path / "mine"], ["mine.lock exists and is not a prepare_data.py lock file"]),
        (["--input", tmp_path / "hidden", "--out", tmp_path / "o"], ["matches no file"]),
        (["--input", "/dev/zero", "--out", tmp_path / "o"], ["matches no file"]),
        (["--input", text, "--val-fraction", "0.999999", "--max-val-docs", "1000", "--out", tmp_path / "o"], ["validation split"]),
    ]:
        code, lines = main_error_lines(["--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--workers", "1", *flags], capsys)
        assert code == 2 and len(lines) == 1, (flags, lines)
        for word in words:
            assert word in lines[0], lines[0]
    assert a_file.read_text() == "mine" and (tmp_path / "mine.lock").read_text() == "a file of the user's"
    assert sorted(os.listdir(tmp_path)) == ["hidden", "mine.lock", "notes.txt", "ok.txt"]


# ----------------------------------------------------------------------------- long documents

def test_split_long_document_and_pack_pieces():
    split = prepare_data.split_long_document
    assert list(split("aaaa bbbb cccc\ndddd", 7)) == ["aaaa", " bbbb", " cccc", "\ndddd"]
    assert list(split("x" * 20, 7)) == ["x" * 7, "x" * 7, "x" * 6]  # no whitespace: cut hard
    assert list(split("ab " + "x" * 10, 7)) == ["ab", " xxxxxx", "xxxx"]
    assert list(split("short", 7)) == ["short"]
    # pieces continue their document without a [SEP]; an empty piece still ends the previous document
    packed = prepare_data.pack_sequences([[5, 6], [7], [], [8], [9]], 8, 2, 3, 0, [False, True, False, True, False])
    assert packed.tolist() == [[2, 5, 6, 7, 3, 8, 3, 3], [2, 9, 3, 0, 0, 0, 0, 0]]


def wikitext_as_one_line(wikitext_raw, chars):
    lines = [line.strip() for line in open(wikitext_raw, encoding="utf-8") if line.strip()]
    text = " ".join(lines)
    return " ".join([text] * (chars // len(text) + 1))[:chars].rstrip()


def test_a_long_document_is_cut_without_losing_or_changing_a_token(tmp_path, minilm_dir, wikitext_raw):
    doc = wikitext_as_one_line(wikitext_raw, 2_600_000)  # 5 pieces of at most CHUNK_CHARS
    (tmp_path / "long.txt").write_text(doc + "\n", encoding="utf-8")
    out = tmp_path / "out"
    run_script("prepare_data.py", "--input", tmp_path / "long.txt", "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
               "--dup-factor", "1", "--val-fraction", "0", "--workers", "2", "--out", out)
    meta, input_ids, _, _ = load_split(out, "train")
    ids = meta["special_token_ids"]
    assert meta["splits"]["train"]["documents"] == 1
    assert ((input_ids == ids["sep"]).sum(axis=1) == 1).all(), "a [SEP] between the pieces of one document"
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    whole = tokenizer.encode(doc, add_special_tokens=False).ids
    assert text_stream(input_ids, [ids["cls"], ids["sep"], ids["pad"]]).tolist() == whole


def test_one_huge_document_keeps_memory_bounded(tmp_path, minilm_dir, wikitext_raw):
    """A single 50 MB line once peaked at 5 GB; every process must now stay under 1 GB resident."""
    huge = tmp_path / "huge.txt"
    huge.write_text(wikitext_as_one_line(wikitext_raw, 50_000_000) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    # a fresh Python measures the run: ru_maxrss of RUSAGE_CHILDREN is its largest descendant's peak, in KiB
    measure = ("import resource, subprocess, sys; run = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(run.stderr); print(run.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, PREPARE, "--input", str(huge), "--tokenizer",
                             os.path.join(minilm_dir, "vocab.txt"), "--workers", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    code, peak_kib = map(int, result.stdout.split())
    assert code == 0, result.stderr
    assert peak_kib < 2**20, f"peak resident memory {peak_kib / 1024:.0f} MiB"
    meta = json.load(open(out / "meta.json"))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 1
    assert meta["splits"]["train"]["tokens"] > 10_000_000


# ----------------------------------------------------------------------------- the hub: scripts, no network, offline

def test_a_hub_dataset_with_a_loading_script_is_read_from_its_parquet_conversion(tmp_path, minilm_dir, monkeypatch,
                                                                                   capsys, stand_in_hub):
    """datasets >= 4 refuses bookcorpus/bookcorpus, which ships bookcorpus.py; its parquet conversion is read instead."""
    import datasets

    real_load_dataset = datasets.load_dataset
    script_folder = tmp_path / "bookcorpus"
    script_folder.mkdir()
    (script_folder / "bookcorpus.py").write_text("# a loading script\n")
    with pytest.raises(RuntimeError, match="^Dataset scripts are no longer supported, but found bookcorpus.py$"):
        real_load_dataset(str(script_folder))  # what the installed datasets raises for a script: the stand-in's error
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, revision=None, data_dir=None):
        calls.append((path, name, revision, data_dir, split, streaming))
        if revision is None:  # main ships a loading script
            return real_load_dataset(str(script_folder))
        if path == "no/conversion":
            raise datasets.exceptions.DatasetNotFoundError(
                f"Revision '{revision}' doesn't exist for dataset '{path}' on the Hub.")
        return iter([{"text": d} for d in DOCS[:40]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = ["--dataset", "bookcorpus/bookcorpus", "--dataset", "some/scripted:plain_text",
            "--tokenizer", os.path.join(minilm_dir, "vocab.txt"), "--seq-len", "32", "--workers", "1"]
    prepare_data.main([*args, "--out", str(tmp_path / "out")])
    assert calls == [("bookcorpus/bookcorpus", None, None, None, "train", True),
                     ("bookcorpus/bookcorpus", None, "refs/convert/parquet", None, "train", True),
                     ("some/scripted", "plain_text", None, None, "train", True),  # the conversion's one config is
                     ("some/scripted", None, "refs/convert/parquet", "plain_text", "train", True)]  # "default": by folder
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {path} ships a loading script, which datasets >= 4 no longer runs; reading its parquet "
                     f"conversion (revision refs/convert/parquet) instead" for path in ("bookcorpus/bookcorpus", "some/scripted")]
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["sources"] == [{"kind": "hub", "name": "bookcorpus/bookcorpus", "revision": "refs/convert/parquet"},
                               {"kind": "hub", "name": "some/scripted:plain_text", "revision": "refs/convert/parquet"}]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 80
    prepare_data.main([*args, "--out", str(tmp_path / "out")])  # what was read is a record, not a setting
    assert "nothing to do" in capsys.readouterr().out
    # a script and no conversion either: one line that says what to do
    code, lines = main_error_lines(["--dataset", "no/conversion", *args[4:], "--out", tmp_path / "none"], capsys)
    assert_refused(code, lines, tmp_path / "none", "dataset no/conversion ships a loading script and its parquet "
                   "conversion cannot be read (Revision 'refs/convert/parquet' doesn't exist", "--input")


def test_an_unreachable_hub_fails_at_once_with_one_line(tmp_path, minilm_dir, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    for flags, local in (([], "--input and --tokenizer FILE"),  # the default corpus and tokenizer, both from the hub
                         (["--tokenizer", os.path.join(minilm_dir, "vocab.txt")], "--input")):
        start = time.time()
        result = subprocess.run([sys.executable, PREPARE, *flags, "--out", str(out)], capture_output=True, text=True,
                                cwd=REPO, env=hub_env(tmp_path, HF_ENDPOINT=endpoint), timeout=60)
        seconds = time.time() - start
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"prepare_data.py: error: cannot reach the Hugging Face hub at {endpoint} (Connection refused) "
                                   f"for the dataset wikimedia/wikipedia:20231101.en, the dataset bookcorpus/bookcorpus")
        assert lines[0].endswith(f"; set HF_HUB_OFFLINE=1 to use what is in the local cache, or pass local files with {local}")
        assert seconds < 5, f"{seconds:.1f} s to the error"
        for leftover in (out, str(out) + ".partial", str(out) + ".lock"):
            assert not os.path.exists(leftover), leftover
    # the check goes where the request would: through a proxy when one is set, straight to the hub otherwise
    with listening_hub(monkeypatch):
        prepare_data.check_hub_reachable(["dataset some/set"])
        monkeypatch.setenv("http_proxy", endpoint)
        with pytest.raises(prepare_data.UserError, match="Connection refused"):
            prepare_data.check_hub_reachable(["dataset some/set"])


def test_offline_with_an_empty_cache_gets_one_line(tmp_path, minilm_dir):
    env = hub_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
                  HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # were the hub asked, it would refuse
    for flags, words in (
        ([], ["prepare_data.py: error: tokenizer bert-large-uncased is not in the local cache and HF_HUB_OFFLINE=1 keeps the hub out",
              "--tokenizer FILE"]),
        (["--dataset", "some/set:en", "--tokenizer", os.path.join(minilm_dir, "vocab.txt")],
         ["prepare_data.py: error: dataset some/set:en is not in the local cache (", "HF_HUB_OFFLINE=1 keeps the hub out", "--input"]),
    ):
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, PREPARE, *flags, "--out", str(out)], capture_output=True, text=True,
                                cwd=REPO, env=env, timeout=120)
        assert_clean_failure(result, out, *words)


def test_a_tokenizer_file_changed_since_out_was_made_is_noticed(tmp_path, minilm_dir, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(DOCS) + "\n")
    vocab = tmp_path / "vocab.txt"
    shutil.copyfile(os.path.join(minilm_dir, "vocab.txt"), vocab)
    out = tmp_path / "out"
    args = ["--input", text, "--tokenizer", vocab, "--workers", "1", "--out", out]
    prepare_data.main([str(a) for a in args])
    meta_before = (out / "meta.json").read_bytes()
    words = vocab.read_text().splitlines()
    the, of = words.index("the"), words.index("of")
    words[the], words[of] = words[of], words[the]  # the same size, other ids
    vocab.write_text("\n".join(words) + "\n")
    os.utime(vocab, ns=(time.time_ns(), os.stat(vocab).st_mtime_ns + 10**10))
    code, lines = main_error_lines(args, capsys)
    assert code == 2 and len(lines) == 1 and "tokenizer_file" in lines[0], lines
    assert (out / "meta.json").read_bytes() == meta_before


def test_a_local_dataset_folder_needs_no_hub(tmp_path):
    cfg = prepare_data.PrepareConfig(dataset=[str(tmp_path)], tokenizer="vocab.txt")
    assert prepare_data.hub_needs(cfg, prepare_data.describe_sources(cfg)) == []
    cfg = prepare_data.PrepareConfig(dataset=["some/set:en"], tokenizer="vocab.txt")
    assert prepare_data.hub_needs(cfg, prepare_data.describe_sources(cfg)) == ["dataset some/set:en"]


def test_offline_a_bad_row_is_not_blamed_on_the_cache(monkeypatch):
    import datasets

    def rows():
        yield {"text": "fine"}
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows())
    with pytest.raises(prepare_data.UserError) as error:
        list(prepare_data.read_hub_dataset({"name": "some/set"}, "text"))
    assert str(error.value).startswith("could not read dataset some/set: 'utf-8' codec can't decode")
    assert "local cache" not in str(error.value)


def test_a_malformed_hub_address_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://[::1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(prepare_data.UserError, match=r"HF_ENDPOINT must be a URL such as https://huggingface.co"):
        prepare_data.check_hub_reachable(["dataset some/set"])
