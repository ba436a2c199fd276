"""Tests of the trainer (sftfast.train), optimizers and checkpoints, on CPU with a tiny model.

Every run here is a few steps of a 2-layer, 32-wide model on a byte-level tokenizer, so the
whole file takes well under a minute on 2 cores (the torchrun case a little more).
"""

import argparse
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sftfast import checkpoint as ckpt
from sftfast import train, train_data
from sftfast.model import GPT, GPTConfig
from sftfast.optim import Muon, build_optimizers, lr_multiplier, newton_schulz
from sftfast.shards import ShardDataset
from sftfast.tokenizer import NANOCHAT_SPLIT_PATTERN, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def byte_tokenizer():
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, NANOCHAT_SPLIT_PATTERN)


def write_tokenizer(base_dir):
    """Where sftfast.engine.find_tokenizer looks: {base_dir}/tokenizer/tokenizer.sftfast."""
    os.makedirs(os.path.join(base_dir, "tokenizer"), exist_ok=True)
    byte_tokenizer().save(os.path.join(base_dir, "tokenizer", "tokenizer.sftfast"))


def conversations(n, seed=0, long_user=False):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        user = f"add {a} and {b}" + (" please" * 20 if long_user else "")
        reply = [dict(type="text", text="ok "), dict(type="python", text=f"{a}+{b}"),
                 dict(type="python_output", text=str(a + b)), dict(type="text", text=f"it is {a + b}")]
        out.append(dict(messages=[dict(role="user", content=user), dict(role="assistant", content=reply)]))
    return out


@pytest.fixture()
def base_dir(tmp_path):
    tok = byte_tokenizer()
    config = GPTConfig(sequence_len=64, vocab_size=tok.n_vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights(seed=0)
    with torch.no_grad():  # a "pretrained" model: no zero matrices
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt.save_checkpoint(str(tmp_path / "base_checkpoints" / "d2"), 5, model.state_dict(), None,
                         dict(model_config=config.to_dict(), step=5))
    write_tokenizer(str(tmp_path))
    for name, n, seed in (("train.jsonl", 48, 1), ("val.jsonl", 8, 2)):
        with open(tmp_path / name, "w") as f:
            for c in conversations(n, seed):
                f.write(json.dumps(c) + "\n")
    return tmp_path


def make_args(base_dir, *extra):
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    return p.parse_args([
        "--base-dir", str(base_dir), "--source", "base", "--device", "cpu",
        "--train-data", str(base_dir / "train.jsonl"), "--val-data", str(base_dir / "val.jsonl"),
        "--max-seq-len", "64", "--device-batch-size", "2", "--target-examples-per-step", "4",
        "--eval-every", "3", "--eval-steps", "2", "--eval-metrics-every", "-1", "--eval-tasks", "", "--loss-norm", "token",
        "--init-lr-frac", "0.5", *extra,
    ])


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip_and_layout(base_dir):
    model, meta = ckpt.load_model(str(base_dir), "base")
    assert meta["model_tag"] == "d2" and meta["step"] == 5
    d = base_dir / "base_checkpoints" / "d2"
    assert sorted(os.listdir(d)) == ["meta_000005.json", "model_000005.pt"]  # no temp files left behind
    out = str(base_dir / "chatsft_checkpoints" / "d2")
    opt = build_optimizers(model)
    ckpt.save_checkpoint(out, 7, model.state_dict(), dict(optimizers=[o.state_dict() for o in opt]), dict(model_config=model.config.to_dict()))
    assert sorted(os.listdir(out)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]
    state, trainer, meta2 = ckpt.load_checkpoint(out, 7, load_trainer_state=True)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    assert meta2["model_config"] == model.config.to_dict()
    assert len(trainer["optimizers"]) == 2


def resave(path, obj):
    """torch.save over a checkpoint file and record its new digest in the step's meta, as a
    deliberate replacement would (or an attacker): the checks behind the checksum still apply."""
    torch.save(obj, path)
    record_digest(path)


def record_digest(path):
    """Record a checkpoint file's current size and SHA-256 in its step's meta."""
    step = int(path.name.split("_")[1].split(".")[0])
    meta_file = path.parent / f"meta_{step:06d}.json"
    meta = json.loads(meta_file.read_text())
    meta["files"][path.name] = ckpt.file_digest(str(path))
    meta_file.write_text(json.dumps(meta))


def test_damaged_checkpoint_files_are_refused(base_dir):
    """torch's zip reader does not check its CRCs: a flipped bit in a tensor loaded as a silently
    different weight. The meta's size and SHA-256 of each file catch it, for the model (every
    loader) and for a rank's trainer state (resume)."""
    train.run(make_args(base_dir, "--num-iterations", "2", "--save-every", "1", "--eval-every", "-1"))
    out = base_dir / "chatsft_checkpoints" / "d2"
    meta = read_meta(base_dir, 2)
    assert sorted(meta["files"]) == ["model_000002.pt", "optim_000002_rank0.pt"]
    assert meta["files"]["model_000002.pt"] == ckpt.file_digest(str(out / "model_000002.pt"))
    model_file = out / "model_000002.pt"
    good = model_file.read_bytes()
    # a bit flipped inside a tensor: torch.load itself accepts this file
    model_file.write_bytes(good[:-2000] + bytes([good[-2000] ^ 1]) + good[-1999:])
    torch.load(model_file, weights_only=True)
    with pytest.raises(ckpt.CheckpointError, match=r"model_000002\.pt is damaged: its SHA-256 is [0-9a-f]{64}, [0-9a-f]{64} when it was saved"):
        ckpt.load_model(str(base_dir), "sft")
    model_file.write_bytes(good[:-10])
    with pytest.raises(ckpt.CheckpointError, match=rf"model_000002\.pt has {len(good) - 10} bytes, {len(good)} when it was saved"):
        ckpt.load_model(str(base_dir), "sft")
    model_file.write_bytes(good)
    ckpt.load_model(str(base_dir), "sft")
    state_file = out / "optim_000002_rank0.pt"
    state = state_file.read_bytes()
    state_file.write_bytes(state[:-2000] + bytes([state[-2000] ^ 1]) + state[-1999:])
    with pytest.raises(ckpt.CheckpointError, match=r"optim_000002_rank0\.pt is damaged"):
        train.run(make_args(base_dir, "--num-iterations", "3", "--resume", "--eval-every", "-1"))
    state_file.write_bytes(state)
    (out / "meta_000002.json").write_text(json.dumps(dict(meta, files={"model_000002.pt": "x"})))
    with pytest.raises(ckpt.CheckpointError, match="the meta's record of model_000002.pt is damaged"):
        ckpt.load_model(str(base_dir), "sft")
    # nanochat's checkpoints record no digests and load unchecked
    (out / "meta_000002.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    ckpt.load_model(str(base_dir), "sft")


def read_meta(base_dir, step):
    with open(base_dir / "chatsft_checkpoints" / "d2" / f"meta_{step:06d}.json") as f:
        return json.load(f)


def test_sft_checkpoint_meta_is_readable_by_nanochat(base_dir):
    """nanochat builds its model with GPTConfig(**meta["model_config"]) from six fields: an sftfast
    checkpoint's model_config holds exactly those; softcap and rope_base sit beside it."""
    train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1"))
    meta = read_meta(base_dir, 1)
    assert sorted(meta["model_config"]) == sorted(ckpt.NANOCHAT_CONFIG_KEYS)
    assert meta["sftfast_model_config"] == {"softcap": 15.0, "rope_base": 10000.0}
    model, _ = ckpt.load_model(str(base_dir), "sft")
    assert model.config == ckpt.load_model(str(base_dir), "base")[0].config


def test_incomplete_checkpoint_is_ignored_and_pickles_refused(base_dir, tmp_path):
    d = base_dir / "base_checkpoints" / "d2"
    shutil.copy(d / "model_000005.pt", d / "model_000009.pt")  # model written, meta never: a crash mid-save
    assert ckpt.find_last_step(str(d)) == 5
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(str(d), 9)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    resave(d / "model_000005.pt", {"x": Evil()})  # with its digest recorded: the content is refused
    with pytest.raises(ckpt.CheckpointError, match="weights_only"):
        ckpt.load_checkpoint(str(d), 5)


def test_damaged_checkpoint_meta_and_state_are_refused_clearly(base_dir):
    """An edited meta was trusted before the weights were looked at: n_layer 2**40 built layers
    for hours; n_head 0 divided by zero; a null meta or a non-dict model file gave bare
    TypeErrors. Each is now a CheckpointError naming the checkpoint, before any allocation."""
    d = base_dir / "base_checkpoints" / "d2"
    meta_file = d / "meta_000005.json"
    good = json.loads(meta_file.read_text())

    def load_with(meta):
        meta_file.write_text(json.dumps(meta))
        return ckpt.load_model(str(base_dir), "base")

    for change, match in (
        (dict(n_layer=2**40), r"n_layer=1099511627776 but the weights hold 2 layers"),
        (dict(n_head=0), r"positive integers, got n_head=0"),
        (dict(vocab_size=2**27), r"transformer\.wte\.weight \(265, 32\) \(model_config: \(134217728, 32\)\)"),
        (dict(n_layer="2"), r"positive integers, got n_layer='2'"),
    ):
        with pytest.raises(ckpt.CheckpointError, match=rf"d2 step 5: .*{match}"):
            load_with(dict(good, model_config=dict(good["model_config"], **change)))
    with pytest.raises(ckpt.CheckpointError, match="expected a JSON object, got NoneType"):
        load_with(None)
    load_with(good)  # intact again
    resave(d / "model_000005.pt", [torch.zeros(1)])
    with pytest.raises(ckpt.CheckpointError, match="model_000005.pt: expected a state dict of tensors, got list"):
        ckpt.load_model(str(base_dir), "base")


def test_a_later_nanochat_architecture_is_refused_by_name(base_dir):
    """Later nanochat GPTs add sliding windows, value embeddings and residual scalars: such a
    checkpoint must not load with those parts dropped (another function would be trained)."""
    d = base_dir / "base_checkpoints" / "d2"
    meta_file = d / "meta_000005.json"
    good = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(good, model_config=dict(good["model_config"], window_pattern="SSSL"))))
    with pytest.raises(ckpt.CheckpointError, match=r"d2 step 5: model_config has fields sftfast's GPT does not know "
                                                   r"\(window_pattern\); .*later nanochat architecture"):
        ckpt.load_model(str(base_dir), "base")
    meta_file.write_text(json.dumps(good))
    state = torch.load(d / "model_000005.pt", weights_only=True)
    resave(d / "model_000005.pt", dict(state, resid_lambdas=torch.ones(2), x0_lambdas=torch.zeros(2)))
    with pytest.raises(ckpt.CheckpointError, match=r"parameters sftfast's GPT does not have \(resid_lambdas, "
                                                   r"x0_lambdas\); .*later nanochat architecture"):
        ckpt.load_model(str(base_dir), "base")


