"""Building the model family: train, distill, quantize, prune, export, evaluate."""
