"""Feedback service: durable, idempotent, authenticated ingestion of user feedback."""
