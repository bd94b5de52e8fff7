"""Training through train.py: run dir contents, resume, precision, checkpointing, sweeps and refusals."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, run_script
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2 as hparams_api
from tensorboard.plugins.hparams import metadata as hparams_metadata

from fiberaug.models.base import GenerativeModule
from fiberaug.tasks import run_task
from fiberaug.tasks.train import resolve_precision, train


def _events(run_dir: Path, name: str = "") -> EventAccumulator:
    """The TensorBoard events of a run, or of the sweep job's run `name`."""
    events = EventAccumulator(str(run_dir / "tensorboard" / name), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


def test_run_dir_holds_checkpoints_tensorboard_samples_and_config(trained_run):
    assert _global_step(trained_run / "checkpoints" / "last.ckpt") == 10
    assert list((trained_run / "checkpoints").glob("best-*.ckpt")), "no best-by-validation checkpoint"
    assert len(list((trained_run / "samples").glob("*.png"))) == 2  # each of the two epochs, 5 steps each
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    events = _events(trained_run)
    scalars = events.Tags()["scalars"]
    assert {"loss/train", "loss/val", "lr-AdamW"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss/val")] == [4, 9]
    assert [e.step for e in events.Images("samples")] == [5, 10]
    # 4 samples of 8 px, ×8, one column per class drawn, class names over them: the same picture in both places.
    grid = np.asarray(Image.open(sorted((trained_run / "samples").glob("*.png"))[-1]))
    assert grid.shape[1] == 4 * 66 + 2 and grid.shape[0] > 66 + 2 + 14
    assert (events.Images("samples")[-1].width, events.Images("samples")[-1].height) == (grid.shape[1], grid.shape[0])
    assert (trained_run / "tensorboard" / "hparams.yaml").read_text().count("model/params/total") == 1


def test_checkpoints_hold_the_ema_average_beside_the_raw_weights(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    changed = [k for k in raw if not torch.equal(ema[k], raw[k])]
    assert len(changed) > len(raw) // 2, "the EMA weights are the raw weights"


def _ckpt(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical weights (the EMA average is `state_dict`), raw weights, EMA state and optimizer state."""
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for i, state in opt_a["state"].items():
            assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in state.items()), f"optimizer state of {i}"
    assert a["global_step"] == b["global_step"]


# Two DataLoader workers and a random pipeline: order, augmentations, timesteps, noise and label dropout all draw.
RESUMABLE = [*TINY, "data.num_workers=2", "augment=geometric"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config("train", RESUMABLE, run_dir))
    return _ckpt(run_dir)


@pytest.mark.parametrize("stop", [5, 3], ids=["at an epoch boundary", "mid-epoch"])
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(uninterrupted, tmp_path, stop):
    """Five batches an epoch: stopping at step 5 ends epoch 0, stopping at step 3 leaves two of its batches."""
    train(compose_config("train", [*RESUMABLE, f"trainer.max_steps={stop}"], tmp_path / "first"))
    resume = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*RESUMABLE, f"ckpt_path={resume}"], tmp_path / "resumed"))
    _assert_same_state(_ckpt(tmp_path / "resumed"), uninterrupted)
    steps = [e.step for e in _events(tmp_path / "resumed").Scalars("loss/train")]
    assert steps and min(steps) >= stop, f"the resumed run logged steps {steps} from before the checkpoint"


def test_best_checkpoint_ranks_every_validation_the_last_one_included(tmp_path, trained_run):
    # Ranked by the step itself, the final validation is the best one by construction.
    ranking = ["callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=max"]
    train(compose_config("train", [*TINY, *ranking], tmp_path))
    assert [p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt")] == ["best-epoch0001-step0000010.ckpt"]
    # By loss/val (the default), the best file holds the lowest validation loss that was logged.
    (best,) = (trained_run / "checkpoints").glob("best-*.ckpt")
    logged = {e.step + 1: e.value for e in _events(trained_run).Scalars("loss/val")}
    assert _global_step(best) == min(logged, key=logged.get)


def test_best_score_carries_across_a_resume_into_a_new_run_dir(tmp_path):
    # Ranked by the lowest step, nothing after the first validation can be better.
    ranking = ["callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min"]
    train(compose_config("train", [*TINY, *ranking, "trainer.max_steps=5"], tmp_path / "first"))
    resume = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(compose_config("train", [*TINY, *ranking, f"ckpt_path={resume}"], tmp_path / "resumed"))
    assert not list((tmp_path / "resumed" / "checkpoints").glob("best-*.ckpt")), "a worse model was saved as best"
    (state,) = (v for k, v in _ckpt(tmp_path / "resumed")["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["best_model_score"] == 5 and Path(state["best_model_path"]).parent.parent == tmp_path / "first"
    assert (tmp_path / "first" / "checkpoints" / "best-epoch0000-step0000005.ckpt").is_file()


def test_precision_16_falls_back_to_bf16_on_cpu(tmp_path, caplog):
    assert resolve_precision("bf16-mixed") == "bf16-mixed"
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where precision=16 runs float16")
    cfg = compose_config("train", [*TINY, "trainer.precision=16", "trainer.max_steps=3"], tmp_path)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "trainer.precision=16: no CUDA device here, so training runs bf16-mixed instead" in caplog.text
    assert _global_step(tmp_path / "checkpoints" / "last.ckpt") == 3


def test_gradient_checkpointing_trains(tmp_path):
    cfg = compose_config("train", [*TINY, "model.gradient_checkpointing=true", "trainer.max_steps=3"], tmp_path)
    train(cfg)
    assert _global_step(tmp_path / "checkpoints" / "last.ckpt") == 3


def test_a_run_ending_inside_its_first_epoch_draws_no_sample_grid(tmp_path, caplog):
    """A smoke test of a large model must not spend minutes sampling; a run past its first epoch still draws."""
    with caplog.at_level(logging.INFO):
        train(compose_config("train", [*TINY, "trainer.max_steps=3"], tmp_path / "short"))
    assert not list((tmp_path / "short" / "samples").glob("*.png")) and "no final sample grid" in caplog.text
    train(compose_config("train", [*TINY, "trainer.max_steps=7", "callbacks.sample_grid.every_n_epochs=5"],
                         tmp_path / "longer"))
    assert [p.name for p in (tmp_path / "longer" / "samples").glob("*.png")] == ["epoch0001-step0000007.png"]


def test_a_run_shorter_than_min_steps_skips_the_extras_and_draws_a_quick_final_grid(tmp_path, caplog, monkeypatch):
    """A 10-step run (two epochs) with the extras' own min_steps (500): no grid and no metrics at its epochs, one
    final grid with 10 sampler steps (not the model's 4 here: the option is the grid's), each extra saying so."""
    calls = []
    sample = GenerativeModule.sample
    monkeypatch.setattr(GenerativeModule, "sample", lambda model, n, **kw: calls.append(kw) or sample(model, n, **kw))
    overrides = [*TINY, "callbacks.sample_grid.min_steps=500", "callbacks.metrics.min_steps=500",
                 "~callbacks.sample_grid.steps"]
    with caplog.at_level(logging.INFO):
        train(compose_config("train", overrides, tmp_path))
    assert [call.get("steps") for call in calls] == [10]  # the final grid only
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["epoch0001-step0000010.png"]
    assert "val/swd" not in _events(tmp_path).Tags()["scalars"]
    assert "sample metrics: none before step 500 (callbacks.metrics.min_steps; now at step 5)" in caplog.text
    assert "sample grid: drawing 4 samples with 10 sampler steps" in caplog.text


def test_the_extras_say_what_they_draw_and_how_long_it_took(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train(compose_config("train", TINY, tmp_path))
    assert caplog.text.count("sample grid: drawing 4 samples…") == 2
    assert caplog.text.count("sample metrics: drawing 16 samples, measuring swd, memorisation…") == 2
    assert re.search(r"sample metrics: swd [\d.]+, memorisation [\d.]+ in [\d.]+ s", caplog.text)


def hparams_session(run_dir: Path, name: str = "") -> tuple[dict, int | None, set[str]]:
    """A run's HPARAMS row as TensorBoard reads it (`name`: a sweep job's run): its parameters, its end status, and
    its hparams summary tags."""
    events = EventAccumulator(str(run_dir / "tensorboard" / name))
    events.Reload()
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    params = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    end = content.get(hparams_metadata.SESSION_END_INFO_TAG)
    return params, hparams_metadata.parse_session_end_info_plugin_data(end).status if end else None, set(content)


def test_multirun_sweep_writes_one_run_dir_per_job_each_a_row_of_hparams_named_by_its_overrides(tmp_path):
    overrides = [*TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2", "optimized_metric=loss/val"]
    # Keys of neither the model nor the loss get their HPARAMS columns too, as typed on the command line.
    others = ["data.val_fraction=0.1,0.2", "callbacks.metrics.every_n_epochs=3", "seed=7"]
    result = run_script("train.py", "-m", *overrides, *others, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for job, fraction in (("0", 0.1), ("1", 0.2)):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file()
        assert f"data.val_fraction={fraction}" in (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        # TensorBoard names the job's run by what it changed: `0/tensorboard/data.val_fraction=0.1`.
        name = f"data.val_fraction={fraction}"
        assert [p.name for p in (tmp_path / job / "tensorboard").iterdir()] == [name]
        params, status, tags = hparams_session(tmp_path / job, name)
        assert params["data.val_fraction"] == pytest.approx(fraction)
        assert params["seed"] == 7 and params["model"] == "ddpm" and params["model/denoiser"] == "context_unet"
        assert params["model.lr"] == pytest.approx(1e-3) and params["model.schedule"] == "cosine"
        assert params["data.batch_size"] == 16 and params["data.image_size"] == 8 and params["augment"] == "none"
        assert params["trainer.precision"] == "32-true" and params["effective_batch_size"] == 16
        assert params["model.denoiser.channel_mults"] == "[1, 2]" and params["model/params/total"] > 0
        assert params["callbacks.metrics.every_n_epochs"] == 3
        # No experiment summary: TensorBoard would take every run's columns from one of them.
        assert status == hparams_api.STATUS_SUCCESS and hparams_metadata.EXPERIMENT_TAG not in tags
        # HPARAMS shows the last value of each scalar of the run: loss/val's is the value train.py returned.
        events = _events(tmp_path / job, name)
        assert [e.step for e in events.Scalars("loss/val")] == [1]  # no extra point at step 0
        record = json.loads((tmp_path / job / "job.json").read_text())
        assert record["value"] == pytest.approx(events.Scalars("loss/val")[-1].value)
        # TensorBoard shows groups in the order of their names: the losses first.
        assert sorted({tag.split("/")[0] for tag in events.Tags()["scalars"]})[0] == "loss"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=folder"], "error: data.root is not set: pass data.root=DIR, a folder of images"),
        (["data.image_size=9"], "error: data.image_size=9 does not fit ContextUNet"),
    ],
)
def test_bad_input_is_one_line_error_from_the_script(tmp_path, overrides, message):
    result = run_script("train.py", *TINY, *overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt is not a file"),
        (["data=folder", "data.root=/no/such/dir"], "data.root=/no/such/dir is not a folder"),
        (["data.channels=2"], "data.channels=2 must be 1 (grayscale) or 3 (RGB)"),
        (["model.schedule=quadratic"], "model.schedule='quadratic' is not known"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, overrides, message):
    cfg = compose_config("train", [*TINY, *overrides], tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_task(train, cfg)
    assert message in str(exc.value)
    assert not (tmp_path / "checkpoints").exists()
