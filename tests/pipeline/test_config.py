import pytest

from pipeline.cli import build_parser, config_from_args, main
from pipeline.config import ConfigError, RunConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == RunConfig() and cfg.beam.runner == "DirectRunner"


def test_nested_sections_and_types(tmp_path):
    cfg = load_config(write(tmp_path, "decode: {resolution: 128, max_aspect_ratio: 2}\nfetch: {allowed_roots: s3://b/x}\n"))
    assert cfg.decode.resolution == 128 and cfg.decode.max_aspect_ratio == 2.0
    assert cfg.fetch.allowed_roots == ("s3://b/x",)


@pytest.mark.parametrize("text,match", [
    ("decode: {resoluton: 128}\n", "unknown keys"),
    ("colour: blue\n", "unknown keys"),
    ("decode: {resolution: big}\n", "expected int"),
    ("decode: {resolution: 8}\n", "resolution"),
    ("fetch: {retries: -1}\n", "retries"),
    ("beam: {direct_running_mode: turbo}\n", "direct_running_mode"),
    ("- a list\n", "mapping"),
])
def test_config_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_cli_paths_resolve_against_the_config_file_and_flags_override(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "run.yaml"
    path.write_text("manifests: [m.jsonl]\npolicy: p.yaml\nout: result\n")
    args, _ = build_parser().parse_known_args(["run", "--config", str(path)])
    cfg = config_from_args(args)
    assert cfg.manifests == (str(tmp_path / "cfg" / "m.jsonl"),)
    assert cfg.policy == str(tmp_path / "cfg" / "p.yaml") and cfg.out == str(tmp_path / "cfg" / "result")
    args, beam_flags = build_parser().parse_known_args(
        ["run", "--config", str(path), "--manifest", "s3://bucket/new.jsonl", "--policy", "memory://p.yaml",
         "--runner=FlinkRunner"])
    cfg = config_from_args(args)
    assert cfg.manifests == ("s3://bucket/new.jsonl",) and cfg.policy == "memory://p.yaml"
    assert beam_flags == ["--runner=FlinkRunner"]


def test_cli_reports_configuration_errors(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "o")]) == 2
    assert "no manifests" in capsys.readouterr().err


def test_train_commands_on_an_existing_curated_store(tiny_corpus, tmp_path, capsys):
    from pipeline.config import AlignConfig
    from pipeline.run import run
    from tokenizer.text import load_bpe
    from tokenizer.vocab import JointVocab

    out = tmp_path / "out"
    run(RunConfig(manifests=(str(tiny_corpus["manifest"]),), policy=str(tiny_corpus["policy"]), out=str(out),
                  align=AlignConfig(enabled=False)), until="curated", beam_flags=["--direct_running_mode=in_memory"])
    cfg = write(tmp_path, "clip_train: {max_steps: 2, batch_size: 4, progress: false}\n"
                          "vq: {train: {max_steps: 2, batch_size: 2, eval_images: 1, grid_images: 1, progress: false,"
                          " num_threads: 1}}\ntext: {vocab_size: 600}\n")
    for what in ("vq", "text", "clip"):
        assert main([f"train-{what}", "--config", cfg, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bpe_tokens" in printed and "vocab_size" in printed
    assert (out / "models" / "vq" / "vq.safetensors").exists() and (out / "models" / "clip" / "clip.safetensors").exists()
    vocab = JointVocab.load(str(out / "models" / "vocab.json"))
    tok = load_bpe(str(out / "models" / "text-bpe.json"))
    assert vocab.image_offset == 600 and tok.decode(tok.encode("a photo").ids) == "a photo"
    assert main(["train-text", "--out", str(tmp_path / "empty")]) == 2  # no curated shards: a clear error


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path):
    """Every key that names a file: relative means beside the config; absolute paths and URLs
    stay; through load_config (any caller) and through the CLI."""
    from pipeline.config import PATH_KEYS

    folder = tmp_path / "cfg"
    folder.mkdir()
    path = folder / "run.yaml"
    path.write_text("manifests: [m.jsonl, /abs/m2.jsonl, s3://bucket/m3.jsonl]\npolicy: ../p.yaml\nout: result\n"
                    "align: {clip: {weights: models/clip.safetensors}}\n"
                    "vq: {weights: models/vq/vq.safetensors}\n"
                    "text: {tokenizer: models/text-bpe.json}\n"
                    "dedup: {previous_run: 'runs/2026-10/curated/metadata-*.parquet'}\n")
    cfg = load_config(str(path))
    assert cfg.manifests == (str(folder / "m.jsonl"), "/abs/m2.jsonl", "s3://bucket/m3.jsonl")
    assert cfg.policy == str(tmp_path / "p.yaml") and cfg.out == str(folder / "result")
    assert cfg.align.clip.weights == str(folder / "models" / "clip.safetensors")
    assert cfg.vq.weights == str(folder / "models" / "vq" / "vq.safetensors")
    assert cfg.text.tokenizer == str(folder / "models" / "text-bpe.json")
    assert cfg.dedup.previous_run == str(folder / "runs" / "2026-10" / "curated" / "metadata-*.parquet")
    assert len(PATH_KEYS) == 7  # each is checked above
    args, _ = build_parser().parse_known_args(["run", "--config", str(path)])
    through_cli = config_from_args(args)
    assert (through_cli.vq.weights, through_cli.text.tokenizer, through_cli.dedup.previous_run) == \
        (cfg.vq.weights, cfg.text.tokenizer, cfg.dedup.previous_run)
    # a config on an object store: relative paths sit beside it there
    import fsspec
    fsspec.filesystem("memory").pipe("/cfgs/run.yaml", b"manifests: m.jsonl\ntext: {tokenizer: bpe.json}\n")
    remote = load_config("memory://cfgs/run.yaml")
    assert remote.manifests == ("memory://cfgs/m.jsonl",) and remote.text.tokenizer == "memory://cfgs/bpe.json"
