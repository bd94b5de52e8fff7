"""The submitit plugin's SLURM config under a second name, which conf/hydra/launcher/submitit_slurm.yaml extends.

A config in our conf/ shadows the plugin's own of the same name, so it cannot name that one as its base (it would
name itself); under this name it can, and it keeps the plugin's schema, so a mistyped option is an error.
"""

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

ConfigStore.instance().store(
    group="hydra/launcher", name="submitit_slurm_schema", node=SlurmQueueConf, provider="fiberaug"
)
