"""Datasets, transforms, samplers and loaders."""

from ffdist.data.loader import BatchPlan, DevicePrefetcher, Loaders, build, plan_batches

__all__ = ["BatchPlan", "DevicePrefetcher", "Loaders", "build", "plan_batches"]
