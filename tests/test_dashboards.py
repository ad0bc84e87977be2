"""Watching a run live: train_sppo.py --report-to tensorboard writes event files (OUT's directory/tensorboard) that
TensorBoard's own reader reads back with the same per-step numbers as train_log.jsonl, also across a kill and
resume; a reporter that cannot start warns once and the run goes on."""
import os
import signal

import pytest

from conftest import read_jsonl, run_stage, write_jsonl
from test_train import ranked_records

SETTINGS = ["--eta", 5, "--lr", 3e-4, "--optimizer", "adamw", "--warmup-ratio", 0, "--batch-size", 8,
            "--micro-batch-size", 4, "--max-length", 96, "--max-prompt-length", 48, "--seed", 1, "--epochs", 2]
METRICS = ("loss", "log_ratio", "target", "log_ratio_pos", "log_ratio_neg", "grad_norm", "lr", "tokens")


def require_tensorboard():
    """Skipped where tensorboard is not installed, but failed in CI (CI=true), where requirements/ installs it."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("tensorboard is not importable, and CI must run the TensorBoard tests")
        pytest.skip("tensorboard not installed")


def train(world, data, out, *extra, fault=None):
    p = run_stage("train_sppo.py", "--model", world / "policy", "--data", data, "--out", out, *SETTINGS, *extra,
                  check=fault is None, env={"SPPO_FAULT": fault} if fault else {})
    if fault:
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    return p


def scalars(log_dir):
    """{tag: [(step, value)]}, as TensorBoard shows them (a resumed run's restart purges what came after it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_as_log(seen, log):
    for name in METRICS:
        steps = [s for s, _ in seen[f"train/{name}"]]
        assert steps == [r["step"] for r in log], (name, steps)
        for (_, value), r in zip(seen[f"train/{name}"], log):
            assert value == pytest.approx(r[name], rel=1e-6, abs=1e-7), (name, r["step"])  # stored as float32


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("dashboards") / "ranked.jsonl"
    write_jsonl(path, ranked_records(world))
    return path


def test_tensorboard_reads_back_the_logged_steps(world, data, tmp_path):
    require_tensorboard()
    out = tmp_path / "ckpt"
    p = train(world, data, out, "--report-to", "tensorboard")
    assert "warning" not in p.stderr
    seen = scalars(tmp_path / "tensorboard")
    assert_same_as_log(seen, read_jsonl(out / "train_log.jsonl"))
    assert all(v > 0 for _, v in seen["train/peak_memory_gb"]) and len(seen["train/tokens_per_s"]) == 4
    # the iteration's data, at step 0: 16 prompts, 2 trained responses each, their win rates' spread
    win = sorted(r["win_rate"][i] for r in read_jsonl(data) for i in (r["win_rate"].index(max(r["win_rate"])),
                                                                    r["win_rate"].index(min(r["win_rate"]))))
    assert seen["data/prompts"] == [(0, 16)] and seen["data/responses"] == [(0, 32)]
    assert seen["data/win_rate_p0"][0][1] == pytest.approx(win[0])
    assert seen["data/win_rate_p100"][0][1] == pytest.approx(win[-1])
    assert seen["data/win_rate_mean"][0][1] == pytest.approx(sum(win) / len(win))
    assert seen["data/cut_prompts"] == [(0, 0)] and seen["data/skipped_prompts"] == [(0, 0)]


def test_tensorboard_after_a_kill_and_resume_shows_each_step_once(world, data, tmp_path):
    """Killed after logging step 3 with the state of step 2 saved: the resumed run logs steps 3 and 4 again, and
    TensorBoard (purge_step) shows steps 1-4 once each, with train_log.jsonl's values."""
    require_tensorboard()
    out = tmp_path / "ckpt"
    train(world, data, out, "--report-to", "tensorboard", "--save-every", 1, fault="train-step:3")
    train(world, data, out, "--report-to", "tensorboard", "--save-every", 1)
    assert_same_as_log(scalars(tmp_path / "tensorboard"), read_jsonl(out / "train_log.jsonl"))


def test_a_reporter_that_cannot_start_warns_once_and_training_goes_on(world, data, tmp_path):
    """A file where the event directory should go: TensorBoard cannot start (nor can it where the package is
    missing). One warning, and the run completes as it would have."""
    (tmp_path / "tensorboard").write_text("in the way")
    out = tmp_path / "ckpt"
    p = train(world, data, out, "--report-to", "tensorboard")
    warnings = [line for line in p.stderr.splitlines() if "--report-to tensorboard" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "the run goes on" in warnings[0]
    assert len(read_jsonl(out / "train_log.jsonl")) == 4 and (out / "model.safetensors").exists()


def test_wandb_offline_writes_its_run_directory(world, data, tmp_path):
    """W&B (in requirements/): WANDB_MODE=offline writes the run to OUT's directory/wandb/ for a later
    `wandb sync`, with no account and no network."""
    import wandb  # noqa: F401  (a requirement: its absence fails, it does not skip)
    out = tmp_path / "ckpt"
    p = run_stage("train_sppo.py", "--model", world / "policy", "--data", data, "--out", out, *SETTINGS,
                  "--report-to", "wandb", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert "--report-to wandb" not in p.stderr, p.stderr[-2000:]  # no warning: it started
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((tmp_path / "wandb").iterdir())
