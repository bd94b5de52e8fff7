"""The training task: data, model, callbacks, loggers and trainer composed from the Hydra config."""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from fiberaug.console import quiet_lightning, summarise
from fiberaug.errors import UserError
from fiberaug.runs import Run, find_last_checkpoint, identifying
from fiberaug.tasks.trainer_options import build_trainer, check_trainer_options

log = logging.getLogger(__name__)

# FiberAug's DataModules resume inside an epoch themselves (their state_dict), which this warning cannot see.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
quiet_lightning()

# Besides the model's and the loss's options, what HPARAMS shows of the data.
HPARAMS_DATA_KEYS = ("image_size", "channels", "batch_size", "resize_policy", "crop_scale", "labels")


def resolve_precision(precision: str | int) -> str | int:
    """`16` means float16 mixed precision, which needs CUDA; elsewhere run bf16-mixed and say so once."""
    if str(precision) not in ("16", "16-mixed"):
        return precision
    if torch.cuda.is_available():
        return "16-mixed"
    log.warning("trainer.precision=%s: no CUDA device here, so training runs bf16-mixed instead", precision)
    return "bf16-mixed"


def loss_option(cfg: DictConfig) -> dict[str, Any]:
    """`{"loss": cfg.loss}` for a model that takes a loss (a GAN); a loss for any other model is refused."""
    if cfg.get("loss") is None:
        return {}
    if "loss" not in inspect.signature(get_class(cfg.model._target_)).parameters:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        loss, model = choices.get("loss", cfg.loss.get("name")), choices.get("model", cfg.model._target_)
        raise UserError(f"loss={loss} applies to model=gan only; model={model} has no loss option")
    return {"loss": cfg.loss}


#: What a preset writes for an option the user must pass (OmegaConf's `???` would not survive the merge over a default).
REQUIRED = "<required>"


def check_required(cfg: DictConfig) -> None:
    """Options a preset leaves to the user, refused in one line that says what to pass."""
    if cfg.model.get("autoencoder") == REQUIRED:
        raise UserError(
            "model.autoencoder is not set: pass model.autoencoder=PATH, an AutoencoderKL folder (train one with "
            "experiment=fibres128_autoencoder, or an SD download's vae/)"
        )


def current_run(cfg: DictConfig) -> Run:
    """This run's folder and the command-line overrides that identify it."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return Run(Path(cfg.paths.output_dir), identifying(overrides))


def is_sweep_job() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def checkpoint_path(cfg: DictConfig, run: Run) -> Path | None:
    """`ckpt_path` as a file: `last` is the newest `last.ckpt` of an earlier run with the same overrides."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last":
        return find_last_checkpoint(Path(cfg.paths.log_dir) / cfg.task_name / "runs", run)
    if ckpt_path and not Path(ckpt_path).is_file():
        raise UserError(
            f"ckpt_path={ckpt_path} is not a file; pass a run's checkpoints/last.ckpt to resume, or ckpt_path=last"
        )
    if ckpt_path:
        try:  # mapped, not read: only the file's structure is checked here
            torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch's own text is meant for pickles it refuses, and says to file an issue
            raise UserError(
                f"ckpt_path={ckpt_path} is not a checkpoint torch can read ({type(exc).__name__}); pass a run's "
                "checkpoints/last.ckpt to resume, or ckpt_path=last"
            ) from exc
    return Path(ckpt_path) if ckpt_path else None


def build_callbacks(configs: DictConfig | None) -> list[pl.Callback]:
    """The configured callbacks. An entry with options but no `_target_` is one that the model's config removed (set
    to null) and a later config gave options again (`debug=fast` tunes `callbacks.metrics`, which `model=autoencoder`
    removes): it stays removed, and the log says so."""
    callbacks = []
    for name, config in (configs or {}).items():
        if config and "_target_" not in config:
            log.info("callbacks.%s has options but no _target_ (removed by the model's config): not used", name)
        elif config:
            callbacks.append(instantiate(config))
    return callbacks


