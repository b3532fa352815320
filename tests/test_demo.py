"""The demo's proof, shortened: under Locust load, ratings retrain the adapter, it earns the traffic as a
canary on people's ratings, swaps in, and answers improve.

A dedicated app (its own registry and feedback log) on the shared Serve instance, started and stopped
by `run_demo` itself, with its curator and retrain scheduler; a small retrain as in test_retrain.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flywheel.config import Settings
from loadtests.demo import DemoPlan, run_demo
from tests.conftest import make_settings

pytestmark = [pytest.mark.serve, pytest.mark.vllm]  # ~6-8 min on 2 cores: one real loop under load

# Mostly drifted traffic from the start, every answer rated and corrected: enough evidence for the gate
# after ~150 ratings; a short tail after the swap measures the new version.
SHORT = DemoPlan(users=2, spawn_rate=2, max_duration_s=420, loops=1, post_swap_s=20, drift_start=0.7,
                 drift_end=0.9, drift_ramp_s=30, correction_p=1.0, schedule_interval_s=10,
                 schedule_min_new_examples=150, check_every_s=1, window_s=10)


def test_short_demo_swaps_in_a_better_adapter_without_failures(
    served: tuple[str, Settings], demo_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    settings = make_settings(home, engine="vllm", port=served[1].serving.port)
    settings.retrain.min_examples = 40
    settings.retrain.steps = 50  # a shorter retrain than test_retrain's: the loop, not the learning, is under test
    settings.retrain.gate.max_latency_ratio = 3.0  # shared 2-core CI boxes: latency is noise, not signal
    out = tmp_path / "demo"

    report = run_demo(settings, out_dir=out, quick=True, seed=0, plan=SHORT, app_name="flywheel-demo",
                      route_prefix="/demo")

    assert report.champion_before == "demo-v1"
    assert report.swaps and report.swaps[0].from_ == "demo-v1", report.runs
    new = report.champion_after
    assert new is not None and new != "demo-v1"
    assert report.failed_requests == 0
    assert report.versions[new].accuracy_drifted > report.versions["demo-v1"].accuracy_drifted, report.summary()
    # the retrained adapter earned the traffic as a canary: half of the people first, then their ratings
    assert [(m.action, m.version, m.share) for m in report.canary][:1] == [("promote", new, 0.5)], report.summary()
    # one move makes the canary champion and ends its trial
    assert report.canary[-1].share == 0 and "canary promoted" in report.canary[-1].reason, report.summary()
    assert abs(report.canary[-1].at_s - report.swaps[0].at_s) <= 1  # the champion moved when the trial ended
    both_arms = [w for w in report.windows if {"demo-v1", new} <= set(w.rating_by_version)]
    assert both_arms, "the report shows the two arms' live ratings side by side"
    assert report.versions[new].mean_rating > report.versions["demo-v1"].mean_rating
    saved = json.loads((out / "report.json").read_text())
    assert saved["swaps"][0]["from"] == "demo-v1" and set(saved["versions"]) >= {"demo-v1", new}
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "locust_stats.csv").exists()
