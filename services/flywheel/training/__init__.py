"""Offline training stages (SFT, reward model, DPO) with TRL's trainers, and data preparation.

The learner runs them inside the online loop on exported feedback; `flywheel train` runs them
step by step on a user's own data (the classic SFT → reward model → RL pipeline).
"""
