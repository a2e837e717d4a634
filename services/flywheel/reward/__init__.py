"""Reward service: scores (prompt, completion) batches; takes versioned reward-model pushes."""
