"""End-to-end: train.py and sample.py as a user runs them."""
import contextlib
import csv
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import sample
import train
from gpt import GPT, GPTConfig, checkpoint, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--log-interval", "1", "--device", "cpu", "--kernels", "torch"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return str(path)


def run_train(tmp_path, corpus, out, *extra):
    args = ["--data", corpus, "--out-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"), *TINY, *extra]
    return train.train(train.parse_args(args))


def test_training_lowers_the_loss_and_writes_outputs(tmp_path, corpus):
    result = run_train(tmp_path, corpus, "out", "--max-steps", "30", "--eval-interval", "15", "--lr", "3e-3", "--warmup", "5")
    out = tmp_path / "out"
    assert result["step"] == 30
    assert result["val"] < 2.0  # from ~ln(vocab)=2.9: it learned the repeating text
    for name in ("ckpt.pt", "metrics.csv", "loss.png"):
        assert (out / name).exists()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,train_loss,val_loss") and len(rows) > 30


def test_compiled_training_follows_eager(tmp_path, corpus):
    """train.py --compile (one Inductor graph for the step, gradient accumulation included)
    gives eager's losses, to rounding: Inductor sums the embedding's gradient in no fixed order.
    (No dropout: Inductor draws its masks from its own random stream.)"""
    losses = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        run_train(tmp_path, corpus, name, "--max-steps", "4", "--eval-interval", "4", "--grad-accum", "2",
                  "--lr", "3e-3", "--warmup", "1", *extra)
        with open(tmp_path / name / "metrics.csv") as f:
            losses[name] = [float(r["train_loss"]) for r in csv.DictReader(f) if r["lr"]]
    assert len(losses["eager"]) == 4
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_tokens_per_second_leave_out_the_eval_time(tmp_path, corpus, monkeypatch):
    """tok/s is the training's speed: an eval between two log lines (minutes on a real corpus)
    is not counted. Here the eval at step 2 takes 1000 s on a clock moved forward, and the
    line at step 4 must still see two steps' tokens over the seconds they took."""
    ahead, real_time, real_eval = [0.0], time.time, train.estimate_loss

    def slow_eval(*args, **kwargs):
        ahead[0] += 1000.0
        return real_eval(*args, **kwargs)
    monkeypatch.setattr(train.time, "time", lambda: real_time() + ahead[0])
    monkeypatch.setattr(train, "estimate_loss", slow_eval)
    run_train(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2", "--log-interval", "2")
    with open(tmp_path / "out" / "metrics.csv") as f:
        speed = {int(r["step"]): float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]}
    assert speed[4] > 2 * 8 * 32 / 100  # two steps of 8 x 32 tokens in under 100 s


def test_checkpoint_round_trip(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "4", "--pos-embedding", "sinusoidal",
              "--no-bias")
    model, tok, state = checkpoint.load_model(tmp_path / "out")
    assert state["step"] == 4 and model.config.pos_embedding == "sinusoidal" and model.config.bias is False
    raw = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model"][k])
    assert tok.decode(tok.encode("def add")) == "def add"


def test_resume_matches_an_uninterrupted_run(tmp_path, corpus):
    common = ["--warmup", "10", "--dropout", "0.1", "--eval-interval", "3"]
    run_train(tmp_path, corpus, "full", "--max-steps", "6", *common)
    run_train(tmp_path, corpus, "split", "--max-steps", "3", *common)
    run_train(tmp_path, corpus, "split", "--max-steps", "6", "--resume", *common)
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert full["step"] == split["step"] == 6
    for k in full["model"]:
        assert torch.equal(full["model"][k], split["model"][k]), k


