"""Data for training and evaluation: the digits world, prompt files, local datasets, condition sources.

* :mod:`.config` -- :class:`DataConfig`, the validated data fields of every trainer;
* :mod:`.sources` -- :class:`ConditionSource` and its kinds (digits, labels, prompts, datasets), with subsets;
* :mod:`.prompts` -- prompt files and the teacher-pipeline :class:`PromptEncoder`;
* :mod:`.datasets` -- :func:`open_dataset`, shared with the evaluation command;
* :mod:`.digits` / :mod:`.digits_models` -- the embedded digits world;
* :mod:`.digits_text` -- the text-conditioned digits world's captions and generated CLIP tokenizer.
"""

from .config import DATA_SOURCES, DataConfig
from .datasets import DataSourceError, open_dataset
from .prompts import PromptEncoder, load_prompts
from .sources import (
    ConditionSource,
    DatasetSource,
    DigitsSource,
    PromptSource,
    UnconditionalSource,
    UniformLabelSource,
    make_data_source,
)

__all__ = [
    "DATA_SOURCES",
    "ConditionSource",
    "DataConfig",
    "DataSourceError",
    "DatasetSource",
    "DigitsSource",
    "PromptEncoder",
    "PromptSource",
    "UnconditionalSource",
    "UniformLabelSource",
    "load_prompts",
    "make_data_source",
    "open_dataset",
]
