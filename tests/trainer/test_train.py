"""The reference trainer on a small shard set: the loss falls, a tiny set is memorised, a stopped
or SIGKILLed run resumes to bit-identical weights, 2 DDP processes match 1, and `curate train-lm`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CHECKPOINT, read_checkpoint
from trainer.config import TrainLMConfig
from trainer.model import load_lm
from trainer.train import LOG, lr_at, train_lm

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "training.md"
PYTHON = sys.executable
# 40 sequences, 37 in the train split: global batch 8 -> 5 steps per epoch, the last one of 5 sequences
BASE = TrainLMConfig(max_steps=30, lr=3e-3, warmup_steps=5, eval_every=0, checkpoint_every=5, progress=False,
                     num_threads=1)



def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_lm(str(out)).state_dict()


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(token_shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lm-uninterrupted")
    return out, train_lm(token_shards.dir, str(out), BASE)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = dataclasses.replace(BASE, max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 0) == pytest.approx(cfg.lr / 10) and lr_at(cfg, 9, 0) == pytest.approx(cfg.lr)
    assert lr_at(cfg, 55, 0) == pytest.approx(cfg.lr * 0.55)  # half-way through the cosine
    assert lr_at(cfg, 100, 0) == pytest.approx(cfg.lr * 0.1) == lr_at(cfg, 500, 0)
    assert lr_at(dataclasses.replace(cfg, max_steps=20, decay_steps=100), 55, 0) == lr_at(cfg, 55, 0)


def test_loss_falls_and_the_log_holds_every_step(token_shards, tmp_path):
    cfg = dataclasses.replace(BASE, max_steps=60, eval_every=30, checkpoint_every=0)
    result = train_lm(token_shards.dir, str(tmp_path), cfg)
    assert result["steps"] == 60 and result["first_loss"] > 6.5  # ~ln(1,312) at init
    assert result["last_10pct_loss"] < result["first_10pct_loss"] - 1.5, result
    rows = log_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert all(r["tokens_per_s"] > 0 and r["tokens"] > 0 and r["lr"] > 0 for r in rows)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "eval_loss" in r] == [30, 60] and all(math.isfinite(e) for e in evals)
    assert result["eval_loss"] == evals[-1] and evals[-1] < evals[0]
    assert max(r["epoch"] for r in rows) == 11  # 5 steps per epoch of the train split
    assert load_lm(result["checkpoint"]).cfg.vocab_size == token_shards.vocab.size


def test_a_tiny_fixed_set_is_memorised(tiny_token_shards, tmp_path):
    tiny = tiny_token_shards
    cfg = dataclasses.replace(BASE, max_steps=90, lr=1e-2, warmup_steps=10, weight_decay=0.0, mask=False,
                              global_batch_size=4, checkpoint_every=0)
    result = train_lm(tiny.dir, str(tmp_path / "lm"), cfg)
    assert result["last_loss"] < 0.05 * math.log(tiny.vocab.size), result  # ln(V) ~ 7.2


def test_a_stopped_run_resumes_to_bit_identical_weights(token_shards, uninterrupted, tmp_path):
    reference, expected = uninterrupted
    first = train_lm(token_shards.dir, str(tmp_path), dataclasses.replace(BASE, max_steps=13, decay_steps=30))
    assert first["steps"] == 13  # mid-epoch (5 steps per epoch) and between checkpoints
    second = train_lm(token_shards.dir, str(tmp_path), BASE)
    assert second["resumed_from"] == 13 and second["steps"] == 30
    ours, theirs = weights(tmp_path), weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r["loss"] for r in log_rows(tmp_path)] == [r["loss"] for r in log_rows(reference)]
    assert second["last_10pct_loss"] == expected["last_10pct_loss"]


def test_a_sigkilled_run_resumes_to_bit_identical_weights(token_shards, uninterrupted, tmp_path):
    """SIGKILLed after step 7 (CM3CURATE_KILL_AFTER_STEP): the checkpoint holds step 5, steps 6-7
    are lost and redone; the logged rows of the lost steps are dropped."""
    from trainer.train import KILL_AFTER_STEP_ENV

    reference, _ = uninterrupted
    command = [PYTHON, "-m", "trainer.train", "--tokens", token_shards.dir, "--out", str(tmp_path),
               "--max-steps", "30", "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "0",
               "--checkpoint-every", "5", "--threads", "1", "--no-progress"]
    process = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
                             env={**os.environ, KILL_AFTER_STEP_ENV: "7"})
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-3000:]
    _, meta = read_checkpoint(str(tmp_path / CHECKPOINT))
    assert meta["step"] == 5
    assert [r["step"] for r in log_rows(tmp_path)] == list(range(1, 8))  # 6 and 7 were logged, then lost
    resumed = train_lm(token_shards.dir, str(tmp_path), BASE)
    assert resumed["resumed_from"] == 5
    ours, theirs = weights(tmp_path), weights(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [r["step"] for r in log_rows(tmp_path)] == list(range(1, 31))  # rows of the lost steps were dropped


def test_resume_refuses_other_settings(token_shards, uninterrupted):
    reference, _ = uninterrupted
    before = (reference / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="lr: checkpoint 0.003 vs now 0.001"):
        train_lm(token_shards.dir, str(reference), dataclasses.replace(BASE, lr=1e-3))
    with pytest.raises(ValueError, match="LR schedule length"):
        train_lm(token_shards.dir, str(reference), dataclasses.replace(BASE, max_steps=40))
    with pytest.raises(ValueError, match="resume is off"):
        train_lm(token_shards.dir, str(reference), dataclasses.replace(BASE, resume=False))
    assert (reference / CHECKPOINT).read_bytes() == before


@pytest.mark.slow
def test_two_ddp_processes_train_the_same_weights_as_one(token_shards, tmp_path):
    """Global batch 6 over 37 train sequences: the 7th step of each epoch holds one sequence, so
    rank 1 gets an empty batch and must still join the all-reduce. Rank batches of 3 in micro
    batches of 2 also exercise gradient accumulation under DDP's no_sync."""
    cfg = dataclasses.replace(BASE, max_steps=10, global_batch_size=6, eval_every=5, checkpoint_every=0)
    single = train_lm(token_shards.dir, str(tmp_path / "one"), cfg)
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "trainer.train",
               "--tokens", token_shards.dir, "--out", str(tmp_path / "two"), "--max-steps", "10",
               "--global-batch-size", "6", "--micro-batch-size", "2", "--lr", "3e-3", "--warmup-steps", "5",
               "--eval-every", "5", "--checkpoint-every", "0", "--threads", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(PYTHON).parent / command[0]), *command[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5) for k in one)
    a, b = log_rows(tmp_path / "one"), log_rows(tmp_path / "two")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # the same global batches
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert b[6]["epoch"] == 0 and b[7]["epoch"] == 1  # step 7 was the one with an empty rank
    assert two_eval(b) == pytest.approx(two_eval(a), rel=1e-5) and single["eval_loss"] is not None


