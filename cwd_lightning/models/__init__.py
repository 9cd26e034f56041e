"""Segmentation networks built here (the smp and torchvision ones are built by their libraries)."""
