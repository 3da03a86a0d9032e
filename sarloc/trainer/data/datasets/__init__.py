"""Public SAR-optical datasets read in their published folder layouts (torch-free).

``open_dataset("sen12ms", root, split=...)`` lists a dataset's pairs (paths only), reads a pair on demand,
normalised as scene folders are (:mod:`sarloc.core.scene`: SAR on a log scale, optical about [0, 1]), and streams
random pairs sharded by rank. :func:`training_data` serves them to the trainer (``sarloc train --dataset``).
See ``docs/trainer.md`` ("Training on public datasets") for the layouts.

==============  ==========================================================  ==================================
name            layout (under ROOT)                                         source
==============  ==========================================================  ==================================
``sen1-2``      ``ROIs1158_spring/s1_1/*_s1_1_p1.png`` + ``s2_1/``          Schmitt et al. 2018
``sen12ms``     ``ROIs1158_spring[_s1]/s1_1/*_s1_1_p30.tif`` + ``s2_1/``    Schmitt et al. 2019
``qxs-saropt``  ``sar_256_oc_0.2/<n>.png`` + ``opt_256_oc_0.2/<n>.png``     Huang et al. 2021
``osdataset``   ``[256|512/]train/sar<n>.png`` + ``opt<n>.png``             Xiang et al. 2020
``sar2opt``     ``trainA/`` (SAR) + ``trainB/`` (optical), ``testA/B``      Zhao et al. 2022
``spacenet6``   ``AOI_11_Rotterdam/SAR-Intensity/`` + ``PS-RGB/``           Shermeyer et al. 2020
==============  ==========================================================  ==================================
"""

from sarloc.trainer.data.datasets.base import Layout, PairSample, PairSource
from sarloc.trainer.data.datasets.registry import (
    LAYOUTS,
    DatasetSpec,
    canonical_name,
    detect_dataset,
    open_dataset,
    open_spec,
    parse_dataset_spec,
)
from sarloc.trainer.data.datasets.training import MixedSampler, training_data

__all__ = [
    "LAYOUTS",
    "DatasetSpec",
    "Layout",
    "MixedSampler",
    "PairSample",
    "PairSource",
    "canonical_name",
    "detect_dataset",
    "open_dataset",
    "open_spec",
    "parse_dataset_spec",
    "training_data",
]
