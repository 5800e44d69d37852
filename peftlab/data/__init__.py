"""peftlab data pipeline."""

from peftlab.data.datamodule import PeftDataModule

__all__ = ["PeftDataModule"]