def declared_metrics(model: pl.LightningModule, callbacks: list[pl.Callback]) -> list[str]:
    """The names the model and the callbacks say they log (their `metric_names`)."""
    return [name for source in (model, *callbacks) for name in getattr(source, "metric_names", ())]


def check_optimized_metric(name: str | None, declared: list[str]) -> None:
    if name is not None and name not in declared:
        raise UserError(
            f"optimized_metric={name} is not logged by this run, which logs: {', '.join(declared) or 'nothing'} "
            "(evaluation metrics come from their callback); set one of those, or optimized_metric=null"
        )


def optimized_value(trainer: pl.Trainer, name: str | None) -> float | None:
    if name is None:
        return None
    value = trainer.callback_metrics.get(name)
    if value is None:
        raise UserError(
            f"optimized_metric={name} was never logged in this run (did a validation or evaluation run? see "
            "data.val_fraction, trainer.limit_val_batches, callbacks.metrics.every_n_epochs and min_steps), so there "
            "is no value to return; the checkpoints are kept"
        )
    return float(value)


def strategy_option(trainer_cfg: DictConfig, model: pl.LightningModule) -> dict[str, Any]:
    """A DDP strategy for a manually optimised model (the GAN) with `find_unused_parameters=True`.

    Each of its backward passes reaches one network only (the other one is frozen by `toggled_optimizer`), and
    without it DDP's reducer would wait for the frozen network's gradients.
    """
    strategy = trainer_cfg.get("strategy")
    if model.automatic_optimization or not isinstance(strategy, DictConfig):
        return {}
    if not issubclass(get_class(strategy._target_), DDPStrategy):
        return {}
    return {"strategy": instantiate(strategy, find_unused_parameters=True)}


def refuse_relaunch_in_sweep(trainer: pl.Trainer) -> None:
    """Lightning starts DDP's other local processes by running the command again: inside `-m`, the whole sweep.

    Processes started by the cluster (SLURM tasks, torchrun) are not started again, and are fine.
    """
    launcher = trainer.strategy.launcher
    relaunches = isinstance(launcher, _SubprocessScriptLauncher)
    if relaunches and not launcher.cluster_environment.creates_processes_externally:
        raise UserError(
            f"trainer.devices={trainer.num_devices} with DDP inside a -m sweep: Lightning would start each further "
            "process by running the whole sweep again; train DDP runs one command at a time, or sweep on SLURM with "
            "hydra/launcher=submitit_slurm (one task per GPU, hydra.launcher.tasks_per_node=GPUs)"
        )


def _plain(value: Any) -> Any:
    """A value as TensorBoard's HPARAMS takes it: a number, a bool or a string."""
    if isinstance(value, (ListConfig, DictConfig)):
        return str(OmegaConf.to_container(value, resolve=True))
    return "none" if value is None else value


def _flat(node: DictConfig | None, prefix: str) -> dict[str, Any]:
    """Every option below `node`, named by its path (`model.denoiser.base_channels`), `_target_` and such left out."""
    flat: dict[str, Any] = {}
    for key, value in (node or {}).items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, DictConfig):
            flat |= _flat(value, f"{prefix}.{key}")
        else:
            flat[f"{prefix}.{key}"] = _plain(value)
    return flat


