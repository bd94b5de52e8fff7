"""Sample images from a trained model: `python sample.py ckpt_path=PATH num_samples=N` (see conf/sample.yaml)."""

import hydra
from omegaconf import DictConfig

from fiberaug.tasks import run_task
from fiberaug.tasks.sample import sample


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_task(sample, cfg)


if __name__ == "__main__":
    main()
