"""``DataConfig``: the data fields every trainer shares (what conditions, which real images), validated."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Values of ``DataConfig.data``.
DATA_SOURCES = ("digits", "uniform_labels", "unconditional", "prompts", "dataset")
#: The sources that come with real images.
IMAGE_SOURCES = ("digits", "dataset")


@dataclass
class DataConfig:
    """Where conditions (and real images) come from; a trainer config inherits these fields.

    Example:
        >>> DataConfig(data="prompts", prompts="prompts.txt")
    """

    data: str = field(
        default="digits",
        metadata={"help": "Conditions / real images: digits | uniform_labels | unconditional | prompts | dataset."},
    )
    prompts: str | None = field(
        default=None, metadata={"help": "data=prompts: a .txt file (one prompt per line), csv/json/parquet, or a "
                                        "save_to_disk folder."}
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (default: prompt/text/caption)."})
    dataset: str | None = field(
        default=None, metadata={"help": "data=dataset: an image folder (imagefolder), csv/json with image paths, or "
                                        "a save_to_disk folder (real images for the GAN / noised inputs)."}
    )
    data_split: str = field(default="train", metadata={"help": "Split of a multi-split dataset."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image/file_name/...)."})
    caption_column: str | None = field(
        default=None, metadata={"help": "Caption column for text teachers (default: prompt/text/caption)."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Class-label column (default: label/class)."})
    num_classes: int = field(default=10, metadata={"help": "Classes for data=uniform_labels."})
    null_class_label: int = field(default=10, metadata={"help": "The teacher's null class (CFG on labels)."})

    def __post_init__(self) -> None:
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {list(DATA_SOURCES)}, got {self.data!r}.")
        if self.data == "prompts" and not self.prompts:
            raise ValueError("data=prompts needs --prompts <file.txt | csv/json/parquet | save_to_disk folder>.")
        if self.data == "dataset" and not self.dataset:
            raise ValueError("data=dataset needs --dataset <image folder | csv/json | save_to_disk folder>.")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")

    @property
    def has_images(self) -> bool:
        """Whether this data source comes with real images."""
        return self.data in IMAGE_SOURCES


__all__ = ["DATA_SOURCES", "IMAGE_SOURCES", "DataConfig"]
