"""Domain exceptions raised by the engine; the web layer maps them to HTTP codes."""


class PatchCoreError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidImage(PatchCoreError):
    """The bytes are not a decodable image (or are truncated)."""


class ImageTooLarge(PatchCoreError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


class BackboneUnavailable(PatchCoreError):
    """Pretrained weights for a backbone cannot be found; never fall back to random weights."""


class UnknownBackbone(PatchCoreError):
    """No backbone of that name is registered."""


class BankCorrupt(PatchCoreError):
    """A bank on disk is missing files, truncated, or fails its checksums."""


class BankIncompatible(PatchCoreError):
    """A bank was written by an incompatible format version or for another backbone setup."""


class NotEnoughImages(PatchCoreError):
    """Too few nominal images to build and calibrate a bank."""


class BuildCancelled(PatchCoreError):
    """A bank build was cancelled by its caller."""
