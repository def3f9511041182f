"""Explanations on the build machine (never on the device): LRP heatmaps of the logit gap for teacher and student,
their agreement, and pixel-flipping faithfulness. zennit and matplotlib are imported where used."""
