"""What both sides of the store agree on: the join key, the annotation format and the image decoder.

``olacache`` builds store rows from these definitions and ``olatrain`` reads samples with them, so a sample
and its targets always refer to the same image and the same pixels (docs/method.md §8).
"""

from olacache.inputs.keys import image_set_fingerprint, normalize_image_path

__all__ = ["image_set_fingerprint", "normalize_image_path"]