def test_sampling_is_reproducible(tmp_path, corpus, capsys):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        assert sample.main(["--checkpoint", str(tmp_path / "out"), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "3", "--device", "cpu"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def ")
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out != outputs[0]  # the seed is what repeats them


def test_seed_zero_makes_the_samples_reproducible(byte_checkpoint, capsys):
    """--seed 0 is a seed like any other: the same samples each run (a mutation audit: a seed
    taken by truthiness, `args.seed or torch.seed()`, drew fresh samples for --seed 0 unseen)."""
    outputs = []
    for _ in range(2):
        assert sample.main(["--checkpoint", byte_checkpoint, "--prompt", "ab", "--max-new-tokens", "12", "--seed", "0",
                            "--device", "cpu"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ab")


def test_sample_py_reports_its_speed_on_stderr(tmp_path, corpus, capsys):
    """As gpt-fast's generate.py: the tokens drawn, the time and the rate, one line on stderr
    (stdout holds the samples only), streamed or in a batch."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    capsys.readouterr()
    common = ["--checkpoint", str(tmp_path / "out"), "--prompt", "def ", "--max-new-tokens", "7", "--device", "cpu"]
    for extra, line in (([], r"7 tokens in [\d.]+ s, [\d,.]+ tokens/s \(1 sample at once\)"),
                        (["--num-samples", "3"], r"21 tokens in [\d.]+ s, [\d,.]+ tokens/s \(3 samples at once\)")):
        assert sample.main([*common, *extra]) == 0
        out, err = capsys.readouterr()
        assert re.fullmatch(line + "\n", err), err
        assert "tokens/s" not in out
    # --compile compiles the decode step before the generation it times, and reports it apart.
    assert sample.main([*common, "--compile"]) == 0
    assert re.fullmatch(r"compiled the decode step in [\d.]+ s\n7 tokens in [\d.]+ s, [\d,.]+ tokens/s "
                        r"\(1 sample at once\)\n", capsys.readouterr().err)


def test_sample_py_speed_line_counts_what_it_drew_in_the_generation_time(tmp_path, corpus, capsys, monkeypatch):
    """The speed line's numbers: the tokens drawn (fewer than --max-new-tokens when --stop ends
    the samples), the time of the generation (a clock that moves 2 s while generate runs and
    not otherwise), the rate their quotient, and every prompt's samples."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    clock, real_generate = [1000.0], sample.generate

    def generate(*args, **kwargs):
        clock[0] += 2.0
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(sample, "generate", generate)
    monkeypatch.setattr(sample.time, "perf_counter", lambda: clock[0])
    capsys.readouterr()

    def run(*extra):
        assert sample.main(["--checkpoint", str(tmp_path / "out"), "--max-new-tokens", "24", "--seed", "5",
                            "--device", "cpu", *extra]) == 0
        return capsys.readouterr()

    # Streamed (one token a character): stopped where its third character first shows, the last drawn.
    text = run("--prompt", "def ").out[len("def "):]
    drawn = text.index(text[2]) + 1
    assert run("--prompt", "def ", "--stop", text[2]).err == \
        f"{drawn} tokens in 2.00 s, {drawn / 2:.1f} tokens/s (1 sample at once)\n"
    # Four at once, each stopped by its own first character: every row ends at the first
    # check for stop strings, well before 24 tokens.
    batch = ["--prompt", "def ", "--prompt", "ret", "--num-samples", "2"]
    firsts = re.findall(r"--- sample \d ---\n(?:def |ret)(.)", run(*batch).out, re.S)
    assert len(firsts) == 4
    err = run(*batch, *(arg for c in firsts for arg in ("--stop", c))).err
    drawn = int(err.split()[0])
    assert drawn % 4 == 0 and 4 <= drawn < 4 * 24, err
    assert err == f"{drawn} tokens in 2.00 s, {drawn / 2:.1f} tokens/s (4 samples at once)\n"


def test_sample_py_speed_line_on_a_gpu_adds_its_peak_memory(monkeypatch, capsys):
    """On CUDA the line ends with the peak GPU memory in GiB (the allocator's figure, here a
    stand-in's), and rates past a thousand take a thousands separator."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 3 * 2**29)
    sample.report_speed(3000, 2, 1.5, "cuda")
    assert capsys.readouterr().err == \
        "3000 tokens in 1.50 s, 2,000.0 tokens/s (2 samples at once, peak GPU memory 1.50 GiB)\n"


def test_streamer_counts_the_tokens_of_the_sample(capsys):
    """The speed line counts a streamed sample's tokens as generate() counts a batch's: the
    one that completes a stop string (generation stops after it), not the end of text."""
    from gpt.tokenizer import ByteTokenizer

    for stops, eot, text, drawn in [([], ord("|"), b"one|two", 3), (["STOP"], None, b"hello STOP world", 10)]:
        stream = sample.Streamer(ByteTokenizer(), stops, eot)
        for b in text:
            stream(torch.tensor([[b]]))
            if stream.ended:
                break
        stream.finish()
        assert stream.generated == drawn
    capsys.readouterr()


def test_streamed_text_ends_before_a_stop_string_and_at_end_of_text(capsys):
    from gpt.tokenizer import ByteTokenizer

    for stops, eot, text, shown in [(["STOP"], None, b"hello STOP world", "hello \n"),
                                    ([], ord("|"), b"one|two", "one\n"),
                                    (["ST"], None, "caf\u00e9 S and ST".encode(), "caf\u00e9 S and \n")]:
        stream = sample.Streamer(ByteTokenizer(), stops, eot)
        for b in text:
            stream(torch.tensor([[b]]))
        stream.finish()
        assert capsys.readouterr().out == shown


def test_a_long_prompt_keeps_its_end(capsys):
    from gpt.tokenizer import CharTokenizer

    assert sample.encode_prompt("abcdefghij", CharTokenizer("abcdefghij"), 4) == [6, 7, 8, 9]
    assert "keeping the last 4" in capsys.readouterr().err


def test_batched_samples_start_with_their_prompt_and_end_before_the_stop(tmp_path, corpus, capsys):
    run_train(tmp_path, corpus, "out", "--max-steps", "30", "--eval-interval", "30", "--lr", "3e-3", "--warmup", "5")
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--prompt", "def ", "--prompt", "ret", "--num-samples", "2",
                        "--max-new-tokens", "40", "--stop", "(", "--seed", "1", "--device", "cpu"]) == 0
    blocks = capsys.readouterr().out.split("--- sample ")[1:]
    assert len(blocks) == 4
    for n, block in enumerate(blocks):
        text = block.split("---\n", 1)[1]
        assert text.startswith("def " if n < 2 else "ret") and "(" not in text, block


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, input=stdin, timeout=120)


def assert_one_line_error(proc, *phrases):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for phrase in phrases:
        assert phrase in lines[0]


@pytest.mark.parametrize(
    "content, phrase",
    [(None, "does not exist"), (b"", "is empty"), (b"\x00\x01\x02binary\xff", "looks binary")],
    ids=["missing", "empty", "binary"],
)
def test_train_bad_data_is_one_line(tmp_path, content, phrase):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    proc = run_cli("train.py", "--data", str(path), "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(proc, phrase, str(path))


def test_an_early_failure_leaves_no_empty_out_dir(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    args = ["--data", str(tmp_path / "missing.txt"), "--out-dir", str(out), "--cache-dir", str(tmp_path / "c"), *TINY]
    assert train.main(args) == 2
    assert not out.exists()
    out.mkdir()  # a folder the user made is theirs: kept
    assert train.main(args) == 2
    assert out.is_dir()


def test_train_bad_flags_are_one_line(tmp_path, corpus):
    proc = run_cli("train.py", "--data", corpus, "--n-embd", "30", "--n-head", "4", "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(proc, "divisible by n_head")


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--n-embd", "48", "--n-head", "4"], "takes head dims 16, 32, 64, 128, and n_embd 48 over 4 heads is 12"),
        (["--dtype", "bf16"], "Triton's interpreter computes bf16 wrongly"),
    ],
    ids=["head-dim-12", "bf16-interpreted"],
)
@pytest.mark.triton
def test_what_the_triton_kernels_cannot_run_is_refused_at_startup(tmp_path, corpus, capsys, extra, phrase):
    """--kernels triton on a model the kernels do not take: one line before the first step,
    not the kernel's ValueError from inside it. (auto runs such a model on torch.)"""
    args = ["--data", corpus, "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *TINY,
            "--kernels", "triton", "--max-steps", "1", *extra]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0] and "use --kernels auto" in err[0], err


@pytest.mark.triton
def test_kernels_need_ampere_or_newer(monkeypatch):
    """Older GPUs (a T4 is sm75) have too little shared memory for our tiles: auto runs every
    op on torch there, and kernels="triton" is refused naming the GPU."""
    import types

    import kernels
    from gpt import ops
    from kernels import _utils

    gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # a CUDA tensor, to ops.backend
    config = GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=32, kernels="triton")
    for capability, auto, why in (((7, 5), ops.reference, "sm80 (Ampere) or newer GPU, and this one is sm75"),
                                  ((8, 0), kernels, None), ((9, 0), kernels, None)):
        monkeypatch.setattr(_utils, "device_capability", lambda index=0: capability)
        assert ops.backend(gpu, "auto") is auto
        assert ops.backend(gpu, "triton") is kernels
        got = ops.triton_unsupported(config, torch.device("cuda", 0), torch.bfloat16)
        assert got == why or why in got, got


@pytest.mark.triton
def test_a_residual_row_past_the_layer_norm_kernel_is_refused():
    """The residual stream is fp32 whatever --dtype: 16384 values (64 KiB) is the widest row
    the LayerNorm kernel holds, so n_embd 16512 (129 heads of 128) is refused at startup and
    16384 is taken. Counted in 16-bit values, rows up to 32768 passed and failed in the kernel."""
    from gpt import ops

    config = lambda n_embd: GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=n_embd // 128, n_embd=n_embd,
                                      kernels="triton")
    for dtype in (torch.float32, torch.float16):
        assert ops.triton_unsupported(config(16384), torch.device("cpu"), dtype) is None
        got = ops.triton_unsupported(config(16512), torch.device("cpu"), dtype)
        assert got is not None and "rows of up to 16384 fp32 values, not 16512" in got, got


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--data", ""], "--data is empty"),
        (["--lr", "nan"], "--lr must be positive"),
        (["--beta2", "1.5"], "--beta2 must be in [0, 1)"),
        pytest.param(["--fsdp"], "launch with torchrun",
                     marks=pytest.mark.skipif(not distributed.has_fsdp2(), reason="FSDP2 needs torch 2.6 or newer")),
        (["--out-dir", "FILE"], "is a file, not a folder"),
        pytest.param(["--kernels", "triton"], "--kernels triton needs a CUDA GPU, and the device is cpu",
                     marks=pytest.mark.triton),
        (["--weight-decay", "nan"], "--weight-decay must be a non-negative number, got nan"),
        (["--grad-clip", "inf"], "--grad-clip must be a non-negative number, got inf"),
        (["--seed", str(2**64)], "--seed must be in [0, 2^63)"),
        (["--resume", "--overwrite"], "pass one of them"),
        (["--resume", "--init-from", "gpt2"], "--resume continues a run and --init-from starts one"),
        (["--max-skips", "0"], "--max-skips must be positive, got 0"),
        (["--eval-iters", "0"], "--eval-iters must be positive, got 0"),
        (["--save-interval", "-1"], "--save-interval must be a non-negative number, got -1"),
        (["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr between 0 and --lr"),
        (["--beta2", "1"], "--beta2 must be in [0, 1)"),
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--device", "cuda"], "--device cuda was asked for but no CUDA GPU is visible"),
    ],
    ids=["empty-data", "nan-lr", "beta2", "fsdp-alone", "out-dir-file", "triton-on-cpu", "nan-decay", "inf-clip", "seed",
         "resume-overwrite", "resume-init-from", "no-skips", "no-eval-iters", "negative-save-interval", "min-lr-above-lr",
         "beta2-one", "dropout-one", "cuda-without-gpu"],
)
def test_train_flag_errors_are_one_line(tmp_path, corpus, capsys, monkeypatch, extra, phrase):
    monkeypatch.setattr(train, "interpreting", lambda: False)  # conftest sets TRITON_INTERPRET for the kernel tests
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "FILE").write_text("not a folder")
    extra = [str(tmp_path / "FILE") if a == "FILE" else a for a in extra]
    args = ["--data", corpus, "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *TINY,
            "--max-steps", "1", *extra]  # a flag wrongly taken trains one step, not 5000
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], err