def hyperparameters(cfg: DictConfig, model: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
    """One flat row for TensorBoard's HPARAMS, named as typed on the command line: the config groups chosen, every
    option of the model and the loss, the data's size and batch, precision, seed and scale, the parameter counts,
    and every override of the command (so that the keys a sweep varies always have a column)."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    params = {
        group: _plain(choice) for group, choice in choices.items()
        if group.split("/")[0] not in ("hydra", "paths", "logger", "callbacks")
    }
    params |= _flat(cfg.model, "model") | _flat(cfg.get("loss"), "loss")
    params |= {f"data.{key}": _plain(cfg.data.get(key)) for key in HPARAMS_DATA_KEYS}
    accumulate = trainer.accumulate_grad_batches
    params |= {
        "seed": _plain(cfg.get("seed")),
        "trainer.precision": str(trainer.precision),
        "trainer.max_steps": trainer.max_steps,
        "trainer.accumulate_grad_batches": accumulate,
        "world_size": trainer.world_size,
        "effective_batch_size": cfg.data.batch_size * trainer.world_size * accumulate,
        "model/params/trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "model/params/total": sum(p.numel() for p in model.parameters()),
    }
    for override in HydraConfig.get().overrides.task if HydraConfig.initialized() else ():
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in params:
            params[key] = _plain(choices[key] if key in choices else OmegaConf.select(cfg, key))
    return params


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(precision: str) -> None:
    """torch's float32 matmul precision for the whole process (TF32 on tensor-core GPUs from `high`)."""
    if precision not in MATMUL_PRECISIONS:
        raise UserError(f"matmul_precision={precision!r} is not known; choose one of: {', '.join(MATMUL_PRECISIONS)}")
    torch.set_float32_matmul_precision(precision)


def train(cfg: DictConfig) -> float | None:
    """Fit the configured model; returns the value of `cfg.optimized_metric` for sweepers.

    Each run records its overrides and, once done, its result in `job.json`. A sweep job (`-m`) whose folder records
    a result returns it without training, and one with a `last.ckpt` but no result resumes from it: running an
    interrupted sweep's command again completes it. A job that cannot return `optimized_metric` (it was never
    logged) is recorded as failed and returns None, which the sweep takes as a failure and goes on.
    """
    run = current_run(cfg)
    resume = None
    if is_sweep_job():
        finished, resume = run.sweep_state()
        if finished is not None:
            log.info("%s %s before: returning its result %s=%s", run.dir, finished["status"], finished["metric"],
                     finished["value"])
            return finished["value"]
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    set_matmul_precision(cfg.get("matmul_precision", "highest"))
    ckpt_path = resume or checkpoint_path(cfg, run)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)

    check_required(cfg)
    check_trainer_options(cfg.trainer, passed=("callbacks", "logger"))
    model_options = loss_option(cfg)
    # Plain containers: the DataModule's arguments go into checkpoints, which load with weights_only=True.
    datamodule = instantiate(cfg.data, augment=cfg.get("augment"), _recursive_=False, _convert_="all")
    datamodule.setup("fit")  # reads and checks the data, and finds the classes, before the model is built
    model = instantiate(
        cfg.model, image_size=datamodule.image_size, channels=datamodule.channels, class_names=datamodule.class_names,
        **model_options,
    )
    callbacks = build_callbacks(cfg.get("callbacks"))
    metric = cfg.get("optimized_metric")
    check_optimized_metric(metric, declared_metrics(model, callbacks))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: pl.Trainer = build_trainer(lambda: instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, precision=resolve_precision(cfg.trainer.precision),
        **strategy_option(cfg.trainer, model),
    ))
    if is_sweep_job():
        refuse_relaunch_in_sweep(trainer)
    if trainer.is_global_zero:
        run.write("running", resumed_from=str(ckpt_path) if ckpt_path else None)
    params = hyperparameters(cfg, model, trainer)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        summarise(trainer, run.dir)
    resumed_from = str(ckpt_path) if ckpt_path else None
    try:
        value = optimized_value(trainer, metric)
    except UserError as exc:
        if trainer.is_global_zero:
            run.write("failed", resumed_from=resumed_from, metric=metric, value=None, error=str(exc))
        if not is_sweep_job():
            raise
        # The sweep goes on: a grid sweeper ignores the value, Optuna records the trial as failed.
        log.error("job failed: %s", exc)
        return None
    if trainer.is_global_zero:
        run.write("finished", resumed_from=resumed_from, metric=metric, value=value)
    return value