def test_resume_refuses_a_damaged_trainer_state(base_dir):
    """A trainer state with fewer optimizer states than optimizers was zip()-truncated (the
    optimizer silently restarted); loader positions that no loader can have saved changed the
    data order silently."""
    train.run(make_args(base_dir, "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1"))
    out = base_dir / "chatsft_checkpoints" / "d2"
    os.unlink(out / "meta_000004.json")  # resume from step 2
    state_file = out / "optim_000002_rank0.pt"
    good = torch.load(state_file, weights_only=True)
    for damage, match in (
        (lambda s: s.update(optimizers=s["optimizers"][:1]), "holds 1 optimizer states, this run has 2"),
        (lambda s: s["loader"].update(held=[10**12]), "loader state is inconsistent"),
        (lambda s: s["loader"].update(held=s["loader"]["held"] + s["loader"]["held"][:1]), "loader state is inconsistent"),
        (lambda s: s["loader"].update(cursor="7"), "non-negative ints"),
    ):
        state = copy.deepcopy(good)
        damage(state)
        resave(state_file, state)
        with pytest.raises(ckpt.CheckpointError, match=match):
            train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "-1"))
    resave(state_file, good)
    assert train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "-1"))["step"] == 4


def test_bits_per_byte_without_byte_tokens_is_undefined_not_zero():
    """Targets that are all special tokens (0 bytes each) carry no bytes: val_bpb was 0.0."""
    tok = byte_tokenizer()
    model = GPT(GPTConfig(sequence_len=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    model.init_weights(seed=0)
    special = tok.special_token_id("<|assistant_end|>")
    batch = SimpleNamespace(inputs=torch.full((1, 4), tok.bos_id), targets=torch.tensor([[special, -1, special, -1]]),
                            doc_ids=torch.zeros(1, 4, dtype=torch.int32), progress=1.0)
    loader = SimpleNamespace(next=lambda: batch)
    info = train.DistInfo(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    token_bytes = train.token_bytes_tensor(tok, "cpu")
    out = train.evaluate_loss(model, loader, 1, token_bytes, info, torch.autocast("cpu", enabled=False))
    assert out["val_tokens"] == 2 and math.isfinite(out["val_loss"]) and math.isnan(out["val_bpb"])
    # the fresh model's logits are all 0: every target costs ln V nats; only the two byte tokens
    # (a byte each) count for bits per byte, the special one for the loss alone
    batch.targets = torch.tensor([[ord("a"), -1, special, ord("b")]])
    out = train.evaluate_loss(model, loader, 1, token_bytes, info, torch.autocast("cpu", enabled=False))
    assert out["val_tokens"] == 3 and out["val_loss"] == pytest.approx(math.log(tok.n_vocab))
    assert out["val_bpb"] == pytest.approx(math.log2(tok.n_vocab))


def test_log_jsonl_stays_strict_json_with_an_undefined_metric(tmp_path):
    """json.dumps writes NaN bare, which jq or serde refuse: an undefined val_bpb is null."""
    path = tmp_path / "log.jsonl"
    args = SimpleNamespace(log_jsonl=str(path), run="dummy", resume=False)
    log = train.Logger(args, train.DistInfo(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    log.record("eval", dict(step=3, val_loss=1.5, val_bpb=float("nan")))
    log.close()
    line = path.read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}")) == \
        dict(type="eval", step=3, val_loss=1.5, val_bpb=None)


def test_log_jsonl_starts_over_for_a_new_run_and_continues_a_resumed_one(tmp_path):
    """A new run appended to an earlier run's log: two runs' steps read as one."""
    path = tmp_path / "log.jsonl"
    earlier = '{"type": "step", "step": 1, "from": "an earlier run"}\n'
    path.write_text(earlier)
    info = train.DistInfo(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    # a run that stops before its first record (refused at startup) leaves the log as it was
    train.Logger(SimpleNamespace(log_jsonl=str(path), run="dummy", resume=False), info).close()
    assert path.read_text() == earlier
    for resume, expected in ((False, [1]), (True, [1, 2])):
        log = train.Logger(SimpleNamespace(log_jsonl=str(path), run="dummy", resume=resume), info)
        log.record("step", dict(step=len(expected)))
        log.close()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["step"] for r in lines] == expected and all("from" not in r for r in lines)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 836e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce GTX 1080", None)])
def test_mfu_peak_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.gpu_peak_flops(torch.device("cuda")) == peak


# --- optimizers and schedules ---------------------------------------------------------------

def test_initial_lr_and_groups():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights(seed=0)
    adamw, muon = build_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, init_lr_frac=0.02)
    scale = (32 / 768) ** -0.5
    lrs = sorted(g["initial_lr"] for g in adamw.param_groups)
    assert lrs == pytest.approx(sorted([0.004 * scale * 0.02, 0.2 * scale * 0.02]))
    assert all(g["initial_lr"] == pytest.approx(0.02 * 0.02) for g in muon.param_groups)
    assert sum(len(g["params"]) for g in muon.param_groups) == 2 * 6


def test_newton_schulz_orthogonalises():
    g = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.5 and s.max() < 1.3


def test_schedules():
    assert lr_multiplier(0, 10) == 1.0 and lr_multiplier(5, 10) == 0.5
    wsd = [lr_multiplier(s, 10, "wsd", warmup_ratio=0.2, warmdown_ratio=0.5) for s in range(10)]
    assert wsd[0] == 0.5 and wsd[1] == 1.0 and wsd[5] == 1.0 and wsd[9] == pytest.approx(0.2)
    # a derived run schedules by consumption: fractional steps, warmup rising to exactly 1
    fractional = [lr_multiplier(s / 4, 10, "wsd", warmup_ratio=0.2, warmdown_ratio=0.5) for s in range(40)]
    assert max(fractional) == 1.0 and fractional[:8] == sorted(fractional[:8])
    with pytest.raises(ValueError):
        lr_multiplier(0, 10, "cosine")
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


# --- loader -------------------------------------------------------------------------------

def test_bestfit_rows_masks_and_resume():
    tok = byte_tokenizer()
    data = conversations(40, 3)
    loader = train_data.PyPackedLoader(data, tok, 3, 63, buffer_size=5)
    b = loader.next()
    assert b.inputs.shape == (3, 63) and b.targets.shape == (3, 63)
    assert (b.inputs[:, 0] == tok.bos_id).all()  # each row starts with a conversation's bos
    # every supervised target is a real token; targets follow inputs shifted by one
    sup = b.targets >= 0
    assert torch.equal(b.targets[:, :-1][sup[:, :-1]], b.inputs[:, 1:][sup[:, :-1]])
    state = loader.state_dict()
    rest = [loader.next() for _ in range(4)]
    again = train_data.PyPackedLoader(data, tok, 3, 63, buffer_size=5)
    again.load_state_dict(state)
    for x in rest:
        y = again.next()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets) and torch.equal(x.doc_ids, y.doc_ids)


def test_python_baseline_packs_like_the_reference_with_overlong_conversations():
    """The baseline the train benchmark measures must do nanochat's work: an overlong
    conversation is cut to the row when it enters the buffer, then picked like any other."""
    from sftfast import reference as ref

    tok = byte_tokenizer()
    data = conversations(60, 5) + conversations(10, 6, long_user=True)  # long ones: ~200 bytes > a row
    random.Random(1).shuffle(data)
    B, T, buf = 2, 63, 6
    rendered = [ref.render_conversation(tok.to_tiktoken(), c, T + 2) for c in data]
    assert sum(len(ids) > T + 1 for ids, _ in rendered) >= 5
    want = ref.pack_bestfit(rendered, B, T, tok.bos_id, buffer_size=buf)
    loader = train_data.PyPackedLoader(data, tok, B, T, buffer_size=buf)
    used = 0
    for k, w in enumerate(want):
        used += len(w.tags)
        if used > len(data) - buf:  # the reference's buffer starts to run dry; the loader's cycles on
            break
        got = loader.next()
        assert got.inputs.tolist() == w.inputs.tolist(), f"batch {k}"
        assert got.targets.tolist() == w.targets.tolist(), f"batch {k}"
    assert k >= 5
    assert loader.n_truncated == sum(w.num_truncated for w in want[:k])


def test_rank_sharding_is_disjoint():
    tok = byte_tokenizer()
    data = conversations(10, 4)
    seen = []
    for r in range(3):
        ld = train_data.PyPackedLoader(data, tok, 1, 2000, rank=r, world_size=3, packing="padded")
        seen.append(ld.shard_len)
    assert seen == [4, 3, 3]


# --- the trainer ---------------------------------------------------------------------------

def test_resume_is_bitwise_identical(base_dir):
    full = train.run(make_args(base_dir, "--num-iterations", "6"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    first = train.run(make_args(base_dir, "--num-iterations", "6", "--save-every", "3", "--log-jsonl", str(base_dir / "a.jsonl")))
    assert first["losses"] == full["losses"]
    # drop the final checkpoint: resume from step 3
    out = base_dir / "chatsft_checkpoints" / "d2"
    for name in os.listdir(out):
        if "000006" in name:
            os.unlink(out / name)
    # the resumed run reads with worker processes: who prepares the batches changes nothing
    resumed = train.run(make_args(base_dir, "--num-iterations", "6", "--resume", "--loader-workers", "2"))
    assert resumed["losses"] == full["losses"][3:]  # bitwise
    a, b = params(full["model"]), params(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_run_flags(base_dir):
    """A resumed run is the same run continued: a changed learning rate, loss normalisation or
    step count (also one left out, which would become a derived count) is refused with the list
    of differences, instead of being silently half-applied."""
    train.run(make_args(base_dir, "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1"))
    os.unlink(base_dir / "chatsft_checkpoints" / "d2" / "meta_000004.json")  # as if stopped after step 2
    with pytest.raises(ckpt.CheckpointError, match=r"--matrix-lr 0\.5 \(checkpoint: 0\.02\); --loss-norm 'microbatch'"):
        train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--matrix-lr", "0.5", "--loss-norm", "microbatch"))
    with pytest.raises(ckpt.CheckpointError, match=r"--num-iterations -1 \(checkpoint: 4\)"):
        train.run(make_args(base_dir, "--resume"))
    # what may change: evaluation, logging, saving, the loader's workers
    out = train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "1", "--loader-workers", "1"))
    assert out["step"] == 4 and len(out["losses"]) == 2


def test_resume_refuses_changed_training_data(base_dir):
    """The loader state is a position in the data: resumed on changed data (an edited file, a
    new hub revision) it gave other batches than the run would have seen, silently."""
    train.run(make_args(base_dir, "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1"))
    os.unlink(base_dir / "chatsft_checkpoints" / "d2" / "meta_000004.json")  # as if stopped after step 2
    data = base_dir / "train.jsonl"
    good = data.read_text()
    data.write_text(good.replace("add ", "sum ", 1))
    with pytest.raises(ckpt.CheckpointError, match=r"the training data changed: training conversation \d+ differs"):
        train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "-1"))
    data.write_text(good + json.dumps(conversations(1, seed=9)[0]) + "\n")
    with pytest.raises(ckpt.CheckpointError, match="49 training conversations, the checkpoint's run had 48"):
        train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "-1"))
    data.write_text(good)
    assert train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "-1"))["step"] == 4