def test_fsdp_without_fsdp2_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    """torch 2.4 and 2.5 run everything but --fsdp: FSDP2's fully_shard is public from 2.6."""
    major, minor = (int(n) for n in torch.__version__.split(".")[:2])
    assert distributed.has_fsdp2() == ((major, minor) >= (2, 6))
    monkeypatch.setattr(distributed, "has_fsdp2", lambda: False)
    monkeypatch.setenv("RANK", "0")  # as under torchrun: the version is what is refused
    args = ["--data", corpus, "--out-dir", str(tmp_path / "o"), *TINY, "--max-steps", "1", "--fsdp"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch 2.6 or newer) and this is "
                   f"torch {torch.__version__}; upgrade torch, or drop --fsdp for DDP"]


def test_resume_keeps_the_checkpoints_tokenizer(tmp_path, corpus, capsys):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    capsys.readouterr()
    args = ["--data", corpus, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY, "--resume"]
    assert train.main([*args, "--tokenizer", "byte"]) == 2
    assert "uses the char tokenizer; drop --tokenizer byte" in capsys.readouterr().err
    # Resuming a run that already reached --max-steps says so instead of exiting silently.
    assert train.main([*args, "--max-steps", "2"]) == 0
    assert "already reaches --max-steps 2; nothing to train" in capsys.readouterr().out


def test_sample_flags(tmp_path, corpus, capsys):
    assert sample.parse_args(["--stop", r"\n\n", "--stop", "é"]).stop == ["\n\n", "é"]  # shell escapes are read
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--top-k", "-3", "--device", "cpu"]) == 2
    assert "--top-k must be 0 (all tokens) or positive" in capsys.readouterr().err
    # A temperature whose reciprocal overflows is greedy, like 0, not a crash.
    common = ["--checkpoint", str(tmp_path / "out"), "--prompt", "def ", "--max-new-tokens", "8", "--device", "cpu"]
    outputs = []
    for t in ("1e-45", "0"):
        assert sample.main([*common, "--temperature", t]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_sample_defaults_are_nanogpts(monkeypatch):
    """With no flags, sample.py samples as nanoGPT's sample.py and the README's example do:
    temperature 0.8 over the top 200 tokens, no nucleus cut, one streamed sample, 256 new
    tokens, unseeded (a mutation audit: a changed default temperature, top-k or length went
    unseen, as every test passes its own)."""
    args = sample.parse_args([])
    assert (args.temperature, args.top_k, args.top_p, args.num_samples, args.max_new_tokens, args.seed, args.stop) == \
        (0.8, 200, 1.0, 1, 256, None, [])
    assert (args.checkpoint, args.device, args.dtype, args.prompt, args.prompt_file) == ("out", "auto", None, None, None)


def test_sample_errors_are_one_line(tmp_path, corpus):
    assert_one_line_error(run_cli("sample.py", "--checkpoint", str(tmp_path / "none")), "no checkpoint")
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    proc = run_cli("sample.py", "--checkpoint", str(tmp_path / "out"), "--prompt-file", "-", stdin="Ω unknown")
    assert_one_line_error(proc, "'Ω' is not in this char model's vocabulary")
    # Started with stdin closed (sample.py --prompt-file - <&-): Python's sys.stdin is None.
    closed = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "out"), "--prompt-file", "-"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.close(0))
    assert_one_line_error(closed, "--prompt-file -: stdin is closed")


def test_sample_on_diverged_weights_is_a_one_line_error(tmp_path, corpus, capsys):
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    path = tmp_path / "out" / checkpoint.CKPT_NAME
    state = torch.load(path, weights_only=False)
    state["model"]["lm_head.weight"][0, 0] = float("nan")
    torch.save(state, path)
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--max-new-tokens", "4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logits are not finite" in err[0], err


def test_sample_refuses_more_samples_than_the_sampler_draws_apart(tmp_path, corpus, capsys):
    """kernels.sample numbers each row's noise b * V + i in 32 bits, and refuses a batch past
    that with a ValueError, which sample.py showed as a traceback; it is a usage error now,
    caught before the batch is built."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    vocab = torch.load(os.path.join(tmp_path, "out", "ckpt.pt"), weights_only=False)["config"]["vocab_size"]
    capsys.readouterr()
    too_many = str(-(-2**32 // vocab))
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--num-samples", too_many, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"generate fewer than {too_many} at a time" in err


def test_sample_out_of_memory_is_a_one_line_error(tmp_path, corpus, capsys, monkeypatch):
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")

    def no_room(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(sample, "Decoder", no_room)
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--num-samples", "64", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: out of GPU memory generating (the KV cache holds every sample of every prompt at once, and the "
        "output each one's tokens); lower --num-samples, pass fewer prompts or lower --max-new-tokens")


def test_ctrl_c_while_sampling_ends_the_line(tmp_path, corpus, capsys, monkeypatch):
    """Ctrl-C mid-sample exits 130 with the partial sample's line ended, so the shell's prompt
    does not land after its last character."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")

    def interrupted(*args, on_token=None, **kwargs):
        on_token(torch.tensor([[3]]))
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "generate", interrupted)
    capsys.readouterr()
    assert sample.main(["--checkpoint", str(tmp_path / "out"), "--prompt", "de", "--device", "cpu"]) == 130
    out = capsys.readouterr().out
    assert out.startswith("de") and out.endswith("\n") and len(out) > 3, repr(out)


