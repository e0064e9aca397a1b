"""Live progress and quiet consoles: the bar counts every row, also from the local runner's
worker processes, and Beam's own logs go to OUT/_logs/, not to the console."""

import io
import json
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.config import AlignConfig, RunConfig
from pipeline.progress import Monitor, counted
from pipeline.run import run

ROOT = Path(__file__).resolve().parents[2]


def test_workers_in_other_processes_are_counted():
    stream = io.StringIO()
    with Monitor("squares", total=500, unit="items", stream=stream) as monitor:
        options = PipelineOptions(["--direct_running_mode=multi_processing", "--direct_num_workers=2"])
        with beam.Pipeline(options=options) as p:
            _ = counted(p | beam.Create(range(500)) | beam.Reshuffle(), monitor.progress) | beam.Map(lambda x: x * x)
    assert monitor.done == 500
    assert "squares: 100%" in stream.getvalue() and "500/500" in stream.getvalue()


def test_a_cli_style_run_shows_progress_and_keeps_beams_logs_in_the_run_folder(tmp_path, capfd):
    rows = [json.loads(line) for line in (ROOT / "manifests" / "demo" / "coco.jsonl").read_text().splitlines()][:12]
    manifest = tmp_path / "delivery" / "manifest.jsonl"
    manifest.parent.mkdir()
    for r in rows:
        (manifest.parent / Path(r["uri"]).name).write_bytes((ROOT / "manifests" / "demo" / r["uri"]).read_bytes())
        r["uri"] = Path(r["uri"]).name
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = RunConfig(manifests=(str(manifest),), policy=str(ROOT / "manifests" / "demo" / "policy.yaml"),
                    out=str(out), align=AlignConfig(enabled=False))
    capfd.readouterr()
    run(cfg, until="curated", beam_flags=["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        progress=True, logs_to_file=True)
    console = capfd.readouterr().err
    assert "prepare: 100%" in console and "12/12" in console
    assert "sdk_worker" not in console and "INFO" not in console
    log = (out / "_logs" / "prepare.log").read_text()
    assert "sdk_worker" in log  # the worker processes' harness logs, inherited stderr