def two_eval(rows: list[dict]) -> list[float]:
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.mark.slow
def test_curate_train_lm_reads_the_run_config_section_and_flags(token_shards, tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["train-lm", "--help"])
    help_text = capsys.readouterr().out
    assert "--max-steps" in help_text and "--tokens" in help_text and "OUT/models/lm" in help_text
    config = tmp_path / "run.yaml"
    config.write_text("train_lm:\n  global_batch_size: 4\n  lr: 0.002\n  eval_every: 0\n  num_threads: 1\n  progress: false\n")
    assert main(["train-lm", "--config", str(config), "--tokens", token_shards.dir, "--out", str(tmp_path / "out"),
                 "--max-steps", "3"]) == 0
    _, meta = read_checkpoint(str(tmp_path / "out" / "models" / "lm" / CHECKPOINT))
    assert (meta["step"], meta["train"]["global_batch_size"], meta["train"]["lr"]) == (3, 4, 0.002)
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    assert main(["train-lm", "--config", str(config), "--out", str(tmp_path / "out"), "--model", "nope"]) == 2
    assert "unknown LM config 'nope'" in capsys.readouterr().err


def test_the_training_example_in_the_docs_runs(token_shards, tmp_path):
    match = re.search(r"<!-- tested: train-example -->\s*```\w*\n(.*?)```", DOCS.read_text(), re.S)
    assert match, "docs/training.md lost its tested block"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    out = runpy.run_path(str(script), init_globals={"TOKENS": token_shards.dir, "OUT": str(tmp_path / "out")})
    assert out["result"]["steps"] == 20 and out["result"]["eval_loss"] is not None
    assert out["model"].cfg.vocab_size == token_shards.vocab.size and not out["model"].training
