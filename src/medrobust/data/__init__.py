"""Medical data in: MedMNIST, DICOM, NIfTI, image folders and built-in phantoms."""

from medrobust.data.base import TASKS, ImageData

__all__ = ["ImageData", "TASKS"]