def test_data_fingerprint_of_conversations_and_shard_items():
    convs = conversations(200, seed=3)
    fp = train_data.data_fingerprint(convs)
    assert fp["n"] == 200 and len(fp["samples"]) == 64 and fp == train_data.data_fingerprint(copy.deepcopy(convs))
    assert train_data.fingerprint_difference(fp, fp) is None
    sampled = fp["samples"][10][0]
    convs[sampled]["messages"][0]["content"] += "!"
    assert train_data.fingerprint_difference(fp, train_data.data_fingerprint(convs)) == (
        f"training conversation {sampled} differs from the checkpoint's run")
    items = [(np.arange(5, dtype=np.uint32) + i, np.ones(5, dtype=np.uint8)) for i in range(3)]
    fp = train_data.data_fingerprint(items)
    assert [i for i, _ in fp["samples"]] == [0, 1, 2]
    items[1][1][0] = 0  # one mask byte
    assert "conversation 1 differs" in train_data.fingerprint_difference(fp, train_data.data_fingerprint(items))
    assert train_data.data_fingerprint([]) == {"n": 0, "samples": []}


def test_resume_trusts_the_meta_not_leftover_files(base_dir):
    """Which ranks wrote a step is the meta's word: a stray rank-1 file (from an interrupted
    2-rank save) neither blocks a 1-rank resume nor passes for this step's state, and a trainer
    state from another step is refused. A fresh run clears an interrupted save's files."""
    d = base_dir / "chatsft_checkpoints" / "d2"
    train.run(make_args(base_dir, "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1"))
    assert read_meta(base_dir, 2)["world_size"] == 1
    os.unlink(d / "meta_000004.json")
    shutil.copy(d / "optim_000002_rank0.pt", d / "optim_000002_rank1.pt")
    out = train.run(make_args(base_dir, "--num-iterations", "4", "--resume", "--eval-every", "-1"))
    assert out["step"] == 4 and len(out["losses"]) == 2
    os.unlink(d / "meta_000004.json")
    shutil.copy(d / "optim_000004_rank0.pt", d / "optim_000002_rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"optim_000002_rank0\.pt (is damaged|has \d+ bytes)"):  # the meta's digest
        train.run(make_args(base_dir, "--num-iterations", "4", "--resume"))
    record_digest(d / "optim_000002_rank0.pt")  # and when the digest was replaced too
    with pytest.raises(ckpt.CheckpointError, match="optim_000002_rank0.pt is not this checkpoint's: it was written at step 4"):
        train.run(make_args(base_dir, "--num-iterations", "4", "--resume"))
    # only incomplete files left (a save interrupted before its meta): a fresh run starts clean
    for name in os.listdir(d):
        if name.startswith("meta_"):
            os.unlink(d / name)
    train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1"))
    assert sorted(os.listdir(d)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]


def test_resuming_a_finished_run_changes_nothing(base_dir):
    train.run(make_args(base_dir, "--num-iterations", "2"))
    before = read_meta(base_dir, 2)
    assert math.isfinite(before["metrics"]["train_loss"])
    out = train.run(make_args(base_dir, "--num-iterations", "2", "--resume"))
    assert out["step"] == 2 and out["losses"] == []
    assert read_meta(base_dir, 2) == before  # not re-saved with train_loss NaN


def test_fresh_run_refuses_an_earlier_runs_checkpoints(base_dir):
    """A fresh, shorter run into a directory holding a longer run's checkpoints would leave the
    old last step to be loaded (and resumed) as if it were this run's: refused unless --overwrite."""
    train.run(make_args(base_dir, "--num-iterations", "4", "--save-every", "2", "--eval-every", "-1"))
    with pytest.raises(ckpt.CheckpointError, match=r"earlier run \(steps 2, 4\).*--overwrite"):
        train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1"))
    # --overwrite deletes only once the run is set up: a bad flag leaves the earlier run intact
    with pytest.raises((ValueError, OSError)):
        train.run(make_args(base_dir, "--num-iterations", "1", "--overwrite", "--train-data", str(base_dir / "missing.jsonl")))
    assert ckpt.complete_steps(str(base_dir / "chatsft_checkpoints" / "d2")) == [2, 4]
    train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1", "--overwrite"))
    assert ckpt.complete_steps(str(base_dir / "chatsft_checkpoints" / "d2")) == [1]
    assert sorted(os.listdir(base_dir / "chatsft_checkpoints" / "d2")) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]