def test_learning_rate_schedule():
    args = train.parse_args(["--lr", "1.0", "--min-lr", "0.2", "--warmup", "4", "--max-steps", "14"])
    lr = lambda s: train.learning_rate(s, 0.0, args)
    assert [lr(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # (step+1)/(warmup+1), never 0
    assert lr(4) == pytest.approx(1.0)  # peak right after warm-up
    assert lr(9) == pytest.approx(0.6)  # halfway through the cosine from the end of warm-up
    assert lr(14) == pytest.approx(0.2) and lr(100) == pytest.approx(0.2)  # floor is --min-lr
    default = train.parse_args(["--lr", "1.0", "--warmup", "0", "--max-steps", "10"])
    assert train.learning_rate(10, 0.0, default) == pytest.approx(0.1)
    # With --max-time the cosine follows the clock when it runs out first.
    timed = train.parse_args(["--lr", "1.0", "--min-lr", "0.2", "--warmup", "0", "--max-steps", "1000", "--max-time", "60"])
    assert train.learning_rate(1, 30.0, timed) == pytest.approx(0.6) and train.learning_rate(1, 60.0, timed) == pytest.approx(0.2)


def test_flags_at_the_edges_of_their_ranges_are_taken():
    """The ends of each range that are in it: --seed 0, --min-lr equal to --lr or 0, --beta2 0,
    no warm-up, clip, decay, time limit or dropout (a mutation audit: < for <= went unseen)."""
    for argv in (["--seed", "0"], ["--seed", str(2**63 - 1)], ["--lr", "1e-3", "--min-lr", "1e-3"], ["--min-lr", "0"],
                 ["--beta2", "0"], ["--warmup", "0", "--grad-clip", "0", "--weight-decay", "0", "--max-time", "0",
                                    "--save-interval", "0", "--dropout", "0"]):
        train.check_args(train.parse_args(argv))


def test_train_defaults_are_its_help(monkeypatch):
    """With no flags, train.py runs as its --help says: lr 1e-3 to lr / 10 over 5000 steps after
    100 of warm-up, AdamW (0.9, 0.99) with decay 0.1, clip 1.0, 10 skips, an eval of 20 batches every
    250 steps, a line every 10, batch 32, seed 1337 (a mutation audit: a changed default went unseen,
    as every test passes its own)."""
    args = train.parse_args([])
    assert (args.lr, args.min_lr, args.warmup, args.max_steps, args.decay_steps, args.max_time) == \
        (1e-3, None, 100, 5000, None, 0)
    assert (args.weight_decay, args.beta2, args.grad_clip, args.max_skips, args.batch_size, args.grad_accum) == \
        (0.1, 0.99, 1.0, 10, 32, 1)
    assert (args.eval_interval, args.eval_iters, args.save_interval, args.log_interval, args.seed) == (250, 20, 0, 10, 1337)
    assert (args.out_dir, args.device, args.dtype, args.kernels, args.preset, args.tokenizer) == \
        ("out", "auto", None, "auto", None, None)


def test_the_logged_lr_is_the_one_the_step_trained_with(tmp_path, corpus):
    """metrics.csv's lr for step s is the schedule's at s - 1, the update it made: 1/5 and 2/5 of
    --lr in a warm-up of 4 (a mutation audit: the next step's lr logged went unseen)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "100", "--warmup", "4", "--lr", "1e-3")
    with open(tmp_path / "out" / "metrics.csv") as f:
        assert [r["lr"] for r in csv.DictReader(f) if r["lr"]] == ["2.000e-04", "4.000e-04"]


def test_a_cpu_run_is_fp32_unless_asked_and_other_dtypes_are_said_to_be_slow(tmp_path, corpus, capsys):
    """--dtype's default on a CPU is fp32, and bf16 asked for there is taken with a note (a
    mutation audit: a bf16 default, and the note dropped, went unseen)."""
    run_train(tmp_path, corpus, "fp32", "--max-steps", "1", "--eval-interval", "1")
    out = capsys.readouterr().out
    assert "| dtype fp32 |" in out and "on CPU is slow" not in out
    run_train(tmp_path, corpus, "bf16", "--max-steps", "1", "--eval-interval", "1", "--dtype", "bf16")
    assert "note: bf16 on CPU is slow; fp32 is the CPU default" in capsys.readouterr().out


def test_a_run_no_longer_than_its_warmup_says_so(tmp_path, corpus, capsys):
    """--max-steps 3 under the default --warmup 100 is all warm-up: the lr never reaches --lr
    nor decays, the schedule --decay-steps 3 would be refused for. It runs, but says so."""
    run_train(tmp_path, corpus, "short", "--max-steps", "3", "--eval-interval", "3", "--lr", "1e-3")
    assert "note: --max-steps 3 ends within --warmup 100: the lr rises to 3.0e-05 (--lr is 0.001) and never decays" \
        in capsys.readouterr().out
    run_train(tmp_path, corpus, "long", "--max-steps", "3", "--eval-interval", "3", "--warmup", "2")
    assert "ends within --warmup" not in capsys.readouterr().out
    run_train(tmp_path, corpus, "equal", "--max-steps", "3", "--eval-interval", "3", "--warmup", "3")
    assert "note: --max-steps 3 ends within --warmup 3: the lr rises to 7.5e-04" in capsys.readouterr().out


def test_best_pt_holds_the_step_with_the_lowest_val_loss(tmp_path, corpus, monkeypatch):
    vals = iter([1.0, 2.0, 1.5])
    monkeypatch.setattr(train, "estimate_loss", lambda *a: {"train": 1.0, "val": next(vals)})
    run_train(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "2")
    assert checkpoint.load(tmp_path / "out" / "best.pt")["step"] == 2
    assert checkpoint.load(tmp_path / "out")["step"] == 6


def test_a_resumed_run_keeps_the_best_val_loss_it_had(tmp_path, corpus, monkeypatch):
    """After --resume, best.pt is replaced only by a val loss below the whole run's best,
    not below the first eval after the resume (a mutation audit: best_val could be left at inf)."""
    vals = iter([1.0, 2.0, 1.5])
    monkeypatch.setattr(train, "estimate_loss", lambda *a: {"train": 1.0, "val": next(vals)})
    run_train(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2")
    result = run_train(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "2", "--resume")
    assert result["best_val_loss"] == 1.0
    assert checkpoint.load(tmp_path / "out" / "best.pt")["step"] == 2


def test_an_equal_val_loss_does_not_replace_best_pt(tmp_path, corpus, monkeypatch):
    """best.pt is written when val improves, not when it ties (a mutation audit: < could be <=)."""
    vals = iter([1.0, 1.0])
    monkeypatch.setattr(train, "estimate_loss", lambda *a: {"train": 1.0, "val": next(vals)})
    run_train(tmp_path, corpus, "out", "--max-steps", "4", "--eval-interval", "2")
    assert checkpoint.load(tmp_path / "out" / "best.pt")["step"] == 2


def test_save_interval_saves_between_evals(tmp_path, corpus, monkeypatch):
    saved, save = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda state, path: saved.append((state["step"], os.path.basename(path))) or save(state, path))
    run_train(tmp_path, corpus, "out", "--max-steps", "5", "--eval-interval", "100", "--save-interval", "2")
    assert [s for s in saved if s[1] == "ckpt.pt"] == [(2, "ckpt.pt"), (4, "ckpt.pt"), (5, "ckpt.pt")]


def test_max_time_ends_the_run(tmp_path, corpus):
    result = run_train(tmp_path, corpus, "out", "--max-steps", "50", "--max-time", "1e-9")
    assert result["step"] == 1 and checkpoint.load(tmp_path / "out")["step"] == 1


def test_a_resumed_run_does_not_repeat_logged_steps(tmp_path, corpus):
    run_train(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "3")
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    state["step"] = 3  # as if the run had died after its step-3 checkpoint, its log reaching step 6
    torch.save(state, tmp_path / "out" / "ckpt.pt")
    run_train(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "3", "--resume")
    rows = [r.split(",") for r in (tmp_path / "out" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows if r[2] == ""] == list(range(1, 7)), rows  # train rows: steps 1-6 once each


def test_tokens_per_second_spans_the_steps_it_counts(tmp_path, corpus, monkeypatch):
    """An eval inside a log interval (here at step 19 of 11-20) is taken out of the interval's
    time, not the steps before it: those steps' time was dropped, so the rate read ~10x.
    On a clock that moves 1 s a step and 100 s an eval, every interval's rate is the same."""
    clock, real_batches, real_eval = [0.0], train.train_batches, train.estimate_loss

    def timed(seconds, fn):
        def call(*args, **kwargs):
            clock[0] += seconds
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    monkeypatch.setattr(train, "train_batches", timed(1.0, real_batches))
    monkeypatch.setattr(train, "estimate_loss", timed(100.0, real_eval))
    run_train(tmp_path, corpus, "out", "--max-steps", "20", "--eval-interval", "19", "--log-interval", "10")
    rows = [r.split(",") for r in (tmp_path / "out" / "metrics.csv").read_text().splitlines()]
    rate = {int(r[0]): float(r[rows[0].index("tokens_per_s")]) for r in rows[1:] if r[rows[0].index("tokens_per_s")]}
    assert rate.keys() == {1, 10, 20} and rate[1] == rate[10] == rate[20], rate


def test_tokens_per_second_count_every_micro_batch(tmp_path, corpus, one_second_steps):
    """On a clock that moves 1 s a step, tokens/s is the step's tokens: batch x grad-accum x
    block (a mutation audit: --grad-accum could be left out of the count unseen)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "100", "--batch-size", "4",
              "--grad-accum", "3")
    with open(tmp_path / "out" / "metrics.csv") as f:
        rates = {int(r["step"]): float(r["tokens_per_s"]) for r in csv.DictReader(f) if r["tokens_per_s"]}
    assert rates == {1: 4 * 3 * 32, 2: 4 * 3 * 32}, rates


def test_the_logged_loss_with_grad_accum_is_the_mean_over_the_batch(tmp_path, corpus):
    """The first step's logged loss is the same whether its 8 sequences come as one micro-batch
    or as two of 4 (a mutation audit: the micro-batches' losses could be summed, not averaged)."""
    def first_loss(out, *extra):
        run_train(tmp_path, corpus, out, "--max-steps", "1", "--eval-interval", "100", "--dropout", "0", *extra)
        with open(tmp_path / out / "metrics.csv") as f:
            return float(next(r for r in csv.DictReader(f) if r["tokens_per_s"])["train_loss"])
    whole = first_loss("whole", "--batch-size", "8", "--grad-accum", "1")
    assert first_loss("split", "--batch-size", "4", "--grad-accum", "2") == pytest.approx(whole, abs=2e-4)


def test_progress_lines_average_the_loss_and_time_over_their_interval(tmp_path, corpus, one_second_steps, capsys):
    """A line every 3 steps shows the mean loss of its steps, not their sum, and an eta from the
    mean step time (a mutation audit: both could be off by the log interval unseen)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "6", "--eval-interval", "100", "--log-interval", "3",
              "--lr", "1e-9", "--warmup", "0", "--dropout", "0")
    lines = {int(m[1]): m for m in re.finditer(r"^step (\d+)/6 \| loss ([\d.]+) .* eta (\S+)$", capsys.readouterr().out, re.M)}
    assert sorted(lines) == [1, 3, 6]
    assert [lines[s][3] for s in (1, 3, 6)] == ["0m05s", "0m03s", "0m00s"]  # 1 s a step
    # At lr 1e-9 the weights hardly move: each line's mean loss is about the first step's.
    assert float(lines[3][2]) == pytest.approx(float(lines[1][2]), rel=0.1)
    assert float(lines[6][2]) == pytest.approx(float(lines[1][2]), rel=0.1)


def test_the_eta_of_a_timed_run_is_its_time_left(tmp_path, corpus, one_second_steps, capsys):
    """Under --max-time the eta is the time left when that comes first, not the steps' (a
    mutation audit: it could show 16 minutes for a run with 9 s to go)."""
    run_train(tmp_path, corpus, "out", "--max-steps", "1000", "--max-time", "10", "--eval-interval", "1000")
    out = capsys.readouterr().out
    assert re.search(r"^step 1/1000 .* eta 0m09s$", out, re.M), out


def test_accumulated_gradient_is_the_mean_over_the_global_batch(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: (lambda n: norms.append(n.item()) or n)(real(ps, m)))
    base = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--n-layer", "1", "--n-head", "2",
            "--n-embd", "32", "--block-size", "16", "--eval-iters", "1", "--max-steps", "1", "--eval-interval", "1",
            "--device", "cpu", "--kernels", "torch", "--dropout", "0"]
    train.train(train.parse_args(base + ["--out-dir", str(tmp_path / "a"), "--batch-size", "8", "--grad-accum", "1"]))
    train.train(train.parse_args(base + ["--out-dir", str(tmp_path / "b"), "--batch-size", "4", "--grad-accum", "2"]))
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_times_from_an_hour_on_show_hours():
    """The eta and the run's time: minutes and seconds below an hour, hours and minutes from
    one on (a mutation audit: exactly an hour could read 60m00s unseen)."""
    assert [train.fmt_time(s) for s in (0, 59.9, 3599, 3600, 3661, 90000)] == \
        ["0m00s", "0m59s", "59m59s", "1h00m", "1h01m", "25h00m"]


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    opt, _ = train.make_optimizer(model, train.parse_args(["--weight-decay", "0.1"]), fused=False)
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), tuple(p.shape)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA GeForce GTX 1080", None)])
def test_mfu_peak_is_the_cards_own(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert train.peak_flops("cuda", "bf16") == peak


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 67e12), ("NVIDIA A100-SXM4-80GB", 19.5e12)])
def test_fp32_mfu_is_against_the_rate_fp32_matmuls_run_at(monkeypatch, name, peak):
    """--dtype fp32 leaves TF32 off (torch's default; the kernels ask for IEEE fp32), so its
    matmuls run on the CUDA cores: against the tensor cores' TF32 peak, 7x (H100) or 8x (A100)
    faster, its MFU would read that many times too low."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert not torch.backends.cuda.matmul.allow_tf32
    assert train.peak_flops("cuda", "fp32") == peak


def test_a_new_run_does_not_overwrite_a_checkpoint(tmp_path, corpus, capsys):
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    before = checkpoint.load(tmp_path / "out")
    args = ["--data", corpus, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY, "--max-steps", "1"]
    assert train.main(args) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert torch.equal(checkpoint.load(tmp_path / "out")["model"]["lm_head.weight"], before["model"]["lm_head.weight"])
    assert train.main([*args, "--overwrite", "--eval-interval", "1"]) == 0  # asked for: replaced
    assert checkpoint.load(tmp_path / "out")["step"] == 1
    assert "done: step 1" in capsys.readouterr().out
    # best.pt alone (ckpt.pt deleted to save space) is a checkpoint too.
    (tmp_path / "out" / "ckpt.pt").unlink()
    assert train.main(args) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err and (tmp_path / "out" / "best.pt").exists()


def test_resume_stays_on_the_runs_corpus(tmp_path, corpus, capsys):
    """A byte or gpt2 model trains on any corpus; without --data, --resume means the run's own."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2", "--tokenizer", "byte")
    capsys.readouterr()
    args = ["--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY, "--resume", "--max-steps", "3"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert f"resuming on --data {corpus}" in out and f"data: {corpus}:" in out
    assert train.main([*args, "--data", corpus, "--max-steps", "4"]) == 0  # the same corpus again: nothing to note
    assert "note: resuming on --data" not in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, corpus, capsys):
    for main, argv in ((train.main, ["--max-stesp", "3"]), (sample.main, ["--topk", "3"])):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unrecognized arguments" in err[0] and "(see --help)" in err[0], err
    for argv, phrase in ((["--stop", ""], 'pass the text to stop at'), (["--seed", str(10**23)], "--seed must be in")):
        assert sample.main(argv) == 2
        assert phrase in capsys.readouterr().err
    run_train(tmp_path, corpus, "out", "--max-steps", "1", "--eval-interval", "1")
    (tmp_path / "file").write_text("x")
    from gpt import export

    assert export.main([str(tmp_path / "out"), str(tmp_path / "file"), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0], err
    only_best = tmp_path / "only_best"
    only_best.mkdir()
    (tmp_path / "out" / "best.pt").rename(only_best / "best.pt")
    assert sample.main(["--checkpoint", str(only_best)]) == 2
    assert f"holds no ckpt.pt but best.pt: pass {only_best / 'best.pt'}" in capsys.readouterr().err


def test_a_checkpoint_loads_on_the_kernels_asked_for_in_eval_mode(tmp_path):
    """A run on --kernels triton (a GPU) saved that mode; sample.py on a CPU must not keep it."""
    from gpt.hf import load_any, save_safetensors
    from gpt.tokenizer import get_tokenizer

    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.3, kernels="triton"))
    state = {"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": {"name": "byte"}}
    checkpoint.save(state, tmp_path / "ckpt.pt")
    save_safetensors(model, get_tokenizer("byte"), tmp_path / "export")
    for path in (tmp_path / "ckpt.pt", tmp_path / "export"):
        loaded, _ = load_any(path)
        assert loaded.config.kernels == "auto" and not loaded.training


def test_sample_reads_prompts_as_bytes_and_starts_a_newline_free_vocabulary(tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes(b"a\r\nb")
    assert sample.read_prompts(sample.parse_args(["--prompt-file", str(tmp_path / "p.txt")])) == ["a\r\nb"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfthe quick")  # a byte-order mark goes, as from the corpus
    assert sample.read_prompts(sample.parse_args(["--prompt-file", str(tmp_path / "bom.txt")])) == ["the quick"]
    from gpt.tokenizer import CharTokenizer

    assert sample.encode_prompt("", CharTokenizer("xyz"), 8) == [0]  # no "\n" in the vocabulary


def test_a_prompt_file_adds_to_the_prompts_given(tmp_path):
    """--prompt and --prompt-file together are one batch of all of them, the file's last (a
    mutation audit: the file's prompt replacing those of --prompt went unseen)."""
    (tmp_path / "p.txt").write_bytes(b"from file")
    args = sample.parse_args(["--prompt", "one", "--prompt", "two", "--prompt-file", str(tmp_path / "p.txt")])
    assert sample.read_prompts(args) == ["one", "two", "from file"]


def test_a_prompt_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    """A prompt file in latin-1 (a byte that is no UTF-8) is the one-line "cannot read prompt
    file", not a UnicodeDecodeError's traceback (a mutation audit: catching OSError alone went
    unseen)."""
    (tmp_path / "p.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(train.UsageError, match=f"cannot read prompt file {tmp_path / 'p.txt'}: 'utf-8' codec"):
        sample.read_prompts(sample.parse_args(["--prompt-file", str(tmp_path / "p.txt")]))


def test_a_reader_that_goes_away_stops_train_and_sample_cleanly(tmp_path, corpus):
    """`train.py | head` saves and stops as on Ctrl-C; `sample.py | head` just ends. Both
    exit with 141 (128 + SIGPIPE), no traceback."""
    flags = ["--data", corpus, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY,
             "--max-steps", "100000", "--eval-interval", "100000"]
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with _killed_at_exit(proc):
        deadline = time.monotonic() + 300
        while not (line := proc.stdout.readline()).startswith(b"step 2/"):
            # At its end (b""), train.py has exited without the line: fail, not loop forever.
            assert line and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        proc.stdout.close()  # as head does after its lines
        assert proc.wait(timeout=60) == 141
    assert "Traceback" not in proc.stderr.read().decode()
    assert checkpoint.load(tmp_path / "out")["step"] >= 2
    proc = subprocess.Popen([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "out"), "--device", "cpu",
                             "--max-new-tokens", "100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with _killed_at_exit(proc):
        proc.stdout.read(10)
        proc.stdout.close()
        assert proc.wait(timeout=60) == 141
    assert proc.stderr.read().decode() == ""


@contextlib.contextmanager
def _killed_at_exit(proc: subprocess.Popen):
    """Kills proc if it still runs when the block ends, however it ends: a run of 100,000
    steps or tokens that outlived a failed wait kept a core busy after the test (a mutant
    that never stopped on the closed pipe did)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_progress_on_a_full_disk_is_a_one_line_error(tmp_path, corpus):
    """`train.py > log` on a full disk: the progress line cannot be written. One line names
    the error and how to go on, not a traceback (a cli audit found one)."""
    flags = ["--data", corpus, "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY,
             "--max-steps", "3"]
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                              timeout=300)
    err = done.stderr.decode().strip()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: [Errno 28] No space left on device; free the space"), err


def test_the_progress_console_closes_when_the_reader_goes_only(monkeypatch):
    """A reader gone (BrokenPipeError) closes train.py's Console: later lines are dropped and
    stdout is pointed away. A full disk (another OSError) is not taken for one, so `train.py >
    log` on a full disk does not stop as though `| head` had ended (a mutation audit: catching
    every OSError, or not dropping the later lines, went unseen)."""
    import errno
    import io

    from gpt import cli

    class Stdout(io.StringIO):
        error = None

        def write(self, text):
            if self.error:
                raise self.error
            return super().write(text)

    out, dropped = Stdout(), []
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(cli, "drop_stdout", lambda: dropped.append(True))
    log = cli.Console()
    log("step 1")
    assert out.getvalue() == "step 1\n" and not log.closed
    out.error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        log("step 2")
    assert not log.closed and not dropped
    out.error = BrokenPipeError(errno.EPIPE, "Broken pipe")
    log("step 3")
    assert log.closed and dropped == [True]
    out.error = None
    log("step 4")
    assert out.getvalue() == "step 1\n"


def test_drop_stdout_points_stdout_at_dev_null_for_writing():
    """Once the reader has gone, what is left to write (Python's flush at exit) goes to
    /dev/null: opened read-only, the run would end in 'Bad file descriptor' (a mutation audit:
    O_RDONLY went unseen, as nothing was left to flush in the tests that close the pipe)."""
    proc = run_cli("-c", "import os; from gpt.cli import drop_stdout; drop_stdout(); os.write(1, b'gone'); print('gone')")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_a_flag_error_names_the_tool():
    """In `train.py ... && sample.py ...` the line of a mistyped flag says which tool refused it
    (a mutation audit: the one-line error without the program's name went unseen)."""
    proc = run_cli("sample.py", "--topk", "3")
    assert proc.returncode == 2
    assert proc.stderr == "sample.py: error: unrecognized arguments: --topk 3 (see --help)\n"


def test_a_stop_string_with_a_broken_escape_is_a_one_line_error():
    proc = run_cli("sample.py", "--stop", r"\usepackage")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert r"--stop \usepackage: truncated \uXXXX escape; write a literal backslash as \\" in proc.stderr


def test_a_char_model_fine_tunes_on_a_corpus_within_its_vocabulary(tmp_path, corpus, capsys):
    """--init-from or --resume of a char model encode the new corpus with the weights' own
    vocabulary: fewer characters are fine, one outside it is a one-line error naming it."""
    run_train(tmp_path, corpus, "base", "--max-steps", "1", "--eval-interval", "1")
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("def dd(a, a):\n    return a\n\n" * 200)  # no 'b' or '+'
    tuned = run_train(tmp_path, str(fewer), "tuned", "--max-steps", "1", "--eval-interval", "1",
                      "--init-from", str(tmp_path / "base"))
    assert tuned["step"] == 1
    base, new = (checkpoint.load(tmp_path / out)["tokenizer"] for out in ("base", "tuned"))
    assert new == base and "b" in base["chars"]
    other = tmp_path / "other.txt"
    other.write_text("def zz():\n    pass\n" * 200)
    capsys.readouterr()
    assert train.main(["--data", str(other), "--out-dir", str(tmp_path / "t2"), "--cache-dir", str(tmp_path / "cache"),
                       *TINY, "--max-steps", "1", "--init-from", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert "cannot be encoded with the weights' char vocabulary: character 'z' is not in" in err and len(err.splitlines()) == 1


def test_init_from_trains_with_the_dropout_asked_for_and_refuses_no_bias(tmp_path, corpus):
    """--dropout is the fine-tuning's, whatever the weights were trained with; --no-bias on weights
    with biases is refused (a mutation audit: the dropout left out, and the bias check dropped, went
    unseen)."""
    run_train(tmp_path, corpus, "base", "--max-steps", "1", "--eval-interval", "1")
    tuned = run_train(tmp_path, corpus, "tuned", "--max-steps", "1", "--eval-interval", "1", "--init-from",
                      str(tmp_path / "base"), "--dropout", "0.1")
    assert tuned["model"].config.dropout == 0.1
    with pytest.raises(train.UsageError, match="has biases; drop --no-bias"):
        run_train(tmp_path, corpus, "biased", "--max-steps", "1", "--init-from", str(tmp_path / "base"), "--no-bias")


def test_a_corpus_folder_holding_the_out_dir_is_read_without_the_runs_files(tmp_path, capsys):
    """--data . --out-dir out: the run's own files (its lock, metrics.csv, checkpoints) are not
    corpus, so its resume reads the same text (a mutation audit: the out-dir left out of what
    the corpus scan excludes went unseen; the cache dir, excluded too, is outside here)."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "add.py").write_text("def add(a, b):\n    return a + b\n\n" * 200)
    args = ["--data", str(folder), "--out-dir", str(folder / "out"), "--cache-dir", str(tmp_path / "cache"), *TINY,
            "--eval-interval", "1"]
    assert train.main([*args, "--max-steps", "1"]) == 0
    first = re.search(r"^data: .*$", capsys.readouterr().out, re.M)[0]
    assert train.main([*args, "--max-steps", "2", "--resume"]) == 0
    assert re.search(r"^data: .*$", capsys.readouterr().out, re.M)[0] == first


def test_resuming_on_too_short_a_corpus_asks_for_more_text(tmp_path, corpus, capsys):
    """The run's block size is its model's, which --resume does not change: the error does
    not suggest --block-size there."""
    run_train(tmp_path, corpus, "out", "--max-steps", "2", "--eval-interval", "2")
    short = tmp_path / "short.txt"
    short.write_text("def add(a, b):\n" * 3)
    args = ["--data", str(short), "--out-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--resume"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "corpus too short" in err and err.strip().endswith("use more text"), err


def test_a_stdout_that_cannot_encode_the_text_shows_question_marks(tmp_path, monkeypatch):
    """Windows writes a redirected stdout in cp1252, which has no emoji (nor U+FFFD, which a
    byte model's invalid UTF-8 decodes to): the text comes out, not a UnicodeEncodeError."""
    import io

    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "byte"}},
                    tmp_path / "ckpt.pt")
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    for n in ("1", "2"):
        assert sample.main(["--checkpoint", str(tmp_path), "--prompt", "caf\u00e9 \U0001f600", "--max-new-tokens", "8",
                            "--seed", "0", "--device", "cpu", "--num-samples", n]) == 0
    out.flush()
    assert out.buffer.getvalue().startswith("caf\u00e9 ?".encode("cp1252"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_samples_written_to_a_full_disk_are_a_one_line_error(tmp_path):
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "byte"}},
                    tmp_path / "ckpt.pt")
    for n in ("1", "2"):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path), "--device", "cpu",
                                   "--max-new-tokens", "5", "--num-samples", n], cwd=ROOT, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        assert_one_line_error(proc, "cannot write the samples", "No space left on device")


@pytest.mark.parametrize("flags", [["--prompt", "abc"], [], ["--stop", "x" * 64], ["--num-samples", "2"]],
                         ids=["prompt", "streamed", "end-held-back-for-a-stop", "batched"])
def test_every_write_of_the_samples_to_a_full_stdout_is_the_one_line_error(tmp_path, monkeypatch, capsys, flags):
    """The prompt, streamed text, the text a stop string held back to the end, batched samples:
    a failed write of any is "cannot write the samples", not the bare OSError of other failures."""
    import errno
    import io

    class FullStdout(io.StringIO):
        def write(self, text):
            if text:
                raise OSError(errno.ENOSPC, "No space left on device")
            return 0

    # A char model: every token is a whole character, which streams at once.
    cfg = GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                     "tokenizer": {"name": "char", "chars": "abcdefghijklmnop"}}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(sys, "stdout", FullStdout())
    monkeypatch.setattr(sample, "drop_stdout", lambda: None)  # no file descriptor to point at /dev/null
    assert sample.main(["--checkpoint", str(tmp_path), "--device", "cpu", "--max-new-tokens", "5", *flags]) == 1
    assert capsys.readouterr().err == ("error: cannot write the samples to stdout (No space left on device); "
                                       "free some space or write them elsewhere\n")


def test_samples_reach_stdout_as_they_are_written(monkeypatch):
    """Flushed at each write: streamed text shows as it comes under `sample.py | tee` or
    `> file` (not when the buffer fills), and a full disk fails the write that caused it."""
    import io

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", out)
    sample.write_out("abc")
    assert out.buffer.getvalue() == b"abc"


def test_an_os_error_not_writing_stdout_is_not_called_a_full_disk(tmp_path, monkeypatch, capsys):
    """Only a failed write to stdout is "cannot write the samples": another OSError (a cache
    folder Triton cannot write, say) is its own one line, with its path."""
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "byte"}},
                    tmp_path / "ckpt.pt")

    def generate(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/root/.triton/cache/abc")

    monkeypatch.setattr(sample, "generate", generate)
    assert sample.main(["--checkpoint", str(tmp_path), "--device", "cpu", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "error: [Errno 13] Permission denied: '/root/.triton/cache/abc'\n"


def test_streaming_decodes_only_the_text_not_printed_yet(tmp_path, monkeypatch, capsys):
    """Each streamed token costs the same however long the sample: decoding the whole sample
    at every token (and again for --stop) made 30,000 tokens take 4x as long as generating them."""
    from gpt.tokenizer import CharTokenizer

    cfg = GPTConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(),
                     "tokenizer": {"name": "char", "chars": "abc xyz\n"}}, tmp_path / "ckpt.pt")
    decoded = []
    decode = CharTokenizer.decode
    monkeypatch.setattr(CharTokenizer, "decode", lambda self, ids: decoded.append(len(ids)) or decode(self, ids))
    assert sample.main(["--checkpoint", str(tmp_path), "--prompt", "a", "--max-new-tokens", "300", "--stop", "zzzzzz",
                        "--seed", "0", "--top-k", "0", "--temperature", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert len(decoded) >= len(out) - 2 > 100 and max(decoded) <= 2


def test_an_empty_prompt_starts_at_the_end_of_text_token():
    """GPT-2 models start a text after <|endoftext|>, not after a newline."""
    from gpt.tokenizer import get_tokenizer

    assert sample.encode_prompt("", get_tokenizer("gpt2"), 16) == [50256]


def test_several_stop_strings_cut_at_the_first_found(capsys):
    from gpt.tokenizer import ByteTokenizer

    assert sample.cut_at_stop("one\ntwo. three", [".", "\n"]) == "one"
    stream = sample.Streamer(ByteTokenizer(), [".", "\n"], None)
    for b in b"one\ntwo. three":
        stream(torch.tensor([[b]]))
    stream.finish()
    assert capsys.readouterr().out == "one\n"


def test_a_streamed_sample_cuts_at_the_stop_string_that_starts_first(capsys):
    """Two stop strings completed by the same token: the sample ends where the earlier one
    starts, as in a batch ("xab" under --stop b --stop ab is "x"; a mutation audit: the
    streamer cutting at the later one went unseen, as the existing test's stops come one
    token apart)."""
    from gpt.tokenizer import ByteTokenizer

    stream = sample.Streamer(ByteTokenizer(), ["b", "ab"], None)
    for b in b"xab and more":
        stream(torch.tensor([[b]]))
    stream.finish()
    assert capsys.readouterr().out == "x\n" == sample.cut_at_stop("xab and more", ["b", "ab"]) + "\n"


def test_a_batched_stop_check_decodes_only_the_new_tokens_and_the_stops_length(byte_checkpoint, monkeypatch, capsys):
    """Batch mode checks for the stop string every few tokens: each check decodes what came
    since the last one and the stop string's length in bytes before it (a long sample's
    checks cost the same), and still finds a stop string split across two checks."""
    from gpt.tokenizer import ByteTokenizer

    decoded = []
    decode = ByteTokenizer.decode
    monkeypatch.setattr(ByteTokenizer, "decode", lambda self, ids: decoded.append(len(ids)) or decode(self, ids))
    text = b"x" * 40 + b"say ST" + b"OP and more"
    found = {}

    def fake_generate(model, prompts, max_new_tokens, stop=None, **kw):
        new = []
        for i in range(0, len(text), 5):  # a check every 5 tokens: "say S" | "TOP a"
            new.extend(text[i:i + 5])
            if stop(0, new):
                found[0] = len(new)
                break
        return [new, list(b"no stop here")]

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(sample, "Decoder", lambda *a, **kw: None)
    assert sample.main(["--checkpoint", byte_checkpoint, "--stop", "STOP", "--device", "cpu", "--num-samples", "2"]) == 0
    assert found == {0: 50} and max(decoded[:10]) <= 5 + len("STOP")
    assert "--- sample 1 ---\n" + "x" * 40 + "say \n" in capsys.readouterr().out


def test_a_batched_stop_check_looks_back_the_stops_length_in_bytes(byte_checkpoint, monkeypatch, capsys):
    """The window a batched check decodes reaches back the stop string's length in bytes, not
    in characters: "\u00e9\u00e9" is 4 bytes, and here starts 3 tokens before the check that completes
    it (a mutation audit: len(s) for len(s.encode()) went unseen, as the existing test stops
    at ASCII; the sample then ran on to --max-new-tokens)."""
    text = b"xx" + "\u00e9\u00e9".encode() + b"yyyyyyyyyyyyyyy"
    found = {}

    def fake_generate(model, prompts, max_new_tokens, stop=None, **kw):
        new = []
        for i in range(0, len(text), 5):  # checks after "xx\xc3\xa9\xc3" and "\xa9yyyy"
            new.extend(text[i:i + 5])
            if stop(0, new):
                found[0] = len(new)
                break
        return [new, list(b"no stop here")]

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(sample, "Decoder", lambda *a, **kw: None)
    assert sample.main(["--checkpoint", byte_checkpoint, "--stop", "\u00e9\u00e9", "--device", "cpu", "--num-samples", "2"]) == 0
    assert found == {0: 10}
    assert "--- sample 1 ---\nxx\n" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature non-negative and finite"),
    (["--temperature", "inf"], "--temperature non-negative and finite"),
    (["--num-samples", "0"], "--num-samples must be positive"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--seed", "-1"], "--seed must be in [0, 2^63)"),
    (["--seed", str(2**63)], "--seed must be in [0, 2^63)"),
    (["--top-k", "-1"], "--top-k must be 0 (all tokens) or positive"),
    (["--stop", ""], "--stop \"\" would end every sample before its first token"),
])
def test_sample_flags_out_of_range_are_refused_before_loading(tmp_path, capsys, flags, message):
    assert sample.main(["--checkpoint", str(tmp_path / "none"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


@pytest.fixture
def byte_checkpoint(tmp_path):
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "byte"}},
                    tmp_path / "ckpt.pt")
    return str(tmp_path / "ckpt.pt")


def test_a_streamed_sample_stops_generating_at_its_stop_string(byte_checkpoint, monkeypatch, capsys):
    """Generation itself ends there, not only the printing: the tokens after it are not drawn."""
    drawn = []

    def fake_generate(model, prompts, max_new_tokens, stop=None, on_token=None, **kw):
        for t in b"say STOP and more":
            drawn.append(t)
            on_token(torch.tensor([[t]]))
            if stop is not None and stop(0, drawn):
                break
        return [drawn]

    monkeypatch.setattr(sample, "generate", fake_generate)
    assert sample.main(["--checkpoint", byte_checkpoint, "--stop", "STOP", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "say \n" and bytes(drawn) == b"say STOP"


@pytest.mark.parametrize("dtype, want", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_sample_runs_the_model_in_the_dtype_asked_for(byte_checkpoint, monkeypatch, capsys, dtype, want):
    seen = []
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, **kw: seen.append(model.lm_head.weight.dtype) or [[]] * len(prompts))
    monkeypatch.setattr(sample, "Decoder", lambda *a, **kw: None)
    assert sample.main(["--checkpoint", byte_checkpoint, "--dtype", dtype, "--device", "cpu", "--num-samples", "2"]) == 0
    assert seen == [want]


def test_sample_runs_in_fp32_on_a_cpu_by_default(byte_checkpoint, monkeypatch, capsys):
    """Without --dtype, bf16 is for a CUDA GPU that supports it; on a CPU the model samples in
    fp32, as --help says (a mutation audit: a bf16 default everywhere went unseen, as the
    dtype test passes --dtype)."""
    seen = []
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, **kw: seen.append(model.lm_head.weight.dtype) or [[]] * len(prompts))
    monkeypatch.setattr(sample, "Decoder", lambda *a, **kw: None)
    assert sample.main(["--checkpoint", byte_checkpoint, "--device", "cpu", "--num-samples", "2"]) == 0
    assert seen == [torch.float32]


def test_compile_runs_the_decode_step_on_the_torch_ops(byte_checkpoint, monkeypatch, capsys):
    """--compile hands torch.compile the reference ops (Inductor writes its own kernels; ours
    are opaque to it, and Decoder refuses them on CUDA): the model is on kernels="torch" when
    its Decoder is built, and stays on its own otherwise (a mutation audit: dropping
    set_kernels("torch") went unseen, as on a CPU "auto" runs the torch ops anyway)."""
    seen = []
    monkeypatch.setattr(sample, "Decoder", lambda model, *a, **kw: seen.append((model.config.kernels, kw["compile"])))
    monkeypatch.setattr(sample, "generate", lambda model, prompts, *a, **kw: [[]] * len(prompts))
    for flags in (["--compile"], []):
        assert sample.main(["--checkpoint", byte_checkpoint, "--device", "cpu", "--num-samples", "2", *flags]) == 0
    assert seen == [("torch", True), ("auto", False)]


def test_the_sampling_flags_reach_generate(tmp_path, monkeypatch, capsys):
    """--max-new-tokens, --temperature, --top-k, --top-p and the tokenizer's end of text are
    what generate() draws with, batched and streamed (a mutation audit: a --top-p or an
    end-of-text token left out of the call went unseen, as generate's own tests pass them)."""
    cfg = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    checkpoint.save({"model": GPT(cfg).state_dict(), "config": cfg.to_dict(), "tokenizer": {"name": "gpt2"}},
                    tmp_path / "ckpt.pt")
    calls = []

    def fake_generate(model, prompts, max_new_tokens, on_token=None, **kw):
        calls.append((len(prompts), max_new_tokens, kw["temperature"], kw["top_k"], kw["top_p"], kw["eot_token"]))
        if on_token is not None:  # streamed: the end of text ends the sample, and is not printed
            for t in (64, 50256, 65):
                on_token(torch.tensor([[t]]))
        return [[64]] * len(prompts)

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(sample, "Decoder", lambda *a, **kw: None)
    flags = ["--checkpoint", str(tmp_path), "--device", "cpu", "--max-new-tokens", "9", "--temperature", "0.5",
             "--top-k", "7", "--top-p", "0.9", "--prompt", "x"]
    assert sample.main([*flags, "--num-samples", "2"]) == 0
    assert sample.main(flags) == 0
    assert calls == [(2, 9, 0.5, 7, 0.9, 50256), (1, 9, 0.5, 7, 0.9, 50256)]
    assert capsys.readouterr().out.endswith("\nxa\n")
