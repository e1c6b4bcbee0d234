"""Workflow services: the worker processes (replicas) that run workflows."""
