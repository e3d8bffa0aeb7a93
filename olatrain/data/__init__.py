"""Training data, in pipeline order: ``templates`` (conversation -> ids/labels), ``pixels`` (image ->
encoder pixels), ``dataset`` (samples + their targets), ``targets`` (the store join before step 1),
``sampler`` (rank r's samples at step s) and ``loader`` (collate + DataLoader). Nothing here imports the
model or any teacher."""

from olatrain.data.dataset import ConversationDataset, PackedStrings
from olatrain.data.errors import DataError
from olatrain.data.loader import build_dataloader, collate
from olatrain.data.pixels import load_image_processor, pad_to_square, processor_mean_color, run_processor
from olatrain.data.sampler import StepBatchSampler
from olatrain.data.targets import check_targets

__all__ = [
    "ConversationDataset",
    "DataError",
    "PackedStrings",
    "StepBatchSampler",
    "build_dataloader",
    "check_targets",
    "collate",
    "load_image_processor",
    "pad_to_square",
    "processor_mean_color",
    "run_processor",
]
