"""Shared fixtures of the tasks/engine/eval/prep/loader tests: a byte-level tokenizer, a tiny
random GPT, and local mirrors of hub datasets (GSM8K rows, good and bad).

Prompts are rendered by the tokenizer's own (Rust) `render_for_completion`.
"""

import os

import pytest
import torch

from sftfast import Tokenizer
from sftfast.model import GPT, GPTConfig


@pytest.fixture()
def one_thread():
    """Tiny matmuls on a shared 2-core box: more torch threads only add contention.
    Test modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def byte_tokenizer() -> Tokenizer:
    # 256 single-byte tokens and no merges: a valid BPE vocabulary, tiny and instant to build.
    ranks = {bytes([i]): i for i in range(256)}
    return Tokenizer.from_ranks(ranks, r"\S+|\s+")


def tiny_model(vocab_size: int, seed: int = 0, n_layer: int = 2, n_embd: int = 64) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=n_layer, n_head=4, n_kv_head=2, n_embd=n_embd))
    model.init_weights(seed=seed)
    # nanochat zero-inits lm_head and output projections; give them random weights so the
    # model's outputs depend on its input (a zero lm_head makes every logit equal).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model.eval()


GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in total?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A shop sells 1,200 apples a day. How many in 2 days?", "answer": "1,200*2 = <<1200*2=2400>>2400\n#### 2,400"},
]
# A row GSM8K cannot turn into a conversation: the answer has no final "#### N".
GSM8K_BAD_ROW = {"question": "How many legs do 3 cats have?", "answer": "3*4 = <<3*4=12>>12 legs."}


def write_parquet(path, rows) -> None:
    import datasets

    os.makedirs(os.path.dirname(path), exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def write_gsm8k_mirror(root, rows, splits=("train", "test")) -> str:
    """`root` laid out as the hub's openai/gsm8k (main subset), each split holding `rows`."""
    for split in splits:
        write_parquet(os.path.join(root, "openai/gsm8k/main", f"{split}-00000-of-00001.parquet"), rows)
    return str(root)
