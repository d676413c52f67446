"""Masked diffusion: on-device corruption (`corruption`), training losses (`losses`) and samplers."""
