"""Augment every image of a folder: `python augment.py input_dir=DIR output_dir=DIR augment=photometric copies=4`.

See conf/batch/augment.yaml. The exit code is 1 when any image failed (the summary and the manifest say which).
"""

import hydra
from omegaconf import DictConfig

from fiberaug.tasks import run_task
from fiberaug.tasks.augment import augment


@hydra.main(version_base="1.3", config_path="conf/batch", config_name="augment")
def main(cfg: DictConfig) -> None:
    raise SystemExit(run_task(augment, cfg).exit_code)


if __name__ == "__main__":
    main()
