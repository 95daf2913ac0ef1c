"""Data and measurement: calibration and evaluation text and image-text data, perplexity / KL / top-1 evaluation,
multiple choice, generation through a decode graph."""
