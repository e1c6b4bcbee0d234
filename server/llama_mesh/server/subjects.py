"""Names of the work queues and topics the mesh uses on the message queue.

Deployment names and service ids are ``[A-Za-z0-9_-]`` tokens (validated with the YAML),
task ids are UUIDs, so every name below is a valid dot-separated subject.
"""

from __future__ import annotations


def task_queue(deployment: str, service_id: str) -> str:
    """The work queue of one workflow service (shared by its replicas)."""
    return f"{deployment}.{service_id}"


def events_topic(deployment: str, task_id: str) -> str:
    """The topic a task's events (and its final event) are published to."""
    return f"ev.{deployment}.{task_id}"


def inputs_topic(deployment: str, task_id: str) -> str:
    """The topic a running task reads human events and cancellation from."""
    return f"in.{deployment}.{task_id}"


def progress_topic(deployment: str) -> str:
    """The topic a deployment's (re)deploy progress lines are published to."""
    return f"progress.{deployment}"
