"""Inference tasks on `io.Volume`s in HU: one module each (synthesis, denoise, anomaly, ...).

`common` holds what they share: device and precision choice, model loading, body region, anatomy
condition, the sliding-window sampler set-up and the memory check.
"""
