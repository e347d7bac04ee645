"""Training that survives: exact resume, signals, failed writes, hostile files, NaNs, locks, torchrun."""
import csv
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch

import train
from gpt import GPTConfig, checkpoint, distributed
from gpt.model import GPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FSDP2 (fully_shard) is public from torch 2.6; the rest runs on torch 2.4 too.
needs_fsdp2 = pytest.mark.skipif(not distributed.has_fsdp2(), reason="FSDP2 needs torch 2.6 or newer")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-iters", "2", "--log-interval", "1", "--device", "cpu", "--kernels", "torch"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("class Stack:\n    def push(self, x):\n        self.items.append(x)\n\n" * 100)
    return str(path)


def flags(tmp_path, corpus, out, *extra):
    return ["--data", corpus, "--out-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"), *TINY, *extra]


def run_train(tmp_path, corpus, out, *extra):
    return train.train(train.parse_args(flags(tmp_path, corpus, out, *extra)))


def tiny_checkpoint(path):
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "byte"}}, path)


def logged_losses(path):
    with open(path / "metrics.csv") as f:
        return {int(r["step"]): r["train_loss"] for r in csv.DictReader(f) if not r["val_loss"]}


def test_resume_is_bit_identical(tmp_path, corpus):
    # Checkpoints (every 4 steps) inside log intervals (of 3): the first line after the resume
    # averages steps from before it too.
    common = ["--warmup", "2", "--decay-steps", "8", "--dropout", "0.1", "--eval-interval", "4", "--grad-accum", "2",
              "--log-interval", "3"]
    run_train(tmp_path, corpus, "full", *common, "--max-steps", "8")
    run_train(tmp_path, corpus, "split", *common, "--max-steps", "4")  # stopped at step 4
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4
    run_train(tmp_path, corpus, "split", *common, "--max-steps", "8", "--resume")
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    for k in full["model"]:
        assert torch.equal(full["model"][k], split["model"][k]), k
    assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "split")


