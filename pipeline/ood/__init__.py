"""Inputs outside the subtask: scores, threshold calibration, metrics, outlier exposure, report section.
The numpy scoring and metrics live in device_tests.ood (the device applies them without torch)."""
