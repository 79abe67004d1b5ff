"""Evaluation of predictions: Dice per class, pictures for people."""