def start_training(tmp_path, corpus, out, *extra):
    cmd = [sys.executable, "train.py", *flags(tmp_path, corpus, out, "--max-steps", "100000", "--eval-interval", "100000", *extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 2/"):
            return proc
        assert time.time() < deadline
    pytest.fail(f"training did not start: {proc.stderr.read()}")


def test_sigint_saves_and_exits_as_interrupted(tmp_path, corpus):
    proc = start_training(tmp_path, corpus, "out")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # not 0: `train.py && sample.py` must not take it for a finished run
    state = checkpoint.load(tmp_path / "out")
    assert state["step"] >= 2
    assert not (tmp_path / "out" / "train.lock").exists()
    # The printed command, with the interpreter that ran (not a bare "python"), goes on from there.
    resume = shlex.split(out.split("Resume with: ")[1].strip())
    assert os.path.samefile(os.path.join(ROOT, resume[0]), sys.executable) and resume[-1] == "--resume"
    done = subprocess.run([*resume, "--max-steps", str(state["step"] + 2)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert checkpoint.load(tmp_path / "out")["step"] == state["step"] + 2


def test_one_sigterm_saves_and_exits_as_terminated(tmp_path, corpus):
    """One SIGTERM (a scheduler's stop, `timeout`, `docker stop`) stops cleanly as Ctrl-C does:
    the step finishes and ckpt.pt is saved. Only the second signal quits at once; without
    training's own handler the first one did (exit 143 all the same, but no checkpoint)."""
    proc = start_training(tmp_path, corpus, "out")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM received" in out and "received by another rank" not in out, out
    assert checkpoint.load(tmp_path / "out")["step"] >= 2


def test_sigterm_twice_quits_at_once_leaving_a_loadable_checkpoint(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    proc = start_training(tmp_path, corpus, "out", "--overwrite")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode in (130, 143)  # quit on the second signal, or saved and stopped on the first
    checkpoint.load(tmp_path / "out")  # whichever checkpoint is there, it is whole
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_a_second_signal_quits_at_once_and_the_handlers_are_put_back(tmp_path, corpus):
    """In training the first SIGTERM or SIGINT asks for a stop, the second raises KeyboardInterrupt
    at once; after train.py's main, both signals have their handlers of before (a mutation audit:
    the second signal ignored, and the handlers left in place, went unseen: the subprocess test
    above takes either exit)."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert train.main(flags(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with train.StopSignal(lambda *a: None) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"model": {"w": torch.ones(3)}, "config": {}, "tokenizer": {"name": "byte"}}
    checkpoint.save(good, path)

    def disk_full(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    message = r"could not write .*ckpt.pt \(No space left on device\); any earlier checkpoint is intact: free some space"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.save({**good, "model": {"w": torch.zeros(3)}}, path)
    # torch.save's own report of a full disk: a RuntimeError from its zip writer.
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("unexpected pos 64")))
    with pytest.raises(checkpoint.CheckpointError, match=r"\(unexpected pos 64\)"):
        checkpoint.save(good, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    with pytest.raises(checkpoint.CheckpointError, match="cannot write in .*; pass a writable --out-dir"):
        checkpoint.save(good, path / "inside-a-file.pt")


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = RunsCode()
    RunsCode.marker = marker
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "config": {}, "tokenizer": evil}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refused for safety"):
        checkpoint.load(path)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(path) in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", pickle.dumps({"a": 1})], ids=["empty", "text", "plain-pickle"])
def test_corrupt_or_foreign_files_name_the_file(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=str(path)):
        checkpoint.load(path)
    if content != pickle.dumps({"a": 1}):  # not misreported as unsafe: it is no checkpoint at all
        with pytest.raises(checkpoint.CheckpointError, match="not a torch.save archive"):
            checkpoint.load(path)


@pytest.mark.parametrize("member, data", [("data.pkl", b"\x80\x02h\x05."), (".storage_alignment", b"\x00\x00"),
                                          ("data.pkl", b"\x80\x02X\x02\x00\x00\x00\xff\xfe.")],
                         ids=["memo-key", "zeroed-record", "not-utf8"])
def test_a_damaged_archive_names_the_file(tmp_path, member, data):
    """Damage inside a whole zip (flipped bits, a zeroed block) makes torch.load raise a KeyError
    or a ValueError as well as a RuntimeError: each is the one line naming the file, not a
    traceback out of sample.py or train.py --resume."""
    import zipfile

    path = tmp_path / "ckpt.pt"
    tiny_checkpoint(tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as good, zipfile.ZipFile(path, "w") as damaged:
        for info in good.infolist():
            damaged.writestr(info, data if info.filename.endswith("/" + member) else good.read(info))
        if not any(info.filename.endswith("/" + member) for info in good.infolist()):
            pytest.skip(f"this torch writes no {member}")  # torch 2.4 writes no .storage_alignment
    with pytest.raises(checkpoint.CheckpointError, match=f"{path} is truncated or not a tritongpt checkpoint"):
        checkpoint.load(path)


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint.save({"model": {"w": torch.ones(1)}}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o644  # as torch.save would leave it, not mkstemp's 0600


def test_truncated_checkpoint(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    path = tmp_path / "out" / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)


class NaNAfter(GPT):
    """A model whose loss turns NaN on chosen training calls."""

    bad_calls: set = set()
    calls = 0

    def forward(self, idx, targets=None, **kwargs):
        out = super().forward(idx, targets, **kwargs)
        if targets is not None and self.training:
            NaNAfter.calls += 1
            if NaNAfter.calls in NaNAfter.bad_calls:
                return out[0], out[1] * float("nan")
        return out


def test_a_non_finite_step_is_skipped(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train, "GPT", NaNAfter)
    retries, batches = [], train.train_batches
    monkeypatch.setattr(train, "train_batches", lambda *a, retry=0: retries.append(retry) or batches(*a, retry=retry))
    NaNAfter.calls, NaNAfter.bad_calls = 0, {3}
    result = run_train(tmp_path, corpus, "out", "--max-steps", "5", "--eval-interval", "5")
    assert result["step"] == 5 and result["skipped"] == 1
    assert retries == [0, 0, 0, 1, 0, 0]  # the retried step 3 draws a fresh batch
    with open(tmp_path / "out" / "metrics.csv") as f:  # skipped: the run's count so far, not the streak
        assert [r["skipped"] for r in csv.DictReader(f) if not r["val_loss"]] == ["0", "0", "1", "1", "1"]
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())
    # The count of skipped steps survives a resume.
    assert run_train(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "5", "--resume")["skipped"] == 1


class InfGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a finite loss, a non-finite step."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class InfGradAt(GPT):
    bad_calls: set = set()
    calls = 0

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = super().forward(idx, targets, **kwargs)
        if targets is not None and self.training:
            InfGradAt.calls += 1
            if InfGradAt.calls in InfGradAt.bad_calls:
                loss = InfGradient.apply(loss)
        return logits, loss


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped(tmp_path, corpus, monkeypatch):
    """The loss alone does not decide: an infinite gradient under a finite loss is a skipped
    step too, not an update that leaves NaN weights (a mutation audit: the check went unseen)."""
    monkeypatch.setattr(train, "GPT", InfGradAt)
    InfGradAt.calls, InfGradAt.bad_calls = 0, {2}
    result = run_train(tmp_path, corpus, "out", "--max-steps", "3", "--eval-interval", "3")
    assert result["step"] == 3 and result["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())


def test_under_fp16_an_overflowing_gradient_is_the_loss_scales_not_a_skipped_step(tmp_path, corpus, monkeypatch):
    """fp16: an infinite gradient is an overflow, which the GradScaler skips (halving its scale):
    not a skipped step, which --max-skips would count. A NaN loss still is one, and the scaler
    updates after it, else its next unscale_ raises (a mutation audit: both went unseen)."""
    monkeypatch.setattr(train, "GPT", InfGradAt)
    InfGradAt.calls, InfGradAt.bad_calls = 0, {2}
    result = run_train(tmp_path, corpus, "inf", "--max-steps", "3", "--eval-interval", "3", "--dtype", "fp16")
    assert result["step"] == 3 and result["skipped"] == 0
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())
    monkeypatch.setattr(train, "GPT", NaNAfter)
    NaNAfter.calls, NaNAfter.bad_calls = 0, {2}
    result = run_train(tmp_path, corpus, "nan", "--max-steps", "3", "--eval-interval", "3", "--dtype", "fp16")
    assert result["step"] == 3 and result["skipped"] == 1


def test_under_fp16_the_gradient_is_clipped_unscaled(tmp_path, corpus, monkeypatch):
    """The norm --grad-clip bounds is the gradient's, not the loss scale (65536) times it: fp16's
    first step sees about fp32's (a mutation audit: clipping before unscale_ went unseen)."""
    norms, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: (lambda n: norms.append(n.item()) or n)(clip(ps, m)))
    for dtype in ("fp32", "fp16"):
        run_train(tmp_path, corpus, dtype, "--max-steps", "1", "--eval-interval", "1", "--dropout", "0", "--dtype", dtype)
    assert norms[1] == pytest.approx(norms[0], rel=0.05), norms


def test_repeated_non_finite_steps_stop_and_keep_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train, "GPT", NaNAfter)
    NaNAfter.calls, NaNAfter.bad_calls = 0, set(range(4, 100))
    with pytest.raises(train.TrainingError, match="3 non-finite steps in a row at step 4; lower --lr or raise --warmup, then --resume from the last checkpoint"):
        run_train(tmp_path, corpus, "out", "--max-steps", "50", "--eval-interval", "2", "--max-skips", "3")
    # Not overwritten by the state that kept failing (diverged weights, when the lr is to blame).
    state = checkpoint.load(tmp_path / "out")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    NaNAfter.calls, NaNAfter.bad_calls = 0, set(range(100))  # --overwrite: that checkpoint is the replaced run's
    with pytest.raises(train.TrainingError, match=r"at step 1; .*, then start again \(no checkpoint was written yet\)"):
        run_train(tmp_path, corpus, "out", "--max-steps", "50", "--eval-interval", "2", "--max-skips", "3", "--overwrite")


def test_grad_clip_bounds_the_update(tmp_path, corpus):
    """--grad-clip 1e-12 shrinks the gradient below AdamW's eps, so a step hardly moves the
    weights; unclipped, the same step moves them by about the lr (a mutation audit: the clip
    could be dropped unseen)."""
    def moved(out, clip):
        result = run_train(tmp_path, corpus, out, "--max-steps", "1", "--eval-interval", "1", "--warmup", "0",
                           "--weight-decay", "0", "--grad-clip", clip)
        torch.manual_seed(1337)  # the run's initial weights
        start = GPT(result["model"].config)
        return max((a - b).abs().max().item() for a, b in zip(result["model"].parameters(), start.parameters()))
    assert moved("clipped", "1e-12") < 1e-5 < 5e-4 < moved("free", "0")


def test_an_eval_is_the_mean_over_its_batches_and_repeats_exactly(tmp_path, corpus):
    """Evals compare from one to the next: the same weights give the same losses, each the
    mean over --eval-iters batches, without dropout (a mutation audit: an unseeded draw, the
    last batch alone, or an eval left in training mode)."""
    args = train.parse_args(flags(tmp_path, corpus, "out", "--eval-iters", "4", "--dropout", "0.5"))
    data = train.load_dataset(corpus, "char", str(tmp_path / "cache"), log=lambda *a: None)
    torch.manual_seed(0)
    model = GPT(train.model_config(args, data.tokenizer.vocab_size))
    model.train()
    first = train.estimate_loss(model, data, args, "cpu", train.contextlib.nullcontext())
    assert model.training  # back to training mode (dropout on) after the eval
    assert train.estimate_loss(model, data, args, "cpu", train.contextlib.nullcontext()) == first
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    for split in ("train", "val"):
        losses = [model(*data.batch(split, args.batch_size, 32, gen))[1].item() for _ in range(4)]
        assert first[split] == pytest.approx(sum(losses) / 4)


def test_a_retried_step_draws_a_fresh_batch(tmp_path, corpus):
    args = train.parse_args(flags(tmp_path, corpus, "out"))
    data = train.load_dataset(corpus, "char", str(tmp_path / "cache"), log=lambda *a: None)
    world = train.distributed.World()
    first, again, retried = (train.train_batches(data, 5, args, world, 32, retry=r)[0][0] for r in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, retried)


def test_each_step_draws_its_own_batch_in_micro_batches(tmp_path, corpus):
    """Step 6 trains on other sequences than step 5, and --grad-accum 3 splits a step's 12 into
    3 micro-batches of --batch-size 4, each target its input shifted by one (a mutation audit: the
    same batch every step, and the whole batch as one micro-batch, went unseen)."""
    args = train.parse_args(flags(tmp_path, corpus, "out", "--grad-accum", "3"))
    data = train.load_dataset(corpus, "char", str(tmp_path / "cache"), log=lambda *a: None)
    world = train.distributed.World()
    five, six = (train.train_batches(data, step, args, world, 32) for step in (5, 6))
    assert [tuple(x.shape) for x, _ in five] == [(4, 32)] * 3
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in five)
    assert not torch.equal(torch.cat([x for x, _ in five]), torch.cat([x for x, _ in six]))


def test_any_seed_draws_batches(tmp_path, corpus):
    args = train.parse_args(flags(tmp_path, corpus, "out", "--seed", str(2**63 - 1)))
    data = train.load_dataset(corpus, "char", str(tmp_path / "cache"), log=lambda *a: None)
    train.train_batches(data, 5, args, train.distributed.World(), 32)  # (seed * 1_000_003 + step) past 2^64


def test_one_trainer_per_out_dir(tmp_path, corpus):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "train.lock").write_text(f"{os.uname().nodename} {sleeper.pid}")
        with pytest.raises(checkpoint.CheckpointError, match=f"in use by another trainer .*pid {sleeper.pid}"):
            run_train(tmp_path, corpus, "out", "--max-steps", "1")
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its owner is gone now: the stale lock is taken over.
    assert run_train(tmp_path, corpus, "out", "--max-steps", "1")["step"] == 1
    assert not (tmp_path / "out" / "train.lock").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--n-embd", "-8"], "--n-embd must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--resume", "--n-layer", "3"], "trained with n_layer=2, not 3"),
        (["--resume", "--block-size", "64"], "trained with block_size=32, not 64"),
    ],
)
def test_impossible_flags_are_refused_before_work(tmp_path, corpus, extra, message):
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    before = (tmp_path / "out" / "ckpt.pt").stat().st_mtime_ns
    args = flags(tmp_path, corpus, "out", "--max-steps", "5", *extra)  # the last of a repeated flag wins
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "out" / "ckpt.pt").stat().st_mtime_ns == before


