"""`curate sample` and its retrieval glue (`pipeline/sample_retrieval.py`) on a run folder laid
out like the pipeline's: the trainer tests' tiny LM, VQ and token shards, plus a CLIP (random
init, saved as the run's own) and a FAISS index with planted neighbours of the caption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipeline.cli import main
from pipeline.clip import BUILTIN_ARCHS, ClipEmbedder, build_model
from pipeline.config import ClipConfig
from pipeline.retrieval import build_index
from pipeline.sample_retrieval import retrieve_keys, retrieve_neighbours
from tests.trainer.conftest import build_token_shards
from tests.trainer.test_sample import CAPTION, GRID, PHOTO, RESOLUTION, build_run_out, tiny_lm
from tokenizer.cm3 import sequence_documents


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """OUT/ with models, tokens, CLIP and index; the index holds, among random documents, a copy
    of the caption's embedding (too similar: skipped), then two near ones, best first."""
    base = tmp_path_factory.mktemp("sample-cli")
    shards = build_token_shards(str(base / "tokens-src"))
    out = build_run_out(base / "out", shards.dir, tiny_lm(shards.vocab.size))
    torch.manual_seed(0)
    clip = build_model(BUILTIN_ARCHS["cpu-tiny"]).eval()
    (out / "models" / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / "models" / "clip" / "clip.safetensors"))
    run_json = json.loads((out / "run.json").read_text())
    run_json["config"].update(align={"clip": {"arch": "cpu-tiny", "weights": None}}, neighbours={"k": 2, "max_score": 0.9})
    (out / "run.json").write_text(json.dumps(run_json))
    query = ClipEmbedder(ClipConfig(arch="cpu-tiny", weights=str(out / "models" / "clip" / "clip.safetensors"),
                                    device="cpu")).embed_texts([CAPTION])[0]
    keys = sorted(shards.sequences)
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(len(keys), len(query))))
    noise = unit(rng.normal(size=(2, len(query))) - np.outer(unit(rng.normal(size=(2, len(query)))) @ query, query))
    vectors[0] = query  # score 1.0: a near copy of the query, never a neighbour
    vectors[1] = unit(query + 0.5 * noise[0])  # ~0.89
    vectors[2] = unit(query + 1.0 * noise[1])  # ~0.7, and not too similar to keys[1]
    build_index(vectors, keys, str(out / "index"))
    return {"out": out, "shards": shards, "keys": keys, "query": query, "vectors": vectors}


def test_retrieval_uses_the_run_clip_index_and_rules(run):
    found = retrieve_keys(str(run["out"]), CAPTION, 2)
    assert [k for k, _ in found] == run["keys"][1:3]
    scores = run["vectors"] @ run["query"]
    np.testing.assert_allclose([s for _, s in found], scores[1:3], atol=1e-4)
    assert scores[0] > 0.99 and all(s <= 0.9 for _, s in found)
    docs = retrieve_neighbours(str(run["out"]), CAPTION, 2)
    assert [d.key for d in docs] == run["keys"][1:3]
    for doc in docs:
        assert doc.tokens.tolist() == sequence_documents(run["shards"].vocab, run["shards"].sequences[doc.key])[-1].tolist()


def test_sample_with_retrieval_writes_png_and_record(run, capsys):
    out = run["out"]
    rc = main(["sample", "--out", str(out), "--caption", CAPTION, "--retrieve", "2", "--seed", "3",
               "--cfg-scale", "2.5", "--temperature", "0.8", "--top-p", "0.95", "--samples", str(out / "cli")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["neighbours"] == run["keys"][1:3] and summary["grid"] == GRID
    with Image.open(summary["image"]["png"]) as img:
        assert img.size == (RESOLUTION, RESOLUTION)
    record = json.loads(Path(summary["image"]["json"]).read_text())
    assert [n["key"] for n in record["neighbours"]] == run["keys"][1:3]
    assert record["settings"] == {"temperature": 0.8, "top_p": 0.95, "cfg_scale": 2.5, "max_caption_tokens": 64, "seed": 3}
    assert record["prompt"]["text"].count("<break>") == 2 and record["prompt"]["text"].endswith(f"{json.dumps(CAPTION)} <img>")
    assert record["unconditional_prompt"]["text"] == "<bos> <mask:0> <img>"


def test_sample_caption_from_an_image_and_errors(run, capsys, tmp_path):
    out = run["out"]
    assert main(["sample", "--out", str(out), "--image", str(PHOTO), "--max-caption-tokens", "6",
                 "--samples", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["caption"]["txt"]).read_text().rstrip("\n") == summary["caption"]["text"]
    assert main(["sample", "--out", str(out), "--caption", CAPTION, "--lm", str(tmp_path / "none")]) == 2
    assert "no LM checkpoint" in capsys.readouterr().err
    assert main(["sample", "--out", str(out), "--image", str(PHOTO), "--retrieve", "2"]) == 2
    assert "--retrieve needs --caption" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--out", str(out), "--caption", CAPTION, "--image", str(PHOTO)])  # one or the other


def test_demo_lm_continues_its_model_and_starts_afresh_when_the_shards_change(run, tmp_path):
    import dataclasses
    import shutil

    from pipeline.cli import demo_lm
    from pipeline.config import RunConfig
    from trainer.config import TrainLMConfig

    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    shutil.rmtree(out / "models" / "lm")
    cfg = RunConfig(out=str(out), train_lm=TrainLMConfig(max_steps=2, global_batch_size=2, eval_batches=1,
                                                         checkpoint_every=0, progress=False, num_threads=1))
    summary = demo_lm(cfg)
    assert "reference LM (cpu-tiny, 2 steps" in summary
    assert len(list((out / "samples").glob("*.png"))) == 1 and len(list((out / "samples").glob("*.txt"))) == 1
    weights = (out / "models" / "lm" / "lm.safetensors").read_bytes()
    demo_lm(cfg)  # same shards: the same model continues (its budget is spent: nothing changes)
    assert (out / "models" / "lm" / "lm.safetensors").read_bytes() == weights
    index = json.loads((out / "tokens" / "index.json").read_text())
    (out / "tokens" / "index.json").write_text(json.dumps({**index, "seed": 99}))  # another shard set
    summary = demo_lm(dataclasses.replace(cfg, train_lm=dataclasses.replace(cfg.train_lm, max_steps=3)))
    assert "3 steps" in summary  # no "cannot resume on a different data stream": trained afresh
    steps = [json.loads(line)["step"] for line in (out / "models" / "lm" / "train-log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
