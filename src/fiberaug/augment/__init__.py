"""Batch augmentation of an image folder (`augment.py`): planning and seeding, the per-image worker,
annotations, the manifest and run file that make a run auditable, resumable and replayable.
"""
