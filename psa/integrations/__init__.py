"""Integrations of psa into model libraries (`psa.integrations.diffusers`, `psa.integrations.transformers`)."""
