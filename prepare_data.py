"""
Turn raw text into pre-masked, memory-mapped arrays for BERT pretraining (the 24hBERT recipe).

    python prepare_data.py --out data/wiki                       # Wikipedia + BookCorpus from the hub
    python prepare_data.py --input corpus/ --tokenizer vocab.txt --out data/mine
    python prepare_data.py --demo --train-tokenizer --vocab-size 8192 --out data/demo   # offline

Pipeline: read documents as a stream -> hold out validation documents -> cut the stream into
chunks of about 512 KB of text (a longer document into several, at whitespace) -> in parallel, per
chunk: tokenize, pack into fixed-length [CLS] ... [SEP] rows, mask each row `dup_factor` times ->
write shards in chunk order. The workers' memory stays bounded whatever the corpus or the length of a
document; the main process holds one document at a time (with --doc-sep file, one whole file).

Safety: OUT is written as OUT.partial and renamed when complete; Ctrl-C or SIGTERM, once or repeatedly,
removes OUT.partial and kills the workers, which also die with the main process on Linux; OUT.lock keeps a
second run off the same OUT; a rerun finds OUT complete (every file as meta.json lists it), or says which
setting or input file differs, or which file is damaged.

Output folder (what train_bert.py reads; the contract is meta.json, not shared code):
    meta.json                       format, settings, special ids, counts, every array's file/shape/dtype
    tokenizer.json                  the exact tokenizer used
    {split}-{k:05d}-input_ids.npy       (rows, seq_len)       unmasked token ids, [PAD] after the text
    {split}-{k:05d}-mask_positions.npy  (dup, rows, max_pred) masked positions, ascending; 0 = unused slot
    {split}-{k:05d}-mask_tokens.npy     (dup, rows, max_pred) the token the model sees there
The token ids are stored once and only the masking per duplicate (about 86 bytes per row per
duplicate at seq_len 128, against 274 for the original 24hBERT HDF5 files). Labels are
input_ids[row, positions]. The validation split has a single fixed masking (dup = 1).

Packing: documents follow each other in the token stream, separated by [SEP]; every row takes the
next seq_len - 2 tokens, so rows cross document boundaries (as RoBERTa's FULL-SENTENCES) and no token
is dropped. Only the last row of each chunk is padded, which makes padding about 0.05%.

Determinism: chunks are cut by the reader, not by the workers, and each chunk is masked with a
random generator seeded by (seed, split, chunk index), so --workers never changes a byte.
"""

import argparse
import ast
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from collections import deque
from concurrent.futures import ProcessPoolExecutor, wait as wait_for_futures
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import asdict, dataclass, field
from multiprocessing import current_process as mp_current_process, get_context as mp_get_context, \
    parent_process as mp_parent_process

import numpy as np

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 19  # text per worker task: small enough to spread a small corpus over the cores
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_DATASETS = ["wikimedia/wikipedia:20231101.en", "bookcorpus/bookcorpus"]  # the hub's main branch, not pinned
DEFAULT_TOKENIZER = "bert-large-uncased"  # the 24hBERT vocabulary, from the hub
PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet copy of a dataset, read where main ships a loading script
HUB_CONNECT_TIMEOUT_S = 2  # a lost SYN is sent again after 1 s, so one loss still connects in time
SPLIT_IDS = {"train": 0, "val": 1}


@dataclass
class PrepareConfig:
    out: str = "data/prepared"
    dataset: list = field(default_factory=list)  # hub names NAME[:CONFIG]; default Wikipedia + BookCorpus
    input: list = field(default_factory=list)  # local files, folders or globs
    demo: bool = False  # the embedded offline corpus: this Python's standard-library docstrings
    text_column: str = "text"  # for .jsonl, .parquet and hub datasets
    doc_sep: str = "line"  # plain text: one document per "line", per "blank"-line-separated block, or per "file"
    tokenizer: str = ""  # tokenizer.json, vocab.txt or a hub name; default bert-large-uncased
    train_tokenizer: bool = False  # train a lower-cased WordPiece vocabulary on the corpus instead
    vocab_size: int = 30522
    seq_len: int = 128
    dup_factor: int = 10
    mask_prob: float = 0.15
    max_predictions: int = 20
    val_fraction: float = 0.01
    max_val_docs: int = 10_000  # caps the validation split for corpora as large as Wikipedia
    shard_size: int = 1 << 18  # rows per shard file (a shard closes after the chunk that fills it)
    seed: int = 0
    workers: int = 0  # 0 = all cores


class UserError(Exception):
    """A mistake in the command line or the input: printed as one line, no traceback."""


# -----------------------------------------------------------------------------
# Sources: every reader yields documents (str) one at a time, so the corpus never sits in memory.

def expand_inputs(patterns, out):
    """Files, folders (searched recursively) and globs -> a sorted list of files. This run's own output
    (OUT, OUT.partial, OUT.lock) is left out: a folder or glob around --out would otherwise match it."""
    out = os.path.realpath(out)
    own = (out + os.sep, out + ".partial" + os.sep, out + ".lock" + os.sep)
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = files_under(pattern)
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        kept, seen = [], set()
        for path in sorted(found):
            real_path = os.path.realpath(path)
            if real_path not in seen and not (real_path + os.sep).startswith(own):  # once, even if linked twice
                kept.append(path)
                seen.add(real_path)
        if not kept and os.path.realpath(pattern) == out:
            raise UserError(f"input {pattern!r} is the output folder itself (--out); choose another --out")
        if not kept and found:
            raise UserError(f"input {pattern!r} matches only this run's own output ({out}); "
                            f"choose another --out or --input")
        if not kept:
            raise UserError(f"input {pattern!r} matches no file; check the path")
        files += kept
    return [os.path.abspath(p) for p in files]


def files_under(folder):
    """Every file below `folder`, hidden ones left out (as glob does). Links to folders are followed,
    but each real folder is entered once, so a link loop (a/up -> ..) ends instead of repeating files."""
    seen, files = set(), []
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            folders[:] = []
            continue
        seen.add(os.path.realpath(root))
        folders[:] = [name for name in folders if not name.startswith(".")]
        files += [os.path.join(root, name) for name in names
                  if not name.startswith(".") and os.path.isfile(os.path.join(root, name))]
    return files


