"""Evaluate generated images: `python evaluate.py ckpt_path=PATH` or `real_dir=DIR fake_dir=DIR` (conf/evaluate.yaml).

`task=utility` measures whether they help a small classifier trained on a few real images per class.
"""

import hydra
from omegaconf import DictConfig

from fiberaug.tasks import run_task
from fiberaug.tasks.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_task(evaluate, cfg)


if __name__ == "__main__":
    main()
