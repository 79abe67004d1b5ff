"""Network architectures that nnU-Net builds from the plans' dotted class path."""
