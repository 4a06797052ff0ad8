"""Framework integrations, each in its own module and imported only when used:

- :mod:`ckptrepo.integrations.lightning`: ``RepoCheckpointIO``, a Lightning ``CheckpointIO``
  plugin (needs ``lightning``);
- :mod:`ckptrepo.integrations.torch_dcp`: ``StorageWriter`` / ``StorageReader`` for
  ``torch.distributed.checkpoint`` (needs ``torch``).

``ckptrepo.CheckpointManager`` (Orbax's manager) and ``ckptrepo.Checkpoint`` (Ray AIR's
checkpoint) need no framework and live at the top level.
"""
