"""FiberAug's Hydra plugins. Hydra instantiates only sweepers and launchers it discovers in `hydra_plugins`."""