def first_bad_line(path):
    """The number of the first line of `path` that is not UTF-8 (None if all are). Only called once decoding
    has failed: a UTF-8 character never contains the byte of a newline, so lines can be checked one by one."""
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_number
    return None


def read_text_file(path, doc_sep):
    """Documents of a plain text file: each line, each block between blank lines, or the whole file (a book
    of the original BookCorpus: it is read whole, then cut into pieces by split_long_document)."""
    with open(path, encoding="utf-8-sig") as f:  # text mode also turns CRLF into LF; -sig drops a BOM
        if doc_sep == "file":
            yield f.read().strip()
            return
        lines = []
        for line in f:
            line = line.strip()
            if doc_sep == "line":
                if line:
                    yield line
            elif line:
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
        if lines:
            yield "\n".join(lines)


def read_jsonl_file(path, text_column):
    """One JSON object per line. A null text is an empty document and is skipped, like an empty line."""
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{line_number} is not valid JSON; a .jsonl file needs one JSON object per line")
            except RecursionError:  # json refuses nesting deeper than Python's recursion limit
                raise UserError(f"{path}:{line_number} is JSON nested too deeply to read; fix or drop that row")
            if not isinstance(row, dict) or text_column not in row:
                raise UserError(f"{path}:{line_number} has no {text_column!r} field; set --text-column")
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}:{line_number} has {text_column!r}: {json.dumps(text)[:40]}, which is not a string; "
                                f"fix that row or set --text-column")
            if text and not text.isascii():
                try:  # JSON can spell an unpaired surrogate (\ud800), which is not text and the tokenizer refuses
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise UserError(f"{path}:{line_number} has an unpaired surrogate escape in {text_column!r}; "
                                    f"fix or drop that row")
            yield text


