"""Segmentation losses of the nnyseg methods, composable with nnU-Net's DeepSupervisionWrapper."""
