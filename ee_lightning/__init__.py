"""ee-lightning: early-exit inference for transformer language models (ConsistentEE and baselines)."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """A saved early-exit model folder (`<run>/model/`): an `EarlyExitClassifier` (encoders, `predict`) or
    an `EarlyExitGenerator` (decoders, `generate`). See `ee_lightning.pretrained`."""
    # Imported on use: `import ee_lightning` (the CLI, the config schemas) stays free of torch and transformers.
    from ee_lightning.pretrained import load as load_folder

    return load_folder(path, device)