def read_parquet_file(path, text_column):
    """The text column of a Parquet file, in batches. A null is an empty document and is skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            raise UserError(f"{path} has no column {text_column!r}; set --text-column")
        column_type = parquet.schema_arrow.field(text_column).type
        if pa.types.is_dictionary(column_type):
            column_type = column_type.value_type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UserError(f"{path} column {text_column!r} holds {column_type}, not strings; "
                            f"set --text-column to a text column")
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_column]):
            yield from batch.column(0).to_pylist()
    except pa.ArrowException:  # not Parquet at all, or a damaged page
        raise UserError(f"{path} is not a readable Parquet file; check it or leave it out")


def read_hub_dataset(source, text_column):
    """A Hugging Face dataset, streamed. A null text is an empty document and is skipped.

    datasets >= 4 refuses a dataset whose main branch still ships a loading script (BookCorpus does); the
    hub keeps a parquet copy of such a dataset at PARQUET_REVISION, which is read instead and recorded in
    `source` (meta.json's sources). That copy has no dataset card, so datasets sees a single config,
    "default", whose files are laid out as CONFIG/train/NNNN.parquet: a config is picked by folder."""
    import datasets  # imported here: only hub sources need it

    name = source["name"]
    path, _, config = name.partition(":")
    stream = None  # set once the dataset is found: errors after that are about its rows, not the cache
    try:
        try:
            stream = datasets.load_dataset(path, config or None, split="train", streaming=True)
        except RuntimeError as e:
            if "Dataset scripts are no longer supported" not in str(e):
                raise
            note(f"note: {path} ships a loading script, which datasets >= 4 no longer runs; "
                 f"reading its parquet conversion (revision {PARQUET_REVISION}) instead")
            try:
                stream = datasets.load_dataset(path, None, revision=PARQUET_REVISION, data_dir=config or None,
                                               split="train", streaming=True)
            except Exception as e:
                raise UserError(f"dataset {name} ships a loading script and its parquet conversion cannot be read "
                                f"({first_line(e)}); download its text and pass it with --input")
            source["revision"] = PARQUET_REVISION
        for row_number, row in enumerate(stream, 1):
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise UserError(f"dataset {name} row {row_number} has {text_column!r}: {repr(text)[:40]}, which is not "
                                f"a string; set --text-column to a text column")
            yield text
    except UserError:
        raise
    except KeyError:
        raise UserError(f"dataset {name} has no column {text_column!r}; set --text-column")
    except Exception as e:  # unknown name, not in the cache, ...: the library's first line says which
        if hub_offline() and stream is None:
            raise UserError(f"dataset {name} is not in the local cache ({first_line(e)}) and HF_HUB_OFFLINE=1 keeps "
                            f"the hub out; unset HF_HUB_OFFLINE to download it, or pass local files with --input")
        raise UserError(f"could not read dataset {name}: {first_line(e)}")


def first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def note(message):
    """One line on stderr that does not break the progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def stdlib_docstrings():
    """The demo corpus: every module, class and function docstring of this Python's standard library
    (about 1.6 MB and 250k words of English prose, present on any machine that runs this script)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if skip & set(os.path.relpath(path, root).split(os.sep)):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    yield docstring


def describe_sources(cfg):
    """What will be read, in order, as recorded in meta.json; also checks local paths up front. A file is
    known by its size and modification time, so a rerun notices an input that changed since OUT was made."""
    if cfg.demo:
        return [{"kind": "python-stdlib-docstrings", "python": sys.version.split()[0]}]
    datasets = cfg.dataset or ([] if cfg.input else DEFAULT_DATASETS)
    sources = [{"kind": "hub", "name": name} for name in datasets]
    for path in expand_inputs(cfg.input, os.path.abspath(cfg.out)):
        stat = os.stat(path)
        sources.append({"kind": "file", "path": path, "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns})
    return sources


def iter_documents(sources, cfg):
    for source in sources:
        if source["kind"] == "python-stdlib-docstrings":
            docs = stdlib_docstrings()
        elif source["kind"] == "hub":
            docs = read_hub_dataset(source, cfg.text_column)
        elif source["path"].endswith((".jsonl", ".json")):
            docs = read_jsonl_file(source["path"], cfg.text_column)
        elif source["path"].endswith(".parquet"):
            docs = read_parquet_file(source["path"], cfg.text_column)
        else:
            docs = read_text_file(source["path"], cfg.doc_sep)
        try:
            for doc in docs:
                if doc and not doc.isspace():  # None (a null in .jsonl, Parquet or the hub) is skipped too
                    yield doc
        except UnicodeDecodeError:  # text and .jsonl files: the line is found afterwards; Parquet has no lines
            path = source["path"]
            if path.endswith(".parquet"):
                raise UserError(f"{path} column {cfg.text_column!r} holds text that is not UTF-8; fix the file or "
                                f"leave it out")
            raise UserError(f"{path}:{first_bad_line(path)} is not UTF-8 text; convert the file to UTF-8 or leave it out")


# -----------------------------------------------------------------------------
# The hub. Where it cannot be reached, datasets and huggingface_hub retry for about 25 s and print a line per
# retry; a plain TCP connection tells the same in a second or two, before any work starts.

def hub_offline():
    """HF_HUB_OFFLINE=1 (or ON, YES, TRUE, as huggingface_hub reads it): the libraries use their local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def is_hub_name(name):
    """A hub repository (bert-large-uncased, google-bert/bert-base-uncased) rather than a tokenizer file."""
    return (not os.path.exists(name) and not name.endswith((".json", ".txt")) and not name.startswith((".", "/", "~"))
            and name.count("/") <= 1)


def hub_needs(cfg, sources):
    """What this run fetches from the hub: its hub datasets, and the tokenizer unless it is a file or trained."""
    needs = [f"dataset {s['name']}" for s in sources if s["kind"] == "hub"
             and not os.path.exists(s["name"].partition(":")[0])]  # a local folder datasets reads, no hub
    tokenizer = cfg.tokenizer or DEFAULT_TOKENIZER
    if not cfg.train_tokenizer and is_hub_name(tokenizer):
        needs.append(f"tokenizer {tokenizer}")
    return needs


def check_hub_reachable(needs):
    """Connects to the host of HF_ENDPOINT (huggingface.co by default), or to the proxy that would carry the
    request; one line if that fails. Skipped with HF_HUB_OFFLINE=1, where nothing is fetched."""
    if not needs or hub_offline():
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        url = urllib.parse.urlsplit(endpoint)
    except ValueError:  # "http://[::1", say
        url = None
    if not url or not url.hostname:
        raise UserError(f"HF_ENDPOINT must be a URL such as https://huggingface.co, not {endpoint!r}")
    proxy = urllib.request.getproxies().get(url.scheme)
    try:
        if proxy and not urllib.request.proxy_bypass(url.hostname):
            url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as e:  # no such host, refused, timed out; ValueError: a port that is not a number
        local_flags = sorted({"--input" if need.startswith("dataset") else "--tokenizer FILE" for need in needs})
        raise UserError(f"cannot reach the Hugging Face hub at {endpoint} ({getattr(e, 'strerror', None) or e}) "
                        f"for the {', the '.join(needs)}; set HF_HUB_OFFLINE=1 to use what is in the local cache, "
                        f"or pass local files with {' and '.join(local_flags)}")


# -----------------------------------------------------------------------------
# Tokenizer

def load_tokenizer(name):
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    if os.path.isfile(name):
        if name.endswith(".json"):
            try:
                return Tokenizer.from_file(name)
            except Exception:
                raise UserError(f"{name} is not a tokenizers JSON file; pass one saved by the tokenizers library, "
                                f"or a BERT vocab.txt")
        try:
            return BertWordPieceTokenizer(name, lowercase=True)._tokenizer  # a BERT vocab.txt
        except Exception as e:  # the library's message has no line number: find the line here
            line_number = first_bad_line(name)
            if line_number:
                raise UserError(f"{name}:{line_number} is not UTF-8 text; a vocab.txt holds one UTF-8 token per line")
            raise UserError(f"{name} is not a BERT vocab.txt ({e}); pass a vocab.txt or a tokenizer.json")
    if not is_hub_name(name):
        raise UserError(f"tokenizer file {name} does not exist")
    try:
        return Tokenizer.from_pretrained(name)
    except Exception:
        if hub_offline():
            raise UserError(f"tokenizer {name} is not in the local cache and HF_HUB_OFFLINE=1 keeps the hub out; unset "
                            f"HF_HUB_OFFLINE to download it, or pass --tokenizer FILE or --train-tokenizer")
        raise UserError(f"tokenizer {name!r} is neither a file nor reachable on the hub; pass --tokenizer FILE or --train-tokenizer")


def train_tokenizer(documents, vocab_size):
    """A lower-cased WordPiece vocabulary, as bert-large-uncased's, learned from the corpus."""
    from tokenizers.implementations import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(documents, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    # The trainer numbers tokens in hash-map order, different on every run, and that order also breaks
    # ties between merges (huggingface/tokenizers#1794). WordPiece matching does not depend on ids, so
    # renumbering in sorted order makes most runs identical; a tie can still swap a rare token. For
    # byte-identical reruns, pass the saved OUT/tokenizer.json with --tokenizer.
    learned = sorted(set(trainer.get_vocab()) - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + learned)}
    return BertWordPieceTokenizer(vocab, lowercase=True)._tokenizer


def special_token_ids(tokenizer, name):
    from tokenizers.models import WordPiece

    ids = {key: tokenizer.token_to_id(f"[{key.upper()}]") for key in ("cls", "sep", "mask", "pad", "unk")}
    missing = [f"[{key.upper()}]" for key in ("cls", "sep", "mask", "pad") if ids[key] is None]
    if missing:
        raise UserError(f"tokenizer {name} has no {' '.join(missing)} token; use a BERT tokenizer (vocab.txt or tokenizer.json)")
    model = tokenizer.model  # WordPiece spells a word it cannot split as unk_token, and crashes if it has none
    if isinstance(model, WordPiece) and tokenizer.token_to_id(model.unk_token) is None:
        raise UserError(f"tokenizer {name} has no {model.unk_token} token, which WordPiece needs for words it cannot "
                        f"spell; add it or use a BERT tokenizer (vocab.txt or tokenizer.json)")
    return ids


def special_token_mask(tokenizer, special_ids):
    """(vocab,) bool: the tokens that are never masked nor drawn as a random replacement."""
    is_special = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    for token in tokenizer.get_added_tokens_decoder().values():
        if token.special:
            is_special[tokenizer.token_to_id(token.content)] = True
    for token_id in special_ids.values():
        if token_id is not None:
            is_special[token_id] = True
    return is_special


# -----------------------------------------------------------------------------
# Packing and masking: the heart of the data pipeline, both pure numpy functions.

def pack_sequences(token_lists, seq_len, cls_id, sep_id, pad_id, continues_previous=None):
    """Documents (lists of ids) -> (rows, seq_len) array of [CLS] stream... [SEP], [SEP] between documents.
    continues_previous[i] marks a piece of a long document cut by split_long_document: it follows the
    previous piece without a [SEP]."""
    continues_previous = continues_previous or [False] * len(token_lists)
    stream, new_document = [], True
    for ids, continues in zip(token_lists, continues_previous):
        new_document = new_document or not continues
        if ids:
            if new_document and stream:
                stream.append(sep_id)
            stream.extend(ids)
            new_document = False
    stream = np.array(stream, dtype=np.int64)
    body = seq_len - 2
    rows = -(-len(stream) // body)
    packed = np.full((rows, seq_len), pad_id, dtype=np.int64)
    packed[:, 0] = cls_id
    full = len(stream) // body
    packed[:full, 1:-1] = stream[: full * body].reshape(full, body)  # (full, seq_len - 2)
    packed[:full, -1] = sep_id
    rest = stream[full * body:]
    if len(rest):  # the chunk's last row, the only one that is padded
        packed[full, 1:1 + len(rest)] = rest
        packed[full, 1 + len(rest)] = sep_id
    return packed


def mask_sequences(input_ids, dup, rng, is_special, mask_id, random_ids, mask_prob, max_predictions):
    """Static masking as BERT: per row choose round(mask_prob * maskable tokens) positions (at most
    max_predictions, never a special or padding token); of those 80% -> [MASK], 10% -> a random token,
    10% unchanged. Does it `dup` times independently. Returns (positions, tokens), both (dup, rows, P)."""
    rows, seq_len = input_ids.shape
    maskable = ~is_special[input_ids]  # (rows, seq_len)
    maskable[:, 0] = False  # [CLS] in real rows; never masked, so position 0 can mark an unused slot
    n_maskable = maskable.sum(axis=1)
    n_predict = np.minimum(np.floor(mask_prob * n_maskable + 0.5), max_predictions).astype(np.int64)
    n_predict[(n_predict == 0) & (n_maskable > 0)] = 1

    # A random key per token; the lowest keys among the maskable tokens are the chosen positions.
    keys = rng.random((dup, rows, seq_len), dtype=np.float32)
    keys[:, ~maskable] = 2.0  # above any random key: never chosen while a maskable token is left
    lowest = np.argpartition(keys, max_predictions - 1, axis=-1)[..., :max_predictions]  # unordered
    lowest = np.take_along_axis(lowest, np.argsort(np.take_along_axis(keys, lowest, -1), -1), -1)
    used = np.arange(max_predictions) < n_predict[None, :, None]  # (1, rows, P), broadcast over dup
    used = np.broadcast_to(used, lowest.shape)
    positions = np.sort(np.where(used, lowest, seq_len), axis=-1)  # ascending, unused slots last
    positions[positions == seq_len] = 0

    original = np.take_along_axis(np.broadcast_to(input_ids, (dup, rows, seq_len)), positions, -1)
    action = rng.random(positions.shape, dtype=np.float32)
    random_tokens = random_ids[rng.integers(0, len(random_ids), positions.shape)]
    tokens = np.where(action < 0.8, mask_id, np.where(action < 0.9, random_tokens, original))
    tokens[positions == 0] = 0
    return positions, tokens


# -----------------------------------------------------------------------------
# Workers: one chunk of documents in, the arrays of its rows out.

WORKER = {}  # the tokenizer and settings of this worker process
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # Ctrl-C, and kill's default: both end the run (see interrupt)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def init_worker(tokenizer_json, settings):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    if mp_current_process().name != "MainProcess":
        leave_signals_to_the_main_process()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    is_special = special_token_mask(tokenizer, settings["special_token_ids"])
    WORKER.update(tokenizer=tokenizer, is_special=is_special, random_ids=np.flatnonzero(~is_special), **settings)


def leave_signals_to_the_main_process():
    """Ctrl-C reaches the whole process group: a worker ignores it, and the main process stops the pool. SIGTERM
    (the pool's own terminate(), or a kill) ends a worker at once, without the main process's handler and its
    traceback. And a worker dies with the main process, however that ends, kill -9 included, instead of
    running on, waiting for tasks with the caller's pipes open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back by run_chunks until now
    if sys.platform != "linux":  # prctl is Linux's; elsewhere a worker can outlive a killed main process
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the kernel kills us when the main process (our parent) ends
    if not mp_parent_process().is_alive():  # it ended before prctl: nobody will ask for results
        os._exit(1)


def process_chunk(split, chunk_index, texts, continues_previous):
    """One chunk of documents (or pieces of long ones) -> packed rows, their maskings and counts."""
    w = WORKER
    ids = w["special_token_ids"]
    encodings = w["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    input_ids = pack_sequences([e.ids for e in encodings], w["seq_len"], ids["cls"], ids["sep"], ids["pad"],
                               continues_previous)
    dup = w["dup_factor"] if split == "train" else 1
    rng = np.random.default_rng([w["seed"], SPLIT_IDS[split], chunk_index])
    positions, tokens = mask_sequences(input_ids, dup, rng, w["is_special"], ids["mask"], w["random_ids"],
                                       w["mask_prob"], w["max_predictions"])
    id_dtype = np.uint16 if w["vocab_size"] <= 65536 else np.uint32
    position_dtype = np.uint8 if w["seq_len"] <= 256 else np.uint16
    return {
        "split": split,
        "chars": sum(len(text) for text in texts),
        "input_ids": input_ids.astype(id_dtype),
        "mask_positions": positions.astype(position_dtype),
        "mask_tokens": tokens.astype(id_dtype),
        "stats": {
            "documents": continues_previous.count(False),
            "tokens": sum(len(e.ids) for e in encodings),
            "padding_tokens": int((input_ids == ids["pad"]).sum()),
            "maskable_tokens": int((~w["is_special"][input_ids]).sum()) * dup,
            "masked_tokens": int((positions != 0).sum()),
            "rows_without_predictions": int((positions[0] == 0).all(axis=-1).sum()),  # only specials: nothing to learn
        },
    }


def split_long_document(doc, max_chars=CHUNK_CHARS):
    """A document longer than max_chars -> pieces of at most max_chars characters, so that one huge
    document never has to be tokenized, packed and masked at once. Each cut is at the last whitespace
    before the limit, and the whitespace starts the next piece; a stretch with no whitespace at all is cut
    hard. This assumes the tokenizer splits words at whitespace before anything else (BERT's WordPiece
    does), so the pieces give the same tokens as the whole document. Shorter documents come back whole."""
    start = 0
    while len(doc) - start > max_chars:
        end = start + max_chars
        cut = max(doc.rfind(space, start + 1, end) for space in " \n\t")
        if cut == -1:  # no whitespace at all: cut hard
            cut = end
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def chunk_tasks(documents, cfg):
    """Assign each document to train or val, and group each split's documents into chunks of about
    CHUNK_CHARS characters: (split, chunk index, texts, continues_previous). A document longer than a
    chunk is cut into pieces that stay in its split; all but its first piece continue the previous one.
    Decided here, in order, never by workers."""
    pending = {"train": [], "val": []}
    pending_continues = {"train": [], "val": []}
    pending_chars = {"train": 0, "val": 0}
    next_chunk = {"train": 0, "val": 0}
    draws, val_docs = None, 0
    for doc_index, doc in enumerate(documents):
        if doc_index % 65536 == 0:  # one random draw per document, in blocks, reproducible by index
            draws = np.random.default_rng([cfg.seed, 99, doc_index // 65536]).random(65536)
        is_val = draws[doc_index % 65536] < cfg.val_fraction and val_docs < cfg.max_val_docs
        split = "val" if is_val else "train"
        val_docs += is_val
        for piece_index, piece in enumerate(split_long_document(doc) if len(doc) > CHUNK_CHARS else (doc,)):
            pending[split].append(piece)
            pending_continues[split].append(piece_index > 0)
            pending_chars[split] += len(piece)
            if pending_chars[split] >= CHUNK_CHARS:
                yield split, next_chunk[split], pending[split], pending_continues[split]
                next_chunk[split] += 1
                pending[split], pending_continues[split], pending_chars[split] = [], [], 0
    for split in ("train", "val"):
        if pending[split]:
            yield split, next_chunk[split], pending[split], pending_continues[split]


def run_chunks(tasks, workers, tokenizer_json, settings):
    """Yields each chunk's result in task order; at most 2 tasks per worker are in flight. If the caller stops
    early (Ctrl-C, an error, or closing this generator) or a worker dies, all workers are killed at once."""
    if workers == 1:
        init_worker(tokenizer_json, settings)
        for task in tasks:
            yield process_chunk(*task)
        return
    # fork, which the worker cleanup below relies on (Python 3.14 no longer makes it the default on Linux)
    with ProcessPoolExecutor(workers, mp_context=mp_get_context("fork"), initializer=init_worker,
                             initargs=(tokenizer_json, settings)) as pool:
        try:
            in_flight = deque()
            for task in tasks:
                # submit() may start a worker, which runs this process's signal handlers until init_worker sets
                # its own: a Ctrl-C in between would end it with a traceback. Such a signal waits instead.
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    in_flight.append(pool.submit(process_chunk, *task))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                if len(in_flight) >= 2 * workers:
                    yield result_while_workers_live(in_flight.popleft(), pool)
            while in_flight:
                yield result_while_workers_live(in_flight.popleft(), pool)
        except BaseException:
            kill_workers(pool)
            raise


def result_while_workers_live(future, pool):
    """future.result(), but a dead worker (out of memory, kill -9) ends the wait: the pool notices a death by
    itself, except while it waits for the rest of a result that the worker was sending when it died."""
    while not wait_for_futures([future], timeout=1).done:
        if any(process.exitcode is not None for process in list(pool._processes.values())):
            raise BrokenProcessPool("a worker process died")
    return future.result()


def kill_workers(pool):
    """Kills the workers now, rather than waiting for the tasks they hold, and drops the queued tasks. The pool's
    thread may be waiting for the rest of a result that a killed worker was sending, and would wait forever, and
    so would shutdown() and the exit of this process: closing this process's end of the result pipe, the last
    one open once the workers are dead, ends that wait. (_processes and _result_queue are private: the pool
    offers no public way to do either.)"""
    for process in list(pool._processes.values()) if pool._processes else []:
        process.kill()
    if pool._result_queue is not None:
        pool._result_queue._writer.close()
    pool.shutdown(cancel_futures=True)


# -----------------------------------------------------------------------------
# Writing shards

ARRAY_ROLES = {
    "input_ids": "(rows, seq_len) unmasked token ids: [CLS] text [SEP] ... [PAD]; [SEP] also between documents",
    "mask_positions": "(dup, rows, max_predictions) positions masked in duplicate d, ascending; 0 marks an unused slot",
    "mask_tokens": "(dup, rows, max_predictions) the id the model sees at each position: [MASK], random or original",
}


class ShardWriter:
    """Collects one split's chunk results and writes them as numbered shards of about shard_size rows."""

    def __init__(self, folder, split, shard_size):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.buffer = []
        self.shards = []
        self.stats = {"documents": 0, "tokens": 0, "sequences": 0, "padding_tokens": 0,
                      "maskable_tokens": 0, "masked_tokens": 0, "rows_without_predictions": 0}

    def add(self, result):
        self.buffer.append(result)
        for key, value in result["stats"].items():
            self.stats[key] += value
        self.stats["sequences"] += len(result["input_ids"])
        if sum(len(r["input_ids"]) for r in self.buffer) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.buffer:
            return
        shard = {"sequences": sum(len(r["input_ids"]) for r in self.buffer)}
        for name, axis in (("input_ids", 0), ("mask_positions", 1), ("mask_tokens", 1)):
            array = np.concatenate([r[name] for r in self.buffer], axis=axis)
            file = f"{self.split}-{len(self.shards):05d}-{name}.npy"
            np.save(os.path.join(self.folder, file), array)
            shard[name] = {"file": file, "shape": list(array.shape), "dtype": str(array.dtype)}
        self.shards.append(shard)
        self.buffer = []


# -----------------------------------------------------------------------------
# The run: the flags, the output folder (settings, damage, lock), then prepare()

def check_config(cfg):
    """Every flag is checked before any work starts; a bad value gets one line naming the flag and its range."""
    integer_ranges = [  # (flag, lowest, highest): both allowed
        ("seq_len", 8, 65535),  # positions are stored as uint16
        ("max_predictions", 1, cfg.seq_len - 2),
        ("vocab_size", 100, 2**24),  # ids are stored as uint32 above 65,536; 2**24 is far above any real vocabulary
        ("dup_factor", 1, 100),  # masking memory grows with it; BERT and 24hBERT use 10
        ("shard_size", 1, 2**20),  # a shard's rows are gathered in memory (about 1 KB each) before they are written
        ("max_val_docs", 0, 2**63 - 1),
        ("seed", 0, 2**63 - 1),
        ("workers", 0, 256),  # 0 = all cores
    ]
    for name, lowest, highest in integer_ranges:
        value = getattr(cfg, name)
        if not lowest <= value <= highest:
            upper = "2**63)" if highest == 2**63 - 1 else f"{highest}]"
            raise UserError(f"--{name.replace('_', '-')} must be an integer in [{lowest}, {upper}, not {value}")
    if not 0 < cfg.mask_prob < 1:  # also false for nan
        raise UserError(f"--mask-prob must be a number in (0, 1), not {cfg.mask_prob}")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be a number in [0, 1), not {cfg.val_fraction}")
    if not cfg.text_column:
        raise UserError("--text-column must name a field or column, not be empty")
    if not cfg.out:
        raise UserError("--out must name a folder, not be empty")
    if cfg.doc_sep not in ("line", "blank", "file"):
        raise UserError("--doc-sep must be 'line', 'blank' or 'file'")
    if cfg.tokenizer and cfg.train_tokenizer:
        raise UserError("give either --tokenizer or --train-tokenizer, not both")
    if cfg.demo and (cfg.input or cfg.dataset):
        raise UserError("--demo is a corpus of its own; give either --demo or --input/--dataset, not both")


def output_settings(cfg, sources):
    """Everything that changes the arrays; a finished folder made with other settings is refused."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "dataset", "input", "demo")}
    settings["tokenizer"] = cfg.tokenizer or ("" if cfg.train_tokenizer else DEFAULT_TOKENIZER)
    if cfg.tokenizer and os.path.isfile(cfg.tokenizer):  # a file that changes is another tokenizer
        stat = os.stat(cfg.tokenizer)
        settings["tokenizer_file"] = {"path": os.path.abspath(cfg.tokenizer), "bytes": stat.st_size,
                                      "modified_ns": stat.st_mtime_ns}
    if not cfg.train_tokenizer:
        settings.pop("vocab_size")
    settings["sources"] = sources
    return settings


def check_output_folder(out, settings):
    """Returns True when `out` already holds this exact data. Raises for anything else in the way."""
    meta_path = os.path.join(out, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except ValueError:  # not JSON, or not UTF-8
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict) \
                or not isinstance(meta["settings"].get("sources", []), list):
            raise UserError(f"{meta_path} is damaged (not the JSON object prepare_data.py writes); "
                            f"delete {out} or choose another --out")
        old = meta["settings"]
        if old == settings:
            try:
                damage = damaged_file(out, meta)
            except (KeyError, TypeError, AttributeError):  # not the lists and dicts that write_dataset writes
                damage = "meta.json does not list its files as prepare_data.py does"
            if damage:
                raise UserError(f"{out} is damaged ({damage}); delete it and run the same command again")
            return True
        changed = changed_inputs(old.get("sources"), settings["sources"])
        if changed:
            raise UserError(f"input {changed[0]} changed since {out} was made (its size or modification time differ); "
                            f"choose another --out or delete {out} to prepare it again")
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise UserError(f"{out} holds data made with other settings ({', '.join(differ)} differ); "
                        f"choose another --out or delete it")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} exists and is not a prepare_data.py output folder; choose another --out")
    return False


def damaged_file(out, meta):
    """What is wrong with the first file of a finished OUT that is missing or not as meta.json lists it, or None.
    np.load with mmap_mode reads an array's header only, so this is cheap even for a large OUT. Without it, a
    damaged OUT would be found complete here and incomplete by train_bert.py, which sends the user back here."""
    tokenizer_path = os.path.join(out, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        return "tokenizer.json is missing"
    if file_sha256(tokenizer_path) != meta["tokenizer_sha256"]:
        return "tokenizer.json is not the one meta.json records: its sha256 differs"
    for split in meta["splits"].values():
        for shard in split["shards"]:
            for name in ARRAY_ROLES:
                file, shape, dtype = shard[name]["file"], shard[name]["shape"], shard[name]["dtype"]
                if os.path.basename(file) != file:  # a bare name: nothing outside OUT is read
                    return f"meta.json names {file}, not a file in it"
                try:
                    array = np.load(os.path.join(out, file), mmap_mode="r")
                except FileNotFoundError:
                    return f"{file} is missing"
                except (ValueError, EOFError, IsADirectoryError):  # a short or empty file, or not .npy at all
                    return f"{file} is cut short or is not a .npy array"
                if list(array.shape) != shape or str(array.dtype) != dtype:
                    return f"{file} holds {array.dtype} {list(array.shape)}, meta.json lists {dtype} {shape}"
    return None


def changed_inputs(old_sources, sources):
    """The input files named in both lists whose size or modification time are no longer the same."""
    old_files = {s["path"]: s for s in old_sources or []
                 if isinstance(s, dict) and s.get("kind") == "file" and isinstance(s.get("path"), str)}
    return [s["path"] for s in sources if s["kind"] == "file" and s["path"] in old_files and old_files[s["path"]] != s]


def check_out_parent(out):
    """--out some.txt/sub: one line that says some.txt is a file, before anything tries to create a folder in it."""
    parent = os.path.dirname(out)
    while not os.path.exists(parent):  # ends at "/" at the latest
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--out {out} is inside {parent}, which is a file, not a folder; choose another --out")


def lock_output(out):
    """Takes an exclusive lock on OUT.lock, beside OUT (which does not exist until the end), so that one
    run at a time writes OUT; a second run refuses at once. Returns the open lock file for unlock_output, or
    None where OUT's folder is read-only: nothing can be written there, but a complete OUT can still be found.

    The lock is flock(2), released by the kernel however the holder ends (a kill -9 leaves OUT.lock behind,
    unlocked and harmless). On NFS, Linux emulates flock with byte-range locks that the server keeps (NFSv4,
    or NFSv3 with lockd), so runs on two machines see each other; a mount with nolock or local_lock=flock
    keeps locks on one machine. Where flock is not supported at all (Lustre without -o flock, for one), the
    call fails and the run stops with one line."""
    path = out + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        try:
            lock_file = open(path, "a+", encoding="utf-8", errors="replace")
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EROFS):
                return None
            raise
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "just starting"
            lock_file.close()
            raise UserError(f"another prepare_data.py ({holder}) is writing {out}; "
                            f"wait for it to finish or choose another --out")
        except OSError as e:
            lock_file.close()
            raise UserError(f"cannot lock {path} ({e.strerror}): its filesystem has no file locks; "
                            f"choose an --out on another disk")
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.path.samestat(os.fstat(lock_file.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        lock_file.close()
    lock_file.seek(0)
    if lock_file.read(4) not in ("", "pid "):  # a file of the user's that happens to be called OUT.lock: keep it
        lock_file.close()
        raise UserError(f"{path} exists and is not a prepare_data.py lock file; choose another --out")
    lock_file.truncate(0)
    lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}")
    lock_file.flush()
    # Forked workers inherit the descriptor; if this process were killed, workers left waiting would keep
    # the lock held. Each child closes its copy at once (closing a copy does not unlock the parent's).
    os.register_at_fork(after_in_child=lock_file.close)
    return lock_file


def unlock_output(lock_file):
    """Removes OUT.lock while still holding it, then closes it: a run that opened the old file meanwhile
    finds, once it gets the lock, that the path names another file, and starts over (see lock_output)."""
    try:
        os.unlink(lock_file.name)
    except FileNotFoundError:
        pass
    lock_file.close()


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def prepare(cfg):
    start = time.time()
    check_config(cfg)
    out = os.path.abspath(cfg.out)  # also makes "." and "dir/" into names that OUT.partial can sit beside
    check_out_parent(out)
    lock_file = lock_output(out)
    try:
        sources = describe_sources(cfg)
        settings = output_settings(cfg, sources)
        if check_output_folder(out, settings):
            print(f"{out} is already complete with these settings; nothing to do")
            return
        if lock_file is None:
            raise UserError(f"cannot write in {os.path.dirname(out)} (read-only or not yours); choose another --out")
        check_hub_reachable(hub_needs(cfg, sources))
        summary = write_output_folder(cfg, sources, settings, out)
    finally:
        if lock_file is not None:
            unlock_output(lock_file)
    seconds = time.time() - start
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    print(f"done in {seconds:.1f} s: {train['documents'] + val['documents']:,} documents, "
          f"{train['tokens'] + val['tokens']:,} tokens ({(train['tokens'] + val['tokens']) / seconds:,.0f}/s), "
          f"{train['sequences']:,} train + {val['sequences']:,} val sequences x {cfg.dup_factor} maskings, "
          f"padding {100 * train['padding_tokens'] / max(1, train['sequences'] * cfg.seq_len):.2f}%, "
          f"masked {100 * train['masked_tokens'] / max(1, train['maskable_tokens']):.2f}% of maskable tokens, "
          f"{summary['bytes_on_disk'] / 2**20:,.1f} MiB on disk "
          f"({summary['bytes_per_sequence_per_duplicate']:.1f} bytes per sequence per masking) -> {out}")
    if train["rows_without_predictions"]:
        print(f"note: {train['rows_without_predictions']:,} of {train['sequences']:,} training rows have nothing to "
              f"mask (only [UNK], [CLS], [SEP] or padding): they teach nothing; check the text or the tokenizer",
              file=sys.stderr)


def write_output_folder(cfg, sources, settings, out):
    """Writes everything into OUT.partial and renames it to OUT once complete; on any failure, including
    Ctrl-C and a full disk, OUT.partial is removed. Returns meta.json's contents."""
    partial = out + ".partial"  # never taken for data: train_bert.py needs meta.json in --data
    if os.path.exists(partial):  # we hold the lock, so no other run is writing it
        print(f"removing {partial}, left unfinished by an earlier run", file=sys.stderr)
        shutil.rmtree(partial)
    os.makedirs(partial)
    try:
        meta = write_dataset(cfg, sources, settings, partial)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


def write_dataset(cfg, sources, settings, folder):
    from tqdm import tqdm

    sources = [dict(source) for source in sources]  # readers add what they read (a hub revision); settings don't
    if cfg.train_tokenizer:
        print("training a WordPiece vocabulary on the corpus", file=sys.stderr)
        pieces = (piece for doc in iter_documents(sources, cfg) for piece in split_long_document(doc))
        tokenizer = train_tokenizer(pieces, cfg.vocab_size)
        tokenizer_name = "the trained tokenizer"
    else:
        tokenizer_name = cfg.tokenizer or DEFAULT_TOKENIZER
        tokenizer = load_tokenizer(tokenizer_name)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    special_ids = special_token_ids(tokenizer, tokenizer_name)
    if special_token_mask(tokenizer, special_ids).all():
        raise UserError(f"tokenizer {tokenizer_name} has only special tokens; use a BERT vocabulary")
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    with open(tokenizer_path, "w", encoding="utf-8") as f:  # as tokenizer.save(), but a full disk raises OSError
        f.write(tokenizer.to_str(pretty=True))
    worker_settings = {"seq_len": cfg.seq_len, "dup_factor": cfg.dup_factor, "mask_prob": cfg.mask_prob,
                       "max_predictions": cfg.max_predictions, "seed": cfg.seed,
                       "vocab_size": tokenizer.get_vocab_size(), "special_token_ids": special_ids}

    writers = {split: ShardWriter(folder, split, cfg.shard_size) for split in ("train", "val")}
    total_bytes = sum(s.get("bytes", 0) for s in sources) or None  # unknown for hub and demo sources
    workers = cfg.workers or len(os.sched_getaffinity(0))
    tasks = chunk_tasks(iter_documents(sources, cfg), cfg)
    start, tokens = time.time(), 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, mininterval=1,
              desc=f"tokenizing and masking ({workers} workers)", file=sys.stderr) as progress, \
            closing(run_chunks(tasks, workers, tokenizer.to_str(), worker_settings)) as results:
        for result in results:  # closing: a Ctrl-C here, not in run_chunks, still stops the workers at once
            writers[result["split"]].add(result)
            tokens += result["stats"]["tokens"]
            progress.update(result["chars"])
            progress.set_postfix_str(f"{tokens / (time.time() - start) / 1e6:.2f}M tokens/s", refresh=False)
    for writer in writers.values():
        writer.flush()
    if writers["train"].stats["sequences"] == 0 and writers["val"].stats["sequences"] > 0:
        raise UserError("every document went to the validation split; lower --val-fraction or --max-val-docs")
    if writers["train"].stats["sequences"] == 0:
        raise UserError("the corpus is empty: no training text was found in the sources")

    bytes_on_disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    train_bytes = sum(os.path.getsize(os.path.join(folder, shard[name]["file"]))
                      for shard in writers["train"].shards for name in ARRAY_ROLES)
    bytes_per_sequence = train_bytes / writers["train"].stats["sequences"]
    meta = {
        "format": "bert-mlm-static-masking",
        "format_version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_file": "tokenizer.json",
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "special_token_ids": special_ids,
        "dup_factor": cfg.dup_factor,
        "mask_prob": cfg.mask_prob,
        "mask_token_fraction": 0.8,
        "random_token_fraction": 0.1,
        "max_predictions": cfg.max_predictions,
        "seed": cfg.seed,
        "packing": "documents joined by [SEP] and cut into rows of seq_len - 2 tokens; rows cross documents",
        "sources": sources,
        "arrays": ARRAY_ROLES,
        "splits": {split: {**w.stats, "duplicates": cfg.dup_factor if split == "train" else 1, "shards": w.shards}
                   for split, w in writers.items()},
        "bytes_on_disk": bytes_on_disk,
        "bytes_per_train_sequence": round(bytes_per_sequence, 2),
        "bytes_per_sequence_per_duplicate": round(bytes_per_sequence / cfg.dup_factor, 2),
        "settings": settings,
    }
    with open(os.path.join(folder, "meta.json"), "w") as f:  # written last: it marks the data complete
        json.dump(meta, f, indent=1)
    for name in os.listdir(folder):  # on disk before the folder is renamed into place
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    return meta


def parse_args(argv=None):
    d = PrepareConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out,
                   help=f"output folder, written as OUT.partial and renamed when complete (default: {d.out})")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME[:CONFIG]",
                   help=f"a Hugging Face dataset, repeatable (default: {' + '.join(DEFAULT_DATASETS)}, "
                        "when no --input is given)")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="a local file, folder or glob, repeatable: plain text, .jsonl or .parquet")
    p.add_argument("--demo", action="store_true", help="the offline demo corpus: this Python's standard-library docstrings")
    p.add_argument("--text-column", default=d.text_column,
                   help=f"text field of .jsonl/.parquet files and hub datasets (default: {d.text_column})")
    p.add_argument("--doc-sep", default=d.doc_sep, choices=["line", "blank", "file"],
                   help="plain text: one document per line, per block between blank lines, or per file (a book) "
                        f"(default: {d.doc_sep})")
    p.add_argument("--tokenizer", default=d.tokenizer,
                   help=f"tokenizer.json, BERT vocab.txt or hub name (default: {DEFAULT_TOKENIZER}, from the hub)")
    p.add_argument("--train-tokenizer", action="store_true", help="train a lower-cased WordPiece vocabulary on the corpus")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"size of the vocabulary that --train-tokenizer trains (default: {d.vocab_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"tokens per row, [CLS] and [SEP] included (default: {d.seq_len})")
    p.add_argument("--dup-factor", type=int, default=d.dup_factor,
                   help=f"different maskings of every training row (default: {d.dup_factor})")
    p.add_argument("--mask-prob", type=float, default=d.mask_prob,
                   help=f"fraction of a row's tokens that are masked and predicted (default: {d.mask_prob})")
    p.add_argument("--max-predictions", type=int, default=d.max_predictions,
                   help=f"masked tokens per row at most (default: {d.max_predictions})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"fraction of documents held out for validation (default: {d.val_fraction})")
    p.add_argument("--max-val-docs", type=int, default=d.max_val_docs,
                   help=f"cap on validation documents (default: {d.max_val_docs})")
    p.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="rows per shard file, at least: a shard closes after the chunk of text that fills it "
                        f"(default: {d.shard_size})")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the validation split and of the masking (default: {d.seed})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"processes; 0 = all cores (default: {d.workers})")
    p.error = usage_error
    return PrepareConfig(**vars(p.parse_args(argv)))