def test_periodic_checkpoints_carry_their_own_steps_metrics(base_dir, capsys):
    """--save-every N saves after step N's evaluation (its metrics are step N's, not the previous
    evaluation's), and a derived run that ends on a multiple of N is saved once, at the end."""
    train.run(make_args(base_dir, "--num-iterations", "4", "--save-every", "2", "--eval-every", "2",
                        "--log-jsonl", str(base_dir / "log.jsonl")))
    with open(base_dir / "log.jsonl") as f:
        val = {r["step"]: r["val_loss"] for r in map(json.loads, f) if r["type"] == "eval"}
    assert sorted(val) == [0, 2, 4]
    assert read_meta(base_dir, 2)["metrics"]["val_loss"] == pytest.approx(val[2])
    assert read_meta(base_dir, 4)["metrics"]["val_loss"] == pytest.approx(val[4])
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    capsys.readouterr()
    out = train.run(make_args(base_dir, "--num-epochs", "1", "--save-every", "1", "--eval-every", "-1", "--max-seq-len", "256"))
    assert out["step"] < out["num_iterations"]  # packed rows: the data ends before the bound
    saved = ckpt.complete_steps(str(base_dir / "chatsft_checkpoints" / "d2"))
    assert saved == list(range(1, out["step"] + 1))
    assert capsys.readouterr().out.count("saved checkpoint") == out["step"]  # the last step once


