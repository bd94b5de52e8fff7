"""TensorBoard as FiberAug writes it: every run a row of the HPARAMS tab, and the loss curves first."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pytorch_lightning import loggers
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoard logger, changed in three ways for comparing runs.

    - `log_hyperparams` also starts an HPARAMS session with the parameters as its columns. It writes no
      experiment summary, as Lightning's `log_hyperparams(params, metrics)` would: TensorBoard takes the
      columns from one arbitrary run's experiment summary, hiding those only other runs have, and Lightning
      writes each metric as a point at step 0. From sessions alone TensorBoard joins every run's columns and
      shows each of the run's scalars as a metric column, with its last value (`loss/val`, evaluation metrics).
    - `finalize` ends the session with the run's status (success or failure), which HPARAMS filters by.
    - Lightning's `epoch` counter is written as `train/epoch`: TensorBoard orders its groups by name, and the
      first group is then `loss/`.
    """

    @rank_zero_only
    def log_hyperparams(
        self, params: Mapping[str, Any], metrics: dict[str, Any] | None = None, step: int | None = None
    ) -> None:
        super().log_hyperparams(params, metrics, step)
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for name, value in params.items():
            if isinstance(value, bool):
                start.hparams[name].bool_value = value
            elif isinstance(value, (int, float)):
                start.hparams[name].number_value = value
            else:
                start.hparams[name].string_value = str(value)
        self._write(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({"train/epoch" if k == "epoch" else k: v for k, v in metrics.items()}, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None and self._experiment.file_writer is not None:
            end = plugin_data_pb2.SessionEndInfo(
                status=api_pb2.STATUS_SUCCESS if status == "success" else api_pb2.STATUS_FAILURE,
                end_time_secs=time.time(),
            )
            self._write(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))
        super().finalize(status)

    def _write(self, tag: str, data: plugin_data_pb2.HParamsPluginData) -> None:
        value = Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))
        self.experiment.file_writer.add_summary(Summary(value=[value]))
