"""Orchestration: ``batch`` (GladPipeline: one reconstruction loop per batch) and ``stream`` (StepScheduler:
in-flight batching of images at different DDIM steps)."""