def test_data_dir_reaches_the_mixture_and_the_metric_tasks(base_dir, monkeypatch):
    """--data-dir (local copies of the hub datasets, as for eval and prep) is what the
    mixture and the evaluation tasks load from."""
    from sftfast import tasks

    seen = []

    def build_mixture(name, split="train", data_dir=None):
        seen.append(("mixture", split, data_dir))
        raise tasks.TaskError("stop here")

    monkeypatch.setattr(tasks, "build_mixture", build_mixture)
    args = make_args(base_dir, "--data-dir", "/mirror")
    args.train_data = args.val_data = None
    with pytest.raises(tasks.TaskError, match="stop here"):
        train.run(args)
    assert seen == [("mixture", "train", "/mirror")]


def test_eval_tasks_are_scored_when_training_from_a_file(base_dir, monkeypatch):
    """--eval-tasks was honoured only for a --mixture run: with --train-data (a JSONL file or a
    shard, the README's 8-GPU line) no task accuracy was ever reported."""
    from sftfast import tasks

    asked, real_get_task = [], tasks.get_task

    def get_task(name, data_dir=None, role=None):  # no hub here: record the request, return a small task
        asked.append((name, data_dir, role))
        task = real_get_task("Arithmetic", size=4)
        task.eval_type = "categorical"  # stands in for ARC / MMLU (scoring is patched below)
        return task

    monkeypatch.setattr(tasks, "get_task", get_task)
    scored = []
    monkeypatch.setattr(train, "categorical_accuracy",
                        lambda model, tok, task, max_problems=1024, batch_size=8: scored.append(task) or 0.25)
    out = train.run(make_args(base_dir, "--num-iterations", "2", "--eval-tasks", "ARC-Easy, MMLU", "--data-dir", "/mirror",
                              "--eval-metrics-every", "1"))
    assert asked == [("ARC-Easy", "/mirror", "eval"), ("MMLU", "/mirror", "eval")]
    assert out["metrics"]["arc_easy_acc"] == 0.25 and out["metrics"]["mmlu_acc"] == 0.25
    assert len(scored) == 4  # after steps 1 and 2 (the last), as nanochat: not before training


def test_generative_eval_task_is_refused_before_training(base_dir):
    """A generative task passed startup and failed at its first metric evaluation, after the
    training (and without a checkpoint), with a message about a missing field."""
    with pytest.raises(ValueError, match="generative ones are scored by python -m sftfast.eval: SpellingBee, Arithmetic$"):
        train.run(make_args(base_dir, "--num-iterations", "2", "--eval-tasks", "SpellingBee,Arithmetic"))
    assert not (base_dir / "chatsft_checkpoints").exists()


def test_num_iterations_zero_is_a_clear_error(base_dir):
    with pytest.raises(ValueError, match="--num-iterations must be positive, or -1"):
        train.run(make_args(base_dir, "--num-iterations", "0"))


