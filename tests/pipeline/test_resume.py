"""The config-hash chain that decides which steps of a run are already done (pipeline/resume.py),
on the real steps and the real config sections of each."""

from __future__ import annotations

import dataclasses

from pipeline import resume
from pipeline.config import DecodeConfig, RunConfig, TokensConfig
from pipeline.run import STEPS

POLICY = {"allowed": ["CC-BY-2.0"]}
MANIFESTS = {"m.jsonl": "a" * 64}


def _hashes(cfg: RunConfig, manifests=MANIFESTS, policy=POLICY, seed=None) -> dict[str, str]:
    return resume.config_hashes(policy, manifests, cfg.seed if seed is None else seed, cfg.to_json(),
                                [(s.name, s.sections) for s in STEPS])


def _changed(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return [name for name in a if a[name] != b[name]]


def test_a_setting_reruns_its_step_and_every_step_after_it_and_nothing_before():
    base = RunConfig(manifests=("m.jsonl",), policy="p.yaml")
    names = [s.name for s in STEPS]
    hashes = _hashes(base)
    assert len(set(hashes.values())) == len(STEPS)  # every step its own hash
    assert _hashes(dataclasses.replace(base, out="elsewhere")) == hashes  # where the run writes is not a setting
    decode = _hashes(dataclasses.replace(base, decode=DecodeConfig(resolution=128)))
    assert _changed(hashes, decode) == names  # prepare reads `decode`: everything reruns
    tokens = _hashes(dataclasses.replace(base, tokens=TokensConfig(k=1)))
    assert _changed(hashes, tokens) == names[names.index("tokens"):]  # only the tokens step and after


def test_the_first_link_covers_the_policy_the_manifests_and_the_seed():
    base = RunConfig(manifests=("m.jsonl",), policy="p.yaml")
    hashes = _hashes(base)
    for other in (_hashes(base, manifests={"m.jsonl": "b" * 64}), _hashes(base, policy={"allowed": []}),
                  _hashes(base, seed=1)):
        assert _changed(hashes, other) == list(hashes)


def test_a_step_is_done_only_with_its_state_and_the_same_hash(tmp_path):
    out = str(tmp_path)
    assert resume.completed(out, "vq", "abc") is None
    resume.record(out, "vq", "models", "abc", 1.5, {"vq/in": 3}, {"trained": True})
    assert resume.completed(out, "vq", "abc")["counters"] == {"vq/in": 3}
    assert resume.completed(out, "vq", "abd") is None
    assert resume.completed(out, "text", "abc") is None
