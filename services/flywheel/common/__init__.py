"""Plumbing shared by every service: config, server bootstrap, auth, metrics, Redis, weights."""
