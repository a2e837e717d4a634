"""`flywheel demo`: simulated users with a hidden preference drive the whole online-RLHF loop."""