def test_torchrun_ddp_matches_one_process(tmp_path, corpus):
    """2 CPU processes (gloo), batch 4 each == 1 process with 2 micro-batches of 4."""
    common = ["--max-steps", "4", "--eval-interval", "4", "--warmup", "1"]
    single = run_train(tmp_path, corpus, "single", *common, "--grad-accum", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/ddp_worker.py", str(tmp_path), *flags(tmp_path, corpus, "ddp", *common)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    for name, p in single["model"].state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged at {name}"
        torch.testing.assert_close(ddp["model"][name], p, rtol=1e-4, atol=1e-5)
    assert abs(ddp["best_val_loss"] - single["best_val_loss"]) < 1e-4
    # The logged training loss is the global batch's, as one process logs it, not rank 0's share.
    logged, expected = logged_losses(tmp_path / "ddp"), logged_losses(tmp_path / "single")
    assert logged.keys() == expected.keys()
    for step, loss in expected.items():
        assert abs(float(logged[step]) - float(loss)) < 2e-4, (step, logged, expected)


def torchrun(tmp_path, *args, script="tests/ddp_worker.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
           *([str(tmp_path)] if script.endswith("ddp_worker.py") else []), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_resume_with_dropout_is_bit_identical(tmp_path, corpus):
    """Every rank's dropout masks come back on resume (only rank 0's random state is saved),
    and --max-time runs on rank 0's clock."""
    common = ["--warmup", "1", "--eval-interval", "2", "--dropout", "0.2", "--max-time", "1000"]
    for out, steps in (("full", "4"), ("split", "2")):
        proc = torchrun(tmp_path, *flags(tmp_path, corpus, out, *common, "--max-steps", steps))
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(tmp_path, *flags(tmp_path, corpus, "split", *common, "--max-steps", "4", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, split = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("full", "split"))
    assert split["step"] == 4
    # Not bit for bit: two gloo processes on CPU, even two whole runs, differ in the last
    # bits now and then (1e-7 here); another rank's dropout masks move the weights by ~1e-3.
    torch.testing.assert_close(split["model"], full["model"], atol=1e-6, rtol=0)


def test_torchrun_failure_on_rank_0_is_one_line_on_every_rank(tmp_path, corpus):
    """Rank 0 fails alone (here on a missing corpus, which it reads first): each rank exits
    with one line, no traceback from our code (torchrun's own report of failed workers stays)."""
    proc = torchrun(tmp_path, *flags(tmp_path, str(tmp_path / "missing.txt"), "out", "--max-steps", "2"), script="train.py")
    assert proc.returncode != 0 and 'train.py", line' not in proc.stderr, proc.stderr[-3000:]
    assert "error: data path" in proc.stderr and "error on rank 1: " in proc.stderr


@needs_fsdp2
def test_torchrun_fsdp2_matches_one_process_and_resumes_anywhere(tmp_path, corpus):
    common = ["--max-steps", "4", "--eval-interval", "4", "--warmup", "1"]
    single = run_train(tmp_path, corpus, "single", *common, "--grad-accum", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/ddp_worker.py", str(tmp_path), *flags(tmp_path, corpus, "fsdp", *common, "--fsdp")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    fsdp = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)
    for name, p in single["model"].state_dict().items():
        torch.testing.assert_close(fsdp["model"][name], p, rtol=1e-4, atol=1e-5)
    # A sharded run's checkpoint resumes in one process (any world size).
    resumed = run_train(tmp_path, corpus, "fsdp", "--max-steps", "6", "--eval-interval", "6", "--warmup", "1", "--resume")
    assert resumed["step"] == 6


def test_a_peer_lost_on_rank_0_is_one_line(monkeypatch, capsys):
    """A rank killed outright (the OOM killer) resets rank 0's connection: one line there too,
    as on the other ranks, not the collective's traceback."""
    def peer_lost(args):
        raise torch.distributed.DistBackendError("[../gloo/transport/tcp/pair.cc:534] Connection reset by peer\nmore")

    monkeypatch.setattr(train, "train", peer_lost)
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error on rank 0: [../gloo") and "another rank stopped first" in err


def test_torchrun_a_signal_to_one_rank_stops_every_rank_and_rank_0_saves(tmp_path, corpus):
    """A SIGTERM that reaches rank 1 alone (kill PID, or the torchrun of one node of several
    stopped by its scheduler): rank 0, which got none, still saves ckpt.pt and says so."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tests/ddp_worker.py",
           str(tmp_path), *flags(tmp_path, corpus, "out", "--max-steps", "100000", "--eval-interval", "100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 2/"):
            break
        assert time.time() < deadline
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "SIGTERM received by another rank" in out and "stopped at step" in out, (out[-2000:], err[-3000:])
    assert checkpoint.load(tmp_path / "out")["step"] >= 2


def test_torchrun_resumed_at_another_world_size_keeps_the_global_batch(tmp_path, corpus, capsys):
    """2 processes x batch 4, resumed in one process: 2 micro-batches of 4 per step, as before."""
    common = ["--warmup", "1", "--decay-steps", "4", "--eval-interval", "2"]
    proc = torchrun(tmp_path, *flags(tmp_path, corpus, "split", *common, "--max-steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = run_train(tmp_path, corpus, "split", *common, "--max-steps", "4", "--resume")
    assert "world size 1 in place of the run's 2: --grad-accum 2 keeps its batch" in capsys.readouterr().out
    single = run_train(tmp_path, corpus, "single", *common, "--max-steps", "4", "--grad-accum", "2")
    for name, p in single["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[name], p, rtol=1e-4, atol=1e-5)


def test_torchrun_resumes_a_checkpoint_that_names_no_world_size_at_its_own(tmp_path, corpus):
    """A checkpoint from before the world size was saved, resumed by 2 processes: its run is
    taken to have had 2 as well (as most likely), not 1, which would halve --grad-accum."""
    common = ["--warmup", "1", "--eval-interval", "100", "--grad-accum", "2"]
    proc = torchrun(tmp_path, *flags(tmp_path, corpus, "out", *common, "--max-steps", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    del state["world_size"]
    checkpoint.save(state, tmp_path / "out" / "ckpt.pt")
    proc = torchrun(tmp_path, *flags(tmp_path, corpus, "out", "--max-steps", "2", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2 in place" not in proc.stdout, proc.stdout[-3000:]
    assert checkpoint.load(tmp_path / "out")["args"]["grad_accum"] == 2


@pytest.mark.parametrize("argv, saved, size, grad_accum, notes", [
    ([], 2, 1, 2, ["--grad-accum 2 keeps its batch"]),
    ([], 1, 2, 1, ["32 sequences per step, not 16 (to keep them: --batch-size B --grad-accum A with B x A x 2 = 16)"]),
    (["--grad-accum", "1"], 2, 1, 1, ["16 sequences per step, not 32"]),
    ([], 2, 2, 1, []),
], ids=["scaled", "indivisible", "given", "same-size"])
def test_resumed_at_another_world_size_grad_accum_keeps_the_batch_where_it_can(argv, saved, size, grad_accum, notes):
    """Of a run of batch 16 and --grad-accum 1: scaled where the world size divides it,
    kept where it does not or where given, with a note whenever the global batch changes."""
    args = train.parse_args(["--batch-size", "16", *argv])
    logs = []
    train._keep_global_batch(args, {"batch_size": 16, "grad_accum": 1}, saved, size, logs.append)
    assert args.grad_accum == grad_accum
    assert len(logs) == len(notes) and all(note in line for note, line in zip(notes, logs)), logs


def test_torchrun_other_ranks_wait_out_a_long_tokenization(tmp_path, corpus):
    """Rank 0 tokenizes a large corpus for longer than the collectives' timeout (NCCL's is 10
    minutes; 4 s in the worker) while the others wait for its cache: they wait, not fail."""
    proc = torchrun(tmp_path, *flags(tmp_path, corpus, "out", "--max-steps", "2"), script="tests/ddp_slow_data_worker.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint.load(tmp_path / "out")["step"] == 2


@needs_fsdp2
def test_torchrun_helpers_give_every_rank_the_same_answer(tmp_path):
    """gpt.distributed's helpers on 2 ranks, each with its own value: a flag raised on rank 1
    alone is seen by both, the max and the mean are over both ranks, rank 0's value is the one
    broadcast, and FSDP shards each block as well as the whole model (a mutation audit: MIN in
    place of MAX, a sum for the max, rank 1's clock, blocks left unsharded, and later the mean
    summed into the rank's own tensor went unseen).
    shutdown frees the gloo group it made: held until the interpreter's teardown, a group
    there aborted the process ("terminate called without an active exception", SIGABRT,
    after the results were written) in 1 run of 40 on the 2-core machine and once in CI;
    in 0 of 250 since."""
    proc = torchrun(tmp_path, str(tmp_path), script="tests/ddp_collectives_worker.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "world": [rank, rank, 2, rank == 0, True], "any_one": True, "any_none": False, "max": 11,
            "mean": [2.0, 4.0], "own_kept": True, "from_main": 100.0, "blocks_sharded": [True, True], "root_sharded": True,
            "patient_group_freed": True}


def test_torchrun_logs_the_global_batch_once_on_rank_0s_clock(tmp_path, corpus):
    """Rank 1's clock runs 100 s a step, rank 0's 1 s: a --max-time 50 run keeps to rank 0's and
    trains its 3 steps. Each progress line and metrics row comes once, from rank 0, with the tokens/s
    of both ranks' batches and the MFU of one card; best.pt is written, by rank 0 alone, as is
    ckpt.pt; each rank draws its own dropout masks each step (a mutation audit: the world size left
    out of tokens/s or MFU, lines and rows from every rank, a new best lost when rank 1 had none,
    every rank writing the checkpoints, and the same masks on every rank all went unseen)."""
    proc = torchrun(tmp_path, str(tmp_path), *flags(tmp_path, corpus, "out", "--max-steps", "3", "--max-time", "50",
                                                    "--eval-interval", "100", "--dropout", "0.1"),
                    script="tests/ddp_clock_worker.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = checkpoint.load(tmp_path / "out")
    assert state["step"] == 3, proc.stdout[-3000:]
    per_card = GPT(GPTConfig.from_dict(state["config"])).flops_per_token(32) * 256 / 2 / 1e8
    lines = re.findall(r"^step (\d+)/3 \| .* \| ([\d,.]+) tok/s \| mfu ([\d.]+%) ", proc.stdout, re.M)
    assert lines == [(str(s), "256", f"{per_card:.1%}") for s in (1, 2, 3)], proc.stdout[-3000:]  # 4 x 2 x 32 a second
    with open(tmp_path / "out" / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "3"]  # 3 steps and the eval
    assert (tmp_path / "out" / "best.pt").exists()
    probes = [json.loads((tmp_path / f"probe{rank}.json").read_text()) for rank in (0, 1)]
    assert probes[0]["saves"] == ["best.pt", "ckpt.pt"] and probes[1]["saves"] == []
    assert len(set(probes[0]["seeds"] + probes[1]["seeds"])) == 4, probes  # steps 2 and 3's, per rank


def test_torchrun_on_gpus_each_process_takes_its_nodes_gpu(monkeypatch):
    """Rank 5 of 8, on 2 nodes of 4 GPUs, is its node's process 1: cuda:1 over NCCL, where DDP
    keeps its model; on CPU, gloo. The wait for rank 0's tokenizing is on a group of days, not gloo's
    default 30 minutes (a mutation audit: on one node a rank is its local rank, CPU tests run gloo,
    and no test waits 30 minutes, so all of it could change unseen; torchrun always sets
    LOCAL_RANK, so its default went unseen too)."""
    calls = []
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kwargs: kwargs)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids: device_ids)
    world, device = distributed.init("cuda")
    assert (world.rank, world.local_rank, world.size, device) == (5, 1, 8, "cuda:1")
    assert calls == [("set_device", 1), "nccl"]
    assert world.patient["backend"] == "gloo" and world.patient["timeout"] >= timedelta(days=1)
    assert distributed.wrap(torch.nn.Linear(1, 1), world, device, fsdp=False) == [1]
    world, device = distributed.init("cpu")
    assert device == "cpu" and calls[-1] == "gloo"
    assert distributed.wrap(torch.nn.Linear(1, 1), world, device, fsdp=False) is None
    # A launcher that sets RANK and WORLD_SIZE alone (one process a node) runs on the node's first GPU.
    monkeypatch.delenv("LOCAL_RANK")
    world, device = distributed.init("cuda")
    assert (world.rank, world.local_rank, device) == (5, 0, "cuda:0") and calls[-2] == ("set_device", 0)


def test_shutdown_waits_for_every_rank_unless_a_rank_failed(monkeypatch):
    """A clean shutdown meets the other ranks before it tears the group down (one that leaves
    first can cut off another's last collective); after a failure, when a rank may never come,
    it tears down at once (a mutation audit: the barrier dropped went unseen, as the race is rare)."""
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown(distributed.World(0, 0, 2))
    assert calls == ["barrier", "destroy"]
    distributed.shutdown(distributed.World(0, 0, 2), clean=False)
    assert calls == ["barrier", "destroy", "destroy"]
    distributed.shutdown(distributed.World())  # one process: nothing to tear down
    assert calls == ["barrier", "destroy", "destroy"]


def test_checkpoint_is_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    checkpoint.save({"model": {}, "config": {}, "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")
    assert events[:2] == ["fsync", "replace"]


def test_partial_saves_of_a_killed_writer_are_removed(tmp_path, corpus, capsys):
    (tmp_path / "out").mkdir()
    partial = tmp_path / "out" / ".ckpt.pt.abc123.tmp"
    partial.write_bytes(b"PK half a zip")
    keep = tmp_path / "out" / "notes.tmp"
    keep.write_text("not ours")
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    assert not partial.exists() and keep.exists()
    assert "removed the partial file(s) of a ckpt.pt save" in capsys.readouterr().out


class OutOfMemoryAt(GPT):
    """A model whose training forward fails to allocate on a chosen call."""

    error: Exception = RuntimeError()
    at = 0
    calls = 0

    def forward(self, idx, targets=None, **kwargs):
        if targets is not None and self.training:
            OutOfMemoryAt.calls += 1
            if OutOfMemoryAt.calls == OutOfMemoryAt.at:
                raise OutOfMemoryAt.error
        return super().forward(idx, targets, **kwargs)


@pytest.mark.parametrize("error, where", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "host"),
    (MemoryError(), "host"),
])
def test_running_out_of_memory_is_a_one_line_error_naming_the_fix(tmp_path, corpus, monkeypatch, capsys, error, where):
    monkeypatch.setattr(train, "GPT", OutOfMemoryAt)
    OutOfMemoryAt.error, OutOfMemoryAt.calls, OutOfMemoryAt.at = error, 0, 1
    assert train.main(flags(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2")) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: out of {where} memory at --batch-size 4; lower --batch-size (raise --grad-accum to keep the tokens "
        f"per step) or --block-size, then start again (no checkpoint was written yet)")
    OutOfMemoryAt.calls, OutOfMemoryAt.at = 0, 3  # after the step-2 checkpoint: resume from it
    assert train.main(flags(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2")) == 1
    assert capsys.readouterr().err.strip().endswith(f"then --resume from {tmp_path / 'out' / 'ckpt.pt'}")
    OutOfMemoryAt.calls, OutOfMemoryAt.at = 0, 1  # --overwrite: that checkpoint is the replaced run's
    assert train.main(flags(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2", "--overwrite")) == 1
    assert capsys.readouterr().err.strip().endswith("then start again (no checkpoint was written yet)")
    OutOfMemoryAt.error, OutOfMemoryAt.calls, OutOfMemoryAt.at = RuntimeError("some other fault"), 0, 1  # not hidden
    with pytest.raises(RuntimeError, match="some other fault"):
        train.main(flags(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2", "--resume"))


def test_a_resumed_run_that_fails_before_it_saves_says_to_resume_again(tmp_path, corpus, monkeypatch, capsys):
    """The checkpoint a run resumed from is still the one to go on from when it fails before
    saving: the non-finite steps' error (exit 1, the model's fault, not the flags') and running out
    of memory both say --resume, not "start again" (a mutation audit: each judged by this run's
    saves or the file's time alone, and exit 2 for training's errors, went unseen)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    args = flags(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "2", "--max-skips", "2", "--resume")
    capsys.readouterr()
    monkeypatch.setattr(train, "GPT", NaNAfter)
    NaNAfter.calls, NaNAfter.bad_calls = 0, set(range(1, 100))
    assert train.main(args) == 1
    assert capsys.readouterr().err.strip().endswith(f"then --resume from the last checkpoint, {tmp_path / 'out' / 'ckpt.pt'}")
    monkeypatch.setattr(train, "GPT", OutOfMemoryAt)
    OutOfMemoryAt.error, OutOfMemoryAt.calls, OutOfMemoryAt.at = MemoryError(), 0, 1
    assert train.main(args) == 1
    assert capsys.readouterr().err.strip().endswith(f"then --resume from {tmp_path / 'out' / 'ckpt.pt'}")


def test_resume_refuses_an_optimizer_state_of_other_parameters(tmp_path, corpus):
    """An optimizer state naming other parameters than the model's (another version's model) is
    the one-line error, not a traceback from torch's loader (a mutation audit: the check went unseen)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    state["optimizer"]["param_groups"][1]["params"].pop()
    checkpoint.save(state, tmp_path / "out" / "ckpt.pt")
    with pytest.raises(train.UsageError, match="the optimizer state in .*ckpt.pt does not match this model's parameters"):
        run_train(tmp_path, corpus, "out", "--max-steps", "2", "--resume")


def test_resume_refuses_a_preset_or_no_bias_the_run_was_not(tmp_path, corpus):
    """--preset and --no-bias are architecture too: on --resume, ones the weights were not trained
    with are refused (a mutation audit: only the size flags were checked)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    base = ["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--resume"]
    with pytest.raises(train.UsageError, match="trained with n_layer=2, not 4"):
        train.train(train.parse_args([*base, "--preset", "tiny"]))
    with pytest.raises(train.UsageError, match="trained with bias=True, not False"):
        train.train(train.parse_args([*base, "--no-bias"]))


def test_fp16_resume_keeps_the_loss_scale(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2", "--dtype", "fp16")
    path = tmp_path / "out" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    assert state["scaler"]["scale"] > 0
    state["scaler"]["scale"] = 128.0  # as if overflows had brought it down from 65536
    torch.save(state, path)
    run_train(tmp_path, corpus, "out", "--max-steps", "3", "--eval-interval", "3", "--dtype", "fp16", "--resume")
    assert torch.load(path, weights_only=True)["scaler"]["scale"] <= 128.0


def test_resuming_weights_only_is_refused_naming_init_from(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    (tmp_path / "out" / "ckpt.pt").write_bytes((tmp_path / "out" / "best.pt").read_bytes())
    with pytest.raises(train.UsageError, match="holds weights only .* --init-from"):
        run_train(tmp_path, corpus, "out", "--max-steps", "4", "--resume")


def test_overwrite_removes_the_old_runs_best_checkpoint_at_once(tmp_path, corpus, monkeypatch):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    monkeypatch.setattr(train, "GPT", NaNAfter)
    NaNAfter.calls, NaNAfter.bad_calls = 0, set(range(1, 100))  # the new run ends before its first eval
    with pytest.raises(train.TrainingError):
        run_train(tmp_path, corpus, "out", "--max-steps", "4", "--overwrite", "--max-skips", "2")
    assert not (tmp_path / "out" / "best.pt").exists() and not (tmp_path / "out" / "loss.png").exists()


def test_a_resume_whose_flags_contradict_the_runs_schedule_is_refused(tmp_path, corpus):
    """--warmup 10 given to a run of --decay-steps 4 is checked against it (a mutation audit:
    only the given flags were checked, before the run's were merged in)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2", "--warmup", "1", "--decay-steps", "4")
    with pytest.raises(train.UsageError, match="--decay-steps 4 must be past --warmup 10"):
        run_train(tmp_path, corpus, "out", "--max-steps", "4", "--warmup", "10", "--resume")


@pytest.mark.parametrize("extra, message", [
    (["--warmup", "10", "--decay-steps", "5"], "--decay-steps 5 must be past --warmup 10"),
    # Ending the cosine where warm-up ends would drop the lr from --lr to --min-lr in one step.
    (["--warmup", "5", "--decay-steps", "5"], "--decay-steps 5 must be past --warmup 5"),
    (["--init-from", "INIT", "--preset", "gpt2"], "fixes the architecture; drop --preset gpt2"),
])
def test_contradictory_schedule_and_init_flags(tmp_path, corpus, extra, message):
    run_train(tmp_path, corpus, "init", "--max-steps", "1", "--eval-interval", "1")
    extra = [str(tmp_path / "init") if a == "INIT" else a for a in extra]
    with pytest.raises(train.UsageError, match=message):
        run_train(tmp_path, corpus, "out", "--max-steps", "2", *extra)


def test_an_out_dir_that_cannot_be_made_is_a_clear_error(tmp_path, corpus):
    (tmp_path / "file").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot create --out-dir .*file/out \(Not a directory\)"):
        run_train(tmp_path, corpus, "file/out", "--max-steps", "1")


def test_the_corpus_path_is_saved_absolute_so_resume_works_from_anywhere(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(tmp_path, os.path.basename(corpus), "out", "--max-steps", "2", "--eval-interval", "2")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["args"]["data"] == corpus
    monkeypatch.chdir(ROOT)
    args = train.parse_args(["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY,
                             "--max-steps", "3", "--resume"])  # no --data: the saved corpus
    assert train.train(args)["step"] == 3


def test_the_resume_command_drops_the_flags_that_start_a_run():
    argv = ["--init-from", "gpt2", "--out-dir", "o", "--overwrite", "--init-from=x", "--lr", "1e-3"]
    assert train._resume_command(argv, 1).endswith("train.py --out-dir o --lr 1e-3 --resume")
    assert train._resume_command(["--fsdp"], 4).startswith("torchrun --standalone --nproc-per-node=4 ")


def test_the_resume_command_of_a_run_on_several_nodes_starts_each_node(monkeypatch):
    """2 nodes of 8: not one node's torchrun of 16 processes, which it has no GPUs for."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    command = train._resume_command(["--lr", "1e-3"], 16)
    assert command.startswith("torchrun --nnodes=2 --node-rank=N --master-addr=node0 --master-port=29500 "
                              "--nproc-per-node=8 ")
    assert command.endswith("--lr 1e-3 --resume (on each node, N its rank)")


def test_a_full_disk_for_the_log_and_plot_warns_once_and_training_goes_on(tmp_path, corpus, monkeypatch, capsys):
    from gpt import metrics

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics, "open", full, raising=False)
    monkeypatch.setattr(metrics.Metrics, "_plot", full)
    result = run_train(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2")
    assert result["step"] == 4 and checkpoint.load(tmp_path / "out")["step"] == 4
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: could not write")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_resume_with_no_other_flags_continues_the_run_as_it_was_set_up(tmp_path, corpus, capsys):
    """`train.py --out-dir out --resume` goes on with the run's schedule, batch and seed, not
    the defaults (the architecture comes with the weights, the corpus with its path)."""
    common = ["--warmup", "2", "--decay-steps", "8", "--dropout", "0.1", "--eval-interval", "4", "--grad-accum", "2",
              "--seed", "5", "--lr", "2e-3", "--beta2", "0.95"]
    run_train(tmp_path, corpus, "full", *common, "--max-steps", "8")
    run_train(tmp_path, corpus, "split", *common, "--max-steps", "4")
    capsys.readouterr()
    train.train(train.parse_args(["--out-dir", str(tmp_path / "split"), "--cache-dir", str(tmp_path / "cache"),
                                  "--resume", "--max-steps", "8"]))
    assert "note: --max-steps 8 in place of the run's 4" in capsys.readouterr().out
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    for k in full["model"]:
        assert torch.equal(full["model"][k], split["model"][k]), k
    assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "split")
    assert split["args"]["batch_size"] == 4 and split["args"]["seed"] == 5


def test_resume_keeps_every_run_setting_not_given_again(tmp_path, corpus):
    """Each run setting off its default comes back on a bare --resume: --min-lr, --max-time,
    --grad-clip, --max-skips, --eval-iters, --save-interval and --dtype as well as those the test
    above sets (a mutation audit: any of them dropped from RUN_FLAGS went unseen)."""
    run = {"batch_size": 3, "grad_accum": 2, "lr": 2e-3, "min_lr": 1e-4, "warmup": 1, "decay_steps": 7, "max_time": 1000.0,
           "weight_decay": 0.05, "beta2": 0.95, "grad_clip": 0.5, "max_skips": 4, "eval_interval": 2, "eval_iters": 1,
           "save_interval": 5, "log_interval": 2, "dtype": "fp16", "seed": 5}
    given = [a for k, v in run.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    run_train(tmp_path, corpus, "out", *given, "--max-steps", "1")
    train.train(train.parse_args(["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                                  "--device", "cpu", "--kernels", "torch", "--resume", "--max-steps", "2"]))
    saved = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and {k: saved["args"][k] for k in run} == run


def test_an_out_dir_that_cannot_be_written_is_a_clear_error(tmp_path, corpus, monkeypatch):
    """An existing --out-dir without write permission (root ignores chmod, so the lock's open
    is refused here as the kernel would refuse it)."""
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith("train.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write in --out-dir .*out \\(Permission denied\\)"):
        run_train(tmp_path, corpus, "out", "--max-steps", "1")


def test_a_damaged_metrics_log_does_not_block_a_resume(tmp_path, corpus):
    """The NUL-filled tail a power loss can leave in metrics.csv: its rows are dropped."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    with open(tmp_path / "out" / "metrics.csv", "a") as f:
        f.write("13,3.1\x00\x00\x00\n\x00\x00\x00\nstep,oops\n")
    assert run_train(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2", "--resume")["step"] == 4
    assert sorted(logged_losses(tmp_path / "out")) == [1, 2, 3, 4]
    assert (tmp_path / "out" / "loss.png").exists()


def test_resuming_a_run_whose_corpus_is_gone_says_to_pass_data(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    os.remove(corpus)
    args = train.parse_args(["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--resume"])
    with pytest.raises(train.UsageError, match="was trained on --data .*corpus.txt, which is gone .*pass --data again"):
        train.train(args)


def test_resuming_a_run_trained_on_a_pipe_does_not_read_the_pipe_again(tmp_path, corpus):
    """--data /dev/stdin (or a FIFO) still exists on --resume, but gives another corpus, or
    waits for a terminal's input: the run must ask for --data, as for a corpus that is gone."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    os.remove(corpus)
    os.mkfifo(corpus)
    writer = threading.Thread(target=lambda: open(corpus, "w").write("other text " * 500), daemon=True)
    writer.start()
    args = train.parse_args(["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--resume"])
    try:
        with pytest.raises(train.UsageError, match="was trained on --data .*corpus.txt, which is gone .*pass --data again"):
            train.train(args)
    finally:
        fd = os.open(corpus, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer's open return, if nothing read it
        writer.join(10)
        os.close(fd)


def test_resuming_a_run_that_used_its_max_time_says_how_to_go_on(tmp_path, corpus, capsys):
    """--max-time is one of the run's settings (make demo's 120 s): a resume past it trains
    nothing and says so; --max-time 0 goes on."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1000", "--max-time", "0.5", "--eval-interval", "1000")
    capsys.readouterr()
    base = ["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--resume"]
    stopped = train.train(train.parse_args(base))
    assert "its --max-time 0.5 s; nothing to train (raise --max-time, or pass 0 for no limit)" in capsys.readouterr().out
    went_on = train.train(train.parse_args([*base, "--max-time", "0", "--max-steps", str(stopped["step"] + 2)]))
    assert went_on["step"] == stopped["step"] + 2


def test_a_resumed_timed_run_counts_the_time_before_the_resume(tmp_path, corpus, one_second_steps):
    """--max-time is the run's whole training time: 3 s trained, a resume goes on for 7 more,
    and saves 10 s as its time (a mutation audit: the clock could restart at the resume)."""
    assert run_train(tmp_path, corpus, "out", "--max-steps", "3", "--max-time", "10", "--eval-interval", "100")["step"] == 3
    assert run_train(tmp_path, corpus, "out", "--max-steps", "1000", "--resume")["step"] == 10
    assert checkpoint.load(tmp_path / "out")["elapsed"] == pytest.approx(10.0)
    with open(tmp_path / "out" / "metrics.csv") as f:  # the evals' rows at the run's time too, as a plot by time needs
        assert [(r["step"], r["elapsed_s"]) for r in csv.DictReader(f) if r["val_loss"]] == [("3", "3.0"), ("10", "10.0")]


def test_sigterm_while_the_corpus_is_read_cleans_up(tmp_path, corpus):
    """SIGTERM before training starts (tokenizing a big corpus) ends like Ctrl-C: the out-dir
    lock released, exit 143; it used to kill the process, leaving the lock and partial cache."""
    script = (
        "import os, signal, sys, time, train\n"
        "def load(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "train.load_dataset = load\n"
        f"sys.exit(train.main({flags(tmp_path, corpus, 'out')!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stderr[-2000:]
    assert "interrupted" in done.stderr and not (tmp_path / "out" / "train.lock").exists()


def test_optimizer_settings_changed_on_resume_are_the_ones_used(tmp_path, corpus, capsys):
    """--resume notes a changed --weight-decay / --beta2 as taking over: loading the optimizer's
    state brought the saved groups' values back, which went on being used."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    capsys.readouterr()
    run_train(tmp_path, corpus, "out", "--max-steps", "3", "--eval-interval", "2", "--resume", "--weight-decay", "0.5",
              "--beta2", "0.9", "--dropout", "0.2")
    out = capsys.readouterr().out
    assert "note: --weight-decay 0.5 in place of the run's 0.1" in out and "note: --dropout 0.2 in place" in out
    groups = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.5, (0.9, 0.9)), (0.0, (0.9, 0.9))]


def test_a_stop_during_a_skipped_step_resumes_on_its_retry(tmp_path, corpus, monkeypatch):
    """Ctrl-C during a step whose loss is NaN: the resumed run retries it with a fresh batch,
    as the uninterrupted run does, rather than the failing batch again (a second skip)."""
    poison, batches = {}, train.train_batches

    def poisoned(data, step, args, world, block_size, retry=0):
        b = batches(data, step, args, world, block_size, retry=retry)
        if step == 3 and retry == 0:
            poison["x"] = b[0][0]
            if poison.get("stop"):
                os.kill(os.getpid(), signal.SIGINT)  # StopSignal's handler: finish the step, save, stop
        return b

    class Poisoned(GPT):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if targets is not None and self.training and "x" in poison and torch.equal(idx, poison["x"]):
                loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train, "train_batches", poisoned)
    monkeypatch.setattr(train, "GPT", Poisoned)
    common = ["--eval-interval", "100", "--dropout", "0.1"]
    full = run_train(tmp_path, corpus, "full", *common, "--max-steps", "6")
    poison.clear()
    poison["stop"] = True
    assert run_train(tmp_path, corpus, "split", *common, "--max-steps", "6")["stopped"]
    poison.clear()
    split = run_train(tmp_path, corpus, "split", *common, "--max-steps", "6", "--resume")
    assert full["skipped"] == split["skipped"] == 1
    for (name, a), b in zip(full["model"].state_dict().items(), split["model"].state_dict().values()):
        assert torch.equal(a, b), name


def test_a_kill_between_the_two_saves_leaves_best_checkpoint_current(tmp_path, corpus, monkeypatch):
    """Killed after one of ckpt.pt and best.pt was written at an improving eval: best.pt must
    still end up the best model. ckpt.pt first recorded the new best val loss, so the resumed
    run never wrote best.pt again."""
    common = ["--eval-interval", "2", "--warmup", "1"]
    run_train(tmp_path, corpus, "full", *common, "--max-steps", "4")
    save = checkpoint.save

    def killed_at_step_4(state, path):
        save(state, path)
        if state["step"] == 4:
            raise KeyboardInterrupt("killed")  # after the first of the two files
    monkeypatch.setattr(checkpoint, "save", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, corpus, "split", *common, "--max-steps", "4")
    monkeypatch.setattr(checkpoint, "save", save)
    run_train(tmp_path, corpus, "split", *common, "--max-steps", "4", "--resume")
    full, split = (torch.load(tmp_path / d / "best.pt", weights_only=True) for d in ("full", "split"))
    assert full["step"] == split["step"] == 4
    for k in full["model"]:
        assert torch.equal(full["model"][k], split["model"][k]), k


@pytest.mark.parametrize("saved_fused, fused", [(False, True), (True, False)], ids=["fsdp-to-one", "one-to-fsdp"])
def test_resumed_optimizer_steps_are_where_this_optimizer_keeps_them(saved_fused, fused):
    """An FSDP run's checkpoint (foreach AdamW: each `step` count on the CPU) resumed by a fused
    AdamW (one process, DDP) and the reverse: load_state_dict places the counts by the saved
    groups' fused flag, so a fused optimizer must find them on its parameters' device (on CUDA,
    `_fused_adamw_` refuses CPU ones), a foreach one on the CPU. The meta device stands in for a GPU."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.empty(1, device="meta"))], fused=True)
    except RuntimeError:
        pytest.skip("this torch's fused AdamW refuses the meta device")  # torch 2.4
    config = train.GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    args = train.parse_args(["--device", "cpu"])
    source = GPT(config)
    opt, names = train.make_optimizer(source, args, fused=saved_fused)
    source(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()
    saved = checkpoint.optimizer_state_by_name(opt.state_dict(), names)
    with torch.device("meta"):
        model = GPT(config)
    optimizer, names = train.make_optimizer(model, args, fused=fused)
    train._load_optimizer(optimizer, model, saved, names, False, "ckpt.pt")
    for group in optimizer.param_groups:
        assert group["fused"] is fused
        for p in group["params"]:
            assert optimizer.state[p]["step"].device == (p.device if fused else torch.device("cpu"))


@needs_fsdp2
def test_torchrun_fsdp_resumes_a_checkpoint_saved_before_any_update(tmp_path, corpus, monkeypatch):
    """Stopped before its first update (the first step non-finite and Ctrl-C during it; under fp16,
    the GradScaler skipping the first steps), a run saves no optimizer state. FSDP's loader makes
    some first, with a step at lr 0, which an empty state does not replace: AdamW then counted one
    update too many (bias correction), and the run went on unlike one resumed in one process."""
    class StoppedInANonFiniteFirstStep(GPT):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if targets is not None and self.training:
                if not hasattr(StoppedInANonFiniteFirstStep, "sent"):
                    StoppedInANonFiniteFirstStep.sent = os.kill(os.getpid(), signal.SIGINT)  # finish the step, save
                loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train, "GPT", StoppedInANonFiniteFirstStep)
    common = ["--warmup", "1", "--decay-steps", "4", "--eval-interval", "2"]
    assert run_train(tmp_path, corpus, "one", *common, "--max-steps", "2", "--grad-accum", "2")["stopped"]
    monkeypatch.undo()
    state = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert state["step"] == 0 and state["optimizer"]["state"] == {}
    (tmp_path / "fsdp").mkdir()
    (tmp_path / "fsdp" / "ckpt.pt").write_bytes((tmp_path / "one" / "ckpt.pt").read_bytes())
    run_train(tmp_path, corpus, "one", *common, "--max-steps", "2", "--resume")
    proc = torchrun(tmp_path, *flags(tmp_path, corpus, "fsdp", *common, "--max-steps", "2", "--resume", "--fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, fsdp = (torch.load(tmp_path / out / "ckpt.pt", weights_only=True) for out in ("one", "fsdp"))
    assert {s["step"].item() for s in fsdp["optimizer"]["state"].values()} == {2.0}  # 3.0: one update too many
    torch.testing.assert_close(fsdp["model"], one["model"], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_is_whole_on_disk_when_synced_and_its_rename_is_synced_too(tmp_path, monkeypatch):
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync dir",) if stat.S_ISDIR(st.st_mode) else ("fsync file", st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    checkpoint.save({"model": {"w": torch.randn(5000)}, "config": {}, "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")
    assert events == [("fsync file", (tmp_path / "ckpt.pt").stat().st_size), ("replace",), ("fsync dir",)]


def test_an_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch):
    checkpoint.save({"model": {}, "config": {}, "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")

    def interrupted(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {}, "config": {}, "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_save_writes_beside_the_checkpoint_under_the_name_cleanup_removes(tmp_path, monkeypatch):
    """The rename is atomic within one file system only: the temporary file is in the
    checkpoint's folder (not /tmp), under a name that remove_partial_saves finds when a
    SIGKILL leaves it there."""
    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append(a) or real_replace(a, b))
    path = tmp_path / "run" / "ckpt.pt"
    checkpoint.save({"model": {}, "config": {}, "tokenizer": {"name": "byte"}}, path)
    tmp = path.parent / os.path.basename(renamed[0])
    assert os.path.samefile(os.path.dirname(renamed[0]), path.parent)
    tmp.write_bytes(b"PK half a zip")  # what a save killed mid-write leaves
    assert checkpoint.remove_partial_saves(path) == 1 and not tmp.exists() and path.exists()


def test_a_folder_that_refuses_fsync_keeps_the_save_and_closes_its_descriptor(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL: some network and FUSE mounts): the
    renamed checkpoint stands, and the folder's descriptor is closed all the same, where a
    run saving at every eval leaked one a save until "Too many open files"."""
    import errno
    import stat

    opened, closed = [], []
    real_open, real_close, real_fsync = os.open, os.close, os.fsync

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        if os.path.isdir(path):
            opened.append(fd)
        return fd

    def refused(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) or real_close(fd))
    for fsync in (real_fsync, refused):
        monkeypatch.setattr(os, "fsync", fsync)
        opened.clear(), closed.clear()
        checkpoint.save({"model": {"w": torch.ones(2)}, "config": {}, "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")
        assert len(opened) == 1 and opened[0] in closed, fsync
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("state", [{"transformer.wte.weight": torch.zeros(2, 2)}, {"config": {}, "tokenizer": {"name": "byte"}},
                                   {"model": {}, "config": {}}, torch.zeros(2), [{"model": {}}]],
                         ids=["bare-state-dict", "no-model", "no-tokenizer", "a-tensor", "a-list"])
def test_a_torch_save_file_that_is_no_checkpoint_is_named_so(tmp_path, state):
    """torch.save(model.state_dict()), a dict without weights or tokenizer, or no dict at all (an
    AttributeError's traceback): not called another version's checkpoint."""
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt.pt is not a tritongpt checkpoint \(missing model"):
        checkpoint.load_model(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_weights_named_otherwise_than_the_model_are_refused(tmp_path, change):
    """Another version's weights, a name missing or one more: the one-line error, not a model
    whose missing weights stay at their random init."""
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    weights = GPT(cfg).state_dict()
    if change == "missing":
        del weights["transformer.ln_f.weight"]
    else:
        weights["transformer.ln_f.scale"] = torch.ones(16)
    checkpoint.save({"model": weights, "config": cfg.to_dict(), "tokenizer": {"name": "byte"}}, tmp_path / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match=f"ckpt.pt: the weights do not match its config .*{change.title()} key"):
        checkpoint.load_model(tmp_path)


@pytest.mark.parametrize("key, value", [("config", {"n_embd": 0}), ("config", [2, 2]), ("tokenizer", {"name": "char"}),
                                        ("tokenizer", "byte"), ("tokenizer", {"name": "char", "chars": 5})],
                         ids=["config-value", "config-not-a-dict", "char-without-chars", "tokenizer-not-a-dict",
                              "chars-not-a-string"])
def test_a_config_or_tokenizer_this_version_cannot_read_is_one_line(tmp_path, key, value):
    """Each way GPTConfig.from_dict or tokenizer_from_state fails (ValueError, AttributeError,
    KeyError, TypeError) is the CheckpointError, at load, before any caller rebuilds them."""
    cfg = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    state = {"model": {}, "config": cfg.to_dict(), "tokenizer": {"name": "byte"}, key: value}
    checkpoint.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(checkpoint.CheckpointError, match="ckpt.pt holds a config or tokenizer this version cannot read"):
        checkpoint.load(tmp_path)


def test_load_model_puts_the_model_on_the_device_asked_for(tmp_path):
    """Here the meta device stands in for a GPU."""
    tiny_checkpoint(tmp_path / "ckpt.pt")
    model, _, _ = checkpoint.load_model(tmp_path, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training


def test_rng_state_brings_back_every_global_stream():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first



def test_a_lock_from_another_host_is_never_taken_as_stale(tmp_path):
    """A shared out dir: a pid that runs on no process here may run on the host that wrote it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "train.lock").write_text(f"another-host {gone.pid}")
    with pytest.raises(checkpoint.CheckpointError, match=f"in use by another trainer \\(another-host pid {gone.pid}\\)"):
        checkpoint.OutDirLock(tmp_path).acquire()
    assert (tmp_path / "train.lock").read_text() == f"another-host {gone.pid}"


def test_a_lock_without_a_pid_is_held_not_a_traceback(tmp_path):
    """A lock whose pid is not a number (written by hand, or cut short) on this host: taken as
    held, with the way out, not int()'s ValueError."""
    (tmp_path / "train.lock").write_text(f"{os.uname().nodename} ?")
    with pytest.raises(checkpoint.CheckpointError, match=r"in use by another trainer .*or delete .*train.lock"):
        checkpoint.OutDirLock(tmp_path).acquire()


def test_a_lock_held_by_another_users_process_is_not_stale(tmp_path, monkeypatch):
    """Signalling another user's process is refused (EPERM): it runs, and its lock holds."""
    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    (tmp_path / "train.lock").write_text(f"{os.uname().nodename} 4242")
    monkeypatch.setattr(checkpoint.os, "kill", not_permitted)
    with pytest.raises(checkpoint.CheckpointError, match="in use by another trainer .*pid 4242"):
        checkpoint.OutDirLock(tmp_path).acquire()
    assert (tmp_path / "train.lock").read_text() == f"{os.uname().nodename} 4242"


def test_the_metrics_log_has_one_header_however_many_rows(tmp_path):
    from gpt.metrics import Metrics

    log = Metrics(str(tmp_path))
    for step in (1, 2, 3):
        log.append(step=step, train_loss=1.0 / step)
    log.truncate_after(2)
    log.append(step=3, train_loss=0.5)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "step" and [r[0] for r in rows[1:]] == ["1", "2", "3"]


def test_the_metrics_log_columns_are_in_their_documented_order(tmp_path):
    """metrics.csv's header and each row's values come in one fixed order: a resumed run appends
    under the header its first run wrote, so a reordered FIELDS would put tokens/s under
    elapsed_s in every log from an earlier version (a mutation audit: swapping two columns went
    unseen, as every reader here looks columns up by name)."""
    from gpt.metrics import Metrics

    Metrics(str(tmp_path)).append(step=7, train_loss=2.5, lr=1e-3, tokens_per_s=900.0, elapsed_s=12.0, skipped=1)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "skipped"],
                    ["7", "2.5", "", "0.001", "900.0", "12.0", "1"]]


def test_truncating_a_metrics_log_that_is_not_there_writes_and_warns_nothing(tmp_path):
    """A resume whose out dir has no metrics.csv (deleted, or never written) truncates nothing
    quietly, and a later failure still gets its one warning (a mutation audit: reading the
    missing file warned of a write that never failed, and used up the one warning)."""
    from gpt.metrics import Metrics

    warnings = []
    Metrics(str(tmp_path), warn=warnings.append).truncate_after(3)
    assert warnings == [] and not (tmp_path / "metrics.csv").exists()


def test_a_nul_tail_in_the_metrics_log_is_dropped_under_python_3_10s_csv(tmp_path, monkeypatch):
    """Python 3.10's csv reader raises "line contains NUL" where 3.11's keeps the NUL in the
    field: the log's reader must drop the damaged rows either way, not warn and keep them
    (found under Python 3.10, make torch-floor PYTHON=python3.10)."""
    from gpt import metrics

    reader = csv.DictReader

    def reader_of_3_10(lines, *args, **kwargs):
        lines = list(lines)
        if any("\0" in line for line in lines):
            raise csv.Error("line contains NUL")
        return reader(lines, *args, **kwargs)

    monkeypatch.setattr(metrics.csv, "DictReader", reader_of_3_10)
    warnings = []
    log = metrics.Metrics(str(tmp_path), warn=warnings.append)
    log.append(step=1, train_loss=3.0)
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("2,2.9\x00\x00\n\x00\x00\x00\n")
    log.truncate_after(5)
    assert warnings == []
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["1,3.0,,,,,"]


def test_a_damaged_val_loss_or_an_overlong_line_in_the_metrics_log_does_not_stop_training(tmp_path):
    """A row whose val_loss does not parse is dropped like one whose train_loss does not, and a
    NUL tail longer than the csv module's field limit is a warning, not a traceback, in both
    truncate_after and plot (a mutation audit: _parses checking train_loss only, and
    truncate_after catching OSError only, went unseen: the damaged-log test writes a short
    tail in train_loss)."""
    from gpt.metrics import Metrics

    warnings = []
    log = Metrics(str(tmp_path), warn=warnings.append)
    log.append(step=1, train_loss=3.0, val_loss=3.1)
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("2,,2.9\x00\x00\x00\n")
    log.truncate_after(5)
    log.plot()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]
    assert (tmp_path / "loss.png").exists() and warnings == []
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("3," + "\x00" * 200_000)
    log.truncate_after(5)
    log.plot()
    assert len(warnings) == 1 and "field larger than field limit" in warnings[0]