def test_token_loss_norm_independent_of_micro_batch_split(base_dir):
    one = train.run(make_args(base_dir, "--num-iterations", "1", "--device-batch-size", "4"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    four = train.run(make_args(base_dir, "--num-iterations", "1", "--device-batch-size", "1"))
    assert one["grad_accum_steps"] == 1 and four["grad_accum_steps"] == 4
    assert one["losses"][0] == pytest.approx(four["losses"][0], rel=1e-5)
    a, b = params(one["model"]), params(four["model"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def supervised_targets(tok, data, row):
    """Supervised targets of each conversation in a row of `row` tokens (cut to the row)."""
    return sum(sum(tok.render_conversation(c, max_tokens=row + 1)[1][1:row]) for c in data)


@pytest.mark.parametrize("loader", ["rust", "python"])
def test_a_derived_run_trains_every_conversation_once(base_dir, loader, tmp_path):
    """Best-fit packs several conversations a row, so the run ends when the data is read: every
    conversation exactly once. An endless stream stopped by a consumed count left the buffer's
    last conversations untrained and trained some of the next epoch's instead (here: 52
    conversations consumed of 49, yet 295 supervised tokens fewer than the data holds)."""
    data = conversations(40, 3) + conversations(9, 4, long_user=True)  # some longer than a row
    with open(base_dir / "train.jsonl", "w") as f:
        for c in data:
            f.write(json.dumps(c) + "\n")
    log = tmp_path / "log.jsonl"
    out = train.run(make_args(base_dir, "--max-seq-len", "128", "--eval-every", "-1", "--loader", loader,
                              "--target-examples-per-step", "4", "--device-batch-size", "2", "--log-jsonl", str(log)))
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "step"]
    assert len(steps) == out["step"] < out["num_iterations"]  # rows held several conversations
    assert steps[-1]["epoch"] == 1.0
    assert sum(r["sup_tokens"] for r in steps) == supervised_targets(byte_tokenizer(), data, 129)
    # the linear schedule follows consumption: each step's lrm is 1 - the data read before it
    before = [0.0] + [r["epoch"] for r in steps[:-1]]
    assert [r["lrm"] for r in steps] == pytest.approx([1.0 - e for e in before])


def test_all_masked_steps_give_no_nan(base_dir):
    # user prompts longer than the row: every target of every row is masked
    with open(base_dir / "train.jsonl", "w") as f:
        for c in conversations(16, 5, long_user=True):
            f.write(json.dumps(c) + "\n")
    before, _ = ckpt.load_model(str(base_dir), "base")
    out = train.run(make_args(base_dir, "--num-iterations", "2", "--packing", "padded", "--max-seq-len", "32", "--eval-every", "-1"))
    assert out["losses"] == [0.0, 0.0]
    a, b = params(before), params(out["model"])
    assert all(torch.isfinite(b[k]).all() and torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_without_saving(base_dir):
    model, meta = ckpt.load_model(str(base_dir), "base")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    ckpt.save_checkpoint(str(base_dir / "base_checkpoints" / "d2"), 5, model.state_dict(), None, dict(model_config=model.config.to_dict()))
    with pytest.raises(train.TrainingDivergedError, match=r"step 0 in rank 0 micro-batch 0 \(loss nan\)"):
        train.run(make_args(base_dir, "--num-iterations", "3", "--eval-every", "-1", "--loader-workers", "1"))
    assert not (base_dir / "chatsft_checkpoints").exists()
    # the failed run's loader is closed: no producer thread, no worker process left behind
    import multiprocessing
    import threading

    assert not multiprocessing.active_children()
    assert not [t for t in threading.enumerate() if t.name == "sftfast-loader"]


def test_bad_batch_arithmetic_is_an_error(base_dir):
    with pytest.raises(ValueError, match="multiple"):
        train.run(make_args(base_dir, "--device-batch-size", "3"))


@pytest.mark.parametrize("flag, value", [("--device-batch-size", "0"), ("--num-epochs", "0"), ("--eval-steps", "0"),
                                         ("--target-examples-per-step", "-4"), ("--max-seq-len", "0"),
                                         ("--loader-workers", "-1"), ("--device-batch-size", "two")])
def test_counts_below_their_minimum_are_refused_when_read(base_dir, flag, value, capsys):
    """--device-batch-size 0 was a ZeroDivisionError traceback; --num-epochs 0 said the data
    "give no step"; such values are refused with the flag's name before anything loads."""
    with pytest.raises(SystemExit) as exit_info:
        make_args(base_dir, flag, value)
    assert exit_info.value.code == 2 and f"argument {flag}: must be an integer >= " in capsys.readouterr().err


def test_token_budget_sets_the_rows_per_step(base_dir):
    args = make_args(base_dir, "--target-tokens-per-step", str(8 * 64))  # 8 rows of max_seq_len 64
    assert train.grad_accum_steps(args, world_size=2) == 2 and args.target_examples_per_step == 8
    with pytest.raises(ValueError, match="max_seq_len"):
        train.grad_accum_steps(make_args(base_dir, "--target-tokens-per-step", "100"), world_size=1)
    by_tokens = train.run(make_args(base_dir, "--num-iterations", "2", "--target-tokens-per-step", str(4 * 64)))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    by_rows = train.run(make_args(base_dir, "--num-iterations", "2"))
    assert by_tokens["losses"] == by_rows["losses"]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(base_dir):
    """2 gloo ranks x 1 row x 2 micro-batches == 1 process x 2 rows x 2 micro-batches (padded rows,
    so both see the same 4 conversations per step). The ranks read with a worker process each."""
    common = ["-m", "sftfast.train", "--base-dir", str(base_dir), "--source", "base", "--device", "cpu",
              "--train-data", str(base_dir / "train.jsonl"), "--max-seq-len", "64", "--packing", "padded",
              "--target-examples-per-step", "4", "--num-iterations", "3", "--eval-every", "-1",
              "--eval-metrics-every", "-1", "--eval-tasks", "", "--loss-norm", "token", "--init-lr-frac", "0.5"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "python"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r1 = subprocess.run([sys.executable, *common, "--device-batch-size", "2", "--log-jsonl", str(base_dir / "one.jsonl")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    # a 1-rank checkpoint resumed by 2 ranks: one clear error (rank 1 has no trainer state to read)
    grow = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                           "--device-batch-size", "1", "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert grow.returncode != 0 and "was written by 1 ranks, resuming with 2" in grow.stderr, grow.stderr[-3000:]
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                         "--device-batch-size", "1", "--log-jsonl", str(base_dir / "two.jsonl"), "--loader-workers", "1"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]

    def losses(name):
        with open(base_dir / name) as f:
            return [r["loss"] for r in map(json.loads, f) if r["type"] == "step"]

    l1, l2 = losses("one.jsonl"), losses("two.jsonl")
    assert len(l1) == len(l2) == 3
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert sorted(os.listdir(base_dir / "chatsft_checkpoints" / "d2")) == [
        "meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    assert sorted(read_meta(base_dir, 3)["files"]) == ["model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    # --overwrite where rank 1 fails to set up (one conversation for two ranks): rank 0 waits
    # for it before deleting, so the earlier run's checkpoints survive the failed start
    with open(base_dir / "one.jsonl", "w") as f:
        f.write(json.dumps(conversations(1)[0]) + "\n")
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                          "--device-batch-size", "1", "--overwrite", "--train-data", str(base_dir / "one.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "gets no conversations" in bad.stderr, bad.stderr[-3000:]
    assert ckpt.complete_steps(str(base_dir / "chatsft_checkpoints" / "d2")) == [3]


@pytest.mark.slow
def test_torchrun_ranks_whose_data_ends_apart(base_dir, tmp_path):
    """Rank 0 reads long replies (a row each), rank 1 short ones (three a row): rank 1's data
    ends steps before rank 0's. It takes part in the remaining steps with no micro-batch (zero
    gradients, the same all-reduces), the run ends when both are done, and every conversation
    is trained once, with the micro-batch loss norm counting only micro-batches that exist."""

    def chat(user, reply):
        return dict(messages=[dict(role="user", content=user), dict(role="assistant", content=reply)])

    n = 24
    order = np.random.default_rng(42).permutation(n)  # the trainer's shuffle (train_data.Shuffled)
    data = [None] * n
    for position, index in enumerate(order):  # rank r reads shuffled positions r, r + 2, ...
        data[index] = chat("hi", "long " * 20) if position % 2 == 0 else chat(f"q{position}", "ok")
    with open(base_dir / "train.jsonl", "w") as f:
        for c in data:
            f.write(json.dumps(c) + "\n")
    log = tmp_path / "log.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "python"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "sftfast.train", "--base-dir", str(base_dir), "--source", "base", "--device", "cpu",
                          "--train-data", str(base_dir / "train.jsonl"), "--max-seq-len", "128",
                          "--target-examples-per-step", "4", "--device-batch-size", "1", "--eval-every", "-1",
                          "--eval-metrics-every", "-1", "--eval-tasks", "", "--loss-norm", "microbatch",
                          "--log-jsonl", str(log)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "step"]
    assert len(steps) == 6  # rank 0: 12 rows, 2 a step; rank 1 is done after 2 steps (4 rows)
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert sum(r["sup_tokens"] for r in steps) == supervised_targets(byte_tokenizer(), data, 129)
    assert ckpt.complete_steps(str(base_dir / "chatsft_checkpoints" / "d2")) == [6]


@pytest.mark.slow
def test_demo_end_to_end_scaled_down(tmp_path):
    """The embedded demo at 2% scale: tokenizer, base training, SFT, evaluation, checkpoint, chat."""
    from sftfast import demo

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--demo", "--base-dir", str(tmp_path), "--demo-scale", "0.02"])
    out = demo.main(args)
    assert out["after"]["val_loss"] < out["before"]["val_loss"]
    assert {"val_loss", "val_bpb", "find_the_number_acc"} <= set(out["before"]) and set(out["before"]) == set(out["after"])
    assert os.path.exists(os.path.join(out["checkpoint_dir"], f"model_{out['steps']:06d}.pt"))
    assert os.path.exists(tmp_path / "tokenizer" / "tokenizer.sftfast")
    assert out["chat"] and all(isinstance(r, str) for r in out["chat"].values())
    # the base model is saved under its last base-training step (it was "step 0"), once
    base_steps = max(10, int(demo.BASE_STEPS * 0.02))
    assert ckpt.complete_steps(str(tmp_path / "base_checkpoints" / "demo")) == [base_steps]


def test_training_from_a_prep_shard_equals_training_from_jsonl(base_dir):
    """`--data DIR` (a shard from python -m sftfast.prep) feeds the same batches as the JSONL it
    was built from, so the losses are the same."""
    from sftfast import prep

    shard = base_dir / "shard"
    rc = prep.main([str(base_dir / "train.jsonl"), "--tokenizer", str(base_dir / "tokenizer" / "tokenizer.sftfast"),
                    "--out", str(shard), "--quiet", "--no-progress"])
    assert rc == 0
    from_jsonl = train.run(make_args(base_dir, "--num-iterations", "3"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    args = make_args(base_dir, "--num-iterations", "3")
    args.train_data = str(shard)
    from_shard = train.run(args)
    assert from_shard["losses"] == from_jsonl["losses"]


def test_a_shard_cut_shorter_than_the_rows_is_said(base_dir, capsys):
    """A shard prepared with --max-tokens below the rows' length trained its cut conversations
    shorter than the JSONL would, and nothing said so."""
    from sftfast import prep

    shard = base_dir / "short"
    rc = prep.main([str(base_dir / "train.jsonl"), "--tokenizer", str(base_dir / "tokenizer" / "tokenizer.sftfast"),
                    "--out", str(shard), "--quiet", "--no-progress", "--max-tokens", "40"])
    assert rc == 0
    cut = ShardDataset(shard).manifest["num_truncated"]
    assert cut > 0
    args = make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1")
    args.train_data = str(shard)
    train.run(args)
    assert (f"warning: --train-data {shard}: {cut} conversations were cut at max_tokens=40 when it was prepared, "
            "and rows hold 65 tokens") in capsys.readouterr().out


@pytest.mark.parametrize("loader", ["rust", "python"])
def test_the_run_reports_what_its_batches_held(base_dir, capsys, loader):
    """Padding, truncation, rows without a supervised token and skips were counted by the loader
    and never shown; a shard's conversations cut at prep (max_tokens = the row) were reported
    nowhere."""
    log = base_dir / "log.jsonl"
    train.run(make_args(base_dir, "--eval-every", "-1", "--packing", "padded", "--loader", loader,
                        "--log-jsonl", str(log)))
    data = [json.loads(line) for line in log.read_text().splitlines() if '"type": "data"' in line]
    assert len(data) == 1
    d = data[0]
    assert d["conversations"] == 48 and d["batches"] == 24 and d["skipped"] == 0 and "cut_at_prep" not in d
    assert 0 < d["padding"] < d["positions"]
    out = capsys.readouterr().out
    assert f"data | 48 conversations in 24 batches | padding {100 * d['padding'] / d['positions']:.1f}% |" in out


def test_a_shard_reports_the_conversations_prep_cut(base_dir, capsys):
    from sftfast import prep

    shard, long = base_dir / "row", base_dir / "long.jsonl"
    long.write_text("".join(json.dumps(c) + "\n" for c in conversations(16, seed=5, long_user=True)))
    assert prep.main([str(long), "--tokenizer", str(base_dir / "tokenizer" / "tokenizer.sftfast"),
                      "--out", str(shard), "--quiet", "--no-progress", "--max-tokens", "65"]) == 0
    cut = ShardDataset(shard).manifest["num_truncated"]
    assert cut > 0
    args = make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1")
    args.train_data = str(shard)
    train.run(args)
    out = capsys.readouterr().out
    assert f"cut at prep's max_tokens=65: {cut} of the shard" in out and "warning" not in out  # 65 = the row


def test_validation_reads_each_conversation_once(base_dir):
    """The validation loader was endless: with more eval_steps than the set fills, best-fit
    mixed the next pass's copies in (some conversations counted twice, others never)."""
    tok = byte_tokenizer()
    val = train_data.read_jsonl_conversations(base_dir / "val.jsonl")
    row = 64 + 1
    expected = sum(sum(tok.render_conversation(c, max_tokens=row)[1][1:]) for c in val)
    for packing in ("bestfit", "padded"):
        out = train.run(make_args(base_dir, "--num-iterations", "1", "--eval-steps", "50", "--packing", packing))
        shutil.rmtree(base_dir / "chatsft_checkpoints")
        assert out["metrics"]["val_tokens"] == expected, packing


def test_training_data_paths_that_are_not_data(base_dir):
    """A missing path or a directory without a manifest was reported as "CustomJSON: X is not
    a file"; --val-data without --train-data was silently ignored (the mixture's own
    validation part was used)."""
    args = make_args(base_dir, "--num-iterations", "1")
    args.train_data = str(base_dir / "nope")
    with pytest.raises(FileNotFoundError, match="nope: no such file or directory"):
        train.run(args)
    (base_dir / "empty_dir").mkdir()
    args.train_data = str(base_dir / "empty_dir")
    with pytest.raises(ValueError, match="empty_dir is a directory without manifest.json: not a shard"):
        train.run(args)
    args = make_args(base_dir, "--num-iterations", "1", "--mixture", "demo")
    args.train_data = None
    with pytest.raises(ValueError, match="--val-data .*val.jsonl goes with --train-data"):
        train.run(args)


def test_validation_data_smaller_than_the_world_is_refused_at_startup(base_dir, monkeypatch):
    """A validation set with fewer conversations than ranks failed at the first evaluation
    (with the default eval_every, at the end of the run, without a checkpoint)."""
    (base_dir / "val1.jsonl").write_text(json.dumps(conversations(1, seed=3)[0]) + "\n")
    args = make_args(base_dir, "--num-iterations", "1", "--val-data", str(base_dir / "val1.jsonl"))
    # rank 0 of 2 as it sees itself (the check comes before anything talks to the other rank)
    monkeypatch.setattr(train, "init_distributed", lambda device: train.DistInfo(False, 0, 0, 2, torch.device("cpu")))
    with pytest.raises(ValueError, match="the validation data has 1 conversations, fewer than the 2 ranks"):
        train.run(args)
    assert not (base_dir / "chatsft_checkpoints").exists() or not any((base_dir / "chatsft_checkpoints").rglob("*.pt"))


def test_training_data_is_shuffled_deterministically(base_dir):
    """--train-data is dealt in a fixed seed-42 permutation (not file order), the same on every
    run and rank; validation data keeps its order."""
    tok = byte_tokenizer()
    path = base_dir / "train.jsonl"
    a, b = train_data.read_training_data(path, tok), train_data.read_training_data(path, tok)
    in_file_order = train_data.read_jsonl_conversations(path)
    assert sorted(a.order.tolist()) == list(range(len(in_file_order)))
    assert a.order.tolist() != list(range(len(in_file_order)))
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
    assert a[0] == in_file_order[int(a.order[0])]
    assert train_data.read_training_data(path, tok, shuffle=False) == in_file_order


def test_read_jsonl_conversations_accepts_a_byte_order_mark(tmp_path):
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(c) + "\n" for c in convs).encode())
    assert train_data.read_jsonl_conversations(path) == convs
    # only a leading mark: one later in the file is still a bad line, named by line number
    path.write_bytes(json.dumps(convs[0]).encode() + b"\n\xef\xbb\xbf" + json.dumps(convs[1]).encode() + b"\n")
    with pytest.raises(ValueError, match="bom.jsonl:2: invalid JSON"):
        train_data.read_jsonl_conversations(path)


def test_compiled_model_trains_like_the_eager_one(base_dir):
    """--compile (torch.compile of the model, as on GPUs) on CPU: same losses and weights as eager
    within float tolerance, packed rows with per-conversation attention included."""
    eager = train.run(make_args(base_dir, "--num-iterations", "2", "--eval-every", "-1"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    compiled = train.run(make_args(base_dir, "--num-iterations", "2", "--eval-every", "-1", "--compile"))
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    a, b = params(eager["model"]), params(compiled["model"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)


# --- behaviours pinned after a mutation review (each test failed on a plausible slip) ----------

def test_microbatch_norm_logs_the_mean_loss(base_dir):
    """--loss-norm microbatch (the CLI default): the logged loss of step 1 is the mean of the
    micro-batches' mean losses on the starting model (not their sum)."""
    tok = byte_tokenizer()
    model, _ = ckpt.load_model(str(base_dir), "base")
    ds = train_data.read_training_data(str(base_dir / "train.jsonl"), tok)
    loader = train_data.make_loader(ds, tok, 1, 64, 0, 1, "bestfit")
    with torch.no_grad():
        per_micro = []
        for _ in range(4):
            b = loader.next()
            per_micro.append(float(model(b.inputs, b.targets, doc_ids=b.doc_ids)))
    if hasattr(loader, "close"):
        loader.close()
    out = train.run(make_args(base_dir, "--num-iterations", "1", "--device-batch-size", "1", "--loss-norm", "microbatch"))
    assert out["grad_accum_steps"] == 4
    assert out["losses"][0] == pytest.approx(sum(per_micro) / 4, rel=1e-5)


def test_optimizer_lr_is_initial_lr_times_schedule(base_dir):
    train.run(make_args(base_dir, "--num-iterations", "3", "--eval-every", "-1"))
    _, trainer, _ = ckpt.load_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), 3, load_trainer_state=True)
    lrm_last = lr_multiplier(2, 3)  # the lr the third (last) step used
    for opt in trainer["optimizers"]:
        for g in opt["param_groups"]:
            assert g["lr"] == pytest.approx(g["initial_lr"] * lrm_last, rel=1e-12)


def test_derived_iterations_cover_every_epoch(base_dir, tmp_path):
    """--num-epochs 2: twice the derived count, and every conversation trained exactly twice."""
    one = train.run(make_args(base_dir, "--eval-every", "-1"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    log = tmp_path / "log.jsonl"
    two = train.run(make_args(base_dir, "--eval-every", "-1", "--num-epochs", "2", "--log-jsonl", str(log)))
    assert two["num_iterations"] == 2 * one["num_iterations"] == 2 * (48 // 4)
    assert two["step"] >= 2 * one["step"] - 1
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r["type"] == "step"]
    data = [json.loads(line) for line in (base_dir / "train.jsonl").read_text().splitlines()]
    assert sum(r["sup_tokens"] for r in steps) == 2 * supervised_targets(byte_tokenizer(), data, 65)


def test_validation_is_one_pass_however_many_eval_steps(base_dir):
    a = train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1", "--eval-steps", "50"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    b = train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1", "--eval-steps", "500"))
    assert a["metrics"]["val_tokens"] == b["metrics"]["val_tokens"]
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"]


def test_eval_loss_of_a_packed_row_is_per_conversation():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    model.init_weights(seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        for blk in model.transformer.h:
            blk.attn.c_proj.weight.normal_(0, 0.5)
    A, B = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    tA, tB = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 7))
    from types import SimpleNamespace
    batch = SimpleNamespace(inputs=torch.cat([A, B], 1), targets=torch.cat([tA, tB], 1),
                            doc_ids=torch.tensor([[0] * 5 + [1] * 7], dtype=torch.int32), progress=1.0)
    info = train.DistInfo(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    out = train.evaluate_loss(model, SimpleNamespace(next=lambda: batch), 1, train.token_bytes_tensor(tok, "cpu"), info,
                              torch.autocast("cpu", enabled=False), doc_mask=True)
    with torch.no_grad():
        want = (float(model(A, tA, loss_reduction="sum")) + float(model(B, tB, loss_reduction="sum"))) / 12
    assert out["val_loss"] == pytest.approx(want, rel=1e-5)


def test_cross_doc_attention_flag_changes_the_computation(base_dir):
    # rows of 200 positions hold several of the fixture's ~60-token conversations
    a = train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1", "--max-seq-len", "200"))
    shutil.rmtree(base_dir / "chatsft_checkpoints")
    b = train.run(make_args(base_dir, "--num-iterations", "1", "--eval-every", "-1", "--max-seq-len", "200",
                            "--cross-doc-attention"))
    assert a["losses"][0] != b["losses"][0]


def test_wsd_final_lr_frac():
    assert lr_multiplier(10, 10, "wsd", final_lr_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, "wsd", warmdown_ratio=0.5, final_lr_frac=0.1) == pytest.approx(0.2 + 0.8 * 0.1)


def test_muon_two_steps_match_the_formula():
    torch.manual_seed(0)
    p0 = torch.randn(8, 4)
    G1, G2 = torch.randn(8, 4), torch.randn(8, 4)
    p = torch.nn.Parameter(p0.clone())
    opt = Muon([p], lr=0.1)
    for G in (G1, G2):
        p.grad = G.clone()
        opt.step()
    buf1 = 0.05 * G1
    buf2 = 0.95 * buf1 + 0.05 * G2
    u1 = newton_schulz(G1 + 0.95 * (buf1 - G1))
    u2 = newton_schulz(G2 + 0.95 * (buf2 - G2))
    want = p0 - 0.1 * 2 ** 0.5 * (u1 + u2)  # tall 8x4: scale sqrt(8/4)
    torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_find_model_tag_is_the_deepest_numerically(tmp_path):
    for t in ("d2", "d12", "d3", "other"):
        (tmp_path / t).mkdir()
    assert ckpt.find_model_tag(str(tmp_path)) == "d12"


def test_compiled_and_ddp_prefixes_are_stripped(base_dir):
    model, meta = ckpt.load_model(str(base_dir), "base")
    out = str(base_dir / "mid_checkpoints" / "d2")
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    ckpt.save_checkpoint(out, 1, state, None, dict(model_config=model.config.to_dict()))
    again, _ = ckpt.load_model(str(base_dir), "mid")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_remove_checkpoints_deletes_meta_first(tmp_path, monkeypatch):
    for n in ("model_000001.pt", "optim_000001_rank0.pt", "meta_000001.json", "model_000002.pt", "meta_000002.json"):
        (tmp_path / n).write_text("x")
    order = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p: (order.append(os.path.basename(p)), real(p)))
    ckpt.remove_checkpoints(str(tmp_path))
    assert [n.startswith("meta_") for n in order] == [True, True, False, False, False]
