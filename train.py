"""Train a FiberAug model: `python train.py model=ddpm data=folder data.root=DIR` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from fiberaug.tasks import run_task
from fiberaug.tasks.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg)


if __name__ == "__main__":
    main()
