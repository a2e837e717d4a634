"""Learner service: PPO (and critic-free variants) over remote rollouts; pushes weights back."""
