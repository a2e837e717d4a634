"""Generator service: serves the policy, logs production completions, takes versioned weight pushes."""
