"""Planning: nnU-Net's fingerprint-based planners adapted to the nnyseg architectures."""