def usage_error(message):
    """argparse's complaints (an unknown flag, "--seed x"), as one line like every other error."""
    exit_with_error(f"{message}; see --help", 2)


def exit_with_error(message, status):
    """The one line every mistake ends with, as the other two scripts write it."""
    print(f"prepare_data.py: error: {message}", file=sys.stderr)
    sys.exit(status)


def interrupt(signum, frame):
    """Ctrl-C and SIGTERM end the run: the unfinished folder is removed, nothing half-written stays. Further
    signals are ignored from here on, so that pressing Ctrl-C again cannot cut that cleanup short."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None):
    cfg = parse_args(argv)
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, interrupt)
    try:
        prepare(cfg)
    except UserError as e:
        exit_with_error(e, 2)
    except KeyboardInterrupt:
        exit_with_error("interrupted; nothing was kept, run the same command again to start over", 130)
    except BrokenProcessPool:
        exit_with_error("a worker process died (killed, or out of memory?); nothing was kept, run the same command "
                        "again, with fewer --workers if memory is short", 1)
    except OSError as e:
        if is_disk_full(e):
            where = e.filename or os.path.abspath(cfg.out) + ".partial"
            exit_with_error(f"the disk is full or refuses a file this large ({where}); free space or choose an --out "
                            f"on another disk, and run the same command again", 1)
        if e.filename is None:
            raise  # not about a path: a bug, so the traceback stays
        exit_with_error(f"{e.filename}: {e.strerror}; check the path and its permissions", 2)


def is_disk_full(error):
    """ENOSPC or EDQUOT; EFBIG, a file over a size limit (ulimit -f, FAT32's 4 GiB); or numpy's short write,
    which has no errno ("8192 requested and 0 written")."""
    return (error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            or (error.errno is None and "requested and" in str(error)))


if __name__ == "__main__":
    main()
