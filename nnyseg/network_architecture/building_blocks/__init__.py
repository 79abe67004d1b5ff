"""Small named blocks shared by the nnyseg architectures."""
